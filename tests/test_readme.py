"""The README's results table and `dvc metrics show` block are generated from the committed metrics.

They are checked against the metrics *as committed* (``git show HEAD:...``), not the working tree:
a user who runs ``dvc repro`` before the tests regenerates ``metrics/`` on their machine, and the
README describes the committed run, so the README's two commands pass in either order.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from facesearch.tools.cli import metrics_show_block, results_table


def committed(repo_root, path: str) -> str:
    out = subprocess.run(["git", "show", f"HEAD:{path}"], cwd=repo_root, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"{path} is not readable from a git HEAD here ({out.stderr.strip()})")
    return out.stdout


def test_results_table_matches_committed_metrics(repo_root, tmp_path):
    readme = (repo_root / "README.md").read_text()  # dvc repro never rewrites the README
    section = readme.split("<!-- results-sample:start -->\n", 1)[1].split("<!-- results-sample:end -->", 1)[0]
    backbones = yaml.safe_load(committed(repo_root, "params.yaml"))["backbones"]
    for backbone in backbones:
        (tmp_path / f"{backbone}.json").write_text(committed(repo_root, f"metrics/details/{backbone}.json"))
    expected = results_table(str(tmp_path), backbones)
    assert section == expected, "regenerate it: python -m facesearch results --readme README.md, then commit"


def section(readme: str, name: str) -> str:
    return readme.split(f"<!-- {name}:start -->\n", 1)[1].split(f"<!-- {name}:end -->", 1)[0]


def test_metrics_show_block_is_dvcs_output_of_the_committed_metrics(repo_root, tmp_path):
    # DVC itself prints the committed pipeline's metrics, in a copy holding only what it reads:
    # dvc.yaml, params.yaml (its matrix) and the committed metrics/ files.
    for path in ("dvc.yaml", "params.yaml"):
        (tmp_path / path).write_text(committed(repo_root, path))
    listed = subprocess.run(["git", "ls-tree", "-r", "--name-only", "HEAD", "metrics"], cwd=repo_root,
                            capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    for path in listed:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(committed(repo_root, path))
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=tmp_path, env=env, check=True)
    block = section((repo_root / "README.md").read_text(), "metrics-show")
    assert block == metrics_show_block(tmp_path), "regenerate it: python -m facesearch results --readme README.md"
    # A terminal's width: one row per headline file, a dozen columns (once ~190).
    assert max(map(len, block.splitlines())) <= 170
