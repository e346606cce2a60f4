"""The search app's logic, free of Streamlit so it can be tested and benchmarked directly.

A photo arrives as bytes (upload or camera), is checked and decoded in memory
(never written to disk), its faces found by the pipeline's own detector, the
chosen face cropped as the crop stage cropped the chosen model's gallery
(the model's own ``preprocessing.crop``), embedded by that model and searched
in a :class:`Gallery`: the test gallery the pipeline built
(``data/embeddings/<backbone>/<state>_gallery.npy``, :func:`load_gallery`) or a
photo index (``python -m facesearch index build``, :func:`load_index_gallery`).
Each result carries its cosine similarity; the answer is a match when the nearest
face reaches the gallery's model's verdict for a gallery of that size
(:func:`facesearch.retrieval.verdict.verdict`), and names who matched (:attr:`Answer.who`).
Results are grouped by person where the gallery knows names (:func:`group`): the
matched person's other faces are shown as that person's, other people once each.
Finding, cutting and embedding are :mod:`facesearch.gallery.photos`' (shared with the
photo index, :mod:`facesearch.gallery`); this module adds the upload checks, the
choice of face (:func:`face_choices`, :func:`default_face`) and the
visitor-facing errors.

What a visitor may search is the operator's choice (:class:`Access`, from the
environment): listed index folders, and typed ones only when turned on and only
inside allowed roots, every refusal one message (:data:`NOT_AN_INDEX`). An index is
data, not trusted: a result's photo is shown only from inside the index's own root,
resolved (:func:`confined`), and only with the content that was indexed
(:func:`photo_bytes`). Loaded indexes are bounded (:class:`IndexGalleries`: one live
version per folder, a few folders, models shared).

Uploads are hostile until proven otherwise: every function a query passes
through (:func:`read_upload`, :func:`find_faces`, :func:`face_choices`,
:func:`crop_face`, :func:`search`, and :func:`load_index_gallery`,
:func:`source_photo` for what a visitor names or opens) raises only
:class:`UploadError`, whose text is meant for the visitor, and an accepted upload
costs a bounded amount of memory: its header is checked before any pixel is decoded
(a WebP's from its RIFF chunks, before PIL allocates anything), JPEGs are decoded at
reduced scale, and the image is brought down to :data:`WORK_SIDE` right after decoding
(:func:`facesearch.data.images.decode_image` with ``max_side``: ~200 MB at most, ``bench/app.py --hostile``).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import stat
import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from PIL import Image

from facesearch.data import manifest as M
from facesearch.data.celeba import ATTRIBUTE_NAMES
from facesearch.data.images import (
    ALLOWED_FORMATS,
    WEBP_CANVAS_MAX_PIXELS,
    DecodedImage,
    ImageRejected,
    decode_image,
    webp_header,
)
from facesearch.faces.config import FaceConfig
from facesearch.faces.cropping import read_photo
from facesearch.faces.detection import Box, Detection, Landmarks, crop_square
from facesearch.faces.haar import has_eye
from facesearch.gallery import embedder as XE
from facesearch.gallery import photos
from facesearch.gallery import store as X
from facesearch.nets import contract
from facesearch.nets.models import ModelConfig, load_model, seeded_model
from facesearch.params import load_params
from facesearch.retrieval import rerank as R
from facesearch.retrieval import verdict as V
from facesearch.retrieval.knn import ExactIndex, SearchIndex
from facesearch.retrieval.metrics import attribute_matrix

log = logging.getLogger(__name__)

# The upload limit, one number everywhere: the app's own check and its message, the uploader's own
# limit (st.file_uploader max_upload_size, which the uploader states under its drop zone) and
# Streamlit's server.maxUploadSize in .streamlit/config.toml (tests/test_app.py checks them, and the
# README's statement) are all this many MiB (Streamlit's "MB").
MAX_UPLOAD_MB = 10
MAX_UPLOAD_BYTES = MAX_UPLOAD_MB * 2**20
MAX_UPLOAD_PIXELS = 40_000_000  # 40 megapixels
# Longer side a photo is brought down to right after decoding. Faces are found
# on 160-256 px copies and cut to ~218 px, so 2048 px loses nothing a query
# needs, while a 40 MP photo would otherwise cost ~120 MB per RGB copy.
WORK_SIDE = 2048
# A face photo is never a strip: 100000 x 1 or 12000 x 32 images only break
# the detector's downscaled copies (a zero-pixel side) and cost memory.
MAX_ASPECT = 10
# Smallest face side (px, in the photo) the app searches with. The models read 64 px crops
# (train.*.img_size) cut with a 20% margin each side, so the face itself spans ~45 px of
# their input: a box under 40 px is upscaled blur to them, and CelebA, which they learnt
# from, has no faces that small. Such faces are listed, marked, never pre-selected.
MIN_FACE_SIDE = 40
BACKBONE_LABELS = {"resnet50": "ResNet-50 (more accurate)", "mobilenet_v2": "MobileNet-V2 (faster)",
                   "dlib_resnet": "dlib ResNet (face-pretrained)", "sface": "SFace (face-pretrained)"}  # fmt: skip

# The formats the app accepts: the decoder's own (facesearch.data.images.ALLOWED_FORMATS),
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
# The limits the uploader's own line ("10MB per file • JPG, JPEG, ...", from max_upload_size and the
# file types) cannot state, shown under it: each limit is stated once on the page.
LIMITS_TEXT = (f"At most {MAX_UPLOAD_PIXELS // 1_000_000} megapixels ({WEBP_CANVAS_MAX_PIXELS // 1_000_000} for a "
               f"WebP with transparency, lossless or animated), no side more than {MAX_ASPECT} times the "
               "other.")  # fmt: skip
WEBP_TOO_LARGE = (f"A WebP with transparency, lossless or animated can be at most "
                  f"{WEBP_CANVAS_MAX_PIXELS // 1_000_000} megapixels: its decoder holds the whole image several "
                  "times over. Save it as JPEG or PNG, or smaller.")  # fmt: skip

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


def _check_header(data: bytes) -> None:
    """The image's header, parsed without decoding pixels, checked for format, size and shape.

    A WebP is read from its RIFF header (:func:`facesearch.data.images.webp_header`), never opened
    by PIL here: PIL's WebP decoder allocates its full-size canvases on open.
    """
    try:
        webp = webp_header(data)
    except ImageRejected:
        raise UploadError(REJECT_MESSAGES["corrupt"]) from None
    if webp is not None:
        w, h = webp.width, webp.height
    else:
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
    if webp is not None and not webp.bounded and max(w, h) > WORK_SIDE and w * h > WEBP_CANVAS_MAX_PIXELS:
        raise UploadError(WEBP_TOO_LARGE)
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise UploadError(f"The image is {w} x {h} pixels: too long and narrow for a face photo "
                          f"(at most {MAX_ASPECT}:1).")  # fmt: skip


def read_upload(data: bytes) -> DecodedImage:
    """Check and decode uploaded bytes in memory, at most :data:`WORK_SIDE` px on the longer side.

    Raises :class:`UploadError` with a clear message. Boxes found later are in
    the returned image's coordinates, and the app draws them on that image.
    """
    if len(data) > MAX_UPLOAD_BYTES:
        raise UploadError(f"The file is larger than {MAX_UPLOAD_MB} MB.")
    if not data:
        raise UploadError(REJECT_MESSAGES["empty_file"])
    _check_header(data)  # format, pixel count and shape, each with the app's own message
    with failures_as(UNREADABLE):
        try:
            return decode_image(data, MAX_UPLOAD_PIXELS, max_side=WORK_SIDE)
        except ImageRejected as exc:
            raise UploadError(REJECT_MESSAGES.get(exc.reason, UNREADABLE)) from None


def crop_settings(root: Path, backbone: str) -> FaceConfig:
    """How ``backbone``'s gallery was cropped, so queries are cut the same way.

    :func:`facesearch.nets.contract.crop_settings`: the model file's record, and
    ``params.yaml: crop`` only for models saved before they carried one.
    """
    # mmap: only the small preprocessing entry is read, not the weights.
    payload = torch.load(root / "models" / f"{backbone}.pt", map_location="cpu", weights_only=True, mmap=True)
    return contract.crop_settings(payload, root / "params.yaml")[1]


def find_faces(image: DecodedImage, settings: FaceConfig) -> Detection:
    """Every face in the photo, in photo order (:func:`facesearch.gallery.photos.detect`)."""
    with failures_as("Looking for faces in this photo failed; please try another photo."):
        return photos.detect(image.rgb, settings)


def crop_face(
    image: DecodedImage, box: Box | None, settings: FaceConfig, points: Landmarks | None = None
) -> np.ndarray:
    """The crop the pipeline would make of ``box`` (``points``: its landmarks, where the detector gives them);
    ``None``: the whole image, squared."""
    with failures_as("Cutting the face out of this photo failed; please try another photo."):
        return photos.crop(image.rgb, box, settings, points)


# Colours of the 5 landmarks in the query view (RGB), in facesearch.data.manifest.LANDMARKS order:
# eyes green, nose yellow, mouth corners magenta.
LANDMARK_COLOURS = ((0, 220, 0), (0, 220, 0), (255, 220, 0), (230, 0, 230), (230, 0, 230))
LANDMARK_MARGIN = 0.2  # border around the box in the query view, fraction of its side (crop.margin's default)


def landmarks_view(image: DecodedImage, box: Box, points: Landmarks, side: int = 200) -> np.ndarray:
    """The detected face (a square around ``box``, ``side`` px) with its 5 landmarks marked: where the detector
    (YuNet) put the eyes, nose tip and mouth corners that an ``align: arcface`` chip is aligned on."""
    with failures_as("Drawing the face's landmarks failed; please try another photo."):
        view = np.ascontiguousarray(crop_square(image.rgb, box, LANDMARK_MARGIN, side))
        x, y, w, h = box
        crop_side = max(1, round(max(w, h) * (1 + 2 * LANDMARK_MARGIN)))  # as crop_square cuts it
        x0, y0 = round(x + w / 2 - crop_side / 2), round(y + h / 2 - crop_side / 2)
        scale = side / crop_side
        radius = max(2, side // 60)
        for (px, py), colour in zip(points, LANDMARK_COLOURS, strict=True):
            centre = (round((px - x0) * scale), round((py - y0) * scale))
            cv2.circle(view, centre, radius, colour, -1, cv2.LINE_AA)
        return view


# --- which face of the photo -------------------------------------------------------------
@dataclass(frozen=True)
class Face:
    """One detected face of the query photo, as the face picker lists it."""

    number: int  # 1-based, in photo order (facesearch.gallery.photos.detect): "face 2" everywhere
    box: Box
    searchable: bool  # at least MIN_FACE_SIDE px: see there
    eyes: bool  # the eye cascade fires in its upper part (facesearch.faces.haar.has_eye)
    at_edge: bool  # the box touches the photo's border: cut off, or a logo or frame at the edge


def face_choices(image: DecodedImage, detection: Detection) -> list[Face]:
    """The photo's faces with what the picker needs to choose and mark them."""
    with failures_as("Looking for faces in this photo failed; please try another photo."):
        gray = cv2.cvtColor(image.rgb, cv2.COLOR_RGB2GRAY)
        h, w = gray.shape
        return [Face(i, box, min(box[2], box[3]) >= MIN_FACE_SIDE, has_eye(gray, box),
                     box[0] <= 1 or box[1] <= 1 or box[0] + box[2] >= w - 1 or box[1] + box[3] >= h - 1)
                for i, box in enumerate(detection.boxes, start=1)]  # fmt: skip


