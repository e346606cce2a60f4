"""Stage chips@<backbone>: each backbone's chips cut from the source photos with the one recorded detection."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import run_crop, write_params
from PIL import Image

from facesearch.data import manifest as M
from facesearch.data.packing import load_array, read_info
from facesearch.faces import zoo
from facesearch.faces.chips import CHANGED, faces_of
from facesearch.faces.config import chip_config, chip_record, face_crop
from facesearch.faces.yunet import ARCFACE_TEMPLATE, similarity_transform
from facesearch.params import load_params
from stages import chips, split
from stages.chips import PACKED, chip_settings

# Two backbones cut two ways from one detection: a square crop stored smaller, and a sface-like
# ArcFace chip (align arcface at the template's 112 px) stored as it is.
SQUARE = {"chips.mobilenet_v2.size": 40, "chips.mobilenet_v2.margin": 0.1, "train.mobilenet_v2.img_size": 24}
ARCFACE = {"chips.resnet50.align": "arcface", "chips.resnet50.size": 112, "train.resnet50.img_size": 112}


def in_dir(work: Path, fn, *args):
    cwd = os.getcwd()
    os.chdir(work)
    try:
        return fn(*args)
    finally:
        os.chdir(cwd)


def prepare(work: Path, data: Path, overrides: dict) -> Path:
    """crop + split of ``data`` in ``work`` with ``overrides``; returns the params file."""
    run_crop(work, data, overrides)
    params = write_params(work / "params.yaml", {"execution.n_jobs": 1, "split.val_fraction": 0.25,
                                                 "split.test_fraction": 0.25, **overrides})  # fmt: skip
    in_dir(work, split.main, ["--manifest", "data/manifest.parquet", "--out", "data/split", "--metrics", "m.json",
                              "--details", "md.json"])  # fmt: skip
    return params


def run_chips(work: Path, data: Path, backbone: str, out: str, params: Path) -> None:
    in_dir(work, chips.main, ["--backbone", backbone, "--data", str(data), "--split", "data/split", "--out", out,
                              "--params", str(params)])  # fmt: skip


def expected_chip(data: Path, table: pd.DataFrame, i: int, cfg, side: int) -> np.ndarray:
    """What the app would cut from the photo for row ``i``'s recorded face, at ``side``."""
    rgb = np.asarray(Image.open(data / table[M.IMAGE_PATH].iloc[i]).convert("RGB"))
    (face,) = faces_of(table.iloc[[i]], data)
    chip = face_crop(rgb, face.box, cfg, face.points)
    if side == cfg.size:
        return chip
    return np.asarray(Image.fromarray(chip).resize((side, side), Image.Resampling.BILINEAR))


def test_settings_name_the_missing_block():
    params = load_params(Path(__file__).parents[2] / "params.yaml")
    cfg, side = chip_settings(params, "resnet50")
    assert (cfg.align, cfg.size, side) == ("none", 218, params["train"]["resnet50"]["img_size"])
    with pytest.raises(SystemExit, match=r"no params\.yaml train block"):
        chip_settings(params, "vit")
    del params["chips"]["resnet50"]
    with pytest.raises(SystemExit, match=r"no chips\.resnet50 block"):
        chip_settings(params, "resnet50")


