"""The commands a user types outside the repository: relative paths mean what a shell user expects.

From a folder holding no ``params.yaml`` (the default ``--params``), ``index build``, ``search``,
``index info``, ``evaluate``, ``calibrate`` and ``check-data`` take paths relative to the current
folder and fall back to the library defaults; an index records absolute paths, so it answers the
same from any other folder.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import person_folders

from facesearch.faces.config import FaceConfig
from facesearch.nets.contract import preprocessing_record
from facesearch.nets.models import get_model, load_model, save_model
from facesearch.tools.cli import main as cli


@pytest.fixture
def home(sample_factory, tmp_path, monkeypatch):
    """A user's folder: photos one folder per person and a model file, no params.yaml; the current folder."""
    home = tmp_path / "home"
    person_folders(sample_factory(identities=6, images_per_identity=4, seed=3), home / "photos")
    torch.manual_seed(0)
    model = get_model("mobilenet_v2", weights="none", embedding_dim=8, img_size=32)
    save_model(home / "m.pt", model, extra={"preprocessing": preprocessing_record(FaceConfig(size=48), 32)})
    monkeypatch.chdir(home)
    return home


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_index_and_search_with_relative_paths_from_anywhere(home, tmp_path, monkeypatch, capsys):
    cli(["index", "build", "--model", "m.pt", "--photos", "photos", "--out", "idx"])
    record = json.loads(next((home / "idx").glob("v*/index.json")).read_text())
    assert record["model"]["path"] == str(home / "m.pt") and list(record["roots"]) == [str(home / "photos")]
    query = next((home / "photos").glob("*/*.jpg"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    cli(["search", "--index", "../home/idx", "--json", f"../home/photos/{query.parent.name}/{query.name}"])
    lines = json_lines(capsys.readouterr().out)
    assert lines and lines[0]["photo"] == f"../home/photos/{query.parent.name}/{query.name}"  # as typed
    shown = [r["photo"] for line in lines for r in line["results"]]
    assert shown and all(p.startswith(str(home / "photos")) and r == "current"
                         for p, r in zip(shown, [r["photo_status"] for line in lines for r in line["results"]],
                                         strict=True))  # fmt: skip
    cli(["index", "info", "--index", "../home/idx", "--json"])
    info = json.loads(capsys.readouterr().out)
    assert info["model"]["file_matches"] is True and info["faces"] > 0  # the recorded model path, absolute
    cli(["index", "remove", "--index", "../home/idx", "--photos", f"../home/photos/{query.parent.name}"])
    assert "removed: 4 photos" in capsys.readouterr().out


def test_evaluate_calibrate_and_check_data_without_a_params_file(home, capsys):
    assert not (home / "params.yaml").exists()
    cli(["evaluate", "--model", "m.pt", "--data", "photos", "--out", "out/eval.json", "--n-jobs", "1",
         "--device", "cpu"])  # fmt: skip
    metrics = json.loads((home / "out" / "eval.json").read_text())
    assert metrics["layout"] == "folders" and metrics["rerank"]["method"] == "none"  # no params file: plain search
    cli(["calibrate", "--model", "m.pt", "--data", "photos", "--out", "calibrated.pt", "--n-jobs", "1",
         "--device", "cpu"])  # fmt: skip
    _, payload = load_model(home / "calibrated.pt")
    assert payload["threshold"]["identification"]["fpir"] == 0.01  # the library default without params.yaml
    capsys.readouterr()
    with pytest.raises(SystemExit) as code:
        cli(["check-data", "photos", "--json"])
    assert code.value.code == 0  # the default crop limits
    assert json.loads(capsys.readouterr().out)["n_rejected_before_detection"] == 0
