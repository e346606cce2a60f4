"""Shared fixtures: tiny synthetic data sets, bad files, and the real-face subset."""

from __future__ import annotations

import io
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from facesearch.synth import SampleSpec, generate_sample

REPO = Path(__file__).resolve().parents[1]
CELEBA_DEV = REPO.parent / "shared" / "data" / "celeba-dev"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def celeba_dev() -> Path:
    if not (CELEBA_DEV / "identity_CelebA.txt").is_file():
        pytest.skip(f"real-face subset not found at {CELEBA_DEV} (CI provides it beside the repo)")
    return CELEBA_DEV


@pytest.fixture(scope="session")
def sample_factory(tmp_path_factory):
    """Generate (and cache per session) a synthetic CelebA-layout folder for a spec."""
    cache: dict[SampleSpec, Path] = {}

    def make(**kwargs) -> Path:
        spec = SampleSpec(**kwargs)
        if spec not in cache:
            out = tmp_path_factory.mktemp("sample")
            generate_sample(spec, out)
            cache[spec] = out
        return cache[spec]

    return make


@pytest.fixture
def small_sample(sample_factory, tmp_path) -> Path:
    """A private copy of a 6-identity x 4-photo sample that a test may modify."""
    src = sample_factory(identities=6, images_per_identity=4, seed=3)
    dst = tmp_path / "data"
    shutil.copytree(src, dst)
    return dst


def jpeg_bytes(img: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kwargs)
    return buf.getvalue()


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny, valid-headed PNG that claims a huge canvas (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def variants_of(face: Image.Image) -> dict[str, bytes]:
    """The same face photo in awkward but valid encodings."""
    gray = face.convert("L")
    sixteen = Image.fromarray(np.asarray(gray, dtype=np.uint16) * 257)  # mode I;16
    rgba = face.convert("RGBA")
    rgba.putalpha(200)
    return {
        "gray.jpg": jpeg_bytes(gray),
        "cmyk.jpg": jpeg_bytes(face.convert("CMYK")),
        "rgba.png": png_bytes(rgba),
        "sixteen.png": png_bytes(sixteen),
        "palette.png": png_bytes(face.convert("P")),
    }


def broken_files(good_jpeg: bytes) -> dict[str, bytes]:
    """File name -> bytes for each kind of unusable input."""
    return {
        "zero.jpg": b"",
        "text.jpg": b"this is not an image\n" * 20,
        "random.jpg": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "truncated.jpg": good_jpeg[: len(good_jpeg) // 2],
        "corrupt.jpg": good_jpeg[:200] + b"\x00" * 50 + good_jpeg[250:400],
        "bomb.png": bomb_png(),
        "notes.txt": b"readme\n",
    }


def write_params(path: Path, overrides: dict | None = None) -> Path:
    """Copy the repo's params.yaml to ``path`` with dotted-key overrides ({"crop.n_jobs": 1})."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for dotted, value in (overrides or {}).items():
        node = params
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path
