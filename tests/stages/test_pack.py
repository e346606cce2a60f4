from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
from conftest import TINY_CROP, write_params

from facesearch.data import manifest as M
from facesearch.data.packing import load_array, load_crop, read_info
from stages import pack
from stages.pack import PACKED, pack_size


def params_with(sizes: dict[str, int], backbones: list[str]) -> dict:
    return {"backbones": backbones, "train": {b: {"img_size": s, "lr": 0.1} for b, s in sizes.items()}}


def test_pack_size_is_the_largest_listed_img_size():
    sizes = {"resnet50": 64, "mobilenet_v2": 96, "dlib_resnet": 150}
    assert pack_size(params_with(sizes, ["resnet50", "mobilenet_v2"])) == 96  # dlib_resnet is not listed
    assert pack_size(params_with(sizes, ["resnet50"])) == 64
    assert pack_size(params_with(sizes, ["dlib_resnet", "resnet50"])) == 150
    with pytest.raises(SystemExit, match=r"no params\.yaml train block"):
        pack_size(params_with(sizes, ["resnet50", "vit"]))
    with pytest.raises(SystemExit, match=r"no params\.yaml train block"):
        pack_size(params_with(sizes, []))


def run_pack(work, out: str, overrides: dict) -> None:
    params = write_params(work / f"{out}.yaml", TINY_CROP | overrides)
    cwd = os.getcwd()
    os.chdir(work)
    try:
        pack.main(["--split", "data/split", "--out", out, "--params", str(params)])
    finally:
        os.chdir(cwd)


def test_stage_packs_every_split_at_the_largest_img_size(prepared):
    # The crops of `prepared` are 40 px (TINY_CROP); backbones resnet50 (24) and mobilenet_v2 (16).
    run_pack(prepared, "packed24", {"train.resnet50.img_size": 24, "train.mobilenet_v2.img_size": 16,
                                    "train.dlib_resnet.img_size": 36, "execution.n_jobs": 2})  # fmt: skip
    for name in PACKED:
        table = pd.read_parquet(prepared / "data/split" / f"{name}.parquet")
        arr = load_array(prepared / "packed24" / f"{name}.npy", len(table), crop_side=40, min_side=24)
        assert arr.shape == (len(table), 24, 24, 3) and len(table) > 0
        assert read_info(prepared / "packed24" / f"{name}.npy") == {"rows": len(table), "crop_side": 40, "side": 24}
        # Row i is the table's crop i, resized as facesearch.data.packing resizes.
        for i in (0, len(table) - 1):
            assert np.array_equal(arr[i], load_crop(prepared / table[M.CROP_PATH].iloc[i], (24, 24)))
    # Larger than the crops: stored at the crop side, which the model input path upscales.
    run_pack(prepared, "packed64", {"train.resnet50.img_size": 64})
    arr = load_array(prepared / "packed64" / "train.npy", crop_side=40, min_side=64)
    assert arr.shape[1:] == (40, 40, 3)
    assert np.array_equal(arr, load_array(prepared / "data/arrays/train.npy"))  # the fixture's own pack, 40 px
