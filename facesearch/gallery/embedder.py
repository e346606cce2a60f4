"""The model a photo index is bound to, and one photo file's faces through it.

An index embeds every face with one model (:class:`Embedder`: the model file, its crop settings
and input side from its preprocessing record, :func:`facesearch.nets.contract.model_preprocessing`)
and knows it by its fingerprint (:func:`model_fingerprint`: SHA-256 of the model's config,
preprocessing record and weights), so build, add, remove and search refuse any other model:
embeddings of two models cannot be compared. :func:`file_faces` reads one photo file's faces
with it, as the app does (:mod:`facesearch.gallery.photos`). :class:`PhotoIndexError` is the
one-line failure of every index command.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from facesearch.data.images import ImageRejected, decode_image
from facesearch.faces.config import FaceConfig
from facesearch.faces.cropping import CropLimits, read_photo, shape_reason
from facesearch.gallery import photos
from facesearch.nets.config import fingerprinted_config
from facesearch.nets.contract import model_preprocessing, preprocessing_record
from facesearch.nets.distances import unit_rows
from facesearch.nets.models import ModelFileError, load_model, resolve_device
from facesearch.retrieval.verdict import verdict
from facesearch.threads import use_usable_cpus

log = logging.getLogger(__name__)

# The crop stage's file and image limits (crop.max_file_bytes, max_pixels, min_image_side, max_aspect).
LIMITS = CropLimits()


class PhotoIndexError(RuntimeError):
    """The index cannot do what was asked; the message says why, for the user."""


def model_fingerprint(payload: dict) -> str:
    """SHA-256 of what decides a model's embeddings: config, preprocessing and weights.

    Not of the file: a file re-saved with new metadata (a threshold, metrics) but the
    same weights and crops embeds the same, and is the same model to the index.
    """
    face, size = model_preprocessing(payload)
    h = hashlib.sha256()
    meta = {"config": fingerprinted_config(payload["config"]), "preprocessing": preprocessing_record(face, size)}
    h.update(json.dumps(meta, sort_keys=True).encode())
    for name, tensor in sorted(payload["state_dict"].items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}:".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


@dataclass
class Embedder:
    """A loaded model with its crop settings, input side and fingerprint."""

    path: str
    model: torch.nn.Module
    payload: dict
    settings: FaceConfig
    size: int
    fingerprint: str
    device: torch.device

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu") -> Embedder:
        """The model file at ``path``; :class:`PhotoIndexError` (one line) when it is missing or no model."""
        if not Path(path).is_file():
            raise PhotoIndexError(f"model file {path} does not exist")
        try:
            model, payload = load_model(path)  # on the CPU: the fingerprint reads the weights there
        except ModelFileError as exc:
            raise PhotoIndexError(str(exc)) from None
        except OSError as exc:
            raise PhotoIndexError(f"model file {path} cannot be read: {exc.strerror or exc}") from None
        dev = resolve_device(device)
        use_usable_cpus()  # the app's indexes too: one thread per CPU this process may use
        settings, size = model_preprocessing(payload)
        return cls(os.path.abspath(path), model.to(dev), payload, settings, size, model_fingerprint(payload), dev)

    def record(self) -> dict:
        return {"path": self.path, "fingerprint": self.fingerprint, "backbone": self.model.config.backbone,
                "embedding_dim": self.model.config.embedding_dim,
                "preprocessing": preprocessing_record(self.settings, self.size)}  # fmt: skip

    def embed(self, crops: np.ndarray) -> np.ndarray:
        return unit(photos.embed(self.model, crops, self.size, self.device))


def enrol_threshold(embedder: Embedder) -> tuple[float, str]:
    """(similarity, source) at which two faces count as one person when enrolling people (:func:`find_person`).

    The model's verdict threshold for a gallery of one face: a face compared with one
    other face (or with the mean of a person's faces) is a 1:1 decision.
    """
    v = verdict(embedder.payload, 1)
    if v.warning():  # who is named after whom rests on it too
        log.warning("enrolling people: %s", v.warning())
    return v.similarity, v.source


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (:func:`facesearch.nets.distances.unit_rows`), float32: a model saved with
    normalize false has longer ones."""
    return unit_rows(np.asarray(x, np.float32))


def read_file(path: bytes | str, limits: CropLimits) -> tuple[bytes, str]:
    """(bytes, SHA-256) of a photo file, or :class:`ImageRejected` (not a file, unreadable, too big)."""
    data = read_photo(path, limits.max_file_bytes)
    return data, hashlib.sha256(data).hexdigest()


def file_faces(data: bytes, settings: FaceConfig, limits: CropLimits) -> tuple[tuple[int, int], tuple, np.ndarray, str]:
    """((width, height), boxes, crops, detector) of every face in a photo's bytes, or :class:`ImageRejected`.

    Decoded at full resolution like the crop stage's photos, so boxes are in the
    photo's own pixels and crops are cut as the model's training crops were.
    """
    image = decode_image(data, limits.max_pixels)
    reason = shape_reason(image.width, image.height, limits)
    if reason is not None:
        raise ImageRejected(reason, f"{image.width}x{image.height}")
    detection = photos.detect(image.rgb, settings)
    return (image.width, image.height), detection.boxes, photos.crops(image.rgb, detection, settings), \
        detection.detector  # fmt: skip
