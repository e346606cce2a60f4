"""dlib's face recognition ResNet, ported to PyTorch, and the reader of dlib's model file.

The network is the one of dlib's ``dnn_face_recognition_ex.cpp`` (a ResNet-34
variant: 29 convolutions, affine layers where batch norm was, 150x150 RGB
input, ``fc_no_bias`` to a 128-d descriptor), trained by Davis King on about
three million faces. Its weights ship, offline-installable, in the PyPI
package ``face_recognition_models`` as ``dlib_face_recognition_resnet_model_v1.dat``.

That file is dlib's own serialization of the network object, which this module
reads without dlib (:func:`read_dlib_net`): integers are a length byte (low
nibble: byte count; bit 7: sign) then little-endian magnitude bytes; strings a
length then bytes; bools one ASCII ``'0'``/``'1'``; scalar floats a
(mantissa, exponent) integer pair; tensors a version, the four dimensions and
raw little-endian float32. A network is nested ``add_layer`` objects, each
serialized as its version, then its sub-network (so the file runs from the
loss layer's header down to the input layer, then back up layer by layer),
then its layer's own fields. Tag and skip layers carry only a version.

The weights are converted once to a PyTorch state dict cached beside
torchvision's (``$TORCH_HOME/hub/checkpoints``), keyed by the ``.dat`` file's
content hash, so every later start loads a plain ``.pt``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from facesearch.faces.dlib_models import RECOGNITION_MODEL, DlibModelMissing, find_model_file
from facesearch.nets.backbone import Backbone, WeightsUnavailable
from facesearch.nets.converted import cached_conversion
from facesearch.nets.transforms import IMAGENET_MEAN, IMAGENET_STD

# dlib's input_rgb_image: (pixel - mean) / 256 per channel, pixels on the 0..255 scale.
DLIB_MEAN = (122.782, 117.001, 104.298)
DLIB_SCALE = 256.0
CHIP_SIZE = 150  # the network's native input side, px
EMBEDDING_DIM = 128


class DlibFormatError(ValueError):
    """The file is not (or not entirely) the dlib network this module knows how to read."""


# --- reading dlib's serialization ---------------------------------------------------------


class _Reader:
    def __init__(self, data: bytes):
        self.data = memoryview(data)
        self.pos = 0

    def _take(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise DlibFormatError(f"file ends at byte {len(self.data)}, {n} more bytes expected at {self.pos}")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def int(self) -> int:
        head = self._take(1)[0]
        n = head & 0x0F
        if n > 8:
            raise DlibFormatError(f"bad integer header {head:#x} at byte {self.pos - 1}")
        value = int.from_bytes(self._take(n), "little")
        return -value if head & 0x80 else value

    def str(self) -> str:
        n = self.int()
        if not 0 <= n <= 256:
            raise DlibFormatError(f"implausible string length {n} at byte {self.pos}")
        return bytes(self._take(n)).decode("ascii", errors="replace")

    def bool(self) -> bool:
        c = bytes(self._take(1))
        if c not in (b"0", b"1"):
            raise DlibFormatError(f"bad bool {c!r} at byte {self.pos - 1}")
        return c == b"1"

    def float(self) -> float:
        mantissa, exponent = self.int(), self.int()
        return float(mantissa) * 2.0**exponent

    def version(self, expected: tuple[int, ...], what: str) -> int:
        v = self.int()
        if v not in expected:
            raise DlibFormatError(f"{what}: version {v} at byte {self.pos}, expected one of {expected}")
        return v

    def tensor(self) -> np.ndarray:
        self.version((2,), "tensor")
        shape = tuple(self.int() for _ in range(4))
        count = int(np.prod(shape))
        raw = self._take(4 * count)
        return np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(shape)

    def alias(self) -> tuple[int, ...]:
        self.version((1,), "alias_tensor")
        return tuple(self.int() for _ in range(4))


@dataclass
class DlibLayer:
    """One computational layer of the file: its kind (``con``, ``affine``, ``relu``,
    ``max_pool``, ``avg_pool``, ``add_prev``, ``fc``, or ``tag`` for a tag/skip
    wrapper), its geometry and its parameters as NumPy arrays."""

    kind: str
    geometry: dict = field(default_factory=dict)
    params: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class DlibNet:
    input: dict  # input layer: name, mean, size
    loss: dict  # loss layer: name, margin, distance threshold
    layers: list[DlibLayer]  # input side first


def _layer_details(r: _Reader) -> DlibLayer:
    name = r.str()
    if name in ("con_4", "con_5"):
        params = r.tensor().reshape(-1)
        g = {k: r.int() for k in ("num_filters", "nr", "nc", "stride_y", "stride_x", "padding_y", "padding_x")}
        filters, biases = r.alias(), r.alias()
        for _ in range(4):  # learning-rate and weight-decay multipliers: training settings
            r.float()
        use_bias = r.bool() if name == "con_5" else True
        n_w = int(np.prod(filters))
        if params.size != n_w + (int(np.prod(biases)) if use_bias else 0):
            raise DlibFormatError(f"con: {params.size} parameters for filters {filters}")
        p = {"weight": params[:n_w].reshape(filters)}
        if use_bias:
            p["bias"] = params[n_w:]
        return DlibLayer("con", g, p)
    if name == "affine_":
        params = r.tensor().reshape(-1)
        gamma, _beta = r.alias(), r.alias()
        mode = r.int()  # 0: per channel (CONV_MODE), 1: per element (FC_MODE)
        k = int(np.prod(gamma))
        if mode != 0 or params.size != 2 * k:
            raise DlibFormatError(f"affine: mode {mode}, {params.size} parameters for {k} channels")
        return DlibLayer("affine", {"channels": k}, {"gamma": params[:k], "beta": params[k:]})
    if name == "relu_":
        return DlibLayer("relu")
    if name == "add_prev_":
        return DlibLayer("add_prev")
    if name in ("max_pool_2", "avg_pool_2"):
        g = {k: r.int() for k in ("nr", "nc", "stride_y", "stride_x", "padding_y", "padding_x")}
        return DlibLayer(name[:-2], g)
    if name == "fc_2":
        n_out, n_in = r.int(), r.int()
        params = r.tensor().reshape(-1)
        weights, _biases = r.alias(), r.alias()
        bias_mode = r.int()  # 0: has bias, 1: no bias
        for _ in range(4):
            r.float()
        n_w = n_in * n_out
        p = {"weight": params[:n_w].reshape(n_in, n_out)}  # dlib computes x @ W
        if bias_mode == 0:
            p["bias"] = params[n_w : n_w + n_out]
        return DlibLayer("fc", {"outputs": n_out, "inputs": n_in, "weights": weights}, p)
    raise DlibFormatError(f"unsupported dlib layer {name!r} at byte {r.pos}")


def read_dlib_net(data: bytes) -> DlibNet:
    """Parse a serialized ``loss_metric`` network (dlib's face recognition model file)."""
    r = _Reader(data)
    r.version((1,), "add_loss_layer")
    loss_name = r.str()
    if loss_name != "loss_metric_2":
        raise DlibFormatError(f"expected a loss_metric network, found {loss_name!r}")
    loss = {"name": loss_name, "margin": r.float(), "distance_threshold": r.float()}
    # Outermost to innermost wrapper versions: 2 = add_layer, 1 = tag/skip, 3 = add_layer on the input.
    wrappers = []
    while True:
        v = r.version((1, 2, 3), "layer wrapper")
        wrappers.append(v)
        if v == 3:
            break
    input_name = r.str()
    if input_name != "input_rgb_image_sized":
        raise DlibFormatError(f"expected input_rgb_image_sized, found {input_name!r}")
    mean = (r.float(), r.float(), r.float())
    size = (r.int(), r.int())
    layers = []
    for v in reversed(wrappers):
        if v == 1:
            layers.append(DlibLayer("tag"))
            continue
        layers.append(_layer_details(r))
        for _ in range(3):  # setup called, gradient stale, output disabled
            r.bool()
        for _ in range(3):  # x_grad, cached_output, params_grad: empty in a saved model
            r.tensor()
        if v == 3:
            r.int()  # sample expansion factor
    if r.pos != len(r.data):
        raise DlibFormatError(f"{len(r.data) - r.pos} unread bytes after the last layer")
    return DlibNet({"name": input_name, "mean": mean, "size": size}, loss, layers)


# --- the network --------------------------------------------------------------------------


class Affine(nn.Module):
    """Per-channel ``gamma * x + beta``: dlib's inference form of batch norm."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.bias.view(1, -1, 1, 1), x, self.weight.view(1, -1, 1, 1))


def _add_prev(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's ``add_prev``: the sum over the larger shape, the smaller operand zero-padded at the end
    of each dimension (channels, rows, columns). The down-sampling blocks rely on this: 32 -> 64
    channels, and at 8x8 a 3x3/2 convolution gives 3x3 while the 2x2/2 pooled shortcut gives 4x4."""
    shape = [max(x, y) for x, y in zip(a.shape[1:], b.shape[1:], strict=True)]

    def pad(t: torch.Tensor) -> torch.Tensor:
        dc, dh, dw = (s - n for s, n in zip(shape, t.shape[1:], strict=True))
        return F.pad(t, (0, dw, 0, dh, 0, dc)) if dc or dh or dw else t

    return pad(a) + pad(b)


class ResBlock(nn.Module):
    """``relu(block(x) + shortcut(x))``; ``block`` = conv3x3/stride, affine, relu, conv3x3, affine.

    Down-sampling blocks (stride 2) use no padding, as dlib's strided ``con`` layers, and a 2x2/2
    average pool as shortcut; the others pad by 1 and use the identity.
    """

    def __init__(self, c_in: int, c_out: int, down: bool):
        super().__init__()
        self.down = down
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=2 if down else 1, padding=0 if down else 1)
        self.aff1 = Affine(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.aff2 = Affine(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.aff2(self.conv2(F.relu(self.aff1(self.conv1(x)))))
        shortcut = F.avg_pool2d(x, 2, 2) if self.down else x
        return F.relu(_add_prev(y, shortcut))


# (channels, blocks, first block down-samples) per level, input side first: alevel4 .. alevel0.
LEVELS = ((32, 3, False), (64, 4, True), (128, 3, True), (256, 3, True), (256, 1, True))


class DlibTrunk(nn.Module):
    """Input normalisation, stem and residual levels; output (N, 256, 2, 2) for a 150x150 input.

    It takes the pipeline's ImageNet-normalised input and maps it exactly onto dlib's
    ``(pixel - mean) / 256`` with one fixed per-channel affine, so the data path, the
    augmentation and the app stay the same for every backbone.
    """

    def __init__(self):
        super().__init__()
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        # pixel = (x * std + mean) * 255 ; dlib = (pixel - dlib_mean) / 256
        self.register_buffer("in_scale", (std * 255.0 / DLIB_SCALE).view(1, 3, 1, 1), persistent=False)
        shift = (mean * 255.0 - torch.tensor(DLIB_MEAN)) / DLIB_SCALE
        self.register_buffer("in_shift", shift.view(1, 3, 1, 1), persistent=False)
        self.conv = nn.Conv2d(3, 32, 7, stride=2, padding=0)
        self.aff = Affine(32)
        blocks, c_in = [], 32
        for c, n, down in LEVELS:
            for i in range(n):
                blocks.append(ResBlock(c_in, c, down and i == 0))
                c_in = c
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.in_scale.to(x.dtype) + self.in_shift.to(x.dtype)
        x = F.max_pool2d(F.relu(self.aff(self.conv(x))), 3, 2)
        return self.blocks(x)


def dlib_head(embedding_dim: int = EMBEDDING_DIM) -> nn.Sequential:
    """``avg_pool_everything`` then ``fc_no_bias``: global average, then Linear(256, d) without bias."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, embedding_dim, bias=False))


# Expected sequence of (kind, geometry) in the file, to check it is this architecture.
def _expected_layers() -> list[tuple[str, dict]]:
    seq: list[tuple[str, dict]] = [
        ("con", {"num_filters": 32, "nr": 7, "nc": 7, "stride_y": 2, "stride_x": 2, "padding_y": 0, "padding_x": 0}),
        ("affine", {"channels": 32}),
        ("relu", {}),
        ("max_pool", {"nr": 3, "nc": 3, "stride_y": 2, "stride_x": 2, "padding_y": 0, "padding_x": 0}),
    ]
    for c, n, down in LEVELS:
        for i in range(n):
            d = down and i == 0
            s, p = (2, 0) if d else (1, 1)
            conv1 = {"num_filters": c, "nr": 3, "nc": 3, "stride_y": s, "stride_x": s, "padding_y": p, "padding_x": p}
            conv2 = {"num_filters": c, "nr": 3, "nc": 3, "stride_y": 1, "stride_x": 1, "padding_y": 1, "padding_x": 1}
            seq += [("tag", {}), ("con", conv1), ("affine", {"channels": c}), ("relu", {}), ("con", conv2)]
            seq += [("affine", {"channels": c})]
            if d:
                pool = {"nr": 2, "nc": 2, "stride_y": 2, "stride_x": 2, "padding_y": 0, "padding_x": 0}
                seq += [("tag", {}), ("tag", {}), ("avg_pool", pool)]
            seq += [("add_prev", {}), ("relu", {})]
    everything = {"nr": 0, "nc": 0, "stride_y": 1, "stride_x": 1, "padding_y": 0, "padding_x": 0}
    seq += [("avg_pool", everything), ("fc", {"outputs": EMBEDDING_DIM, "inputs": 256})]
    return seq


def state_dict_from_dlib(net: DlibNet) -> dict[str, torch.Tensor]:
    """Map the parsed file onto ``EmbeddingNet(DlibTrunk, dlib_head)`` parameter names.

    Checks layer by layer that the file is exactly this architecture first.
    """
    expected = _expected_layers()
    if len(net.layers) != len(expected):
        raise DlibFormatError(f"{len(net.layers)} layers in the file, {len(expected)} in dlib's face ResNet")
    for i, (layer, (kind, geometry)) in enumerate(zip(net.layers, expected, strict=True)):
        got = {k: layer.geometry[k] for k in geometry}
        if layer.kind != kind or got != geometry:
            raise DlibFormatError(f"layer {i}: file has {layer.kind} {got}, expected {kind} {geometry}")
    if net.input["size"] != (CHIP_SIZE, CHIP_SIZE):
        raise DlibFormatError(f"input size {net.input['size']}, expected {CHIP_SIZE}")
    if any(abs(a - b) > 1e-3 for a, b in zip(net.input["mean"], DLIB_MEAN, strict=True)):
        raise DlibFormatError(f"input mean {net.input['mean']}, expected {DLIB_MEAN}")

    convs = [x for x in net.layers if x.kind == "con"]
    affines = [x for x in net.layers if x.kind == "affine"]
    (fc,) = [x for x in net.layers if x.kind == "fc"]
    names_conv = ["backbone.conv"]
    names_aff = ["backbone.aff"]
    n_blocks = sum(n for _, n, _ in LEVELS)
    for b in range(n_blocks):
        names_conv += [f"backbone.blocks.{b}.conv1", f"backbone.blocks.{b}.conv2"]
        names_aff += [f"backbone.blocks.{b}.aff1", f"backbone.blocks.{b}.aff2"]
    sd: dict[str, torch.Tensor] = {}
    for name, layer in zip(names_conv, convs, strict=True):
        sd[f"{name}.weight"] = torch.from_numpy(layer.params["weight"].copy())
        sd[f"{name}.bias"] = torch.from_numpy(layer.params["bias"].copy())
    for name, layer in zip(names_aff, affines, strict=True):
        sd[f"{name}.weight"] = torch.from_numpy(layer.params["gamma"].copy())
        sd[f"{name}.bias"] = torch.from_numpy(layer.params["beta"].copy())
    sd["head.2.weight"] = torch.from_numpy(fc.params["weight"].T.copy())
    return sd


def load_dlib_state_dict(source: Path | None = None) -> dict[str, torch.Tensor]:
    """The ported weights (:func:`facesearch.nets.converted.cached_conversion` of dlib's ``.dat``)."""
    source = Path(source) if source else find_model_file(RECOGNITION_MODEL)
    return cached_conversion(source, lambda data: state_dict_from_dlib(read_dlib_net(data)))


def build(pretrained: bool, embedding_dim: int) -> Backbone:
    """The backbone ``dlib_resnet`` (:data:`facesearch.nets.models.BACKBONES`): the trunk and dlib's own head."""
    if pretrained and embedding_dim != EMBEDDING_DIM:
        raise ValueError(f"dlib_resnet's pretrained head is {EMBEDDING_DIM}-d, not {embedding_dim}")
    # dlib's own head (global average + bias-free Linear(256, 128)), not the report's two layers:
    # the pretrained descriptor is the point of this backbone.
    trunk, head = DlibTrunk(), dlib_head(embedding_dim)
    if pretrained:
        try:
            state = load_dlib_state_dict()
        except DlibModelMissing as exc:
            raise WeightsUnavailable(str(exc)) from exc
        for prefix, module in (("backbone.", trunk), ("head.", head)):
            module.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
    return Backbone(trunk, 256, head)
