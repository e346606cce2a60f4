"""dlib itself, and where its pretrained model files are: the ``face_recognition_models`` package, or a folder.

Kept apart from the network code so the crop stage (landmark alignment) does
not depend on, and re-run for, changes to the models module.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

RECOGNITION_MODEL = "dlib_face_recognition_resnet_model_v1.dat"
SHAPE_PREDICTORS = {5: "shape_predictor_5_face_landmarks.dat", 68: "shape_predictor_68_face_landmarks.dat"}
# A folder holding the .dat files, for users who downloaded them from dlib.net instead.
MODELS_ENV = "FACESEARCH_DLIB_MODELS"


class DlibModelMissing(FileNotFoundError):
    """A dlib model file is neither installed nor in ``$FACESEARCH_DLIB_MODELS``; says how to get it."""


def find_model_file(name: str) -> Path:
    """Path of one of dlib's model files: ``$FACESEARCH_DLIB_MODELS/<name>``, else the installed
    ``face_recognition_models`` package (located without importing it: its ``__init__`` needs
    ``pkg_resources``, which recent setuptools no longer ships)."""
    folder = os.environ.get(MODELS_ENV)
    if folder:
        path = Path(folder) / name
        if path.is_file():
            return path
        raise DlibModelMissing(f"{name} is not in ${MODELS_ENV}={folder}")
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise DlibModelMissing(
            f"dlib's model file {name} comes with the package face_recognition_models, which is not "
            "installed: pip install -r requirements-face.txt (or point $FACESEARCH_DLIB_MODELS at a "
            "folder holding the .dat files from https://github.com/davisking/dlib-models)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / name
    if not path.is_file():
        raise DlibModelMissing(f"face_recognition_models is installed but has no {path}")
    return path


def import_dlib():
    """The ``dlib`` module, or a RuntimeError saying how to install it (imported only when configured)."""
    try:
        import dlib
    except ImportError as exc:
        raise RuntimeError(
            "crop.detector dlib_hog and crop.align landmarks need dlib: pip install -r requirements-face.txt"
        ) from exc
    return dlib
