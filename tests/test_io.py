from __future__ import annotations

import json

import pytest

from facesearch.io import atomic_dir, atomic_path, write_json_atomic


def test_atomic_path_replaces_only_on_success(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"


def test_atomic_dir_swaps_whole_folders(tmp_path):
    target = tmp_path / "crops"
    target.mkdir()
    (target / "stale.jpg").write_text("x")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "a.jpg").write_text("a")
        raise RuntimeError
    assert sorted(p.name for p in target.iterdir()) == ["stale.jpg"]
    with atomic_dir(target) as tmp:
        (tmp / "a.jpg").write_text("a")
    assert sorted(p.name for p in target.iterdir()) == ["a.jpg"]  # rewritten whole: stale file gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crops"]


def test_json_is_stable(tmp_path):
    write_json_atomic(tmp_path / "m.json", {"b": 1, "a": {"d": 2, "c": 3}})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": {"c": 3, "d": 2}, "b": 1}
    assert (tmp_path / "m.json").read_text().startswith('{\n  "a"')
