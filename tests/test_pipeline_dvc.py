"""DVC re-runs exactly what a change affects (in a temporary copy of the repository)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import write_params

pytestmark = pytest.mark.slow


def copy_repo(src: Path, dst: Path) -> None:
    """Copy the files git would check out (tracked and untracked-not-ignored), nothing built."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=src, check=True, capture_output=True, text=True,
    ).stdout.split("\0")  # fmt: skip
    for rel in filter(None, listed):
        if (src / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, dst / rel)


def repro(repo: Path) -> set[str]:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    return set(re.findall(r"Running stage '([\w@.-]+)'", out.stdout))


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
    repo = tmp_path / "repo"
    copy_repo(repo_root, repo)
    (repo / "dvc.lock").unlink(missing_ok=True)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    # A clone has commits; dvclive reads HEAD and fails in a repository without any.
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "copy"], cwd=repo, check=True)
    tiny = {"sample.identities": 8, "sample.images_per_identity": 5, "crop.n_jobs": 1, "crop.size": 48,
            "split.test_fraction": 0.25, "split.val_identities": 2}  # fmt: skip
    for backbone in ("resnet50", "mobilenet_v2"):
        tiny |= {f"train.{backbone}.epochs": 1, f"train.{backbone}.steps_per_epoch": 1,
                 f"train.{backbone}.img_size": 32, f"train.{backbone}.p_identities": 2}  # fmt: skip
    write_params(repo / "params.yaml", tiny)
    per_backbone = {f"{stage}@{b}" for stage in ("train", "embed", "evaluate") for b in ("resnet50", "mobilenet_v2")}

    assert repro(repo) == {"sample", "crop", "split", "pack"} | per_backbone
    assert repro(repo) == set()  # nothing changed, nothing runs
    set_param(repo, "crop.margin", 0.3)
    assert repro(repo) == {"crop", "split", "pack"} | per_backbone
    set_param(repo, "split.seed", 7)
    assert repro(repo) == {"split", "pack"} | per_backbone
    set_param(repo, "train.resnet50.lr", 0.01)
    # The other backbone's branch is untouched.
    assert repro(repo) == {"train@resnet50", "embed@resnet50", "evaluate@resnet50"}
    set_param(repo, "evaluate.backend", "ckdtree")
    assert repro(repo) == {"evaluate@resnet50", "evaluate@mobilenet_v2"}
    set_param(repo, "sample.seed", 1)
    assert repro(repo) == {"sample", "crop", "split", "pack"} | per_backbone
    metrics = subprocess.run([sys.executable, "-m", "dvc", "metrics", "show", "--json"], cwd=repo, check=True,
                             capture_output=True, text=True).stdout  # fmt: skip
    assert '"before"' in metrics and '"after"' in metrics
    # The outputs DVC tracks are git-ignored by DVC itself.
    ignored = (repo / "data" / ".gitignore").read_text()
    assert "/crops" in ignored and "/manifest.parquet" in ignored
