"""The README's Quick start on a fresh clone: its two commands pass in either order, and leave the clone clean.

The maintainer's side is a copy of this project with tiny pipeline params, run once and committed
with what the real repository commits of a run (``dvc.lock``, ``metrics/``, the tables of ``docs/results.md``);
the newcomer's side is a ``git clone`` of it that runs the tests reading the committed run, then
``dvc repro`` from nothing (no ``dvc pull``), then those tests again. On the machine that made the
committed run the outputs come out the same bytes, so the clone is as it was cloned: ``git status``
and ``dvc status`` say nothing. On another CPU kind the trained models and what follows from them
differ (docs/reliability.md, "After dvc repro"); the tests do not read them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import GIT, dvc, repro, tiny_repo_copy

pytestmark = pytest.mark.slow

# The tests that read what a run commits (the results page's table and `dvc metrics show` block
# against the committed metrics): the ones a `dvc repro` before them could break.
RUN_READERS = ["tests/test_readme.py"]
STAGES = {"sample", "crop", "split"} | {f"{s}@{b}" for s in ("chips", "train", "embed", "evaluate")
                                        for b in ("resnet50", "mobilenet_v2")}  # fmt: skip


def run_tests(repo: Path) -> str:
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *RUN_READERS], cwd=repo,
                         env={**os.environ, "DVC_NO_ANALYTICS": "1"}, capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0 and "skipped" not in out.stdout, out.stdout + out.stderr
    return out.stdout


def git_status(repo: Path) -> str:
    return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=repo, check=True,
                          capture_output=True, text=True).stdout  # fmt: skip


def test_fresh_clone_runs_the_quick_start_in_either_order_and_stays_clean(repo_root, tmp_path):
    origin = tiny_repo_copy(repo_root, tmp_path / "origin")
    assert repro(origin) == STAGES
    # What a maintainer does after a run: the results page's tables from its metrics, then one commit.
    subprocess.run([sys.executable, "-m", "facesearch", "results", "--readme", "docs/results.md"], cwd=origin,
                   check=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"}, capture_output=True)  # fmt: skip
    subprocess.run([*GIT, "add", "-A"], cwd=origin, check=True)
    subprocess.run([*GIT, "commit", "-qm", "pipeline run"], cwd=origin, check=True)
    assert git_status(origin) == ""

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(origin), str(clone)], check=True)
    assert not list((clone / "models").glob("*.pt"))  # models are DVC's outputs, not in git
    assert "passed" in run_tests(clone)  # the tests first: nothing built yet
    assert repro(clone) == STAGES  # every stage from nothing
    assert "passed" in run_tests(clone)  # and after the run, which rewrote metrics/ in the workspace
    # Same machine, same bytes: the run rewrote every tracked output (metrics, dvc.lock) as committed.
    assert git_status(clone) == "", git_status(clone)
    assert "up to date" in dvc(clone, "status")
