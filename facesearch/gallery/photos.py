"""One photo's faces as a model sees them: found, cut with the model's own preprocessing, embedded.

The one place the search app (:mod:`facesearch.gallery.app_core`, a face of an upload)
and the photo index (:mod:`facesearch.gallery`, every face of every photo, and
the ``search`` command's queries) turn pixels into embeddings, so a query and
the faces it is compared with are always cut and embedded alike:

- :func:`detect`: the configured detector (``crop.detector``), its boxes in
  photo order (left to right, then top to bottom), so "face 2" of a photo means
  the same face to the app and to the index;
- :func:`crop`: the crop of one box as the model's training crops were cut
  (``preprocessing.crop``: a square around the box, or a landmark-aligned chip);
- :func:`embed`: crops to embeddings at the model's input side.

Nothing here guards against hostile input; the callers do (the app turns any
failure into a message for the visitor, the index into a counted skip).
"""

from __future__ import annotations

import numpy as np
import torch

from facesearch.data.images import shrink
from facesearch.faces.config import FaceConfig, find_faces
from facesearch.faces.detection import Box, Detection, Landmarks, crop_square
from facesearch.faces.sheet import ChipSheet, cut_face
from facesearch.nets.inference import embed_array


def detect(rgb: np.ndarray, settings: FaceConfig | ChipSheet) -> Detection:
    """Every face the detector of ``settings`` finds in ``rgb``, boxes in photo order."""
    # Sorted by (x, y, w, h), landmarks and scores with their boxes: the detectors return them in
    # scan or score order, which differs between passes.
    return find_faces(rgb, settings).in_photo_order()


def crop(
    rgb: np.ndarray, box: Box | None, settings: FaceConfig | ChipSheet, points: Landmarks | None = None
) -> np.ndarray:
    """The crop the pipeline would make of ``box`` (uint8, size x size x 3); ``None``: the whole image, squared.

    ``points``: the face's landmarks from its detection (:meth:`Detection.landmarks_of`), which
    ``align: arcface`` on a detector that locates them (``yunet``) aligns on.
    """
    if box is None:
        # Shrink before squaring: the square of a 10:1 photo is 10x its pixels.
        small = shrink(rgb, settings.size)
        return crop_square(small, (0, 0, small.shape[1], small.shape[0]), 0.0, settings.size)
    return cut_face(rgb, box, settings, points=points)


def crops(rgb: np.ndarray, detection: Detection, settings: FaceConfig | ChipSheet) -> np.ndarray:
    """:func:`crop` of each face of ``detection``, stacked: (len(boxes), size, size, 3) uint8."""
    if not detection.boxes:
        return np.zeros((0, settings.size, settings.size, 3), np.uint8)
    return np.stack([crop(rgb, box, settings, detection.landmarks_of(box)) for box in detection.boxes])


def embed(
    model: torch.nn.Module, faces: np.ndarray, size: int, device: torch.device | str = "cpu", batch: int = 64
) -> np.ndarray:
    """Embeddings (N, d) float32 of face crops (N, H, W, 3) uint8 at input side ``size`` (``model`` on ``device``)."""
    return embed_array(model, faces, size, torch.device(device), batch=batch)
