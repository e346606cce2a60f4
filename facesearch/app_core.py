"""The search app's logic, free of Streamlit so it can be tested and benchmarked directly.

A photo arrives as bytes (upload or camera), is checked and decoded in memory
(never written to disk), its faces found by the pipeline's own detector, the
chosen face cropped as the crop stage cropped the chosen model's gallery
(the model's own ``preprocessing.crop``), embedded by that model and searched
in a :class:`Gallery`: the test gallery the pipeline built
(``data/embeddings/<backbone>/<state>_gallery.npy``, :func:`load_gallery`) or a
photo index (``python -m facesearch index build``, :func:`load_index_gallery`).
Each result carries its cosine similarity and a verdict against the gallery's
model's own verdict for a gallery of that size (:func:`facesearch.contract.verdict`), and the
answer says whether anything is the same person (:attr:`Answer.match`).
Finding, cutting and embedding are :mod:`facesearch.photos`' (shared with the
photo index, :mod:`facesearch.index`); this module adds the upload checks, the
choice of face (:func:`face_choices`, :func:`default_face`) and the
visitor-facing errors.

Uploads are hostile until proven otherwise: every function a query passes
through (:func:`read_upload`, :func:`find_faces`, :func:`face_choices`,
:func:`crop_face`, :func:`search`, and :func:`load_index_gallery`,
:func:`source_photo` for what a visitor names or opens) raises only
:class:`UploadError`, whose text is meant for the visitor, and an accepted upload
costs a bounded amount of memory: its header is checked before any pixel is decoded,
JPEGs are decoded at reduced scale, and the image is brought down to :data:`WORK_SIDE` right after decoding.
"""

from __future__ import annotations

import hashlib
import io
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from PIL import Image

from facesearch import contract, photos
from facesearch import index as X
from facesearch import manifest as M
from facesearch import rerank as R
from facesearch.celeba import ATTRIBUTE_NAMES
from facesearch.cropping import read_photo
from facesearch.detect import Box, Detection, crop_square, has_eye
from facesearch.faces import FaceConfig
from facesearch.images import (
    ALLOWED_FORMATS,
    WEBP_CANVAS_MAX_PIXELS,
    DecodedImage,
    ImageRejected,
    decode_image,
    webp_header,
)
from facesearch.manifest import SchemaError
from facesearch.models import ModelConfig, load_model, seeded_model
from facesearch.params import load_params
from facesearch.retrieval import attribute_matrix
from facesearch.search import ExactIndex, SearchIndex

log = logging.getLogger(__name__)

# The upload limit, stated once: the app's own check, the caption under the uploader, the uploader's
# own limit (st.file_uploader max_upload_size) and Streamlit's server.maxUploadSize in
# .streamlit/config.toml (tests/test_app.py checks it) are all this many MiB (Streamlit's "MB").
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
LIMITS_TEXT = (f"{FORMATS_TEXT}; at most {MAX_UPLOAD_MB} MB and {MAX_UPLOAD_PIXELS // 1_000_000} megapixels "
               f"({WEBP_CANVAS_MAX_PIXELS // 1_000_000} for a WebP with transparency, lossless or animated), no side "
               f"more than {MAX_ASPECT} times the other.")  # fmt: skip
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

    A WebP is read from its RIFF header (:func:`facesearch.images.webp_header`), never opened
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


# --- which face of the photo -------------------------------------------------------------
@dataclass(frozen=True)
class Face:
    """One detected face of the query photo, as the face picker lists it."""

    number: int  # 1-based, in photo order (facesearch.photos.detect): "face 2" everywhere
    box: Box
    searchable: bool  # at least MIN_FACE_SIDE px: see there
    eyes: bool  # the eye cascade fires in its upper part (facesearch.detect.has_eye)
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

    Neither detector reports a confidence, so "face-like" is what can be checked:
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
    table: pd.DataFrame  # NAME, CROP_FILE, SOURCE_FILE, SOURCE_WIDTH, BOX, attributes; row i <-> embeddings[i]
    attributes: np.ndarray | None  # (N, 40) float, NaN where unknown; None: the gallery has no labels
    verdict: contract.Verdict  # when a result is the same person, and what that promises at this gallery's size
    people: int
    faces: int
    photos: int

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


