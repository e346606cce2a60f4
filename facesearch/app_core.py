"""The search app's logic, free of Streamlit so it can be tested and benchmarked directly.

A photo arrives as bytes (upload or camera), is checked and decoded in memory
(never written to disk), its faces found by the pipeline's own detector, the
chosen face cropped as the crop stage cropped the chosen model's gallery
(the model's own ``preprocessing.crop``), embedded by that model and searched
in the gallery the pipeline built (``data/embeddings/<backbone>/<state>_gallery.npy``).
Finding, cutting and embedding are :mod:`facesearch.photos`' (shared with the
photo index, :mod:`facesearch.index`); this module adds the upload checks and
the visitor-facing errors.

Uploads are hostile until proven otherwise: every function a query passes
through (:func:`read_upload`, :func:`find_faces`, :func:`crop_face`,
:func:`search`) raises only :class:`UploadError`, whose text is meant for the
visitor, and an accepted upload costs a bounded amount of memory: its header is
checked before any pixel is decoded, JPEGs are decoded at reduced scale, and the
image is brought down to :data:`WORK_SIDE` right after decoding.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from facesearch import contract, photos
from facesearch import manifest as M
from facesearch.celeba import ATTRIBUTE_NAMES
from facesearch.detect import Box, Detection
from facesearch.faces import FaceConfig
from facesearch.images import ALLOWED_FORMATS, DecodedImage, ImageRejected, decode_image
from facesearch.models import ModelConfig, load_model, seeded_model
from facesearch.params import load_params
from facesearch.retrieval import attribute_matrix
from facesearch.search import ExactIndex, cosine_similarity

log = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 10 * 2**20  # 10 MB
MAX_UPLOAD_PIXELS = 40_000_000  # 40 megapixels
# Longer side a photo is brought down to right after decoding. Faces are found
# on 160-256 px copies and cut to ~218 px, so 2048 px loses nothing a query
# needs, while a 40 MP photo would otherwise cost ~120 MB per RGB copy.
WORK_SIDE = 2048
# A face photo is never a strip: 100000 x 1 or 12000 x 32 images only break
# the detector's downscaled copies (a zero-pixel side) and cost memory.
MAX_ASPECT = 10
BACKBONE_LABELS = {"resnet50": "ResNet-50 (more accurate)", "mobilenet_v2": "MobileNet-V2 (faster)"}

# The formats the app accepts: the decoder's own (facesearch.images.ALLOWED_FORMATS),
# each with the file extensions the uploader lets through and the name shown to
# visitors. Derived from ALLOWED_FORMATS so the uploader, the message and the
# decoder cannot disagree; a format added there without an entry here is refused
# by the app (tests/test_app.py flags it).
_FORMAT_NAMES = {"JPEG": ("JPEG", ("jpg", "jpeg")), "MPO": ("MPO", ("mpo",)), "PNG": ("PNG", ("png",)),
                 "WEBP": ("WebP", ("webp",)), "BMP": ("BMP", ("bmp",)), "TIFF": ("TIFF", ("tif", "tiff")),
                 "GIF": ("GIF", ("gif",))}  # fmt: skip
UPLOAD_FORMATS: dict[str, tuple[str, tuple[str, ...]]] = {
    fmt: entry for fmt, entry in _FORMAT_NAMES.items() if fmt in ALLOWED_FORMATS
}
UPLOAD_EXTENSIONS = [ext for _, exts in UPLOAD_FORMATS.values() for ext in exts]
_names = [name for name, _ in UPLOAD_FORMATS.values()]
FORMATS_TEXT = ", ".join(_names[:-1]) + f" or {_names[-1]}"
LIMITS_TEXT = (f"{FORMATS_TEXT}; at most {MAX_UPLOAD_BYTES // 2**20} MB and {MAX_UPLOAD_PIXELS // 1_000_000} "
               f"megapixels, no side more than {MAX_ASPECT} times the other.")  # fmt: skip

REJECT_MESSAGES = {
    "empty_file": "The file is empty.",
    "not_an_image": "This is not an image file we can read.",
    "unsupported_format": f"This image format is not supported; use {FORMATS_TEXT}.",
    "too_large": f"The image is too large (more than {MAX_UPLOAD_PIXELS // 1_000_000} megapixels).",
    "truncated": "The image file is cut short (truncated).",
    "corrupt": "The image file is damaged.",
}
UNREADABLE = "The image cannot be read (the file or its metadata is damaged)."


class UploadError(ValueError):
    """A user-facing reason an upload cannot be searched."""


@contextmanager
def failures_as(message: str) -> Iterator[None]:
    """Turn anything raised inside into :class:`UploadError` (``message``), logging the cause.

    Decoders, detectors and models fail in ways no list of exception types covers
    (struct.error from EXIF, TypeError from TIFF tags, cv2.error, MemoryError);
    the visitor gets ``message``, the log the traceback.
    """
    try:
        yield
    except UploadError:
        raise
    except Exception as exc:
        log.exception("%s", message)
        raise UploadError(message) from exc


def _open(data: bytes) -> Image.Image:
    """The image's header, parsed without decoding pixels, checked for format, size and shape."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise UploadError(REJECT_MESSAGES["too_large"]) from None
    except Exception:
        raise UploadError(REJECT_MESSAGES["not_an_image"]) from None
    if img.format not in UPLOAD_FORMATS:
        raise UploadError(REJECT_MESSAGES["unsupported_format"])
    w, h = img.size
    if w <= 0 or h <= 0 or w * h > MAX_UPLOAD_PIXELS:
        raise UploadError(REJECT_MESSAGES["too_large"])
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise UploadError(f"The image is {w} x {h} pixels: too long and narrow for a face photo "
                          f"(at most {MAX_ASPECT}:1).")  # fmt: skip
    return img


