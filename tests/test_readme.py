"""The README's results table is generated from the committed metrics, never typed by hand.

It is checked against the metrics *as committed* (``git show HEAD:...``), not the working tree:
a user who runs ``dvc repro`` before the tests regenerates ``metrics/`` on their machine, and the
README describes the committed run, so the README's two commands pass in either order.
"""

from __future__ import annotations

import subprocess

import pytest
import yaml

from facesearch.cli import results_table


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
        (tmp_path / f"{backbone}.json").write_text(committed(repo_root, f"metrics/{backbone}.json"))
    expected = results_table(str(tmp_path), backbones)
    assert section == expected, "regenerate it: python -m facesearch results --readme README.md, then commit"