def test_each_split_cut_row_by_row_at_the_backbones_side(sample_factory, tmp_path):
    data = sample_factory(identities=6, images_per_identity=4, seed=3)
    params = prepare(tmp_path, data, SQUARE)
    run_chips(tmp_path, data, "mobilenet_v2", "data/arrays/mobilenet_v2", params)
    cfg = chip_config(load_params(params), "mobilenet_v2")
    for name in PACKED:
        table = pd.read_parquet(tmp_path / "data/split" / f"{name}.parquet")
        path = tmp_path / "data/arrays/mobilenet_v2" / f"{name}.npy"
        arr = load_array(path, len(table), crop_side=40, min_side=24)
        assert arr.shape == (len(table), 24, 24, 3) and len(table) > 0
        info = read_info(path)
        assert info == {"rows": len(table), "crop_side": 40, "side": 24, "face": chip_record(cfg), "failed": {},
                        "failed_rows": []}  # fmt: skip
        for i in (0, len(table) - 1):
            assert np.array_equal(arr[i], expected_chip(data, table, i, cfg, 24))
    # Any number of workers: the same bytes.
    write_params(params, {"execution.n_jobs": 2, "split.val_fraction": 0.25, "split.test_fraction": 0.25, **SQUARE})
    run_chips(tmp_path, data, "mobilenet_v2", "again", params)
    for name in PACKED:
        for ext in ("npy", "json"):
            assert (tmp_path / "again" / f"{name}.{ext}").read_bytes() == (
                tmp_path / "data/arrays/mobilenet_v2" / f"{name}.{ext}"
            ).read_bytes()


def test_a_chip_that_cannot_be_cut_is_a_counted_black_row(sample_factory, tmp_path):
    src = sample_factory(identities=6, images_per_identity=4, seed=3)
    data = tmp_path / "data_copy"
    shutil.copytree(src, data)
    params = prepare(tmp_path / "w", data, SQUARE)
    train = pd.read_parquet(tmp_path / "w/data/split/train.parquet")
    changed, gone = (data / train[M.IMAGE_PATH].iloc[k] for k in (1, 3))
    Image.open(changed).convert("RGB").rotate(90).save(changed, quality=90)  # another photo under the name
    gone.unlink()
    run_chips(tmp_path / "w", data, "mobilenet_v2", "arrays", params)
    info = read_info(tmp_path / "w/arrays/train.npy")
    assert info["failed_rows"] == [1, 3] and info["failed"][CHANGED] == 1 and sum(info["failed"].values()) == 2
    arr = np.load(tmp_path / "w/arrays/train.npy")
    assert len(arr) == len(train) and not arr[1].any() and not arr[3].any() and arr[0].any() and arr[2].any()
    assert read_info(tmp_path / "w/arrays/val.npy")["failed"] == {}


def test_two_backbones_cut_their_own_chips_from_one_yunet_detection(sample_factory, tmp_path):
    """A sface-like ArcFace chip and a square one, from the same recorded boxes and landmarks, same rows."""
    if not zoo.available("yunet_int8bq"):
        pytest.skip(f"YuNet's file is not installed: {zoo.MODELS['yunet_int8bq'].how_to_get()}")
    data = sample_factory(identities=6, images_per_identity=4, seed=3)
    params = prepare(tmp_path, data, {"crop.detector": "yunet", **SQUARE, **ARCFACE})
    run_chips(tmp_path, data, "mobilenet_v2", "data/arrays/mobilenet_v2", params)
    run_chips(tmp_path, data, "resnet50", "data/arrays/resnet50", params)
    table = pd.read_parquet(tmp_path / "data/split/gallery.parquet")
    square = load_array(tmp_path / "data/arrays/mobilenet_v2/gallery.npy", len(table), crop_side=40)
    arc = load_array(tmp_path / "data/arrays/resnet50/gallery.npy", len(table), crop_side=112)
    assert square.shape[1:] == (24, 24, 3) and arc.shape[1:] == (112, 112, 3)
    cfg = chip_config(load_params(params), "resnet50")
    assert read_info(tmp_path / "data/arrays/resnet50/gallery.npy")["face"]["align"] == "arcface"
    for i in range(len(table)):
        assert np.array_equal(arc[i], expected_chip(data, table, i, cfg, 112))
        # The recorded landmarks land on the template: the warp is the one of those points.
        points = np.array([table[c].iloc[i] for c in M.LANDMARK_COLUMNS], np.float64).reshape(5, 2)
        m = similarity_transform(points, ARCFACE_TEMPLATE)
        assert np.abs(points @ m[:, :2].T + m[:, 2] - ARCFACE_TEMPLATE).max() < 12
