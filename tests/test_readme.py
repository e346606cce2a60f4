"""The README's results table is generated from the committed metrics, never typed by hand."""

from __future__ import annotations

from facesearch.cli import results_table
from facesearch.params import load_params


def test_results_table_matches_committed_metrics(repo_root):
    readme = (repo_root / "README.md").read_text()
    section = readme.split("<!-- results-sample:start -->\n", 1)[1].split("<!-- results-sample:end -->", 1)[0]
    backbones = load_params(repo_root / "params.yaml")["backbones"]
    expected = results_table(str(repo_root / "metrics"), backbones)
    assert section == expected, "regenerate it: python -m facesearch results --readme README.md"