def read_upload(data: bytes) -> DecodedImage:
    """Check and decode uploaded bytes in memory, at most :data:`WORK_SIDE` px on the longer side.

    Raises :class:`UploadError` with a clear message. Boxes found later are in
    the returned image's coordinates, and the app draws them on that image.
    """
    if len(data) > MAX_UPLOAD_BYTES:
        raise UploadError(f"The file is larger than {MAX_UPLOAD_BYTES // 2**20} MB.")
    if not data:
        raise UploadError(REJECT_MESSAGES["empty_file"])
    _open(data)  # the header: format, pixel count and shape, each with the app's own message
    with failures_as(UNREADABLE):
        try:
            return decode_image(data, MAX_UPLOAD_PIXELS, max_side=WORK_SIDE)
        except ImageRejected as exc:
            raise UploadError(REJECT_MESSAGES.get(exc.reason, UNREADABLE)) from None


def crop_settings(root: Path, backbone: str) -> FaceConfig:
    """How ``backbone``'s gallery was cropped, so queries are cut the same way.

    :func:`facesearch.contract.crop_settings`: the model file's record, and
    ``params.yaml: crop`` only for models saved before they carried one.
    """
    # mmap: only the small preprocessing entry is read, not the weights.
    payload = torch.load(root / "models" / f"{backbone}.pt", map_location="cpu", weights_only=True, mmap=True)
    return contract.crop_settings(payload, root / "params.yaml")[1]


def find_faces(image: DecodedImage, settings: FaceConfig) -> Detection:
    """Every face in the photo, in photo order (:func:`facesearch.photos.detect`)."""
    with failures_as("Looking for faces in this photo failed; please try another photo."):
        return photos.detect(image.rgb, settings)


def crop_face(image: DecodedImage, box: Box | None, settings: FaceConfig) -> np.ndarray:
    """The crop the pipeline would make of ``box``; ``None``: the whole image, squared."""
    with failures_as("Cutting the face out of this photo failed; please try another photo."):
        return photos.crop(image.rgb, box, settings)


@dataclass
class Gallery:
    """One model state's searchable gallery."""

    embeddings: np.ndarray
    index: ExactIndex
    table: pd.DataFrame  # crop_path, identity, attributes; row i <-> embeddings[i]
    attributes: np.ndarray  # (N, 40) float, NaN where unknown


def available(root: Path) -> list[tuple[str, str]]:
    """(backbone, state) pairs whose model and gallery embeddings the pipeline has built."""
    out = []
    for backbone in load_params(root / "params.yaml")["backbones"]:
        for state in reversed(M.STATES):  # the fine-tuned model first: the default choice
            if (root / "models" / f"{backbone}.pt").is_file() and (
                root / "data" / "embeddings" / backbone / f"{state}_gallery.npy"
            ).is_file():
                out.append((backbone, state))
    return out


def load_gallery(root: Path, backbone: str, state: str) -> Gallery:
    emb_dir = root / "data" / "embeddings" / backbone
    embeddings = np.load(emb_dir / f"{state}_gallery.npy")
    index = pd.read_parquet(emb_dir / "gallery.parquet")
    split = pd.read_parquet(root / "data" / "split" / "gallery.parquet")
    table = index.merge(split.loc[:, [M.CROP_PATH, *ATTRIBUTE_NAMES]], on=M.CROP_PATH, how="left")
    return Gallery(embeddings, ExactIndex(embeddings), table, attribute_matrix(table))


def load_embedder(root: Path, backbone: str, state: str) -> torch.nn.Module:
    """The trained model ("after") or its untrained twin ("before"), in eval mode on the CPU."""
    model, payload = load_model(root / "models" / f"{backbone}.pt")
    if state == "before":
        model = seeded_model(ModelConfig(**payload["config"]), payload["train_config"]["seed"])
    return model.eval()


@dataclass(frozen=True)
class Result:
    rank: int
    similarity: float  # cosine similarity of the L2-normalised embeddings
    identity: int
    crop_path: str
    attributes: dict[str, bool]  # known attributes of this gallery face
    shared: frozenset[str]  # attributes on which it agrees with the query's estimated ones


def search(model: torch.nn.Module, gallery: Gallery, face: np.ndarray, k: int = 9) -> tuple[list[Result], dict]:
    """The ``k`` nearest gallery faces to a cropped face (RGB uint8, any square size).

    A user's photo has no attribute labels, so the query's attributes are
    estimated as the majority of its results' (the report's attribute view
    compares them); returns the results and that estimate.
    """
    with failures_as("The search failed; please try again."):
        return _search(model, gallery, face, k)


def _search(model: torch.nn.Module, gallery: Gallery, face: np.ndarray, k: int) -> tuple[list[Result], dict]:
    emb = photos.embed(model, face[None], model.config.img_size, batch=1)
    dist, idx = gallery.index.search(emb, k)
    attrs = gallery.attributes[idx[0]]
    known = ~np.isnan(attrs).any(1)
    estimate = {}
    if known.any():
        votes = np.nanmean(attrs[known], axis=0)
        estimate = {a: bool(v >= 0.5) for a, v in zip(ATTRIBUTE_NAMES, votes, strict=True)}
    results = []
    for rank, (d, g) in enumerate(zip(dist[0], idx[0], strict=True), start=1):
        row = gallery.table.iloc[int(g)]
        own = {a: bool(row[a]) for a in ATTRIBUTE_NAMES if not pd.isna(row[a])}
        shared = frozenset(a for a, v in own.items() if estimate.get(a) == v and v)
        results.append(Result(rank, float(cosine_similarity(d)), int(row[M.IDENTITY]), str(row[M.CROP_PATH]),
                              own, shared))  # fmt: skip
    return results, estimate
