"""The README is a five-minute page; the results page's generated blocks are the committed metrics'.

``docs/results.md``'s results table and ``dvc metrics show`` block are generated from the committed
metrics (``python -m facesearch results --readme docs/results.md``). They are checked against the
metrics *as committed* (``git show HEAD:...``), not the working tree: a user who runs ``dvc repro``
before the tests regenerates ``metrics/`` on their machine, and the page describes the committed
run, so the README's two commands pass in either order.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import yaml

from facesearch.tools.cli import metrics_show_block, results_table

RESULTS = "docs/results.md"  # where the generated blocks live (dvc repro never rewrites it)
REGENERATE = f"regenerate it: python -m facesearch results --readme {RESULTS}, then commit"
QUICK_START = [
    "python -m pip install -r requirements.txt && dvc repro     # install, then run the pipeline on the built-in"
    " sample",
    "python -m pip install -r requirements-dev.txt && python -m pytest   # run the tests",
]


def committed(repo_root, path: str) -> str:
    out = subprocess.run(["git", "show", f"HEAD:{path}"], cwd=repo_root, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"{path} is not readable from a git HEAD here ({out.stderr.strip()})")
    return out.stdout


def section(text: str, name: str) -> str:
    return text.split(f"<!-- {name}:start -->\n", 1)[1].split(f"<!-- {name}:end -->", 1)[0]


def test_results_table_matches_committed_metrics(repo_root, tmp_path):
    table = section((repo_root / RESULTS).read_text(), "results-sample")
    backbones = yaml.safe_load(committed(repo_root, "params.yaml"))["backbones"]
    for backbone in backbones:
        (tmp_path / f"{backbone}.json").write_text(committed(repo_root, f"metrics/details/{backbone}.json"))
    expected = results_table(str(tmp_path), backbones)
    assert table == expected, REGENERATE


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
    block = section((repo_root / RESULTS).read_text(), "metrics-show")
    assert block == metrics_show_block(tmp_path), REGENERATE
    # A terminal's width: one row per headline file, a dozen columns (once ~190).
    assert max(map(len, block.splitlines())) <= 170


def test_results_rewrites_the_generated_blocks_of_a_page(repo_root, tmp_path):
    # The command the docs give: only what lies between the markers changes.
    page = tmp_path / "results.md"
    page.write_text("# Results\n\nbefore\n\n<!-- results-sample:start -->\nold\n<!-- results-sample:end -->\n\nafter\n")
    backbones = yaml.safe_load(committed(repo_root, "params.yaml"))["backbones"]
    for backbone in backbones:
        (tmp_path / "details").mkdir(exist_ok=True)
        (tmp_path / "details" / f"{backbone}.json").write_text(committed(repo_root, f"metrics/details/{backbone}.json"))
    subprocess.run([sys.executable, "-m", "facesearch", "results", "--readme", str(page), "--metrics",
                    str(tmp_path / "details"), "--backbones", ",".join(backbones), "--show-section", ""],
                   cwd=repo_root, check=True)  # fmt: skip
    text = page.read_text()
    assert text.startswith("# Results\n\nbefore\n\n") and text.endswith("<!-- results-sample:end -->\n\nafter\n")
    assert section(text, "results-sample") == results_table(str(tmp_path / "details"), backbones)


def test_the_readme_is_a_five_minute_page(repo_root):
    readme = (repo_root / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    # The Quick start's two commands, word for word.
    assert all(line in readme.splitlines() for line in QUICK_START)
    # One results table on real faces against dlib, one picture, the three ways in, links into the site.
    assert "| dlib itself (what face_recognition users get) |" in readme
    assert re.search(r"!\[[^\]]*\]\(docs/img/[\w.-]+\.png\)", readme)
    for heading in ("### 1. The pipeline and its comparisons", "### 2. Search your own photos", "### 3. The app"):
        assert heading in readme
    for command in ("dvc metrics show", "dvc exp diff", "python -m facesearch pretrained", "index build",
                    "python -m facesearch search", "streamlit run app/main.py"):  # fmt: skip
        assert command in readme, command
    linked = set(re.findall(r"\]\(docs/([\w-]+\.md)", readme))
    pages = {p.name for p in (repo_root / "docs").glob("*.md")}
    assert linked == pages, f"pages the README does not link: {sorted(pages - linked)}"


def test_the_readme_and_the_results_page_show_the_same_real_face_table(repo_root):
    # The README's table on real faces is the results page's, row for row.
    def rows(text: str) -> list[str]:
        start = text.index("| model | Rank-1 | Rank-5 | mAP | LOO Rank-1 | LOO Rank-5 | LOO mAP |")
        return [line for line in text[start:].splitlines() if line.startswith("|")][:11]

    assert rows((repo_root / "README.md").read_text()) == rows((repo_root / RESULTS).read_text())