def model_label(backbone: str, state: str | None = None) -> str:
    """E.g. "MobileNet-V2 (faster), fine-tuned"; an index's model has no state (it is the file's)."""
    name = BACKBONE_LABELS.get(backbone, backbone)
    return name if state is None else f"{name}, {M.STATE_LABELS[state]}"


def find_indexes(folder: Path) -> list[Path]:
    """Photo index folders (a ``CURRENT`` file, :mod:`facesearch.index`) directly under ``folder``."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and (p / X.POINTER).is_file())


def state_verdict(payload: dict, state: str, faces: int, override: float | None) -> contract.Verdict:
    """The verdict of one model state in a gallery of ``faces`` faces (:func:`facesearch.contract.verdict`).

    A model file's threshold was calibrated on its own (fine-tuned) embeddings;
    the untrained twin ("before") embeds on another scale, so it gets the
    fallback, labelled as such, rather than a threshold measured for another model.
    """
    return contract.verdict(payload if state == "after" else {}, faces, override, "$FACESEARCH_THRESHOLD")


def load_gallery(root: Path, backbone: str, state: str, threshold: float | None = None) -> Gallery:
    """The pipeline's test gallery of ``backbone`` at ``state``, with the model that embeds its queries."""
    emb_dir = root / "data" / "embeddings" / backbone
    # Unit rows, as the queries: the similarity is then a cosine whatever the model's normalize setting.
    embeddings = X.unit(np.load(emb_dir / f"{state}_gallery.npy"))
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
    return Gallery(
        title="the pipeline's test gallery", model_label=model_label(backbone, state), model=model,
        settings=crop_settings(root, backbone), size=int(model.config.img_size), embeddings=embeddings,
        index=search_index, table=table, attributes=attribute_matrix(table),
        verdict=state_verdict(payload, state, len(table), threshold), people=int(table[M.IDENTITY].nunique()),
        faces=len(table), photos=n_photos,
    )  # fmt: skip


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
    """crop_path -> SOURCE_FILE, SOURCE_WIDTH, BOX from the crop stage's manifest (empty when it is not there)."""
    columns = [M.CROP_PATH, SOURCE_FILE, SOURCE_WIDTH, *BOX]
    manifest_file = root / "data" / "manifest.parquet"
    if not manifest_file.is_file():
        return pd.DataFrame(columns=columns)
    manifest = pd.read_parquet(manifest_file, columns=[M.CROP_PATH, M.IMAGE_PATH, M.WIDTH, *BOX])
    manifest = manifest[manifest[M.CROP_PATH].notna()]
    data_root = root / load_params(root / "params.yaml")["data"]["root"]
    manifest[SOURCE_FILE] = [str(data_root / p) for p in manifest[M.IMAGE_PATH]]
    return manifest.rename(columns={M.WIDTH: SOURCE_WIDTH}).loc[:, columns]


def _load_state(root: Path, backbone: str, state: str) -> tuple[torch.nn.Module, dict]:
    model, payload = load_model(root / "models" / f"{backbone}.pt")
    if state == "before":
        model = seeded_model(ModelConfig(**payload["config"]), payload["train_config"]["seed"])
    return model.eval(), payload


def load_embedder(root: Path, backbone: str, state: str) -> torch.nn.Module:
    """The trained model ("after") or its untrained twin ("before"), in eval mode on the CPU."""
    return _load_state(root, backbone, state)[0]


