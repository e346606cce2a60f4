"""Which source files a stage runs: its script plus every facesearch module it imports, transitively.

Read from the source text (``from facesearch.<name> import ...`` and ``from
facesearch import <name>, ...`` statements), not from ``sys.modules``: an import inside a
function (``facesearch.models`` imports ``dlib_resnet`` only when that backbone
is built) counts although it may not have run yet. The same rule as
``tests/test_dvc_deps.py``, which checks each stage's ``deps`` in ``dvc.yaml``
against it.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path


def imported_modules(path: str, root: Path) -> set[str]:
    """Repo-relative paths of the facesearch modules ``root / path`` imports directly."""
    text = (root / path).read_text()
    names = set(re.findall(r"from facesearch\.([a-z_]+) import", text))
    for group in re.findall(r"from facesearch import ([a-z_, ]+)", text):  # e.g. "manifest as M"
        names |= {part.split()[0] for part in group.split(",") if part.strip()}
    return {f"facesearch/{n}.py" for n in names}


def module_closure(script: str, root: Path) -> list[str]:
    """``script`` and every facesearch module it imports, transitively; sorted repo-relative paths."""
    seen, todo = {script}, [script]
    while todo:
        for module in imported_modules(todo.pop(), root) - seen:
            seen.add(module)
            todo.append(module)
    return sorted(seen)


def code_fingerprint(script: str, root: Path) -> dict[str, str]:
    """sha256 of each file of :func:`module_closure`: changes whenever the code a stage runs does."""
    return {rel: hashlib.sha256((root / rel).read_bytes()).hexdigest() for rel in module_closure(script, root)}
