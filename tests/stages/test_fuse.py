"""Stage fuse: member weights chosen on the validation embeddings only, fused outputs in the embed stage's
layout, a model file that embeds like its members, members that embedded other faces refused."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from facesearch.data import manifest as M
from facesearch.faces.config import FaceConfig
from facesearch.nets import fused as FU
from facesearch.nets.contract import preprocessing_record
from facesearch.nets.models import get_model, load_model, save_model
from facesearch.retrieval.metrics import leave_one_out_metrics
from stages import fuse as S

SETS = ("query", "gallery", "val")


def write_member(folder, model_path, seed, dim, good: bool):
    """An embed-stage folder: 'good' members separate the people on every set, the other is noise."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for s, n_people in zip(SETS, (6, 6, 8), strict=True):
        labels = np.repeat(np.arange(n_people) + (100 if s == "val" else 0), 4)
        table = pd.DataFrame({M.CROP_PATH: [f"c/{s}{i}.jpg" for i in range(len(labels))],
                              M.FILE_NAME: [f"{s}{i}.jpg" for i in range(len(labels))],
                              M.IDENTITY: pd.array(labels, dtype="Int64")})  # fmt: skip
        table.to_parquet(folder / f"{s}.parquet")
        centres = rng.normal(size=(labels.max() + 1, dim))
        for state in ("before", "after"):
            emb = (centres[labels] if good else 0) + rng.normal(size=(len(labels), dim))
            np.save(folder / f"{state}_{s}.npy", emb.astype(np.float32))
    (folder / "threshold.json").write_text(json.dumps({"data": {"description": "val of x", "synthetic": True}}))
    torch.manual_seed(seed)
    net = get_model("mobilenet_v2", weights="none", embedding_dim=dim, img_size=24)
    save_model(model_path, net, extra={"preprocessing": preprocessing_record(FaceConfig(size=32), 24)})


@pytest.fixture
def run(tmp_path, repo_root):
    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    params["fusions"] = {"ab": {"members": ["a", "b"], "step": 0.25}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    write_member(tmp_path / "emb" / "a", tmp_path / "a.pt", 0, 8, good=True)
    write_member(tmp_path / "emb" / "b", tmp_path / "b.pt", 1, 6, good=False)

    def go():
        emb = tmp_path / "emb"
        S.main(["--name", "ab", "--models", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--embeddings",
                str(emb / "a"), str(emb / "b"), "--out", str(tmp_path / "ab.pt"), "--embeddings-out", str(emb / "ab"),
                "--params", str(tmp_path / "params.yaml")])  # fmt: skip

    return go


def test_fuse_chooses_on_validation_and_writes_the_embed_layout(run, tmp_path):
    run()
    out = tmp_path / "emb" / "ab"
    a, b = ({k: np.load(tmp_path / "emb" / m / f"{k}.npy") for k in ("after_val", "after_query", "before_gallery")}
            for m in "ab")  # fmt: skip
    val_labels = pd.read_parquet(tmp_path / "emb" / "a" / "val.parquet")[M.IDENTITY].to_numpy()
    brute = {w: leave_one_out_metrics(FU.fuse([a["after_val"], b["after_val"]], [w, 1 - w]), val_labels)["mAP"]
             for w in (0, 0.25, 0.5, 0.75, 1)}  # fmt: skip
    model, payload = load_model(tmp_path / "ab.pt")
    w = payload["fused"]["weights"]
    assert w[0] == max(brute, key=brute.get) >= 0.75  # the noise member gets little or nothing
    assert payload["fused"]["chosen"]["on"] == "validation identities"
    # Every set and state is the members' embeddings fused with those weights; the tables are theirs.
    for key in a:
        np.testing.assert_allclose(np.load(out / f"{key}.npy"), FU.fuse([a[key], b[key]], w), atol=1e-6)
    for s in SETS:
        assert pd.read_parquet(out / f"{s}.parquet").equals(pd.read_parquet(tmp_path / "emb" / "a" / f"{s}.parquet"))
    threshold = json.loads((out / "threshold.json").read_text())
    assert threshold == payload["threshold"] and threshold["identification"]["identities"] == 8
    assert threshold["data"]["identities"].startswith("validation")
    assert model.config.backbone == "fused" and model.config.embedding_dim == 14


def test_members_that_embedded_other_faces_are_refused(run, tmp_path):
    table = pd.read_parquet(tmp_path / "emb" / "b" / "query.parquet")
    table.loc[0, M.FILE_NAME] = "other.jpg"
    table.to_parquet(tmp_path / "emb" / "b" / "query.parquet")
    with pytest.raises(SystemExit, match="must embed the same faces"):
        run()
    assert not (tmp_path / "ab.pt").exists()
