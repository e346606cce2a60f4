"""The documentation site: nothing the README stated before the split is lost, every link resolves.

Issue 27 cut the README (1,186 lines at ``f7d98fa``) down to a five-minute page and moved the rest
to the MkDocs site in ``docs/``. What the old README stated must still be stated by README + site:
its headings (and the bold lead-ins that served as headings), its figures with three or more
significant digits, its inline code (params keys, paths, commands) and the lines of its command
blocks. The generated results table and ``dvc metrics show`` block are left out of the comparison:
``python -m facesearch results --readme docs/results.md`` rewrites them after every run.
Module paths (``facesearch/x.py``, ``facesearch.x.y``, ``tests/...``) are left out too: they follow
the package layout, not the documentation.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import yaml

BASE = "f7d98fa"  # the commit the split started from: its README is the reference
GENERATED = re.compile(r"<!-- ([\w-]+):start -->\n.*?<!-- \1:end -->", re.S)
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
MODULE_PATH = re.compile(r"facesearch[./]\w|tests/")
NUMBER = re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?(?![\w])")
# What the split changed on purpose: old statement -> the one that replaces it.
RENAMED = {
    "python -m facesearch results --readme README.md": "python -m facesearch results --readme docs/results.md",
    # Issue 28: the crop stage detects once per photo; each backbone's chip is cut by its own chips stage
    # (stages/chips.py, params.yaml: chips.<backbone>), which replaced pack.
    "Detector and alignment": "Detection, then each backbone's chip",
    "crop.*": "chips.<backbone>",
    "crop.align: none": "align: none",
    "crop.landmarks: 5": "chips.dlib_resnet.landmarks: 5",
    "landmarks_5": "align: landmarks",
    "landmarks_68": "align: landmarks",
    "data/arrays/{train,val,query,gallery}.npy": "data/arrays/<backbone>/{train,val,query,gallery}.npy",
    "stages/pack.py": "stages/chips.py",
    "dvc exp run -S 'backbones=[resnet50,mobilenet_v2,dlib_resnet]' -S crop.detector=dlib_hog -S crop.align=landmarks "
    "-S crop.landmarks=68 -S crop.size=150": "dvc exp run -S 'backbones=[resnet50,mobilenet_v2,dlib_resnet]' -S "
    "crop.detector=dlib_hog",
    # Issue 28: "Search your own photos" indexes with the recommended fused model.
    "python -m facesearch index build --model models/dlib_resnet.pt --photos ~/Pictures --out indexes/pictures": (
        "python -m facesearch index build --model models/dlib_sface.pt --photos ~/Pictures --out indexes/pictures"
    ),
}
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def pages(repo_root: Path) -> dict[str, str]:
    """README.md and every Markdown page of the site, by path relative to the repository root."""
    paths = [repo_root / "README.md", *sorted((repo_root / "docs").rglob("*.md"))]
    return {str(p.relative_to(repo_root)): p.read_text() for p in paths}


def old_readme(repo_root: Path) -> str:
    out = subprocess.run(["git", "show", f"{BASE}:README.md"], cwd=repo_root, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"the README of {BASE} is not in this checkout's history ({out.stderr.strip()})")
    return out.stdout


def prose(text: str) -> str:
    """``text`` without fenced blocks and generated sections."""
    return FENCE.sub("", GENERATED.sub("", text))


def norm(s: str) -> str:
    return " ".join(s.split()).rstrip(".:").rstrip()


def headings(text: str) -> set[str]:
    """Markdown headings and the bold lead-ins that open a paragraph or list item."""
    found = set()
    for line in prose(text).splitlines():
        if m := re.match(r"#{1,6}\s+(.*)|(?:[-*]\s+)?\*\*(.+?)\*\*", line):
            found.add(norm(m.group(1) or m.group(2)))
    return found


def figures(text: str) -> set[str]:
    """Numbers with three or more significant digits (``2,172``, ``0.985``, ``10.6``), fenced blocks included."""
    found = set()
    for n in NUMBER.findall(GENERATED.sub("", text)):
        n = n.rstrip(",")
        if len(n.replace(",", "").replace(".", "").lstrip("0")) >= 3:
            found.add(n)
    return found


def code_spans(text: str) -> set[str]:
    paragraphs = (" ".join(p.split()) for p in prose(text).split("\n\n"))  # a span may wrap a line
    spans = {norm(s) for p in paragraphs for s in re.findall(r"`([^`]+)`", p)}
    return {s for s in spans if s and not MODULE_PATH.search(s)}


def command_lines(text: str) -> set[str]:
    """The lines of fenced blocks (a trailing comment dropped), generated sections excluded."""
    lines = set()
    for block in FENCE.findall(GENERATED.sub("", text)):
        for line in block.splitlines():
            line = norm(re.split(r"\s{2,}#\s", line)[0])
            if line and not MODULE_PATH.search(line):
                lines.add(line)
    return lines


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("kind", [headings, figures, code_spans, command_lines], ids=lambda f: f.__name__)
def test_nothing_the_old_readme_stated_is_lost(repo_root, kind):
    old = {RENAMED.get(x, x) for x in kind(old_readme(repo_root))}
    now = pages(repo_root)
    found = set().union(*(kind(text) for text in now.values()))
    if kind in (figures, code_spans):  # a figure or a span may sit in a table, a list or a block now
        everything = " ".join(flat(text) for text in now.values())
        found |= {x for x in old if x in everything}
    lost = sorted(old - found)
    assert not lost, f"{kind.__name__} of the README at {BASE} that neither README nor docs/ states now: {lost}"


def slug(heading: str) -> str:
    """Python-Markdown's toc slug (MkDocs' anchors): NFKD, drop non-word characters, hyphens for spaces."""
    text = unicodedata.normalize("NFKD", heading).encode("ascii", "ignore").decode()
    text = re.sub(r"[`*]", "", text)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(text: str) -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*)$", FENCE.sub("", text), re.M)}


def test_every_relative_link_of_the_readme_and_the_docs_resolves(repo_root):
    broken = []
    for rel, text in pages(repo_root).items():
        base = (repo_root / rel).parent
        for target in LINK.findall(FENCE.sub("", text)):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (base / path).resolve() if path else repo_root / rel
            if not dest.exists():
                broken.append(f"{rel}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
                broken.append(f"{rel}: {target} (no such heading)")
    assert not broken, broken


def test_the_site_lists_every_page(repo_root):
    config = yaml.safe_load((repo_root / "mkdocs.yml").read_text().replace("!!python/name:", ""))
    listed = set()

    def walk(node):
        if isinstance(node, str):
            listed.add(node)
        elif isinstance(node, dict):
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(config["nav"])
    on_disk = {str(p.relative_to(repo_root / "docs")) for p in (repo_root / "docs").rglob("*.md")}
    assert listed == on_disk


def test_the_site_builds_strictly(repo_root, tmp_path):
    # mkdocs --strict fails on a broken link or anchor between pages (mkdocs.yml: validation).
    if shutil.which("mkdocs") is None:
        pytest.skip("mkdocs is not installed (python -m pip install -r requirements-dev.txt)")
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=repo_root, capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
