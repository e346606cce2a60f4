"""Fused models: the one fusion formula, weights chosen by a score, and a fused file that embeds
exactly what its members do on their own chips, saved, loaded and indexed like any model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from facesearch.faces.config import FaceConfig
from facesearch.faces.sheet import ChipSheet
from facesearch.nets import fused as FU
from facesearch.nets.contract import model_preprocessing, preprocessing_record
from facesearch.nets.inference import embed_array
from facesearch.nets.models import get_model, load_model, save_model
from facesearch.retrieval.metrics import leave_one_out_metrics

A = FaceConfig(size=40)  # member a: a square crop around the box, 40 px
B = FaceConfig(size=28, margin=0.05)  # member b: a tighter, smaller one


def test_fuse_is_the_weighted_mean_of_the_members_cosines():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 8)), rng.normal(size=(6, 5)) * 3  # lengths other than 1: fuse normalises
    f = FU.fuse([a, b], [3, 1])
    assert f.shape == (6, 13) and np.allclose(np.linalg.norm(f, axis=1), 1, atol=1e-6)
    ua, ub = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (a, b))
    assert np.allclose(f @ f.T, 0.75 * ua @ ua.T + 0.25 * ub @ ub.T, atol=1e-6)
    assert np.allclose(FU.fuse([a, b], [1, 0]), np.concatenate([ua, 0 * ub], 1), atol=1e-6)
    for bad in ([1, -1], [0, 0], [math.nan, 1]):
        with pytest.raises(ValueError, match="weights"):
            FU.fuse([a, b], bad)
    with pytest.raises(ValueError, match="same faces"):
        FU.fuse([a, b[:3]], [1, 1])


def test_choose_weights_is_the_best_of_the_grid():
    """One member knows the people, the other is noise: the weight goes to the first; brute force agrees."""
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(12), 4)
    centres = rng.normal(size=(12, 16))
    good = centres[labels] + 0.8 * rng.normal(size=(48, 16))
    noise = rng.normal(size=(48, 16))

    def score(e, y):
        return leave_one_out_metrics(e, y)["mAP"]

    chosen = FU.choose_weights([good, noise], labels, score, step=0.25)
    brute = {w: score(FU.fuse([good, noise], [w, 1 - w]), labels) for w in (0, 0.25, 0.5, 0.75, 1)}
    assert [w for w, _ in chosen["grid"]] == [[0.0, 1.0], [0.25, 0.75], [0.5, 0.5], [0.75, 0.25], [1.0, 0.0]]
    assert chosen["score"] == pytest.approx(max(brute.values()))
    assert chosen["weights"][0] == max(brute, key=brute.get) >= 0.75
    assert len(list(FU._compositions(10, 3))) == 66  # every 3-way split of 10 tenths


def test_a_sheet_holds_each_members_chip_in_its_cell():
    rgb = np.random.default_rng(2).integers(0, 256, (120, 100, 3), dtype=np.uint8)
    box = (20, 30, 50, 50)
    sheet = ChipSheet((A, B))
    assert (sheet.cell, sheet.size, sheet.regions()) == (40, 80, [(0, 0, 40), (0, 40, 28)])
    assert sheet.detector == A.detector and sheet.policy == A.policy  # the members' one detection
    cut = sheet.cut(rgb, box)
    from facesearch.faces.config import face_crop

    assert np.array_equal(cut[:40, :40], face_crop(rgb, box, A))
    assert np.array_equal(cut[:28, 40:68], face_crop(rgb, box, B))
    assert not cut[40:].any() and not cut[28:40, 40:].any()  # the rest is black
    assert ChipSheet((A, B, A)).size == 80 and ChipSheet((A,) * 5).size == 120  # 2x2, 3x3 cells
    with pytest.raises(ValueError, match="share one detection"):
        ChipSheet((A, FaceConfig(size=28, detector="dlib_hog")))
    with pytest.raises(ValueError, match="two or more"):
        ChipSheet((A,))


def member(seed: int, size: int, dim: int, flip: bool):
    torch.manual_seed(seed)
    return get_model("mobilenet_v2", weights="none", embedding_dim=dim, img_size=size, flip_tta=flip).eval()


@pytest.fixture(scope="module")
def fused_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("fused")
    nets = [member(0, 32, 16, True), member(1, 24, 8, False)]
    paths = []
    for i, (net, face) in enumerate(zip(nets, (A, B), strict=True)):
        paths.append(d / f"m{i}.pt")
        ids = {"train": [1, 2], "val": [3]} if i == 0 else {"train": [2, 5], "val": [6]}
        save_model(paths[-1], net, extra={"preprocessing": preprocessing_record(face, net.config.img_size),
                                          "identities": ids})  # fmt: skip
    loaded = [load_model(p) for p in paths]
    net, extra = FU.fused_payload([m for m, _ in loaded], [p for _, p in loaded], ["a", "b"], [0.7, 0.3],
                                  chosen={"on": "test"})  # fmt: skip
    out = d / "fused.pt"
    save_model(out, net, extra=extra)
    return out, paths


def test_a_fused_file_embeds_what_its_members_do_on_their_own_chips(fused_file):
    out, paths = fused_file
    model, payload = load_model(out)
    sheet, size = model_preprocessing(payload)
    assert isinstance(sheet, ChipSheet) and size == sheet.size == 80 and model.config.backbone == "fused"
    assert payload["fused"]["weights"] == pytest.approx([0.7, 0.3]) and payload["fused"]["chosen"] == {"on": "test"}
    assert [m["name"] for m in payload["fused"]["members"]] == ["a", "b"]
    # Everyone a member saw, train or val, is left out of its evaluation.
    assert payload["identities"]["train"] == [1, 2, 5] and payload["identities"]["val"] == [3, 6]
    rng = np.random.default_rng(3)
    photos = [rng.integers(0, 256, (90, 80, 3), dtype=np.uint8) for _ in range(5)]
    box = (15, 20, 45, 45)
    sheets = np.stack([sheet.cut(p, box) for p in photos])
    got = embed_array(model, sheets, size, torch.device("cpu"))
    own = []
    for path, face in zip(paths, (A, B), strict=True):
        net, _ = load_model(path)
        from facesearch.faces.config import face_crop

        chips = np.stack([face_crop(ph, box, face) for ph in photos])
        own.append(embed_array(net, chips, net.config.img_size, torch.device("cpu")))  # its own flip TTA
    np.testing.assert_allclose(got, FU.fuse(own, [0.7, 0.3]), atol=2e-5)
    assert got.shape == (5, 24) and np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)


def test_a_fused_model_cannot_be_a_member_and_crop_params_cannot_replace_its_chips(fused_file, repo_root):
    out, _ = fused_file
    model, payload = load_model(out)
    with pytest.raises(ValueError, match="itself a fused model"):
        FU.fused_payload([model, model], [payload, payload], ["x", "y"], [1, 1])
    from facesearch.nets.contract import crop_settings

    with pytest.raises(ValueError, match="fused model cuts"):
        crop_settings(payload, repo_root / "params.yaml", override=True)
