"""Each stage's deps in dvc.yaml name exactly the package modules its script imports, transitively.

A module missing from deps means DVC would not re-run the stage when that module changes.
"""

from __future__ import annotations

import re

import yaml


def imported_modules(path, root) -> set[str]:
    text = (root / path).read_text()
    names = set(re.findall(r"from facesearch\.([a-z_]+) import", text))
    for group in re.findall(r"from facesearch import ([a-z_, ]+)", text):  # e.g. "manifest as M"
        names |= {part.split()[0] for part in group.split(",") if part.strip()}
    return {f"facesearch/{n}.py" for n in names}


def closure(script: str, root) -> set[str]:
    seen, todo = set(), [script]
    while todo:
        for module in imported_modules(todo.pop(), root) - seen:
            seen.add(module)
            todo.append(module)
    return seen


def test_stage_deps_match_imports(repo_root):
    stages = yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        scripts = [d for d in stage["deps"] if d.startswith("stages/")]
        assert len(scripts) == 1, name
        listed = {d for d in stage["deps"] if d.startswith("facesearch/")}
        assert listed == closure(scripts[0], repo_root), name
