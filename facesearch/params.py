"""Reading ``params.yaml``.

Stages read their hyperparameters from ``params.yaml`` (DVC's default params
file) and take paths on the command line; ``dvc.yaml`` lists for each stage
exactly the keys it reads so DVC re-runs exactly what changed.
"""

from __future__ import annotations

import os
import re
from typing import Any

import yaml


class _Loader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where ``1e-5`` (no dot) is a string; YAML 1.2, and users, read a number."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)?(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_params(path: str | os.PathLike = "params.yaml") -> dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        params = yaml.load(fh, Loader=_Loader)  # a SafeLoader subclass: builds no arbitrary objects
    if not isinstance(params, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return params
