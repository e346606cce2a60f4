"""dlib's face ResNet: the file reader, the PyTorch port, the cached conversion, and dlib itself.

The reader and conversion are tested on a file these tests write in dlib's
format; the port is checked against dlib (``dlib-bin``) on real aligned faces.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from facesearch.faces.dlib_models import MODELS_ENV, RECOGNITION_MODEL, SHAPE_PREDICTORS, find_model_file
from facesearch.nets import dlib_resnet as D
from facesearch.nets.backbone import WeightsUnavailable
from facesearch.nets.converted import converted_cache_path
from facesearch.nets.models import freeze_all_but_last, get_model, parameter_layers
from facesearch.nets.transforms import to_model_input


# --- a writer of dlib's serialization, the reader's mirror ------------------------------------
def w_int(v: int) -> bytes:
    mag = abs(v).to_bytes(max(1, (abs(v).bit_length() + 7) // 8), "little") if v else b""
    return bytes([len(mag) | (0x80 if v < 0 else 0)]) + mag


def w_str(s: str) -> bytes:
    return w_int(len(s)) + s.encode()


def w_float(x: float) -> bytes:
    m, e = math.frexp(x)
    return w_int(int(m * 2**24)) + w_int(e - 24)


def w_tensor(a: np.ndarray, shape=None) -> bytes:
    shape = shape or (a.size, 1, 1, 1)
    return w_int(2) + b"".join(w_int(s) for s in shape) + np.asarray(a, "<f4").tobytes()


def w_alias(shape) -> bytes:
    return w_int(1) + b"".join(w_int(s) for s in shape)


def write_dlib_file(state: dict[str, torch.Tensor], geometry_patch: dict | None = None) -> bytes:
    """``state`` (an EmbeddingNet state dict of dlib_resnet) as dlib would serialize the network."""
    expected = D._expected_layers()
    convs = ["backbone.conv"] + [f"backbone.blocks.{b}.conv{i}" for b in range(16) for i in (1, 2)]
    affs = ["backbone.aff"] + [f"backbone.blocks.{b}.aff{i}" for b in range(16) for i in (1, 2)]
    body, versions = b"", []
    for n, (kind, g) in enumerate(expected):
        g = {**g, **((geometry_patch or {}).get(n, {}))}
        versions.append(1 if kind == "tag" else 3 if n == 0 else 2)
        if kind == "tag":
            continue
        if kind == "con":
            name = convs.pop(0)
            w, b = state[f"{name}.weight"].numpy(), state[f"{name}.bias"].numpy()
            body += w_str("con_4") + w_tensor(np.concatenate([w.ravel(), b]))
            body += b"".join(w_int(g[k]) for k in ("num_filters", "nr", "nc", "stride_y", "stride_x"))
            body += w_int(g["padding_y"]) + w_int(g["padding_x"])
            body += w_alias(w.shape) + w_alias((1, len(b), 1, 1)) + b"".join(w_float(x) for x in (1, 1, 1, 0))
        elif kind == "affine":
            name = affs.pop(0)
            gamma, beta = state[f"{name}.weight"].numpy(), state[f"{name}.bias"].numpy()
            body += w_str("affine_") + w_tensor(np.concatenate([gamma, beta]))
            body += w_alias((1, len(gamma), 1, 1)) * 2 + w_int(0)
        elif kind in ("relu", "add_prev"):
            body += w_str(f"{kind}_")
        elif kind in ("max_pool", "avg_pool"):
            body += w_str(f"{kind}_2") + b"".join(
                w_int(g[k]) for k in ("nr", "nc", "stride_y", "stride_x", "padding_y", "padding_x")
            )
        elif kind == "fc":
            w = state["head.2.weight"].numpy().T  # dlib stores (inputs, outputs)
            body += w_str("fc_2") + w_int(128) + w_int(256) + w_tensor(w, (256, 128, 1, 1))
            body += w_alias((256, 128, 1, 1)) + w_alias((0, 0, 0, 0)) + w_int(1)
            body += b"".join(w_float(x) for x in (1, 1, 1, 0))
        body += b"110" + (w_int(2) + w_int(0) * 4) * 3  # flags, then three empty tensors
        if n == 0:
            body += w_int(1)  # sample expansion factor of the input-side add_layer
    head = w_int(1) + w_str("loss_metric_2") + w_float(0.04) + w_float(0.6)
    head += b"".join(w_int(v) for v in reversed(versions))
    head += w_str("input_rgb_image_sized") + b"".join(w_float(m) for m in D.DLIB_MEAN) + w_int(150) + w_int(150)
    return head + body


@pytest.fixture(scope="module")
def random_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = get_model("dlib_resnet", weights="none", trainable_layers=-1)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def models_dir(tmp_path, monkeypatch, random_state):
    """$FACESEARCH_DLIB_MODELS with a written model file; torch's cache in tmp."""
    (tmp_path / "dlib").mkdir()
    (tmp_path / "dlib" / RECOGNITION_MODEL).write_bytes(write_dlib_file(random_state))
    monkeypatch.setenv(MODELS_ENV, str(tmp_path / "dlib"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "dlib"


# --- reader --------------------------------------------------------------------------------
def test_reader_round_trips_a_written_file(random_state):
    net = D.read_dlib_net(write_dlib_file(random_state))
    assert net.input == {"name": "input_rgb_image_sized", "mean": pytest.approx(D.DLIB_MEAN, abs=1e-4),
                         "size": (150, 150)}  # fmt: skip
    assert net.loss["margin"] == pytest.approx(0.04, abs=1e-6)
    assert [x.kind for x in net.layers].count("con") == 29
    sd = D.state_dict_from_dlib(net)
    assert sd.keys() == random_state.keys()
    for k, v in sd.items():
        torch.testing.assert_close(v, random_state[k], rtol=0, atol=0)


def test_reader_rejects_truncated_files_and_other_architectures(random_state):
    data = write_dlib_file(random_state)
    with pytest.raises(D.DlibFormatError, match="file ends"):
        D.read_dlib_net(data[: len(data) // 2])
    with pytest.raises(D.DlibFormatError, match="unread bytes"):
        D.read_dlib_net(data + b"\x00")
    with pytest.raises(D.DlibFormatError, match="loss_metric"):
        D.read_dlib_net(b"\x01\x01" + w_str("loss_mmod_") + data[20:])
    # A stride-1 first convolution is a different network: the check names the layer.
    other = write_dlib_file(random_state, {0: {"stride_y": 1, "stride_x": 1}})
    with pytest.raises(D.DlibFormatError, match="layer 0"):
        D.state_dict_from_dlib(D.read_dlib_net(other))


# --- the network ------------------------------------------------------------------------------
def test_add_prev_zero_pads_the_smaller_operand_at_the_end():
    a = torch.ones(1, 2, 3, 3)
    b = torch.full((1, 1, 4, 4), 10.0)
    out = D._add_prev(a, b)
    assert out.shape == (1, 2, 4, 4)
    assert out[0, 0, :3, :3].eq(11).all() and out[0, 0, 3, :].eq(10).all()
    assert out[0, 1, :3, :3].eq(1).all() and out[0, 1, 3, :].eq(0).all()


def test_model_shape_norm_and_layers():
    model = get_model("dlib_resnet", weights="none", trainable_layers=-1).eval()
    with torch.no_grad():
        z = model(torch.randn(2, 3, 150, 150))
    assert z.shape == (2, 128)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(2))
    # Trunk spatial sizes as dlib computes them: 150 -> 72 -> 35 -> 17 -> 8 -> 4 -> 2.
    assert model.backbone(torch.zeros(1, 3, 150, 150)).shape == (1, 256, 2, 2)
    assert len(parameter_layers(model)) == 29 + 29 + 1  # convolutions, affines, the fc
    n = freeze_all_but_last(model, 3)
    assert n == 256 * 128 + 2 * 256 + 256 * 256 * 9 + 256  # fc, last affine, last conv
    with pytest.raises(ValueError, match="128-d"):
        get_model("dlib_resnet", weights="dlib", embedding_dim=64)
    with pytest.raises(ValueError, match="'dlib' or 'none'"):
        get_model("dlib_resnet", weights="imagenet")


def test_input_mapping_is_dlibs_pixel_normalisation():
    """The trunk's fixed affine turns ImageNet-normalised input into (pixel - mean) / 256."""
    pixels = torch.randint(0, 256, (1, 150, 150, 3), dtype=torch.uint8)
    x = to_model_input(pixels, 150, "cpu")
    trunk = D.DlibTrunk()
    mapped = x * trunk.in_scale + trunk.in_shift
    want = (pixels.permute(0, 3, 1, 2).float() - torch.tensor(D.DLIB_MEAN).view(1, 3, 1, 1)) / 256
    torch.testing.assert_close(mapped, want, atol=1e-5, rtol=0)


# --- conversion cache -------------------------------------------------------------------------
def test_pretrained_weights_are_converted_once_and_cached(models_dir, random_state, monkeypatch):
    model = get_model("dlib_resnet")  # weights default to dlib for this backbone
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, random_state[k])
    cache = converted_cache_path(models_dir / RECOGNITION_MODEL)
    assert cache.is_file() and cache.parent.name == "checkpoints"

    def fail(_):
        raise AssertionError("the cached conversion should have been used")

    monkeypatch.setattr(D, "read_dlib_net", fail)
    get_model("dlib_resnet")
    # A different source file (same name) invalidates the cache.
    changed = {k: v + 1 for k, v in random_state.items()}
    (models_dir / RECOGNITION_MODEL).write_bytes(write_dlib_file(changed))
    with pytest.raises(AssertionError, match="cached conversion"):
        get_model("dlib_resnet")


def test_missing_model_file_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv(MODELS_ENV, str(tmp_path))
    with pytest.raises(WeightsUnavailable, match=RECOGNITION_MODEL):
        get_model("dlib_resnet")
    model = get_model("dlib_resnet", weights="none")  # random init needs no file
    assert model.config.weights == "none"


# --- against dlib itself -------------------------------------------------------------------------
def _dlib_or_skip():
    dlib = pytest.importorskip("dlib", reason="dlib not installed: pip install -r requirements-face.txt")
    try:
        find_model_file(RECOGNITION_MODEL)
    except FileNotFoundError as exc:
        pytest.skip(f"dlib's model files not installed: {exc}")
    return dlib


def aligned_chips(celeba_dev, n: int, points: int = 5) -> list[np.ndarray]:
    """The first ``n`` faces of celeba-dev (sorted), found by dlib's HOG and aligned by dlib."""
    from facesearch.data.images import ImageRejected, decode_image
    from facesearch.faces.dlib_hog import detect_hog
    from facesearch.faces.landmarks import aligned_chip

    chips = []
    for path in sorted((celeba_dev / "img_celeba").iterdir()):
        try:
            rgb = decode_image(path.read_bytes(), 40_000_000).rgb
        except ImageRejected:
            continue
        det = detect_hog(rgb, 0, "largest", max_side=640)
        if det.chosen is not None:
            chips.append(aligned_chip(rgb, det.chosen, points, 150, 0.25))
        if len(chips) == n:
            return chips
    raise AssertionError(f"only {len(chips)} faces found")


@pytest.mark.slow
def test_port_matches_dlib_on_real_aligned_faces(celeba_dev, monkeypatch, tmp_path):
    dlib = _dlib_or_skip()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # convert from the real file, not a cache
    chips = aligned_chips(celeba_dev, 120)
    reference = dlib.face_recognition_model_v1(str(find_model_file(RECOGNITION_MODEL)))
    ref = np.array([np.asarray(reference.compute_face_descriptor(c)) for c in chips])
    model = get_model("dlib_resnet", normalize=False).eval()
    with torch.no_grad():
        ours = model(to_model_input(torch.from_numpy(np.stack(chips)), 150, "cpu")).numpy()
    cos = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    assert len(cos) >= 100
    assert cos.min() >= 0.9999, f"worst cosine {cos.min():.6f}"
    # Not only the direction: the port reproduces dlib's raw descriptor.
    np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_landmark_models_are_found_when_installed():
    _dlib_or_skip()
    for points in (5, 68):
        assert find_model_file(SHAPE_PREDICTORS[points]).stat().st_size > 1_000_000