def default_face(faces: list[Face]) -> Face | None:
    """The face to pre-select: the most face-like large one; ``None`` when none is large enough.

    Not every detector reports a confidence (Haar and HOG do not), so "face-like" is what can be checked:
    eyes inside the box first, then a box clear of the photo's border (a logo or a
    frame at the edge is what the Haar cascade mistakes for a face), then size.
    """
    searchable = [f for f in faces if f.searchable]
    if not searchable:
        return None
    return max(searchable, key=lambda f: (f.eyes, not f.at_edge, f.box[2] * f.box[3], -f.number))


# --- what is searched ------------------------------------------------------------------------
# Columns of Gallery.table every kind of gallery fills (row i <-> embeddings[i]).
NAME = "name"  # who this face is, when known: "identity 123" (CelebA) or the index's person; else null
CROP_FILE = "crop_file"  # absolute path of the face crop the pipeline wrote; null for an index
SOURCE_FILE = "source_file"  # absolute path of the photo the face was found in; null when unknown
SOURCE_ROOT = "source_root"  # the folder that photo must lie in (the index's root, the data root); null: unknown
SOURCE_SHA = "source_sha256"  # SHA-256 of that photo's content when it was indexed; null when unknown
PHOTO = "photo"  # that photo's path as visitors see it: relative to its root
SOURCE_WIDTH = "source_width"  # that photo's decoded width, px: the box is in its pixels
BOX = (M.BBOX_X, M.BBOX_Y, M.BBOX_W, M.BBOX_H)  # the face's box in the source photo; null when unknown


