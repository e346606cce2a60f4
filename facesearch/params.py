"""Reading ``params.yaml``.

Stages read their hyperparameters from ``params.yaml`` (DVC's default params
file) and take paths on the command line; ``dvc.yaml`` lists for each stage
exactly the keys it reads so DVC re-runs exactly what changed.
"""

from __future__ import annotations

import os
from typing import Any

import yaml


def load_params(path: str | os.PathLike = "params.yaml") -> dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        params = yaml.safe_load(fh)
    if not isinstance(params, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return params
