"""A chip sheet: every member network's chip of one face, side by side on one square image.

A fused model (:mod:`facesearch.nets.fused`) runs several networks on one detected face, each on
its own chip (dlib's ResNet on dlib's 150 px landmark chip, SFace on the 112 px ArcFace chip).
Every path that turns photos into embeddings (the photo index, ``search``, the app, ``python -m
facesearch evaluate`` and ``calibrate``) cuts *one* crop per face with the model's crop settings
and hands a batch of them to the network. :class:`ChipSheet` is those settings for a fused model:
it finds faces as its members do (they share one detection, checked here) and cuts one square
sheet per face holding each member's chip at its own size in its own cell, unresampled; the fused
network reads each member's chip back from its cell. So a fused model needs no new code path
anywhere a model is accepted, and a sheet a person looks at (the app's query face) shows what
each network sees.

Cells are ``max(member size)`` px squares on a ``ceil(sqrt(k))``-wide grid, a member's chip in the
top-left corner of its cell, the rest black.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from facesearch.faces.config import FaceConfig, face_crop
from facesearch.faces.detection import Box

# The FaceConfig fields that say how faces are found, which every member must share (the rest say
# how each member's chip is cut).
DETECTION_FIELDS = ("detector", "hog_upsample", "hog_max_side", "haar", "yunet")


@dataclass(frozen=True)
class ChipSheet:
    """The crop settings of a fused model: its members' chip settings, in member order."""

    members: tuple[FaceConfig, ...]

    def __post_init__(self):
        if len(self.members) < 2:
            raise ValueError("a chip sheet holds the chips of two or more networks")
        first = self.members[0]
        for i, member in enumerate(self.members[1:], 1):
            differ = [f for f in DETECTION_FIELDS if hasattr(first, f) and getattr(member, f) != getattr(first, f)]
            if differ:
                raise ValueError(f"member {i} finds faces differently from member 0 ({', '.join(differ)}): "
                                 "the networks of a fused model share one detection per face")  # fmt: skip

    def __getattr__(self, name: str):
        # How faces are found (detector, policy, haar, ...): the members' one detection. Only reached
        # for names the sheet itself lacks; dunder and private names stay missing (copy, pickle).
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.members[0], name)

    @property
    def cell(self) -> int:
        return max(m.size for m in self.members)

    @property
    def columns(self) -> int:
        return math.ceil(math.sqrt(len(self.members)))

    @property
    def size(self) -> int:
        """The sheet's side, px: a square of whole cells."""
        rows = math.ceil(len(self.members) / self.columns)
        return self.cell * max(self.columns, rows)

    @property
    def alignment(self) -> str:
        """The manifest's ``align`` value of a sheet's crops."""
        return "sheet"

    def regions(self) -> list[tuple[int, int, int]]:
        """(top, left, side) of each member's chip on the sheet, px, in member order."""
        out = []
        for i, member in enumerate(self.members):
            row, col = divmod(i, self.columns)
            out.append((row * self.cell, col * self.cell, member.size))
        return out

    def cut(self, rgb: np.ndarray, box: Box, **detected) -> np.ndarray:
        """The sheet of the face in ``box``: each member's chip (:func:`face_crop`) in its cell, uint8.

        ``detected``: what the detection located besides the box (landmarks), passed to each cut.
        """
        sheet = np.zeros((self.size, self.size, 3), np.uint8)
        for member, (top, left, side) in zip(self.members, self.regions(), strict=True):
            sheet[top : top + side, left : left + side] = face_crop(rgb, box, member, **detected)
        return sheet


def cut_face(rgb: np.ndarray, box: Box, settings: FaceConfig | ChipSheet, **detected) -> np.ndarray:
    """The crop of ``box`` a model sees: its chip (:func:`face_crop`), or its sheet for a fused model."""
    if isinstance(settings, ChipSheet):
        return settings.cut(rgb, box, **detected)
    return face_crop(rgb, box, settings, **detected)