@dataclass
class Gallery:
    """A searchable gallery: the pipeline's test gallery of one model state, or a photo index."""

    title: str  # what is searched, for the visitor
    model_label: str  # which model embeds the queries: backbone and state
    model: torch.nn.Module
    settings: FaceConfig  # how a query face is cut for this model
    size: int  # the model's input side, px
    embeddings: np.ndarray  # (N, d), L2-normalised
    index: SearchIndex
    table: pd.DataFrame  # the columns above and the attributes; row i <-> embeddings[i]
    attributes: np.ndarray | None  # (N, 40) float, NaN where unknown; None: the gallery has no labels
    verdict: V.Verdict  # when a result is the same person, and what that promises at this gallery's size
    people: int
    faces: int
    photos: int
    version: str | None = None  # the index version loaded (its folder's name); None for the pipeline's gallery
    note: str | None = None  # what the gallery's people are, where its title does not say (pipeline_gallery_note)
    embedder: XE.Embedder | None = None  # an index's loaded model file, shared with other indexes of it (_embedder)

    @property
    def threshold(self) -> float:
        """Cosine similarity at which a result is the same person (this model and state's own, at this size)."""
        return self.verdict.similarity

    @property
    def threshold_source(self) -> str:
        return self.verdict.source

    @property
    def counts_text(self) -> str:
        return f"{self.people} people, {self.faces} faces, {self.photos} photos"


def available(root: Path) -> list[tuple[str, str]]:
    """(backbone, state) pairs whose model and gallery embeddings the pipeline has built.

    Only backbones ``params.yaml: backbones`` lists: a stale model of a backbone
    no longer listed is not offered.
    """
    out = []
    for backbone in load_params(root / "params.yaml")["backbones"]:
        for state in reversed(M.STATES):  # the fine-tuned model first: the default choice
            if (root / "models" / f"{backbone}.pt").is_file() and (
                root / "data" / "embeddings" / backbone / f"{state}_gallery.npy"
            ).is_file():
                out.append((backbone, state))
    return out


def model_label(
    backbone: str, state: str | None = None, weights: str | None = None, payload: dict | None = None
) -> str:
    """E.g. "MobileNet-V2 (faster), fine-tuned"; an index's model has no state (it is the file's).

    With the ``weights`` training started from, "before" says what it is: "untrained (random weights)".
    A fused model (``payload["fused"]``) is named by its members, e.g. "dlib ResNet 0.80 + SFace 0.20 (fused)".
    """
    fused = (payload or {}).get("fused")
    if fused:
        parts = [f"{BACKBONE_LABELS.get(m['name'], m['name']).split(' (')[0]} {w:.2f}"
                 for m, w in zip(fused["members"], fused["weights"], strict=True)]  # fmt: skip
        name = " + ".join(parts) + " (fused)"
    else:
        name = BACKBONE_LABELS.get(backbone, backbone)
    return name if state is None else f"{name}, {M.state_label(state, weights)}"


