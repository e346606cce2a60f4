"""Share and reuse: repro -> push to a remote -> fresh clone -> pull -> nothing to re-run, the app loads."""

from __future__ import annotations

import subprocess

import pytest
from conftest import GIT, dvc, repro, tiny_repo_copy

from facesearch.gallery import app_core

pytestmark = pytest.mark.slow


def test_push_clone_pull_restores_everything(repo_root, tmp_path):
    repo = tiny_repo_copy(repo_root, tmp_path / "repo")
    remote = tmp_path / "remote"
    # The committed default remote stays; a --local override points this checkout elsewhere.
    dvc(repo, "remote", "modify", "--local", "storage", "url", str(remote))
    assert repro(repo)
    subprocess.run([*GIT, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*GIT, "commit", "-qm", "pipeline run"], cwd=repo, check=True)
    dvc(repo, "push")
    assert any(remote.rglob("*"))

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    assert not (clone / "models" / "resnet50.pt").exists()
    dvc(clone, "remote", "modify", "--local", "storage", "url", str(remote))
    dvc(clone, "pull")
    # Each backbone's chip arrays are cached and pushed, so the clone has them and nothing is stale.
    arrays = clone / "data" / "arrays" / "resnet50"
    assert (arrays / "train.npy").is_file() and (arrays / "train.json").is_file()
    assert "up to date" in dvc(clone, "status")
    assert repro(clone) == set()  # nothing re-runs after a pull
    # The app finds and loads what the pipeline built, from the pulled files alone.
    built = app_core.available(clone)
    assert ("resnet50", "after") in built and ("mobilenet_v2", "before") in built
    gallery = app_core.load_gallery(clone, "mobilenet_v2", "after")
    assert len(gallery.embeddings) == len(gallery.table) > 0
    assert all((clone / p).is_file() for p in gallery.table["crop_path"])
    app_core.load_embedder(clone, "resnet50", "after")
