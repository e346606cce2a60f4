from __future__ import annotations

import json
import os
import stat

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


def test_outputs_respect_the_umask(tmp_path):
    # mkstemp/mkdtemp would leave 0600/0700: unreadable for another account serving the app.
    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "m.json", {"a": 1})
        with atomic_dir(tmp_path / "crops") as tmp:
            (tmp / "a.jpg").write_text("a")
        with atomic_path(tmp_path / "x.bin") as tmp:
            # A writer that recreates the temp file with a private mode still ends 0644.
            tmp.unlink()
            os.close(os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o600))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "x.bin").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "crops").stat().st_mode) == 0o755
