"""Packing crops into arrays: the resize the model input path would apply, any worker count, guarded reads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from facesearch.data import packing
from facesearch.data.packing import info_path, load_array, pack_crops, read_info
from facesearch.nets.transforms import to_model_input


def face_like(rng: np.random.Generator, side: int) -> np.ndarray:
    """Smooth shapes plus noise: edges and texture for a resize to get wrong."""
    yy, xx = np.mgrid[:side, :side] / side
    base = np.stack([np.sin(7 * xx + 3 * yy), np.cos(5 * yy - 2 * xx), np.sin(11 * xx * yy)], -1)
    img = (base + 1) * 100 + rng.normal(0, 12, (side, side, 3))
    img[side // 3 : side // 2, side // 4 : 3 * side // 4] = 250  # a hard-edged bright bar
    return np.clip(img, 0, 255).astype(np.uint8)


def write_crops(tmp_path, n: int, side: int, seed: int = 0) -> tuple[list, np.ndarray]:
    rng = np.random.default_rng(seed)
    imgs = np.stack([face_like(rng, side) for _ in range(n)])
    paths = []
    for i, img in enumerate(imgs):
        paths.append(tmp_path / f"{i}.png")  # lossless: the decoded bytes are the array's
        Image.fromarray(img).save(paths[-1])
    return paths, imgs


def test_packed_input_is_what_the_model_input_path_makes_of_the_crop(tmp_path):
    # A model trained on packed arrays must see what the app and the CLI feed it from a crop of
    # crop.size (to_model_input resizes on the fly): the model file's preprocessing record says so.
    paths, imgs = write_crops(tmp_path, 4, 90)
    for side in (32, 64, 89):
        pack_crops(paths, tmp_path / f"a{side}.npy", side=side)
        packed = load_array(tmp_path / f"a{side}.npy")
        assert packed.shape == (4, side, side, 3)
        from_crop = to_model_input(torch.from_numpy(imgs), side, "cpu")
        from_pack = to_model_input(torch.from_numpy(np.array(packed)), side, "cpu")  # no resize: equal sides
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        # One grey level: the packed array is rounded to uint8, the on-the-fly path is not.
        assert ((from_crop - from_pack).abs() * std * 255).max() <= 1.0 + 1e-3
        # A naive resize (every 2.8th pixel) is far off: the tolerance above can tell filters apart.
        idx = np.linspace(0, 89, side).round().astype(int)
        naive = to_model_input(torch.from_numpy(imgs[:, idx][:, :, idx].copy()), side, "cpu")
        assert ((from_crop - naive).abs() * std * 255).max() > 20


def test_no_resize_when_equal_and_no_upscaling(tmp_path):
    paths, imgs = write_crops(tmp_path, 3, 20)
    for side in (None, 20, 64):
        out = tmp_path / f"{side}.npy"
        assert pack_crops(paths, out, side=side) == 3
        assert np.array_equal(load_array(out, expected_rows=3), imgs)  # the decoded bytes, untouched
        assert read_info(out) == {"rows": 3, "crop_side": 20, "side": 20}


def test_same_bytes_for_any_number_of_workers(tmp_path, monkeypatch):
    monkeypatch.setattr(packing, "CHUNK", 3)  # 10 crops: 4 tasks over the workers
    paths, _ = write_crops(tmp_path, 10, 40, seed=1)
    pack_crops(paths, tmp_path / "one.npy", side=24, n_jobs=1)
    pack_crops(paths, tmp_path / "two.npy", side=24, n_jobs=2)
    assert (tmp_path / "one.npy").read_bytes() == (tmp_path / "two.npy").read_bytes()
    one = load_array(tmp_path / "one.npy")
    assert np.array_equal(one[7], packing.load_crop(paths[7], (24, 24)))  # row i is crop i


def test_bad_crops_leave_nothing_behind(tmp_path):
    paths, imgs = write_crops(tmp_path, 2, 20)
    Image.fromarray(imgs[0][:10]).save(tmp_path / "odd.png")
    with pytest.raises(ValueError, match="expected 20x20"):
        pack_crops([paths[0], tmp_path / "odd.png"], tmp_path / "b.npy", n_jobs=2)
    assert not (tmp_path / "b.npy").exists() and not info_path(tmp_path / "b.npy").exists()
    with pytest.raises(ValueError, match="only square"):
        pack_crops([tmp_path / "odd.png"], tmp_path / "c.npy", side=5)
    assert pack_crops([], tmp_path / "empty.npy", side=8) == 0
    assert load_array(tmp_path / "empty.npy", expected_rows=0, crop_side=218, min_side=64).shape[0] == 0


def test_reads_refuse_arrays_that_are_not_current(tmp_path):
    paths, _ = write_crops(tmp_path, 3, 40)
    out = tmp_path / "a.npy"
    pack_crops(paths, out, side=24)
    assert load_array(out, expected_rows=3, crop_side=40, min_side=24).shape == (3, 24, 24, 3)
    assert load_array(out, crop_side=40, min_side=16).shape[1] == 24  # larger than needed: resized on the fly
    with pytest.raises(ValueError, match="re-run the chips stage"):
        load_array(out, expected_rows=4)
    with pytest.raises(ValueError, match="from 40 px crops but its chip size is 48"):
        load_array(out, crop_side=48)
    with pytest.raises(ValueError, match="below img_size 32"):
        load_array(out, min_side=32)
    pack_crops(paths, tmp_path / "full.npy")
    assert load_array(tmp_path / "full.npy", min_side=64).shape[1] == 40  # crops below img_size: used as they are
    info_path(out).write_text('{"rows": 3, "crop_side": 40, "side": 32}')
    with pytest.raises(ValueError, match="does not match"):
        load_array(out, crop_side=40)
    info_path(out).unlink()
    with pytest.raises(ValueError, match=r"no a\.json"):
        load_array(out, crop_side=40)


def test_pack_roundtrip_and_stale_guard(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(3, 20, 20, 3), dtype=np.uint8)
    paths = []
    for i, img in enumerate(imgs):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(img).save(paths[-1])
    assert pack_crops(paths, tmp_path / "a.npy") == 3
    arr = load_array(tmp_path / "a.npy", expected_rows=3)
    assert np.array_equal(arr, imgs)
    with pytest.raises(ValueError, match="re-run the chips stage"):
        load_array(tmp_path / "a.npy", expected_rows=4)
    Image.fromarray(imgs[0][:10]).save(tmp_path / "odd.png")
    with pytest.raises(ValueError, match="expected"):
        pack_crops([paths[0], tmp_path / "odd.png"], tmp_path / "b.npy")
    assert not (tmp_path / "b.npy").exists()  # nothing half-written
