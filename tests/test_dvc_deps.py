"""Each stage's deps in dvc.yaml name exactly the package modules its script imports, transitively.

A module missing from deps means DVC would not re-run the stage when that module changes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from facesearch.faces.config import DETECTION_KEYS
from facesearch.provenance import module_closure


def test_stage_deps_match_imports(repo_root):
    stages = yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]
    for name, spec in stages.items():
        stage = spec.get("do", spec)  # a foreach stage's body
        scripts = [d for d in stage["deps"] if d.startswith("stages/")]
        assert len(scripts) == 1, name
        listed = {d for d in stage["deps"] if d.startswith("facesearch/")}
        # The same walk the train stage's resume key uses (facesearch/provenance.py).
        assert listed == set(module_closure(scripts[0], repo_root)) - {scripts[0]}, name


def test_each_backbone_branch_lists_its_own_params(repo_root):
    # chips@<b> and train@<b> read their own blocks and the detection they cut from, never another
    # backbone's: adding or changing one backbone re-runs no other branch.
    stages = yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]
    detection = {f"crop.{k}" for k in DETECTION_KEYS}
    assert set(stages["chips"]["params"]) == {"chips.${item.backbone}", "train.${item.backbone}.img_size"} | detection
    assert set(stages["train"]["params"]) >= {"chips.${item.backbone}", "train.${item.backbone}"} | detection
    assert not [p for p in stages["train"]["params"] if p in ("crop", "crop.size", "crop.margin", "chips")]


def test_no_stage_after_crop_hashes_a_photo_or_crop_folder(repo_root):
    # ~200k files at CelebA: every stage depending on a folder of them costs each `dvc status` a full walk.
    # The chips stage reads the photos, checked against the manifest's hashes, which the split carries.
    stages = yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]
    folders = {"data/crops", "${data.root}"}
    assert {name for name, stage in stages.items() if folders & set(stage.get("do", stage)["deps"])} == {"crop"}


@pytest.mark.parametrize("folder, x", [("metrics/cmc", "rank"), ("metrics/roc", "far"), ("metrics/det", "fpir")])
def test_plots_follow_the_backbones_without_edits(repo_root, tmp_path, folder, x):
    # The top-level plots target folders: whatever evaluate wrote is charted.
    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    params["backbones"] = ["mobilenet_v2", "dlib_resnet"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "dvc.yaml").write_text((repo_root / "dvc.yaml").read_text())
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=tmp_path, env=env, check=True)
    (tmp_path / folder).mkdir(parents=True)
    for b, y in (("mobilenet_v2", 0.5), ("dlib_resnet", 0.9)):
        (tmp_path / folder / f"{b}.csv").write_text(f"{x},before,after\n1,0.1,{y}\n2,0.2,1.0\n")
    out = subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "--json"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    data = json.loads(out)["data"]
    plots = {k: v for k, v in data.items() if k.startswith(folder)}
    assert set(plots) == {f"{folder}/mobilenet_v2.csv", f"{folder}/dlib_resnet.csv"}
    values = plots[f"{folder}/dlib_resnet.csv"][0]["content"]["data"]["values"]
    assert {(v[x], v["field"], v["dvc_inferred_y_value"]) for v in values} >= {("1", "after", "0.9")}
