"""``python -m facesearch check-data``: the crop stage's pre-detection verdicts, and what DVC cannot hash."""

from __future__ import annotations

import json

import hostile as H
import pytest
from conftest import write_params

from facesearch.data.celeba import IDENTITY_FILE
from facesearch.tools.cli import main


@pytest.fixture
def hostile_root(tmp_path):
    root = tmp_path / "data"
    expected = H.hostile_folder(root / "img_celeba", H.jpeg(H.photo(3, (200, 150))))
    (root / "img_celeba" / "no_row.jpg").write_bytes(H.jpeg(H.photo(4)))
    expected["no_row.jpg"] = "no_identity"
    (root / "img_celeba" / "twice.jpg").write_bytes(H.jpeg(H.photo(5)))
    expected["twice.jpg"] = "ambiguous_identity"
    rows = [f"{n} 1" for n in H.identity_names(expected) if n != "no_row.jpg"] + ["twice.jpg 2"]
    (root / IDENTITY_FILE).write_text("\n".join(rows) + "\n")
    return root, expected


def check(root, params, capsys) -> tuple[int, dict]:
    with pytest.raises(SystemExit) as info:
        main(["check-data", str(root), "--params", str(params), "--json"])
    return info.value.code, json.loads(capsys.readouterr().out)


def test_check_data_lists_rejects_and_dvc_blockers(hostile_root, tmp_path, capsys):
    root, expected = hostile_root
    params = write_params(tmp_path / "params.yaml", {"crop.max_file_bytes": 2**20})
    code, report = check(root, params, capsys)
    assert code == 1  # DVC could not hash this folder
    got = {f["file_name"]: f["reason"] for f in report["files"]}
    assert got == {n: r for n, r in expected.items() if r != "kept"}  # kept: would go on to detection
    assert report["n_entries"] == len(expected)
    blockers = {b["path"] for b in report["dvc_blockers"]}
    sock = {"img_celeba/sock.jpg"} & {f"img_celeba/{n}" for n in expected}
    assert blockers == {"img_celeba/pipe.jpg", "img_celeba/loop_a.jpg", "img_celeba/loop_b.jpg",
                        "img_celeba/dangling.jpg"} | sock  # fmt: skip
    assert report["annotations"]["ambiguous_identities"] == ["twice.jpg"]
    # The text form names the blockers and says what to do.
    with pytest.raises(SystemExit):
        main(["check-data", str(root), "--params", str(params)])
    text = capsys.readouterr().out
    assert "DVC cannot hash" in text and "pipe.jpg" in text and "file_too_large" in text


def test_check_data_clean_folder_exits_zero(tmp_path, capsys):
    root = tmp_path / "data"
    (root / "img_celeba").mkdir(parents=True)
    (root / "img_celeba" / "a.jpg").write_bytes(H.jpeg(H.photo(6)))
    (root / IDENTITY_FILE).write_text("a.jpg 1\n")
    code, report = check(root, write_params(tmp_path / "params.yaml"), capsys)
    assert code == 0 and report["files"] == [] and report["dvc_blockers"] == []
