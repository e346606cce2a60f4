"""The ``execution`` params block changes how the crop stage runs, never what DVC thinks must re-run."""

from __future__ import annotations

import pytest
import yaml
from conftest import dvc, tiny_repo_copy

pytestmark = pytest.mark.slow


def set_params(repo, **changes) -> None:
    """Change params.yaml of ``repo`` in place (``crop__margin=0.3``), keeping its other values."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for dotted, value in changes.items():
        block, key = dotted.split("__")
        params[block][key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_execution_knobs_rerun_nothing(repo_root, tmp_path):
    repo = tiny_repo_copy(repo_root, tmp_path / "repo")
    dvc(repo, "repro", "crop")
    assert "crop" not in dvc(repo, "status", "crop")
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    assert not any("execution" in str(s.get("do", s).get("params", [])) for s in stages.values())
    set_params(repo, execution__n_jobs=2, execution__backend="threading")
    assert "crop" not in dvc(repo, "status", "crop")  # nothing to re-run
    set_params(repo, execution__backend="dask", execution__address="tcp://10.0.0.5:8786")
    assert "crop" not in dvc(repo, "status", "crop")  # nor on a cluster
    set_params(repo, crop__margin=0.3)  # a real change is seen (the test can fail)
    assert "crop" in dvc(repo, "status", "crop")
