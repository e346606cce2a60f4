"""Deterministic synthetic faces in the CelebA file layout: the built-in sample data.

CelebA cannot be bundled, so a fresh clone renders a small data set that has
CelebA's files (``img_celeba/NNNNNN.jpg``, ``identity_CelebA.txt``,
``list_attr_celeba.txt``, ``list_eval_partition.txt``) and CelebA's problems:
the face sits on a cluttered background larger than itself, at varied pose,
scale, position and lighting; some photos show a second, smaller face, some
none. Each identity has fixed geometry, skin tone, hair and eye colour, so
identity is learnable; accessories and expression vary per photo.

Attributes are true to the drawing wherever the renderer controls them (see
``DRAWN_ATTRIBUTES``). The few that no drawing can show (Attractive) are drawn
once per identity at random, so they behave like identity traits, as
annotator judgements do in CelebA.

Every photo is rendered from its own RNG seeded by (seed, identity index,
photo index), so the same params give the same bytes, and an identity looks
the same whatever the size of the data set.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from joblib import Parallel, delayed
from PIL import Image

from facesearch.data.celeba import (
    ATTRIBUTE_FILE,
    ATTRIBUTE_NAMES,
    IDENTITY_FILE,
    PARTITION_FILE,
)
from facesearch.data.layouts import SAMPLE_MARKER

# Attributes whose value is decided by what is drawn (per identity or per photo).
DRAWN_ATTRIBUTES = frozenset({
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips",
    "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby",
    "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones",
    "Male", "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face",
    "Pale_Skin", "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks", "Sideburns", "Smiling",
    "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick",
    "Wearing_Necklace", "Wearing_Necktie", "Young",
})  # fmt: skip

HAIR_COLOURS = {  # RGB
    "black": (25, 22, 20),
    "brown": (95, 60, 35),
    "blond": (215, 185, 110),
    "gray": (165, 165, 160),
    "red": (150, 60, 30),
}
SKIN_TONES = [  # RGB, pale first
    (250, 225, 210), (240, 205, 180), (225, 185, 150), (205, 160, 120), (180, 135, 100), (155, 110, 80),
]  # fmt: skip
EYE_COLOURS = [(70, 45, 25), (60, 110, 160), (70, 120, 70), (110, 80, 40), (90, 95, 100)]


@dataclass(frozen=True)
class Identity:
    """Traits fixed for one person."""

    aspect: float  # face height / width
    width_scale: float  # >1: wider (Chubby)
    eye_spacing: float  # eye centre offset from midline, in face half-widths
    eye_height: float  # eye half-height in face half-widths (small: Narrow_Eyes)
    eye_colour: tuple[int, int, int]
    brow_thickness: float
    brow_arch: float
    nose_length: float
    nose_width: float
    pointy_nose: bool
    mouth_width: float
    lip_thickness: float
    skin: tuple[int, int, int]
    pale: bool
    hair: str  # key of HAIR_COLOURS, or "" when bald
    hair_long: bool
    wavy: bool
    bangs: bool
    receding: bool
    male: bool
    beard: str  # "", "full", "goatee", "stubble"
    mustache: bool
    sideburns: bool
    young: bool
    double_chin: bool
    high_cheekbones: bool
    makeup: bool
    lipstick: bool
    rosy: bool
    earrings: bool
    glasses_rate: float  # probability of wearing glasses in a photo
    attractive: bool


def make_identity(rng: np.random.Generator) -> Identity:
    male = bool(rng.random() < 0.5)
    skin_idx = int(rng.integers(len(SKIN_TONES)))
    hair = str(rng.choice(["black", "brown", "blond", "gray", "red"], p=[0.35, 0.3, 0.18, 0.1, 0.07]))
    bald = male and rng.random() < 0.15
    beard = str(rng.choice(["", "full", "goatee", "stubble"], p=[0.55, 0.2, 0.1, 0.15])) if male else ""
    young = bool(rng.random() < 0.7) and hair != "gray"
    return Identity(
        aspect=float(rng.uniform(1.15, 1.45)),
        width_scale=float(rng.choice([1.0, 1.15], p=[0.8, 0.2])),
        eye_spacing=float(rng.uniform(0.36, 0.46)),
        eye_height=float(rng.choice([0.1, 0.075], p=[0.8, 0.2])),
        eye_colour=EYE_COLOURS[int(rng.integers(len(EYE_COLOURS)))],
        brow_thickness=float(rng.choice([0.05, 0.09], p=[0.75, 0.25])),
        brow_arch=float(rng.choice([0.0, 0.08], p=[0.7, 0.3])),
        nose_length=float(rng.uniform(0.3, 0.45)),
        nose_width=float(rng.choice([0.12, 0.2], p=[0.75, 0.25])),
        pointy_nose=bool(rng.random() < 0.3),
        mouth_width=float(rng.uniform(0.3, 0.42)),
        lip_thickness=float(rng.choice([0.04, 0.08], p=[0.75, 0.25])),
        skin=SKIN_TONES[skin_idx],
        pale=skin_idx == 0,
        hair="" if bald else hair,
        hair_long=(not male and rng.random() < 0.8) or (male and rng.random() < 0.1),
        wavy=bool(rng.random() < 0.35),
        bangs=bool(rng.random() < 0.2) and not bald,
        receding=male and not bald and rng.random() < 0.2,
        male=male,
        beard=beard,
        mustache=male and rng.random() < 0.25,
        sideburns=male and not bald and rng.random() < 0.2,
        young=young,
        double_chin=bool(rng.random() < 0.08),
        high_cheekbones=bool(rng.random() < 0.4),
        makeup=(not male) and rng.random() < 0.5,
        lipstick=(not male) and rng.random() < 0.5,
        rosy=bool(rng.random() < 0.1),
        earrings=(not male) and rng.random() < 0.35,
        glasses_rate=float(rng.choice([0.05, 0.7], p=[0.8, 0.2])),
        attractive=bool(rng.random() < 0.5),
    )


@dataclass(frozen=True)
class Look:
    """What varies from photo to photo."""

    smiling: bool
    mouth_open: bool
    glasses: bool
    hat: bool
    necklace: bool
    necktie: bool
    blurry: bool


def _shade(colour, factor):
    return tuple(int(max(0, min(255, c * factor))) for c in colour)


class _Frame:
    """Maps face-local coordinates (units of face half-width, y down) to pixels, with roll."""

    def __init__(self, cx: float, cy: float, half_width: float, roll_deg: float, yaw: float):
        self.cx, self.cy, self.s = cx, cy, half_width
        self.roll = roll_deg
        self.cos, self.sin = math.cos(math.radians(roll_deg)), math.sin(math.radians(roll_deg))
        self.yaw = yaw  # horizontal feature shift, face half-widths

    def pt(self, u: float, v: float, features: bool = True) -> tuple[int, int]:
        if features:
            u = u + self.yaw
        x, y = u * self.s, v * self.s
        return (
            round(self.cx + x * self.cos - y * self.sin),
            round(self.cy + x * self.sin + y * self.cos),
        )

    def ln(self, n: float) -> int:
        return max(1, round(n * self.s))

    def ellipse(self, img, u, v, au, av, colour, angle=0.0, start=0, end=360, thickness=-1, features=True):
        cv2.ellipse(
            img,
            self.pt(u, v, features),
            (self.ln(au), self.ln(av)),
            self.roll + angle,
            start,
            end,
            colour,
            thickness if thickness < 0 else self.ln(thickness),
            cv2.LINE_AA,
        )

    def poly(self, img, pts, colour, features=True):
        arr = np.array([self.pt(u, v, features) for u, v in pts], dtype=np.int32)
        cv2.fillPoly(img, [arr], colour, cv2.LINE_AA)

    def line(self, img, p, q, colour, thickness, features=True):
        cv2.line(img, self.pt(*p, features), self.pt(*q, features), colour, self.ln(thickness), cv2.LINE_AA)


def draw_face(img: np.ndarray, ident: Identity, look: Look, frame: _Frame) -> None:
    """Draw one face into ``img`` (RGB uint8) in place."""
    f = frame
    wsc = ident.width_scale
    ah = ident.aspect
    skin = ident.skin
    hair = HAIR_COLOURS.get(ident.hair, (0, 0, 0))

    # Long hair behind the head and shoulders/neck first.
    if ident.hair and ident.hair_long:
        f.ellipse(img, 0, 0.35, 1.35 * wsc, ah * 1.25, hair, features=False)
    f.poly(
        img,
        [(-0.45, ah * 0.7), (0.45, ah * 0.7), (0.55, ah * 1.8), (-0.55, ah * 1.8)],
        _shade(skin, 0.8),
        features=False,
    )
    f.ellipse(img, 0, ah * 2.3, 2.0, 0.8, (60, 70, 90), features=False)  # shoulders/shirt
    if look.necktie:
        f.poly(
            img,
            [(-0.08, ah * 1.55), (0.08, ah * 1.55), (0.14, ah * 2.4), (0, ah * 2.6), (-0.14, ah * 2.4)],
            (150, 20, 30),
            features=False,
        )
    if look.necklace:
        f.ellipse(img, 0, ah * 1.25, 0.5, 0.3, (230, 200, 60), start=0, end=180, thickness=0.05, features=False)
    # Ears.
    for side in (-1, 1):
        f.ellipse(img, side * 0.98 * wsc, 0.05, 0.16, 0.28, _shade(skin, 0.85), features=False)
        if ident.earrings:
            f.ellipse(img, side * 1.0 * wsc, 0.38, 0.06, 0.06, (235, 205, 70), features=False)
    # Face: darker rim, lighter centre, so the sides read darker as in real lighting.
    f.ellipse(img, 0, 0, 1.0 * wsc, ah, _shade(skin, 0.72), features=False)
    f.ellipse(img, 0, 0, 0.88 * wsc, ah * 0.95, _shade(skin, 0.86), features=False)
    f.ellipse(img, f.yaw * 0.5, -0.05, 0.7 * wsc, ah * 0.85, skin, features=False)
    # Lit cheeks and nose bridge below the eyes.
    f.ellipse(img, 0, 0.12, 0.6 * wsc, 0.22, _shade(skin, 1.12))
    if ident.double_chin:
        f.ellipse(img, 0, ah * 0.92, 0.4, 0.12, _shade(skin, 0.7), start=0, end=180, thickness=0.03)
    if ident.high_cheekbones:
        for side in (-1, 1):
            f.ellipse(img, side * 0.7, 0.38, 0.12, 0.18, _shade(skin, 0.9), angle=side * 25)
    if ident.rosy:
        for side in (-1, 1):
            f.ellipse(img, side * 0.5, 0.3, 0.16, 0.1, (230, 120, 120))
    # Beard regions.
    # Beard hair blended a little with skin: real beards are sparser than a flat fill.
    beard_base = hair if ident.hair else (60, 50, 45)
    beard_colour = tuple(int(0.7 * b + 0.3 * k) for b, k in zip(beard_base, skin, strict=True))
    if ident.beard == "full":
        # Jaw and chin only: a beard over the cheeks hides the bright band below
        # the eyes and real detectors miss such faces too often for a sample.
        f.ellipse(img, 0, ah * 0.62, 0.85 * wsc, ah * 0.38, beard_colour, start=0, end=180, features=False)
    elif ident.beard == "goatee":
        f.ellipse(img, 0, ah * 0.82, 0.22, 0.2, beard_colour)
    elif ident.beard == "stubble":
        f.ellipse(img, 0, ah * 0.55, 0.88 * wsc, ah * 0.43, _shade(skin, 0.8), start=0, end=180, features=False)
    if ident.sideburns:
        for side in (-1, 1):
            f.poly(
                img,
                [(side * 0.86, -0.35), (side * 0.98, -0.35), (side * 0.96, 0.25), (side * 0.84, 0.25)],
                beard_colour,
                features=False,
            )

    # Eyes: dark sockets above bright cheeks are what the Haar cascade keys on.
    ey = -0.18
    for side in (-1, 1):
        ex = side * ident.eye_spacing
        # Eye shadow is a tint of the socket, never lighter than it: the dark
        # band across the eyes is what the Haar cascade keys on.
        socket = _shade((skin[0], skin[1] * 0.8, skin[2] * 1.1), 0.45) if ident.makeup else _shade(skin, 0.5)
        f.ellipse(img, ex, ey - 0.03, 0.25, 0.16, socket)
        f.ellipse(img, ex, ey, 0.14, ident.eye_height, (215, 215, 210))
        f.ellipse(img, ex, ey, 0.075, min(0.075, ident.eye_height), ident.eye_colour)
        f.ellipse(img, ex, ey, 0.035, 0.035, (10, 10, 10))
        if not ident.young:
            f.ellipse(img, ex, ey + 0.14, 0.12, 0.04, _shade(skin, 0.62), start=0, end=180, thickness=0.02)
        # Brows.
        brow = _shade(hair if ident.hair else (70, 55, 45), 0.8)
        by = ey - 0.2
        if ident.brow_arch:
            f.ellipse(img, ex, by + 0.06, 0.2, 0.1, brow, start=200, end=340, thickness=ident.brow_thickness)
        else:
            f.line(img, (ex - 0.19, by), (ex + 0.19, by - 0.01), brow, ident.brow_thickness)
    if look.glasses:
        frame_col = (20, 20, 25)
        for side in (-1, 1):
            f.ellipse(img, side * ident.eye_spacing, ey, 0.23, 0.17, frame_col, thickness=0.03)
        f.line(img, (-ident.eye_spacing + 0.23, ey), (ident.eye_spacing - 0.23, ey), frame_col, 0.03)

    # Nose: bright bridge, shadowed nostrils.
    nl, nw = ident.nose_length, ident.nose_width
    f.line(img, (0.0, ey + 0.05), (0.0, ey + nl), _shade(skin, 1.08), 0.06)
    if ident.pointy_nose:
        f.poly(img, [(0, ey + nl - 0.05), (-nw, ey + nl + 0.08), (nw, ey + nl + 0.08)], _shade(skin, 0.7))
    else:
        f.ellipse(img, 0, ey + nl + 0.04, nw, 0.06, _shade(skin, 0.72))
    for side in (-1, 1):
        f.ellipse(img, side * nw * 0.6, ey + nl + 0.06, 0.035, 0.025, _shade(skin, 0.4))

    # Mustache, then mouth.
    my = ey + nl + 0.3
    mw = ident.mouth_width
    if ident.mustache:
        f.ellipse(img, 0, my - 0.07, mw * 0.9, 0.045, beard_colour)
    lips = (190, 40, 60) if ident.lipstick else _shade(skin, 0.6)
    lt = ident.lip_thickness
    if look.smiling:
        f.ellipse(img, 0, my - 0.05, mw, 0.16 + lt, lips, start=0, end=180)
        inner = (70, 20, 25) if look.mouth_open else lips
        f.ellipse(img, 0, my - 0.04, mw * 0.8, 0.1, inner, start=0, end=180)
        if look.mouth_open:
            f.ellipse(img, 0, my - 0.03, mw * 0.6, 0.03, (240, 240, 235))
    else:
        f.ellipse(img, 0, my, mw, lt + 0.02, lips)
        if look.mouth_open:
            f.ellipse(img, 0, my, mw * 0.7, lt, (70, 20, 25))
        else:
            f.line(img, (-mw, my), (mw, my), _shade(lips, 0.6), 0.02)

    # Hair on top (after the face so it covers the forehead edge), then a hat.
    if ident.hair:
        top = -ah * (0.62 if ident.receding else 0.5)
        if ident.bangs:
            top = -ah * 0.38
        pts = []
        n = 24
        for i in range(n + 1):
            a = math.pi + math.pi * i / n
            r = 1.08 * wsc
            wob = 0.06 * math.sin(i * 1.7) if ident.wavy else 0.0
            pts.append((math.cos(a) * (r + wob), math.sin(a) * ah * 1.1 + 0.05))
        pts += [(0.98 * wsc, top + 0.25), (0.6, top), (-0.6, top), (-0.98 * wsc, top + 0.25)]
        f.poly(img, pts, hair, features=False)
        if ident.wavy:
            for k in range(4):
                f.ellipse(
                    img,
                    -0.6 + 0.4 * k,
                    -ah * 0.82,
                    0.15,
                    0.08,
                    _shade(hair, 0.7),
                    start=0,
                    end=180,
                    thickness=0.025,
                    features=False,
                )
    if look.hat:
        hat = (40, 60, 120)
        f.poly(img, [(-0.95, -ah * 0.8), (0.95, -ah * 0.8), (0.8, -ah * 1.55), (-0.8, -ah * 1.55)], hat, features=False)
        f.ellipse(img, 0, -ah * 0.8, 1.35, 0.12, _shade(hat, 0.8), features=False)


def attributes_of(ident: Identity, look: Look) -> dict[str, bool]:
    """The 40 CelebA attributes of one photo, true to what :func:`draw_face` draws."""
    a = {name: False for name in ATTRIBUTE_NAMES}
    a.update(
        {
            "5_o_Clock_Shadow": ident.beard == "stubble",
            "Arched_Eyebrows": ident.brow_arch > 0,
            "Attractive": ident.attractive,
            "Bags_Under_Eyes": not ident.young,
            "Bald": ident.hair == "",
            "Bangs": ident.bangs and not look.hat,
            "Big_Lips": ident.lip_thickness > 0.05,
            "Big_Nose": ident.nose_width > 0.15,
            "Black_Hair": ident.hair == "black",
            "Blond_Hair": ident.hair == "blond",
            "Blurry": look.blurry,
            "Brown_Hair": ident.hair in ("brown", "red"),
            "Bushy_Eyebrows": ident.brow_thickness > 0.07,
            "Chubby": ident.width_scale > 1.05,
            "Double_Chin": ident.double_chin,
            "Eyeglasses": look.glasses,
            "Goatee": ident.beard == "goatee",
            "Gray_Hair": ident.hair == "gray",
            "Heavy_Makeup": ident.makeup,
            "High_Cheekbones": ident.high_cheekbones,
            "Male": ident.male,
            "Mouth_Slightly_Open": look.mouth_open,
            "Mustache": ident.mustache,
            "Narrow_Eyes": ident.eye_height < 0.08,
            "No_Beard": ident.beard in ("", "stubble"),
            "Oval_Face": ident.aspect > 1.35 and ident.width_scale == 1.0,
            "Pale_Skin": ident.pale,
            "Pointy_Nose": ident.pointy_nose,
            "Receding_Hairline": ident.receding,
            "Rosy_Cheeks": ident.rosy,
            "Sideburns": ident.sideburns,
            "Smiling": look.smiling,
            "Straight_Hair": bool(ident.hair) and not ident.wavy,
            "Wavy_Hair": bool(ident.hair) and ident.wavy,
            "Wearing_Earrings": ident.earrings,
            "Wearing_Hat": look.hat,
            "Wearing_Lipstick": ident.lipstick,
            "Wearing_Necklace": look.necklace,
            "Wearing_Necktie": look.necktie,
            "Young": ident.young,
        }
    )
    return a


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A cluttered scene: gradient, shapes, lines and texture, larger than any face."""
    c0, c1 = rng.integers(30, 226, size=3), rng.integers(30, 226, size=3)
    t = np.linspace(0, 1, w if rng.random() < 0.5 else h, dtype=np.float32)
    ramp = c0[None, :] * (1 - t[:, None]) + c1[None, :] * t[:, None]
    img = np.empty((h, w, 3), np.float32)
    img[:] = ramp[None, :, :] if len(t) == w else ramp[:, None, :]
    img = img.astype(np.uint8)
    for _ in range(int(rng.integers(6, 14))):
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        kind = rng.integers(3)
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        size = int(rng.integers(max(4, min(h, w) // 12), max(8, min(h, w) // 3)))
        if kind == 0:
            cv2.rectangle(img, (x, y), (x + size, y + int(size * rng.uniform(0.3, 2))), colour, -1)
        elif kind == 1:
            cv2.circle(img, (x, y), size // 2, colour, -1, cv2.LINE_AA)
        else:
            cv2.line(
                img,
                (x, y),
                (int(rng.integers(0, w)), int(rng.integers(0, h))),
                colour,
                int(rng.integers(1, 5)),
                cv2.LINE_AA,
            )
    noise = rng.normal(0, 6, size=(h, w, 1)).astype(np.float32)
    return np.clip(img.astype(np.float32) + noise, 0, 255).astype(np.uint8)


def render_photo(
    ident: Identity,
    rng: np.random.Generator,
    stranger: Identity | None,
    face_prob: float,
    second_face_prob: float,
    width: tuple[int, int] = (220, 340),
) -> tuple[np.ndarray, dict[str, bool], int]:
    """Render one photo of ``ident``; returns (RGB image, attributes, faces drawn of ident).

    The photo is ``width[0] <= w < width[1]`` px wide; everything in it is drawn in
    proportion to its size, so a smaller range renders the same scenes smaller.
    """
    w = int(rng.integers(width[0], width[1]))
    h = int(w * rng.uniform(0.8, 1.3))
    img = _background(rng, h, w)
    glasses = bool(rng.random() < ident.glasses_rate)
    smiling = bool(rng.random() < 0.5)
    look = Look(
        smiling=smiling,
        mouth_open=bool(rng.random() < (0.6 if smiling else 0.15)),
        glasses=glasses,
        hat=bool(rng.random() < 0.15),
        necklace=(not ident.male) and rng.random() < 0.25,
        necktie=ident.male and rng.random() < 0.2,
        blurry=bool(rng.random() < 0.1),
    )
    has_face = rng.random() < face_prob
    if has_face:
        half_w = max(h, w) * rng.uniform(0.13, 0.2)
        ah = ident.aspect * half_w
        cx = rng.uniform(half_w * 1.2, w - half_w * 1.2)
        cy = rng.uniform(ah * 1.35, max(ah * 1.35 + 1, h - ah * 1.3))
        if stranger is not None and rng.random() < second_face_prob:
            # A smaller bystander on the side with more room.
            sw = half_w * rng.uniform(0.45, 0.6)
            sx = (
                rng.uniform(sw * 1.2, max(sw * 1.2 + 1, cx - half_w * 1.6))
                if cx > w / 2
                else rng.uniform(min(w - sw * 1.2 - 1, cx + half_w * 1.6), w - sw * 1.2)
            )
            sy = rng.uniform(stranger.aspect * sw * 1.3, h - stranger.aspect * sw)
            s_look = Look(False, False, False, False, False, False, False)
            draw_face(img, stranger, s_look, _Frame(sx, sy, sw, rng.uniform(-8, 8), 0.0))
        frame = _Frame(cx, cy, half_w, rng.uniform(-12, 12), rng.uniform(-0.08, 0.08))
        draw_face(img, ident, look, frame)
    # Lighting: a directional gradient and an overall exposure change.
    gx = np.linspace(-1, 1, w, dtype=np.float32)[None, :, None]
    gain = rng.uniform(0.75, 1.15) * (1 + rng.uniform(-0.25, 0.25) * gx)
    img = np.clip(img.astype(np.float32) * gain, 0, 255).astype(np.uint8)
    if look.blurry:
        img = cv2.GaussianBlur(img, (0, 0), sigmaX=max(1.0, max(h, w) / 200))
    return img, attributes_of(ident, look), int(has_face)


@dataclass(frozen=True)
class SampleSpec:
    """Size and randomness of the sample data set (``params.yaml: sample``)."""

    identities: int = 40
    images_per_identity: int = 12
    seed: int = 0
    face_prob: float = 0.96  # share of photos that show the identity's face at all
    second_face_prob: float = 0.15  # share of those with a smaller bystander face too
    jpeg_quality: int = 92
    photo_width: tuple[int, int] = (220, 340)  # photo width range [low, high), px

    def __post_init__(self):
        lo, hi = (int(v) for v in self.photo_width)  # params.yaml gives a list
        if not 0 < lo < hi:
            raise ValueError(f"sample.photo_width must be [low, high) with 0 < low < high, got {self.photo_width}")
        object.__setattr__(self, "photo_width", (lo, hi))


# Photos per parallel task: large enough that a task's overhead is small, small enough
# that the workers stay busy to the end. Each photo has its own seed, so the bytes do
# not depend on it (nor on the number of workers).
CHUNK = 500


def _render_chunk(
    spec: SampleSpec, img_dir: str, tasks: list[tuple[int, int, str]], identities: dict[int, Identity],
    strangers: list[Identity],
) -> list[tuple[str, dict[str, bool], int]]:  # fmt: skip
    """Render and write the photos ``tasks`` (identity index, photo index, file name)."""
    out = []
    for k, j, name in tasks:
        rng = np.random.default_rng([spec.seed, 3, k, j])
        stranger = strangers[int(rng.integers(len(strangers)))]
        img, attrs, has_face = render_photo(
            identities[k], rng, stranger, spec.face_prob, spec.second_face_prob, spec.photo_width
        )
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=spec.jpeg_quality)
        (Path(img_dir) / name).write_bytes(buf.getvalue())
        out.append((name, attrs, has_face))
    return out


def generate_sample(spec: SampleSpec, out_dir: str | Path, n_jobs: int = 1, chunk: int = CHUNK) -> dict[str, int]:
    """Write a CelebA-layout sample to ``out_dir`` (which must be empty or absent).

    Returns counts for logging. File names are assigned in a seeded shuffled
    order, so identities are interleaved on disk as in CelebA. ``n_jobs`` joblib
    workers render the photos (-1: one per core); the bytes are the same for any
    number (and any ``chunk``, the photos per task).
    """
    out = Path(out_dir)
    img_dir = out / "img_celeba"
    img_dir.mkdir(parents=True, exist_ok=True)
    master = np.random.default_rng(spec.seed)
    # CelebA identity ids are sparse integers in 1..10177.
    ids = sorted(int(i) for i in master.choice(np.arange(1, 10178), size=spec.identities, replace=False))
    identities = [make_identity(np.random.default_rng([spec.seed, 1, k])) for k in range(spec.identities)]
    # Strangers: identities outside the data set, used only as bystanders.
    strangers = [make_identity(np.random.default_rng([spec.seed, 2, k])) for k in range(8)]
    # Identity-disjoint official-style partition: 80% train, 10% val, 10% test.
    order = master.permutation(spec.identities)
    n_train, n_val = round(0.8 * spec.identities), round(0.1 * spec.identities)
    partition_of = {int(k): 0 if r < n_train else 1 if r < n_train + n_val else 2 for r, k in enumerate(order)}
    jobs = [(k, j) for k in range(spec.identities) for j in range(spec.images_per_identity)]
    names = master.permutation(len(jobs))
    tasks = [(k, j, f"{num + 1:06d}.jpg") for (k, j), num in sorted(zip(jobs, names, strict=True), key=lambda t: t[1])]
    chunks = [tasks[i : i + chunk] for i in range(0, len(tasks), chunk)]
    rendered = Parallel(n_jobs=n_jobs, return_as="generator")(
        # Each task gets only the identities it draws: pickling all 10k for every chunk would cost more.
        delayed(_render_chunk)(spec, os.fspath(img_dir), chunk, {k: identities[k] for k, _, _ in chunk}, strangers)
        for chunk in chunks
    )
    id_rows, attr_rows, part_rows = [], [], []
    faces = 0
    for chunk, results in zip(chunks, rendered, strict=True):
        for (k, _, name), (_, attrs, has_face) in zip(chunk, results, strict=True):
            faces += has_face
            id_rows.append(f"{name} {ids[k]}")
            attr_rows.append(name + " " + " ".join(" 1" if attrs[a] else "-1" for a in ATTRIBUTE_NAMES))
            part_rows.append(f"{name} {partition_of[k]}")
    (out / IDENTITY_FILE).write_text("\n".join(id_rows) + "\n")
    header = f"{len(attr_rows)}\n" + " ".join(ATTRIBUTE_NAMES) + "\n"
    (out / ATTRIBUTE_FILE).write_text(header + "\n".join(attr_rows) + "\n")
    (out / PARTITION_FILE).write_text("\n".join(part_rows) + "\n")
    # Says "synthetic" to everything downstream: a threshold calibrated on these cartoon faces is
    # flagged wherever it would be used on real photos (facesearch.data.layouts.is_synthetic).
    (out / SAMPLE_MARKER).write_text(json.dumps({"generator": "facesearch.synth", "synthetic": True,
                                                 "spec": dataclasses.asdict(spec)}, sort_keys=True) + "\n")  # fmt: skip
    return {"identities": spec.identities, "images": len(jobs), "images_with_face": faces}
