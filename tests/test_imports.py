"""The package's rooms follow the pipeline's flow, and imports only point down it.

    data <- faces <- nets <- retrieval <- gallery <- tools

A module may import the top-level helpers and modules of its own room or of the rooms before
it, never one after it; the helpers import no room at all; nothing imports in a circle. Every
import counts, those inside functions too (a lazy import is an import all the same), read
from the source by the same parse that decides each stage's DVC deps
(:func:`facesearch.provenance.imported_names`).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from facesearch.provenance import imported_names

ROOMS = ("data", "faces", "nets", "retrieval", "gallery", "tools")
HELPERS = {"io", "params", "provenance", "threads", "viz"}  # what every room may use; they import no room
ENTRY = {"__init__", "__main__"}  # the package itself, and `python -m facesearch` (tools.cli)


def modules(root: Path) -> dict[str, str]:
    """Dotted name -> repo-relative path of every module of the package."""
    out = {}
    for path in sorted((root / "facesearch").rglob("*.py")):
        rel = path.relative_to(root)
        parts = rel.with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = str(rel)
    return out


def room(name: str) -> str | None:
    """The room of a dotted module name (None for the package's top level)."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ROOMS else None


@pytest.fixture(scope="module")
def graph(repo_root) -> dict[str, set[str]]:
    return {name: imported_names(path, repo_root) for name, path in modules(repo_root).items()}


def test_every_module_has_a_place(repo_root):
    for name in modules(repo_root):
        parts = name.split(".")
        if len(parts) == 1:  # facesearch/__init__.py
            continue
        assert parts[1] in ROOMS or (len(parts) == 2 and parts[1] in HELPERS | ENTRY), (
            f"{name}: put it in a room ({', '.join(ROOMS)}), or add it to the helpers here if every room needs it"
        )


def test_imports_point_down_the_flow(graph):
    wrong = []
    for name, imported in graph.items():
        mine = room(name)
        for other in imported:
            theirs = room(other)
            if name.split(".")[-1] in ENTRY and mine is None:
                allowed = other == "facesearch.tools.cli" or theirs is None
            elif mine is None:  # a helper
                allowed = theirs is None and other.split(".")[-1] not in ENTRY
            else:
                allowed = theirs is None or ROOMS.index(theirs) <= ROOMS.index(mine)
            if not allowed:
                wrong.append(f"{name} imports {other}")
    assert not wrong, "imports against the flow (" + " <- ".join(ROOMS) + "):\n" + "\n".join(sorted(wrong))


def test_no_import_cycles(graph):
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            cycle = [*path[path.index(name) :], name]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if name in done:
            return
        for other in sorted(graph.get(name, ())):
            visit(other, [*path, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


def test_every_import_names_a_module_that_exists(graph, repo_root):
    # A lazy import of a module's old flat name (facesearch.verification for
    # facesearch.retrieval.verification) fails only when its function runs: catch it here.
    names = set(modules(repo_root))
    missing = sorted(f"{name} imports {other}" for name, imported in graph.items() for other in imported
                     if other not in names)  # fmt: skip
    assert not missing, "imports of modules that do not exist:\n" + "\n".join(missing)


def test_stages_import_no_gallery_or_tools(repo_root):
    # The pipeline runs on data .. retrieval: a change to the app, the index or the command line re-runs no stage.
    for script in sorted((repo_root / "stages").glob("*.py")):
        rel = str(script.relative_to(repo_root))
        assert {room(name) for name in imported_names(rel, repo_root)} <= {None, *ROOMS[:4]}, rel


def test_the_check_sees_function_level_and_aliased_imports(tmp_path):
    # What the rules rest on: a lazy import inside a function, and `from room import module as X`.
    (tmp_path / "facesearch" / "data").mkdir(parents=True)
    (tmp_path / "facesearch" / "tools").mkdir()
    for rel in ("__init__.py", "data/__init__.py", "data/celeba.py", "tools/__init__.py", "tools/cli.py"):
        (tmp_path / "facesearch" / rel).write_text("")
    (tmp_path / "facesearch" / "data" / "layouts.py").write_text(
        "from facesearch.data import celeba as C\n\ndef f():\n    from facesearch.tools.cli import main\n"
    )
    assert imported_names("facesearch/data/layouts.py", tmp_path) == {"facesearch.data.celeba", "facesearch.tools.cli"}