def load_index_gallery(folder: Path, threshold: float | None = None) -> Gallery:
    """A photo index built by ``python -m facesearch index build`` (:func:`facesearch.index.load_index`).

    Searched with the model it was built with (refused if that file is now another
    model), at that model's threshold; a broken or missing index is an :class:`UploadError`.
    """
    try:
        index = X.load_index(folder)
        embedder = index.embedder()
    except (X.PhotoIndexError, SchemaError, OSError, ValueError) as exc:
        raise UploadError(f"The index {folder} cannot be searched: {exc}") from None
    structure = index.structure()
    if structure is None:
        raise UploadError(f"The index {folder} holds no faces yet: add photos with `python -m facesearch index add`.")
    f, p = index.faces, index.photos
    sources = [str(Path(r) / ph) for r, ph in zip(f[X.ROOT], f[X.PHOTO], strict=True)]
    widths = p.set_index(X.SHA256)[X.WIDTH]
    table = pd.DataFrame({NAME: f[X.PERSON], CROP_FILE: pd.Series([None] * len(f), dtype="string"),
                          SOURCE_FILE: sources, SOURCE_WIDTH: widths.reindex(f[X.SHA256]).to_numpy()})  # fmt: skip
    for col in BOX:
        table[col] = f[col].to_numpy()
    return Gallery(
        title=f"the photo index {folder.name}", model_label=model_label(embedder.model.config.backbone),
        model=embedder.model.eval(), settings=embedder.settings, size=embedder.size, embeddings=index.embeddings,
        index=structure, table=table, attributes=None,
        verdict=contract.verdict(embedder.payload, len(f), threshold, "$FACESEARCH_THRESHOLD"),
        people=int(f[X.PERSON].nunique()), faces=len(f), photos=int((p[X.N_FACES] > 0).sum()),
    )  # fmt: skip


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
@dataclass(frozen=True)
class Result:
    rank: int
    similarity: float  # cosine similarity of the L2-normalised embeddings
    same_person: bool  # similarity >= the gallery's threshold
    name: str | None  # who it is, when known
    crop_file: str | None  # the pipeline's crop of this face; None for an index
    source_file: str | None  # the photo it was found in; None when unknown
    box: Box | None  # the face's box in that photo's pixels
    source_width: int | None  # that photo's width, px (the box's scale)
    attributes: dict[str, bool]  # known attributes of this gallery face


@dataclass(frozen=True)
class Answer:
    results: list[Result]
    threshold: float
    threshold_source: str

    @property
    def match(self) -> bool:
        """Whether the best result is the same person: else "no match in this gallery"."""
        return bool(self.results) and self.results[0].same_person


def search(gallery: Gallery, face: np.ndarray, k: int = 9) -> Answer:
    """The ``k`` nearest gallery faces to a cropped face (RGB uint8, any square size), each with its verdict.

    A result is the same person when its similarity reaches the gallery's threshold
    (``>=``, :mod:`facesearch.verification`'s acceptance rule); whole-image queries
    get the same verdict, so a landscape that scores high but below it is no match.
    """
    with failures_as("The search failed; please try again."):
        return _search(gallery, face, k)


def _search(gallery: Gallery, face: np.ndarray, k: int) -> Answer:
    emb = X.unit(photos.embed(gallery.model, face[None], gallery.size, batch=1))
    _, idx = gallery.index.search(emb, min(k, len(gallery.table)))
    results = []
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
        results.append(Result(
            rank, sim, sim >= gallery.threshold, None if pd.isna(row[NAME]) else str(row[NAME]),
            None if pd.isna(row[CROP_FILE]) else str(row[CROP_FILE]), str(row[SOURCE_FILE]) if known else None,
            tuple(int(row[c]) for c in BOX) if known else None,
            int(row[SOURCE_WIDTH]) if known and not pd.isna(row[SOURCE_WIDTH]) else None, own,
        ))  # fmt: skip
    return Answer(results, gallery.threshold, gallery.threshold_source)


def source_photo(result: Result) -> tuple[np.ndarray, Box]:
    """The photo a result was found in (at most :data:`WORK_SIDE` px) and its face box in those pixels."""
    if result.source_file is None or result.box is None:
        raise UploadError("The photo this face was found in is not known.")
    try:
        data = read_photo(result.source_file, X.LIMITS.max_file_bytes)
    except ImageRejected:
        raise UploadError(f"The photo {result.source_file} is no longer there or cannot be read.") from None
    with failures_as(f"The photo {result.source_file} cannot be read."):
        image = decode_image(data, X.LIMITS.max_pixels, max_side=WORK_SIDE)
        scale = image.width / (result.source_width or image.width)
        return image.rgb, tuple(round(v * scale) for v in result.box)


def result_face(result: Result, side: int = 180) -> np.ndarray:
    """The face of a result to show: the pipeline's crop, or cut from its source photo (an index)."""
    if result.crop_file is not None:
        with failures_as("A result's face image cannot be read."):
            return np.asarray(Image.open(result.crop_file).convert("RGB"))
    rgb, box = source_photo(result)
    return crop_square(rgb, box, 0.2, side)
