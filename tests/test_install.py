"""facesearch installs as a package with a ``facesearch`` command that works from any folder.

The pins of ``pyproject.toml`` are those of the requirements files; an install (plain and
editable, into a fresh virtual environment that borrows this one's dependencies) puts the
``facesearch`` command on its PATH, holds the package and its data only, and runs from a folder
that is not the checkout.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import REPO, copy_repo

EXTRAS = {"face": "requirements-face.txt", "search": "requirements-search.txt", "cluster": "requirements-cluster.txt"}


def pins(path: Path) -> list[str]:
    """The requirement lines of a requirements file, without comments, ``-r`` includes and ``-e .``."""
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith(("-r", "-e"))]


def test_pyproject_pins_what_the_requirements_files_pin():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["dependencies"] == pins(REPO / "requirements.txt")
    extras = project["optional-dependencies"]
    for extra, file in EXTRAS.items():
        assert extras[extra] == pins(REPO / file), extra
    assert extras["dev"] == ["facesearch[face,search,cluster]", *pins(REPO / "requirements-dev.txt")]
    assert (REPO / "requirements.txt").read_text().splitlines()[-1] == "-e ."  # installs the project itself
    assert project["scripts"] == {"facesearch": "facesearch.tools.cli:main"}


def test_python_m_facesearch_runs_from_another_folder(tmp_path):
    # What an install amounts to for `python -m facesearch`: the package importable, the folder anywhere.
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "facesearch", "--help"], cwd=tmp_path, env=env, capture_output=True,
                         text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: python -m facesearch") and "search" in out.stdout


def venv(path: Path) -> Path:
    """A virtual environment that sees this one's packages (torch and the rest), without its own pip."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(path)], check=True)
    return path / "bin"


def pip_install(bin_dir: Path, *args: str) -> None:
    out = subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--no-index", *args], capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


def run(bin_dir: Path, cwd: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(args, cwd=cwd, env=env | {"PATH": f"{bin_dir}:{env['PATH']}"}, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


@pytest.mark.slow
def test_installed_command_runs_from_any_folder(tmp_path):
    src = tmp_path / "src"
    copy_repo(REPO, src)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = "import facesearch.tools.pretrained as p; print(p.__file__, p.calibration_file('dlib_resnet'))"

    plain = venv(tmp_path / "plain")
    pip_install(plain, str(src))
    site = next((tmp_path / "plain" / "lib").glob("python3*/site-packages"))
    # The package and its data only: stages, app, bench and tests run from a checkout.
    assert sorted(p.name for p in site.iterdir() if not p.name.endswith(".dist-info")) == ["facesearch"]
    assert run(plain, elsewhere, "facesearch", "--help").startswith("usage: facesearch ")
    assert run(plain, elsewhere, "facesearch", "index", "build", "--help").startswith("usage: facesearch index build")
    assert "usage: python -m facesearch" in run(plain, elsewhere, str(plain / "python"), "-m", "facesearch", "--help")
    module, calibration = run(plain, elsewhere, str(plain / "python"), "-c", where).split()
    assert Path(module) == site / "facesearch" / "tools" / "pretrained.py" and Path(calibration).is_file()

    editable = venv(tmp_path / "editable")  # the README's install: requirements.txt ends with -e .
    pip_install(editable, "-e", str(src))
    module, calibration = run(editable, elsewhere, str(editable / "python"), "-c", where).split()
    assert Path(module) == src / "facesearch" / "tools" / "pretrained.py" and Path(calibration).is_file()
    assert run(editable, elsewhere, "facesearch", "search", "--help").startswith("usage: facesearch search")