def find_indexes(folder: Path) -> list[Path]:
    """Photo index folders (a ``CURRENT`` file, :mod:`facesearch.gallery`) directly under ``folder``."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and (p / X.POINTER).is_file())


def state_verdict(payload: dict, state: str, faces: int, override: float | None) -> V.Verdict:
    """The verdict of one model state in a gallery of ``faces`` faces (:func:`facesearch.retrieval.verdict.verdict`).

    A model file's threshold was calibrated on its own (fine-tuned) embeddings;
    the untrained twin ("before") embeds on another scale, so it gets the
    fallback, labelled as such, rather than a threshold measured for another model.
    """
    return V.verdict(payload if state == "after" else {}, faces, override, "$FACESEARCH_THRESHOLD")


def load_gallery(root: Path, backbone: str, state: str, threshold: float | None = None) -> Gallery:
    """The pipeline's test gallery of ``backbone`` at ``state``, with the model that embeds its queries."""
    emb_dir = root / "data" / "embeddings" / backbone
    # Unit rows, as the queries: the similarity is then a cosine whatever the model's normalize setting.
    embeddings = XE.unit(np.load(emb_dir / f"{state}_gallery.npy"))
    index = pd.read_parquet(emb_dir / "gallery.parquet")
    split = pd.read_parquet(root / "data" / "split" / "gallery.parquet")
    table = index.merge(split.loc[:, [M.CROP_PATH, *ATTRIBUTE_NAMES]], on=M.CROP_PATH, how="left")
    table[NAME] = "identity " + table[M.IDENTITY].astype("string")
    table[CROP_FILE] = [str(root / p) for p in table[M.CROP_PATH]]
    table = table.merge(_sources(root), on=M.CROP_PATH, how="left")
    model, payload = _load_state(root, backbone, state)
    search_index = gallery_index(root / "data" / "rerank" / backbone / state, embeddings)
    photos_known = table[SOURCE_FILE].notna()
    n_photos = int(table.loc[photos_known, SOURCE_FILE].nunique() + (~photos_known).sum())
    people = int(table[M.IDENTITY].nunique())
    return Gallery(
        title="the pipeline's test gallery", model=model,
        model_label=model_label(backbone, state, payload.get("config", {}).get("weights")),
        settings=crop_settings(root, backbone), size=int(model.config.img_size), embeddings=embeddings,
        index=search_index, table=table, attributes=attribute_matrix(table),
        verdict=state_verdict(payload, state, len(table), threshold), people=people, faces=len(table),
        photos=n_photos, note=pipeline_gallery_note(root, payload, people),
    )  # fmt: skip


def pipeline_gallery_note(root: Path, payload: dict, people: int) -> str:
    """What the pipeline's test gallery is, in a sentence for the visitor: whose faces, and what for.

    From the crop stage's record of the data (``data/source.json``), else the one the model
    file carries (``identities["source"]``): the synthetic sample's cartoon people are said to
    be that, with where real photos are searched instead.
    """
    source_file = root / "data" / "source.json"
    try:
        source = json.loads(source_file.read_text()) if source_file.is_file() else None
    except (OSError, ValueError):
        source = None
    source = source or (payload.get("identities") or {}).get("source") or {}
    if source.get("synthetic"):
        return (f"The {people} people of this gallery are the built-in synthetic sample's cartoon faces, held out "
                "from training: it shows that the pipeline runs, not how well it finds real people. To search "
                "real photos, build an index of your own (python -m facesearch index build; README, \"Search your "
                "own photos\") or run the pipeline on labelled real photos.")  # fmt: skip
    name = source.get("name")
    return (f"The {people} people of this gallery are held out from training: the pipeline's test identities"
            + (f" of {name}." if name else "."))  # fmt: skip


def gallery_index(structure_dir: Path, embeddings: np.ndarray) -> SearchIndex:
    """The evaluate stage's re-ranking index of this gallery (``evaluate.rerank``), else exact search.

    The structure is the stage's output (built from the gallery alone, once), used only when
    it is of these very embeddings: a stale one (embed re-ran, evaluate not yet) is skipped.
    """
    if (structure_dir / "params.json").is_file():
        structure = R.GalleryStructure.load(structure_dir)
        if structure.gallery.shape == embeddings.shape and np.allclose(structure.gallery, embeddings, atol=1e-5):
            return R.build_rerank_index(structure)
        log.warning("%s is not of the current gallery embeddings: searching without re-ranking", structure_dir)
    return ExactIndex(embeddings)


