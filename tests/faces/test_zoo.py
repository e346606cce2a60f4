"""OpenCV Zoo model files: found in $FACESEARCH_ZOO_MODELS or the carrier package, verified, or refused.

The lookup and verification are tested on small files these tests write (registered under a
test name); the real files only when their wheel is installed.
"""

from __future__ import annotations

import hashlib
import os
import re

import pytest

from facesearch.faces import zoo

PAYLOAD = b"not really an onnx file, but bytes with a known digest\n"


@pytest.fixture
def fake_model(monkeypatch, tmp_path):
    """A registered model ``fake`` (carried by the package ``fakecarrier``), env and path cleared."""
    spec = zoo.ZooModel(
        "fake_model.onnx",
        len(PAYLOAD),
        hashlib.sha256(PAYLOAD).hexdigest(),
        "MIT",
        "https://example.invalid/zoo",
        "fakecarrier",
        "fakecarrier==1.0",
    )
    monkeypatch.setitem(zoo.MODELS, "fake", spec)
    monkeypatch.delenv(zoo.MODELS_ENV, raising=False)
    return spec


def make_package(root, payload: bytes = PAYLOAD):
    """``root/fakecarrier`` whose ``__init__`` fails: the lookup must not import the carrier."""
    pkg = root / "fakecarrier"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('the carrier package must not be imported')\n")
    (pkg / "models" / "fake_model.onnx").write_bytes(payload)
    return pkg


def test_missing_everywhere_says_what_to_install(fake_model):
    with pytest.raises(zoo.ZooModelMissing, match=re.escape("pip install fakecarrier==1.0 (or pip install -r")) as info:
        zoo.verified_model_file("fake")
    assert zoo.MODELS_ENV in str(info.value) and "example.invalid" in str(info.value)
    assert not zoo.available("fake")
    with pytest.raises(KeyError, match="unknown zoo model"):
        zoo.find_model_file("nope")


def test_found_in_the_package_without_importing_it(fake_model, tmp_path, monkeypatch):
    pkg = make_package(tmp_path / "site")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    path = zoo.verified_model_file("fake")
    assert path == pkg / "models" / "fake_model.onnx"
    assert "fakecarrier" not in __import__("sys").modules


def test_env_folder_comes_before_the_package(fake_model, tmp_path, monkeypatch):
    make_package(tmp_path / "site")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    folder = tmp_path / "downloads"
    folder.mkdir()
    (folder / "fake_model.onnx").write_bytes(PAYLOAD)
    monkeypatch.setenv(zoo.MODELS_ENV, str(folder))
    assert zoo.verified_model_file("fake") == folder / "fake_model.onnx"
    # Not in the folder: the package still serves it (the digest, not the place, is what is trusted).
    (folder / "fake_model.onnx").unlink()
    assert zoo.verified_model_file("fake").parent.name == "models"


def test_other_bytes_are_refused(fake_model, tmp_path, monkeypatch):
    monkeypatch.setenv(zoo.MODELS_ENV, str(tmp_path))
    target = tmp_path / "fake_model.onnx"
    target.write_bytes(PAYLOAD[:-1] + b"?")  # same size, one byte changed
    with pytest.raises(zoo.ZooModelMismatch, match="SHA-256"):
        zoo.verified_model_file("fake")
    target.write_bytes(PAYLOAD + b"extra")
    with pytest.raises(zoo.ZooModelMismatch, match="bytes"):
        zoo.verified_model_file("fake")
    assert not zoo.available("fake")


def test_a_file_replaced_after_verification_is_checked_again(fake_model, tmp_path, monkeypatch):
    monkeypatch.setenv(zoo.MODELS_ENV, str(tmp_path))
    target = tmp_path / "fake_model.onnx"
    target.write_bytes(PAYLOAD)
    assert zoo.verified_model_file("fake") == target
    stat = target.stat()
    target.write_bytes(PAYLOAD[:-1] + b"?")
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    with pytest.raises(zoo.ZooModelMismatch):
        zoo.verified_model_file("fake")


def test_registry_records_licence_origin_and_a_pinned_carrier(repo_root):
    pins = dict(
        line.split("==", 1)
        for line in (repo_root / "requirements-face.txt").read_text().splitlines()
        if "==" in line and not line.lstrip().startswith("#")
    )
    for name, spec in zoo.MODELS.items():
        assert re.fullmatch(r"[0-9a-f]{64}", spec.sha256), name
        assert spec.licence.startswith("MIT" if name.startswith("yunet") else "Apache-2.0"), name
        assert spec.origin.startswith("https://github.com/opencv/opencv_zoo/"), name
        assert spec.quantized == name.endswith("_int8bq"), name
        carrier, version = spec.requirement.split("==")
        # The int8bq carrier is pinned; the float32 one is documented as unpinnable (its OpenCV 5 dependency).
        if spec.quantized:
            assert pins.get(carrier) == version, f"{carrier} is not pinned at {version} in requirements-face.txt"
        else:
            assert carrier not in pins


@pytest.mark.parametrize("name", sorted(zoo.MODELS))
def test_installed_files_are_the_published_ones(name):
    spec = zoo.MODELS[name]
    try:
        path = zoo.find_model_file(name)
    except zoo.ZooModelMissing:
        pytest.skip(f"{spec.file} not installed: {spec.how_to_get()}")
    assert zoo.verify_file(name, path) == path
    assert path.stat().st_size == spec.size
