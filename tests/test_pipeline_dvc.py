"""DVC re-runs exactly what a change affects (in a temporary copy of the repository)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import dvc, repro, tiny_repo_copy, write_params

pytestmark = pytest.mark.slow


def set_param(repo: Path, dotted: str, value) -> None:
    write_params(repo / "params.yaml", {**flatten(yaml.safe_load((repo / "params.yaml").read_text())), dotted: value})


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_dvc_reruns_exactly_what_changed(repo_root, tmp_path):
    repo = tiny_repo_copy(repo_root, tmp_path / "repo")
    # A fused model of the two (params.yaml: fusions, empty by default) follows either member.
    set_param(repo, "fusions.resnet50_mobilenet_v2", {"members": ["resnet50", "mobilenet_v2"], "step": 0.5})
    fused = {"fuse@resnet50_mobilenet_v2", "evaluate_fused@resnet50_mobilenet_v2"}
    per_backbone = {f"{stage}@{b}" for stage in ("train", "embed", "evaluate") for b in ("resnet50", "mobilenet_v2")}
    per_backbone |= fused

    chips = {f"chips@{b}" for b in ("resnet50", "mobilenet_v2")}
    assert repro(repo) == {"sample", "crop", "split"} | chips | per_backbone
    assert repro(repo) == set()  # nothing changed, nothing runs
    # Each backbone's chips at its own img_size (32), not the chip size.
    assert np.load(repo / "data/arrays/resnet50/train.npy", mmap_mode="r").shape[1:] == (32, 32, 3)
    # The display crop is no model's input: crop re-runs, the manifest (boxes) stays, nothing else runs.
    set_param(repo, "crop.margin", 0.3)
    assert repro(repo) == {"crop"}
    # One backbone's cut re-runs its own branch only.
    set_param(repo, "chips.mobilenet_v2.margin", 0.3)
    mobilenet = {"chips@mobilenet_v2", "train@mobilenet_v2", "embed@mobilenet_v2", "evaluate@mobilenet_v2"}
    assert repro(repo) == mobilenet | fused
    # An unlisted block changes nothing; a listed backbone's img_size re-runs its branch only.
    set_param(repo, "train.dlib_resnet.img_size", 40)
    set_param(repo, "chips.dlib_resnet.size", 120)
    assert repro(repo) == set()
    set_param(repo, "train.mobilenet_v2.img_size", 40)
    assert repro(repo) == mobilenet | fused
    assert np.load(repo / "data/arrays/mobilenet_v2/train.npy", mmap_mode="r").shape[1:] == (40, 40, 3)
    assert np.load(repo / "data/arrays/resnet50/train.npy", mmap_mode="r").shape[1:] == (32, 32, 3)
    # Adding a backbone with another preprocessing adds its branch and re-runs, removes nothing else.
    before = {p: (repo / p).read_bytes() for p in ("models/resnet50.pt", "models/mobilenet_v2.pt",
                                                  "models/resnet50_mobilenet_v2.pt")}  # fmt: skip
    listed = (repo / "params.yaml").read_text()
    params = yaml.safe_load(listed)
    params["backbones"].append("extra")
    params["train"]["extra"] = {**params["train"]["mobilenet_v2"], "img_size": 24}
    params["chips"]["extra"] = {"align": "none", "size": 24, "margin": 0.0}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stale = json.loads(dvc(repo, "status", "--json"))
    assert set(stale) == {f"{s}@extra" for s in ("chips", "train", "embed", "evaluate")}, stale
    (repo / "params.yaml").write_text(listed)
    assert "Data and pipelines are up to date" in dvc(repo, "status")
    assert before == {p: (repo / p).read_bytes() for p in before}
    set_param(repo, "split.seed", 7)
    assert repro(repo) == {"split"} | chips | per_backbone
    set_param(repo, "train.resnet50.lr", 0.01)
    # The other backbone's branch is untouched.
    assert repro(repo) == {"train@resnet50", "embed@resnet50", "evaluate@resnet50"} | fused
    set_param(repo, "evaluate.backend", "ckdtree")
    assert repro(repo) == {"evaluate@resnet50", "evaluate@mobilenet_v2", "evaluate_fused@resnet50_mobilenet_v2"}
    set_param(repo, "sample.seed", 1)
    assert repro(repo) == {"sample", "crop", "split"} | chips | per_backbone
    # `dvc metrics show` prints the headlines: one narrow row per stage file, backbone and state,
    # short enough for a terminal (every key of every file once made ~190 columns).
    table = dvc(repo, "metrics", "show").splitlines()
    states = {f"metrics/{s}/{b}.json" for s in ("before", "after")
              for b in ("resnet50", "mobilenet_v2", "resnet50_mobilenet_v2")}  # fmt: skip
    assert {line.split()[0] for line in table[1:]} == {"metrics/crop.json", "metrics/split.json"} | states
    # Every headline key but those null here (DVC shows no column of nulls): a 1% FPIR needs 100
    # stranger searches, and this tiny run has a few.
    headline = {"Path", "n_input", "keep_rate", "queries", "gallery", "rank1", "mAP", "loo_mAP", "val_mAP",
                "tpir@fpir1e-2", "fpir", "fnir", "tar@far1e-3"}  # fmt: skip
    assert headline - {"tpir@fpir1e-2", "tar@far1e-3"} <= set(table[0].split()) <= headline, table[0]
    assert max(map(len, table)) <= 170, "\n".join(table)
    # The details are outputs beside them, read on demand: every metric, both states.
    shown = json.loads(dvc(repo, "metrics", "show", "--json", "metrics/details/resnet50.json"))
    details = shown[""]["data"]["metrics/details/resnet50.json"]["data"]
    assert {"rank5", "n_gallery", "loo_mAP", "val_mAP", "ver_auc"} <= set(details["after"])
    assert "rejected.no_face" in dvc(repo, "metrics", "show", "metrics/details/crop.json")
    # The outputs DVC tracks are git-ignored by DVC itself.
    ignored = (repo / "data" / ".gitignore").read_text()
    assert "/crops" in ignored and "/manifest.parquet" in ignored