def _sources(root: Path) -> pd.DataFrame:
    """crop_path -> where its photo is (SOURCE_FILE, SOURCE_ROOT, PHOTO), its content, width and box.

    From the crop stage's manifest; empty when it is not there. The photos' root is the
    data root: a source photo is shown only from inside it, and only with its manifest content.
    """
    columns = [M.CROP_PATH, SOURCE_FILE, SOURCE_ROOT, SOURCE_SHA, PHOTO, SOURCE_WIDTH, *BOX]
    manifest_file = root / "data" / "manifest.parquet"
    if not manifest_file.is_file():
        return pd.DataFrame(columns=columns)
    manifest = pd.read_parquet(manifest_file, columns=[M.CROP_PATH, M.IMAGE_PATH, M.SHA256, M.WIDTH, *BOX])
    manifest = manifest[manifest[M.CROP_PATH].notna()]
    data_root = (root / load_params(root / "params.yaml")["data"]["root"]).absolute()
    manifest[SOURCE_FILE] = [str(data_root / p) for p in manifest[M.IMAGE_PATH]]
    manifest[SOURCE_ROOT] = str(data_root)
    manifest = manifest.rename(columns={M.WIDTH: SOURCE_WIDTH, M.SHA256: SOURCE_SHA, M.IMAGE_PATH: PHOTO})
    return manifest.loc[:, columns]


def _load_state(root: Path, backbone: str, state: str) -> tuple[torch.nn.Module, dict]:
    model, payload = load_model(root / "models" / f"{backbone}.pt")
    if state == "before":
        model = seeded_model(ModelConfig(**payload["config"]), payload["train_config"]["seed"])
    return model.eval(), payload


def load_embedder(root: Path, backbone: str, state: str) -> torch.nn.Module:
    """The trained model ("after") or its untrained twin ("before"), in eval mode on the CPU."""
    return _load_state(root, backbone, state)[0]


# --- photo indexes: which, and loaded how often -------------------------------------------------
NOT_AN_INDEX = "That is not a photo index this app can search."
PHOTO_UNKNOWN = "The photo this face was found in is not known."
PHOTO_OUTSIDE = "This face's photo is not shown: the index places it outside the index's photo folders."
PHOTO_CHANGED = ("This face's photo is not shown: the file has changed since it was indexed (update the index "
                 "with python -m facesearch index add).")  # fmt: skip
PHOTO_GONE = "This face's photo is no longer there or cannot be read."
# Indexes loaded at once (each with its embeddings; models shared, see IndexGalleries). A visitor
# switching between more of them reloads the least recently used one.
MAX_LIVE_INDEXES = 4


def index_failure(folder: Path) -> UploadError:
    """What a visitor is told when a listed index cannot be searched: no path, no cause (both are logged)."""
    return UploadError(f"The photo index {folder.name} cannot be searched right now; the app's log says why.")


