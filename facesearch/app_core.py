"""The search app's logic, free of Streamlit so it can be tested and benchmarked directly.

A photo arrives as bytes (upload or camera), is checked and decoded in memory
(never written to disk), its faces found by the pipeline's own detector, the
chosen face cropped exactly as the crop stage crops, embedded by the chosen
model and searched in the gallery the pipeline built
(``data/embeddings/<backbone>/<state>_gallery.npy``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from facesearch import manifest as M
from facesearch.celeba import ATTRIBUTE_NAMES
from facesearch.data import embed_array
from facesearch.detect import Box, Detection, crop_square
from facesearch.faces import FaceConfig, face_crop
from facesearch.faces import find_faces as _find_faces
from facesearch.images import DecodedImage, ImageRejected, decode_image
from facesearch.models import ModelConfig, load_model, seeded_model
from facesearch.params import load_params
from facesearch.retrieval import attribute_matrix
from facesearch.search import ExactIndex, cosine_similarity

MAX_UPLOAD_BYTES = 10 * 2**20  # 10 MB
MAX_UPLOAD_PIXELS = 40_000_000  # 40 megapixels
STATES = ("after", "before")
STATE_LABELS = {"after": "fine-tuned", "before": "before fine-tuning"}
BACKBONE_LABELS = {"resnet50": "ResNet-50 (more accurate)", "mobilenet_v2": "MobileNet-V2 (faster)"}

REJECT_MESSAGES = {
    "empty_file": "The file is empty.",
    "not_an_image": "This is not an image file we can read.",
    "unsupported_format": "This image format is not supported; use JPEG, PNG, WebP, BMP, TIFF or GIF.",
    "too_large": f"The image is too large (more than {MAX_UPLOAD_PIXELS // 1_000_000} megapixels).",
    "truncated": "The image file is cut short (truncated).",
    "corrupt": "The image file is damaged.",
}


class UploadError(ValueError):
    """A user-facing reason an upload cannot be searched."""


def read_upload(data: bytes) -> DecodedImage:
    """Check and decode uploaded bytes in memory; raises :class:`UploadError` with a clear message."""
    if len(data) > MAX_UPLOAD_BYTES:
        raise UploadError(f"The file is larger than {MAX_UPLOAD_BYTES // 2**20} MB.")
    try:
        return decode_image(data, MAX_UPLOAD_PIXELS)
    except ImageRejected as exc:
        raise UploadError(REJECT_MESSAGES.get(exc.reason, "The image cannot be read.")) from None


def crop_settings(root: Path) -> FaceConfig:
    """The crop stage's settings from the pipeline's ``params.yaml``, so queries are cut like the gallery."""
    return FaceConfig.from_params(load_params(root / "params.yaml")["crop"])


def find_faces(image: DecodedImage, settings: FaceConfig) -> Detection:
    return _find_faces(image.rgb, settings)


def crop_face(image: DecodedImage, box: Box | None, settings: FaceConfig) -> np.ndarray:
    """The crop the pipeline would make of ``box``; ``None``: the whole image, squared."""
    if box is None:
        box = (0, 0, image.width, image.height)
        return crop_square(image.rgb, box, 0.0, settings.size)
    return face_crop(image.rgb, box, settings)


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
        for state in STATES:
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
    size = model.config.img_size
    emb = embed_array(model, face[None], size, torch.device("cpu"), batch=1)
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
