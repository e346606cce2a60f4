"""``python -m facesearch calibrate``: a model's verdict fitted on any labelled folder, on people it never saw."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import person_folders

from facesearch.data.layouts import dataset_source
from facesearch.faces.config import FaceConfig
from facesearch.gallery.embedder import model_fingerprint
from facesearch.nets.contract import identities_record, preprocessing_record
from facesearch.nets.models import get_model, load_model, save_model
from facesearch.retrieval.verdict import verdict
from facesearch.tools import calibrate as C
from facesearch.tools.cli import main as cli


@pytest.fixture(scope="module")
def folder(sample_factory):
    return sample_factory(identities=6, images_per_identity=4, seed=3)


def tiny_model(path, seen=(), source=None):
    torch.manual_seed(0)
    model = get_model("mobilenet_v2", weights="none", embedding_dim=8, img_size=32)
    save_model(path, model, extra={"preprocessing": preprocessing_record(FaceConfig(size=48), 32),
                                   "identities": identities_record(seen[:1], seen[1:], source)})  # fmt: skip
    return str(path)


def test_calibrate_writes_the_verdict_and_what_it_rests_on(folder, tmp_path, capsys):
    model = tiny_model(tmp_path / "m.pt")
    cli(["calibrate", "--model", model, "--data", str(folder), "--out", str(tmp_path / "c.pt"), "--n-jobs", "1",
         "--fpir", "0.05", "--params", str(tmp_path / "none.yaml")])  # fmt: skip
    out = capsys.readouterr().out
    assert "gallery of 1,000,000 faces" in out and "WARNING" in out  # the sample's cartoon faces, loudly
    _, payload = load_model(tmp_path / "c.pt")
    record = payload["threshold"]
    assert record["identification"]["fpir"] == 0.05 and record["identification"]["identities"] == 6
    assert record["data"]["synthetic"] is True and "6 people" in record["data"]["description"]
    assert "does not record" in record["data"]["seen_rule"]
    v = verdict(payload, 500)
    assert v.fpir == 0.05 and v.source == "model" and v.warning() and "500 faces" in v.meaning()
    # Only the record changed: the same weights and crops, so an index takes the calibrated file as its model.
    _, before = load_model(model)
    assert model_fingerprint(payload) == model_fingerprint(before) and "threshold" not in before


def test_calibrate_in_place_on_person_folders_leaves_seen_people_out(folder, tmp_path):
    people = person_folders(folder, tmp_path / "people")
    names = sorted(p.name for p in people.iterdir())
    model = tiny_model(tmp_path / "m.pt", source={"layout": "folders"})
    _, payload = load_model(model)
    payload["identities"]["people"] = {"train": names[:2], "val": []}
    torch.save(payload, tmp_path / "m.pt")
    record = C.calibrate_on_folder(model, str(people), n_jobs=1, params_file=None)
    assert record["identification"]["identities"] == 4  # two of six seen in training: left out by name
    assert "by name" in record["data"]["seen_rule"] and record["data"]["synthetic"] is False
    assert load_model(model)[1]["threshold"] == record  # in place


def test_calibrate_refuses_what_cannot_calibrate(folder, tmp_path):
    one = tmp_path / "one"
    shutil.copytree(person_folders(folder, tmp_path / "people"), tmp_path / "people2")
    (one / "Solo").mkdir(parents=True)
    for photo in sorted((tmp_path / "people2").glob("*/*.jpg"))[:3]:
        shutil.copy(photo, one / "Solo" / photo.name)
    with pytest.raises(SystemExit, match=r"^calibrate: .*at least two"):
        cli(["calibrate", "--model", tiny_model(tmp_path / "m.pt"), "--data", str(one), "--n-jobs", "1"])
    with pytest.raises(SystemExit, match=r"^calibrate: --fpir and --far must lie strictly between 0 and 1"):
        cli(["calibrate", "--model", tiny_model(tmp_path / "m.pt"), "--data", str(folder), "--fpir", "1"])
    # Everyone seen: nobody left to calibrate on.
    source = dataset_source(folder, "celeba")
    ids = sorted({int(i) for i in (folder / "identity_CelebA.txt").read_text().split()[1::2]})
    with pytest.raises(SystemExit, match="at least two"):
        cli(["calibrate", "--model", tiny_model(tmp_path / "s.pt", ids, source), "--data", str(folder),
             "--n-jobs", "1"])  # fmt: skip