def index_version(folder: Path) -> str:
    """The name of the live version of the index in ``folder``; ValueError or OSError when there is none.

    The version must be a folder directly inside ``folder`` (not ``..``, not a link out of it).
    ``CURRENT`` is read only when it is a small regular file, without blocking: a FIFO put
    there would otherwise hang the visitor's session.
    """
    fd = os.open(folder / X.POINTER, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > 4096:
            raise ValueError(f"{folder / X.POINTER} is not a pointer file")
        name = os.read(fd, 4096).decode("utf-8").strip()
    finally:
        os.close(fd)
    real = os.path.realpath(folder)
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise ValueError(f"{folder / X.POINTER} names {name!r}")
    version = os.path.realpath(os.path.join(real, name))
    if os.path.dirname(version) != real or not os.path.isdir(version):
        raise ValueError(f"{folder / X.POINTER} names {name!r}, which is not a folder inside the index")
    return name


@dataclass(frozen=True)
class Access:
    """What the operator lets visitors search, from the environment (``app/main.py`` documents the variables).

    ``index_folders``: folders whose index sub-folders the sidebar lists ($FACESEARCH_INDEXES).
    ``allow_paths``: whether a visitor may type an index folder at all ($FACESEARCH_ALLOW_PATHS=1).
    ``allowed_roots``: the folders a typed one must lie in once resolved ($FACESEARCH_ALLOWED_ROOTS;
    by default the index folders).
    """

    index_folders: tuple[Path, ...]
    allow_paths: bool = False
    allowed_roots: tuple[Path, ...] = ()

    @classmethod
    def from_env(cls, environ: Mapping[str, str], root: Path) -> Access:
        def paths(value: str) -> tuple[Path, ...]:
            return tuple(Path(p).expanduser().absolute() for p in value.split(os.pathsep) if p.strip())

        folders = paths(environ.get("FACESEARCH_INDEXES", "")) or (root.absolute() / "indexes",)
        allow = environ.get("FACESEARCH_ALLOW_PATHS", "").strip().lower() in ("1", "true", "yes", "on")
        return cls(folders, allow, paths(environ.get("FACESEARCH_ALLOWED_ROOTS", "")) or folders)

    def listed(self) -> list[Path]:
        """The index folders directly under the index folders, in order (:func:`find_indexes`)."""
        return [p for folder in self.index_folders for p in find_indexes(folder)]

    def typed_index(self, text: str) -> Path:
        """The index folder ``text`` names, resolved (symlinks followed) and inside an allowed root.

        ``text`` is an absolute path or one relative to an allowed root. Every refusal (typing
        off, outside the roots, no such folder, not an index) is the same
        :class:`UploadError` (:data:`NOT_AN_INDEX`): the answer tells a visitor nothing
        about which folders exist on the server. The reason goes to the log.
        """
        try:
            return self._typed_index(text)
        except Exception as exc:  # one answer whatever the reason
            log.info("typed index folder %r refused: %s", text, exc)
            raise UploadError(NOT_AN_INDEX) from None

    def _typed_index(self, text: str) -> Path:
        if not self.allow_paths:
            raise ValueError("typed index folders are off ($FACESEARCH_ALLOW_PATHS)")
        text = text.strip()
        if not text or "\0" in text:
            raise ValueError("no path")
        typed = Path(text)
        roots = [os.path.realpath(r) for r in self.allowed_roots]
        for candidate in [typed] if typed.is_absolute() else [Path(r) / typed for r in roots]:
            real = os.path.realpath(candidate)
            if any(os.path.commonpath([r, real]) == r for r in roots):
                index_version(Path(real))  # an index, with a live version inside it
                return Path(real)
        raise ValueError("not inside an allowed root")


class IndexGalleries:
    """The loaded photo indexes: one live version per index folder, at most :data:`MAX_LIVE_INDEXES` folders.

    ``st.cache_resource`` keyed by (folder, version) kept every version ever loaded, each
    with its own copy of the model. Here a folder's entry is replaced when its ``CURRENT``
    names another version (the old one is dropped once no search holds it), the least
    recently used folder goes beyond the limit, and galleries whose model is the same
    file share one loaded model while any of them is alive. One lock: two sessions asking
    for the same new version load it once, and two large loads never run side by side.
    """

    def __init__(self, capacity: int = MAX_LIVE_INDEXES):
        self.capacity = capacity
        self._lock = threading.Lock()
        self._live: OrderedDict[str, tuple[str, float | None, Gallery]] = OrderedDict()
        self._models: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

    def __len__(self) -> int:
        return len(self._live)

    def get(self, folder: Path, threshold: float | None = None) -> Gallery:
        """The live version of the index in ``folder``; :func:`index_failure` when it cannot be searched."""
        key = os.path.realpath(folder)
        try:
            version = index_version(Path(key))
        except (OSError, ValueError, UnicodeError) as exc:
            log.warning("index %s cannot be searched: %s", folder, exc)
            raise index_failure(Path(folder)) from None
        with self._lock:
            entry = self._live.get(key)
            if entry is not None and entry[:2] == (version, threshold):
                self._live.move_to_end(key)
                return entry[2]
            gallery = load_index_gallery(Path(folder), threshold, self._models)  # its name, as listed
            self._live.pop(key, None)
            self._live[key] = (str(gallery.version), threshold, gallery)
            while len(self._live) > self.capacity:
                self._live.popitem(last=False)
            return gallery


def _embedder(index: X.PhotoIndex, models: MutableMapping | None) -> XE.Embedder:
    """The index's model, refused unless it is the one the index was built with.

    With ``models`` (file identity -> loaded model, weakly held: a model lives as long as a
    gallery holds it, :attr:`Gallery.embedder`), a model file already loaded for another
    index is not loaded again: the fingerprint check still runs against it.
    """
    if models is None:
        return index.embedder()
    path = os.path.abspath(index.record["model"]["path"])
    try:
        st = os.stat(path)
    except OSError:
        raise XE.PhotoIndexError(f"model file {path} does not exist") from None
    key = (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    embedder = models.get(key)
    if embedder is None:
        embedder = XE.Embedder.load(path)
        embedder.model.eval()
        # The payload's weights are a second copy of the model's: only its records (threshold,
        # preprocessing) are read from here on, so the copy goes.
        embedder = replace(embedder, payload={k: v for k, v in embedder.payload.items() if k != "state_dict"})
        models[key] = embedder
    index.check_model(embedder)
    return embedder


def load_index_gallery(folder: Path, threshold: float | None = None, models: MutableMapping | None = None) -> Gallery:
    """A photo index built by ``python -m facesearch index build`` (:func:`facesearch.gallery.store.load_index`).

    Searched with the model it was built with (refused if that file is now another
    model), at that model's threshold. A broken or missing index, or its model, is
    :func:`index_failure` for the visitor and its cause in the log. ``models``: loaded
    models to share (:class:`IndexGalleries`).
    """
    try:
        index = X.load_index(folder)
        embedder = _embedder(index, models)
        structure = index.structure()
    except Exception as exc:  # a damaged index fails in ways no list of types covers
        log.warning("index %s cannot be searched: %s: %s", folder, type(exc).__name__, exc)
        raise index_failure(folder) from None
    if structure is None:
        raise UploadError(f"The photo index {folder.name} holds no faces yet.")
    f, p = index.faces, index.photos
    widths = p.set_index(X.SHA256)[X.WIDTH]
    table = pd.DataFrame({
        NAME: f[X.PERSON], CROP_FILE: pd.Series([None] * len(f), dtype="string"),
        SOURCE_FILE: [os.path.join(r, ph) for r, ph in zip(f[X.ROOT], f[X.PHOTO], strict=True)],
        SOURCE_ROOT: f[X.ROOT], SOURCE_SHA: f[X.SHA256], PHOTO: f[X.PHOTO],
        SOURCE_WIDTH: widths.reindex(f[X.SHA256]).to_numpy(),
    })  # fmt: skip
    for col in BOX:
        table[col] = f[col].to_numpy()
    return Gallery(
        title=f"the photo index {folder.name}",
        model_label=model_label(embedder.model.config.backbone, payload=embedder.payload),
        model=embedder.model, settings=embedder.settings, size=embedder.size, embeddings=index.embeddings,
        index=structure, table=table, attributes=None,
        verdict=V.verdict(embedder.payload, len(f), threshold, "$FACESEARCH_THRESHOLD"),
        people=int(f[X.PERSON].nunique()), faces=len(f), photos=int((p[X.N_FACES] > 0).sum()), version=index.version,
        embedder=embedder,
    )  # fmt: skip


def typed_index_gallery(access: Access, galleries: IndexGalleries, text: str, threshold: float | None) -> Gallery:
    """The index a visitor typed, loaded; any failure, whatever its reason, is :data:`NOT_AN_INDEX`.

    A broken, empty or model-less index answers as a folder that is none would: a
    different message would tell the visitor that something is there.
    """
    folder = access.typed_index(text)
    try:
        return galleries.get(folder, threshold)
    except UploadError as exc:
        log.info("typed index folder %s refused: %s", folder, exc)
        raise UploadError(NOT_AN_INDEX) from None


def query_labels(root: Path, data: bytes) -> dict[str, bool] | None:
    """The query photo's own attribute labels, when it is a photo of the pipeline's data (same bytes).

    Only then can the app say which attributes a result shares with the query: a
    visitor's own photo has no labels, and guessing them from its results would
    claim for the query what only the results show.
    """
    manifest_file = root / "data" / "manifest.parquet"
    if not manifest_file.is_file():
        return None
    manifest = pd.read_parquet(manifest_file, columns=[M.SHA256, *ATTRIBUTE_NAMES])
    rows = manifest[manifest[M.SHA256] == hashlib.sha256(data).hexdigest()]
    if rows.empty or rows.iloc[0][list(ATTRIBUTE_NAMES)].isna().any():
        return None
    return {a: bool(rows.iloc[0][a]) for a in ATTRIBUTE_NAMES}


# --- the search ----------------------------------------------------------------------------------
# A result's verdict (Result.verdict), set by group():
MATCH = "match"  # the nearest face, at or above the threshold: the answer's verdict rests on it
SAME_PERSON = "same person"  # another face of the matched person: the gallery gives both the same name
ABOVE = "above threshold"  # another person's face (or an unnamed one) that clears the threshold too
BELOW = "below threshold"
# Faces of the matched person shown with the match (the match included): one row of the page.
MATCH_PHOTOS = 3
# Nearest faces read per result shown, so that grouping by person still fills the page.
CANDIDATES_PER_RESULT = 5


@dataclass(frozen=True)
class Result:
    rank: int  # its place among the nearest faces, by the search's order (1: the nearest)
    similarity: float  # cosine similarity of the L2-normalised embeddings
    clears: bool  # similarity >= the gallery's threshold
    name: str | None  # who it is, when known
    crop_file: str | None  # the pipeline's crop of this face; None for an index
    source_file: str | None  # the photo it was found in; None when unknown
    box: Box | None  # the face's box in that photo's pixels
    source_width: int | None  # that photo's width, px (the box's scale)
    attributes: dict[str, bool]  # known attributes of this gallery face
    photo: str | None = None  # the photo's path relative to its root: what visitors are shown
    source_root: str | None = None  # the folder the photo must lie in to be shown
    source_sha256: str | None = None  # the content it had when indexed: other content is not shown
    verdict: str = BELOW  # MATCH, SAME_PERSON, ABOVE or BELOW (group)


@dataclass(frozen=True)
class Answer:
    results: list[Result]  # what the page shows, grouped by person (group)
    threshold: float
    threshold_source: str

    @property
    def match(self) -> bool:
        """Whether the nearest face is the same person: else "no match in this gallery"."""
        return bool(self.results) and self.results[0].verdict == MATCH

    @property
    def who(self) -> str | None:
        """Who matched: the gallery's name for the person, or "a face in photo X"; None without a match."""
        if not self.match:
            return None
        top = self.results[0]
        return top.name if top.name is not None else f"a face in photo {top.photo or 'not known'}"


def group(nearest: list[Result], threshold: float, k: int = 9) -> list[Result]:
    """The ``k`` results to show, each with its verdict, a person's faces together.

    The nearest face decides: :data:`MATCH` when it reaches ``threshold``. When the
    gallery names it, the matched person's other faces among ``nearest`` follow it as
    :data:`SAME_PERSON` (up to :data:`MATCH_PHOTOS` in all), whatever their similarity:
    the gallery says who they are, so they are that person's, not "below threshold".
    Then every other person once, by their nearest face, so one person's photos do not
    crowd out the rest; an unnamed face counts as its own person. Ranks stay the search's.
    """
    if not nearest:
        return []

    def level(r: Result) -> Result:
        return replace(r, verdict=ABOVE if r.similarity >= threshold else BELOW)

    top = nearest[0]
    matched = top.similarity >= threshold
    shown = [replace(top, verdict=MATCH) if matched else level(top)]
    seen = {top.name} - {None}
    if matched and top.name is not None:
        same = [r for r in nearest[1:] if r.name == top.name][: MATCH_PHOTOS - 1]
        shown += [replace(r, verdict=SAME_PERSON) for r in same]
    for r in nearest[1:]:
        if len(shown) >= k:
            break
        if r.name is not None:
            if r.name in seen:
                continue
            seen.add(r.name)
        shown.append(level(r))
    return shown[:k]


def search(gallery: Gallery, face: np.ndarray, k: int = 9) -> Answer:
    """The ``k`` results for a cropped face (RGB uint8, any square size), grouped by person (:func:`group`).

    The answer is a match when the nearest face's similarity reaches the gallery's
    threshold (``>=``, :mod:`facesearch.retrieval.verification`'s acceptance rule); whole-image
    queries get the same verdict, so a landscape that scores high but below it is no match.
    """
    with failures_as("The search failed; please try again."):
        return _search(gallery, face, k)


def _search(gallery: Gallery, face: np.ndarray, k: int) -> Answer:
    emb = XE.unit(photos.embed(gallery.model, face[None], gallery.size, batch=1))
    _, idx = gallery.index.search(emb, min(k * CANDIDATES_PER_RESULT, len(gallery.table)))
    nearest = []
    for rank, g in enumerate(idx[0], start=1):
        row = gallery.table.iloc[int(g)]
        # The plain cosine similarity: a re-ranked search orders by another distance, the verdict is this.
        sim = float(emb[0] @ gallery.embeddings[int(g)])
        own = {}
        if gallery.attributes is not None:
            own = {
                a: bool(v) for a, v in zip(ATTRIBUTE_NAMES, gallery.attributes[int(g)], strict=True) if not np.isnan(v)
            }
        known = not pd.isna(row[SOURCE_FILE]) and not any(pd.isna(row[c]) for c in BOX)
        nearest.append(Result(
            rank, sim, sim >= gallery.threshold, _text(row, NAME), _text(row, CROP_FILE),
            _text(row, SOURCE_FILE) if known else None, tuple(int(row[c]) for c in BOX) if known else None,
            int(row[SOURCE_WIDTH]) if known and not pd.isna(row[SOURCE_WIDTH]) else None, own,
            photo=_text(row, PHOTO), source_root=_text(row, SOURCE_ROOT), source_sha256=_text(row, SOURCE_SHA),
        ))  # fmt: skip
    return Answer(group(nearest, gallery.threshold, k), gallery.threshold, gallery.threshold_source)


def _text(row: pd.Series, col: str) -> str | None:
    """A table cell as text; None when missing (or the gallery has no such column)."""
    value = row.get(col)
    return None if value is None or pd.isna(value) else str(value)


# --- showing a result's photo ---------------------------------------------------------------------
def confined(root: str, path: str) -> str:
    """``path`` resolved (symlinks followed), when it lies inside ``root`` resolved; else :data:`PHOTO_OUTSIDE`.

    An index's stored photo path is data: ``../secret/private.jpg``, an absolute path, or
    a link inside the root that points out of it must not make the app show that file.
    """
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    if real == real_root or os.path.commonpath([real_root, real]) != real_root:
        log.warning("photo %s lies outside its index root %s: not shown", path, root)
        raise UploadError(PHOTO_OUTSIDE)
    return real


def is_indexed_content(data: bytes, sha256: str) -> bool:
    """Whether ``data``, a photo file's bytes as just read, is the content that was indexed.

    The bytes are hashed, not the file: what is decoded and shown is then exactly what
    was checked, even if the file is replaced meanwhile. (A path-level check from
    :mod:`facesearch.gallery`, when it has one, answers for the file, not these bytes.)
    """
    return hashlib.sha256(data).hexdigest() == sha256.lower()


def photo_bytes(result: Result) -> bytes:
    """The bytes of a result's source photo: inside its root, and the content indexed; else a message."""
    if result.source_file is None or result.source_root is None or result.source_sha256 is None:
        raise UploadError(PHOTO_UNKNOWN)
    path = confined(result.source_root, result.source_file)
    try:
        data = read_photo(path, XE.LIMITS.max_file_bytes)
    except ImageRejected:
        raise UploadError(PHOTO_GONE) from None
    if not is_indexed_content(data, result.source_sha256):
        raise UploadError(PHOTO_CHANGED)
    return data


def source_photo(result: Result) -> tuple[np.ndarray, Box]:
    """The photo a result was found in (at most :data:`WORK_SIDE` px) and its face box in those pixels.

    Only a photo inside its index's root whose content is the one indexed (:func:`photo_bytes`).
    """
    if result.box is None:
        raise UploadError(PHOTO_UNKNOWN)
    data = photo_bytes(result)
    with failures_as(PHOTO_GONE):
        image = decode_image(data, XE.LIMITS.max_pixels, max_side=WORK_SIDE)
        scale = image.width / (result.source_width or image.width)
        return image.rgb, tuple(round(v * scale) for v in result.box)


def result_face(result: Result, side: int = 180) -> np.ndarray:
    """The face of a result to show: the pipeline's crop, or cut from its source photo (an index)."""
    if result.crop_file is not None:
        with failures_as("A result's face image cannot be read."):
            return np.asarray(Image.open(result.crop_file).convert("RGB"))
    rgb, box = source_photo(result)
    return crop_square(rgb, box, 0.2, side)
