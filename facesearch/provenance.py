"""Which source files a stage runs: its script plus every facesearch module it imports, transitively.

Read from the source (each file's import statements, parsed with :mod:`ast`), not from
``sys.modules``: an import inside a function (``facesearch.nets.contract`` imports
``facesearch.data.layouts`` only when deciding whom a model has seen) counts although it may
not have run yet. A module counts with every package ``__init__.py`` above it, which Python
runs first (``facesearch/__init__.py``, ``facesearch/nets/__init__.py``, ...). The same rule as
``tests/test_dvc_deps.py``, which checks each stage's ``deps`` in ``dvc.yaml`` against it, and
``tests/test_imports.py``, which checks that imports point down the flow.
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

PACKAGE = "facesearch"


def module_file(name: str, root: Path) -> str | None:
    """Repo-relative path of the module or package ``name`` (dotted), or None when it is no file here."""
    rel = name.replace(".", "/")
    if (root / f"{rel}.py").is_file():
        return f"{rel}.py"
    if (root / rel / "__init__.py").is_file():
        return f"{rel}/__init__.py"
    return None


def _with_packages(name: str, root: Path) -> set[str]:
    """The files Python runs to import ``name``: every package ``__init__.py`` on the way, then the module."""
    parts = name.split(".")
    return {f for i in range(1, len(parts) + 1) if (f := module_file(".".join(parts[:i]), root))}


def imported_names(path: str, root: Path) -> set[str]:
    """Dotted names of the facesearch modules ``root / path`` imports directly (at any depth of the file).

    ``from facesearch.a import b`` names ``facesearch.a.b`` when that is a module, else ``facesearch.a``;
    relative imports are resolved against ``path``'s package.
    """
    tree = ast.parse((root / path).read_text(), filename=path)
    package = Path(path).with_suffix("").parts[:-1]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.split(".")[0] == PACKAGE}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package[: len(package) - node.level + 1]
                base = ".".join([*parent, *([base] if base else [])])
            if base.split(".")[0] != PACKAGE:
                continue
            subs = {f"{base}.{a.name}" for a in node.names if module_file(f"{base}.{a.name}", root)}
            names |= subs or {base}
            if len(subs) < len(node.names):  # some names are attributes of base itself
                names.add(base)
    return names


def imported_modules(path: str, root: Path) -> set[str]:
    """Repo-relative paths of the facesearch files ``root / path`` imports directly, package ``__init__``s included."""
    return {f for name in imported_names(path, root) for f in _with_packages(name, root)}


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
