"""``python -m facesearch fuse``: member weights chosen on validation people, a calibrated fused file that
embeds, indexes and searches like any model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from facesearch.data import manifest as M
from facesearch.faces.config import FaceConfig
from facesearch.faces.sheet import ChipSheet
from facesearch.gallery import build as XB
from facesearch.gallery import embedder as XE
from facesearch.gallery import store as X
from facesearch.nets import fused as FU
from facesearch.nets.contract import identities_record, model_preprocessing, preprocessing_record
from facesearch.nets.models import get_model, load_model, save_model
from facesearch.tools import fuse as F
from facesearch.tools.cli import main as cli


@pytest.fixture(scope="module")
def folder(sample_factory):
    return sample_factory(identities=8, images_per_identity=4, seed=4)


def member(path, seed, size, face, seen=()):
    torch.manual_seed(seed)
    model = get_model("mobilenet_v2", weights="none", embedding_dim=8, img_size=size, flip_tta=seed == 0)
    save_model(path, model, extra={"preprocessing": preprocessing_record(face, size),
                                   "identities": identities_record(seen, [])})  # fmt: skip
    return str(path)


@pytest.fixture
def members(tmp_path):
    return [member(tmp_path / "a.pt", 0, 32, FaceConfig(size=48)),
            member(tmp_path / "b.pt", 1, 24, FaceConfig(size=36, margin=0.05))]  # fmt: skip


def test_fuse_chooses_weights_on_the_validation_people_and_calibrates(folder, members, tmp_path, capsys):
    # A split of the folder: the fuse command may use its validation identities only.
    ids = sorted({int(i) for i in (folder / "identity_CelebA.txt").read_text().split()[1::2]})
    split = tmp_path / "split"
    split.mkdir()
    for name, part in (("train", ids[:2]), ("val", ids[2:7])):
        pd.DataFrame({M.IDENTITY: pd.array(part, dtype="Int64")}).to_parquet(split / f"{name}.parquet")
    out = tmp_path / "fused.pt"
    cli(["fuse", "--models", *members, "--out", str(out), "--data", str(folder), "--split", str(split),
         "--step", "0.25", "--n-jobs", "1", "--params", str(tmp_path / "none.yaml")])  # fmt: skip
    printed = capsys.readouterr().out
    assert "wrote" in printed and "gallery of 1,000,000 faces" in printed
    model, payload = load_model(out)
    chosen = payload["fused"]["chosen"]
    assert chosen["on"]["identities"] == "fuse --data --split (val identities)"
    assert f"5 people of {folder.name}" in chosen["on"]["description"]
    assert payload["fused"]["weights"] == chosen["weights"] and len(chosen["grid"]) == 5
    assert chosen["score"] == max(s for _, s in chosen["grid"])
    record = payload["threshold"]
    assert record["identification"]["identities"] == 5 and record["data"]["synthetic"] is True
    sheet, _ = model_preprocessing(payload)
    assert isinstance(sheet, ChipSheet) and model.config.embedding_dim == 16


def test_a_fused_model_indexes_and_searches_like_any(folder, members, tmp_path, capsys):
    out = tmp_path / "fused.pt"
    cli(["fuse", "--models", *members, "--out", str(out), "--weights", "3,1"])
    assert "no verdict calibrated yet" in capsys.readouterr().out
    _, payload = load_model(out)
    assert payload["fused"]["weights"] == pytest.approx([0.75, 0.25]) and "threshold" not in payload
    XB.build(str(out), str(folder / "img_celeba"), tmp_path / "idx")
    index = X.load_index(tmp_path / "idx")
    assert len(index.faces) > 0 and index.embeddings.shape[1] == 16
    # Each indexed face is the members' own embeddings of their own chips, fused.
    row = index.faces.iloc[0]
    from facesearch.data.images import decode_image
    from facesearch.faces.config import face_crop

    rgb = decode_image((folder / "img_celeba" / row[X.PHOTO]).read_bytes(), 40_000_000).rgb
    box = tuple(int(row[c]) for c in (X.BOX_X, X.BOX_Y, X.BOX_W, X.BOX_H))
    own = []
    for path in members:
        e = XE.Embedder.load(path)
        own.append(e.embed(face_crop(rgb, box, e.settings)[None]))
    np.testing.assert_allclose(index.embeddings[0], FU.fuse(own, [0.75, 0.25])[0], atol=3e-5)
    # search finds an indexed photo's own face first.
    cli(["search", "--index", str(tmp_path / "idx"), str(folder / "img_celeba" / row[X.PHOTO]), "--json"])
    import json

    first = json.loads(capsys.readouterr().out.splitlines()[0])
    assert first["results"][0]["similarity"] == pytest.approx(1, abs=1e-4)
    # The app searches it too, naming the fused model by its members; the query face is cut as a sheet.
    from facesearch.data.images import decode_image as decode
    from facesearch.gallery import app_core as A

    gallery = A.load_index_gallery(tmp_path / "idx")
    assert gallery.model_label == "MobileNet-V2 0.75 + MobileNet-V2 0.25 (fused)"
    image = decode((folder / "img_celeba" / row[X.PHOTO]).read_bytes(), 40_000_000)
    face = A.crop_face(image, box, gallery.settings)
    assert face.shape == (96, 96, 3)  # two cells of 48 px on a 2-wide grid
    answer = A.search(gallery, face)
    assert answer.results[0].similarity == pytest.approx(1, abs=1e-4)


def test_fuse_refuses_what_it_cannot_fuse(members, tmp_path, folder):
    with pytest.raises(SystemExit, match=r"^fuse: give either --data"):
        cli(["fuse", "--models", *members, "--out", str(tmp_path / "f.pt")])
    with pytest.raises(SystemExit, match=r"^fuse: --weights gives 1 numbers for 2 models"):
        cli(["fuse", "--models", *members, "--out", str(tmp_path / "f.pt"), "--weights", "1"])
    with pytest.raises(SystemExit, match=r"^fuse: a fused model needs two or more"):
        cli(["fuse", "--models", members[0], "--out", str(tmp_path / "f.pt"), "--weights", "1"])
    hog = member(tmp_path / "h.pt", 2, 24, FaceConfig(size=36, detector="dlib_hog"))
    with pytest.raises(SystemExit, match="share one detection"):
        cli(["fuse", "--models", members[0], hog, "--out", str(tmp_path / "f.pt"), "--weights", "1,1"])
    with pytest.raises(SystemExit, match=r"^fuse: .*nowhere.pt"):
        cli(["fuse", "--models", members[0], str(tmp_path / "nowhere.pt"), "--out", str(tmp_path / "f.pt"),
             "--weights", "1,1"])  # fmt: skip
    with pytest.raises(SystemExit, match="--step must divide 1"):
        cli(["fuse", "--models", *members, "--out", str(tmp_path / "f.pt"), "--weights", "1,1", "--step", "0.3"])
    assert not (tmp_path / "f.pt").exists()
    assert F.member_parts(np.ones((1, 4)) / 2, [2, 2], [0.5, 0.5])[0].shape == (1, 2)
