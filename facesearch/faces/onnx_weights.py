"""OpenCV Zoo's block-quantised ONNX files turned back into plain float32 graphs.

The Zoo's ``*_int8bq.onnx`` files store each convolution and fully connected weight as int8
with one float scale (and int8 zero point) per block of 64 (or 9) consecutive values, and
compute the float weight at run time: ``DequantizeLinear`` (opset 21, ``block_size``) then a
``Reshape`` to the convolution's shape. Everything else (batch norm, PReLU) stays float32.

Folding those constant sub-graphs once gives a float32 graph with exactly the weights the
quantised graph computes, which serves twice: the PyTorch port of SFace reads its weights
from it (one converter for both files), and OpenCV runs the folded YuNet at float32 speed
(its DNN module re-evaluates the ``DequantizeLinear`` nodes on every forward pass, which
halves YuNet's throughput).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


class OnnxGraphError(ValueError):
    """The graph is not one this module can fold (an unexpected constant op or attribute)."""


def dequantize_linear(
    q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int = 1, block_size: int = 0
) -> np.ndarray:
    """ONNX ``DequantizeLinear``: ``(q - zero_point) * scale`` in float32.

    A scalar scale applies to the whole tensor; a 1-d one per slice along ``axis``; with
    ``block_size`` the scale has ``q``'s rank and each of its entries covers ``block_size``
    consecutive values along ``axis`` (the last block may be shorter).
    """
    q = q.astype(np.float32)
    scale = np.asarray(scale, np.float32)
    zp = np.zeros_like(scale) if zero_point is None else np.asarray(zero_point).astype(np.float32)
    axis = axis % max(q.ndim, 1)
    if block_size:
        if scale.ndim != q.ndim:
            raise OnnxGraphError(f"blocked scale of rank {scale.ndim} for a tensor of rank {q.ndim}")
        scale = np.repeat(scale, block_size, axis=axis).take(np.arange(q.shape[axis]), axis=axis)
        zp = np.repeat(zp, block_size, axis=axis).take(np.arange(q.shape[axis]), axis=axis)
    elif scale.ndim == 1 and scale.size > 1:
        shape = [1] * q.ndim
        shape[axis] = scale.size
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return (q - zp) * scale


def _attributes(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _reshape(data: np.ndarray, shape: np.ndarray, allowzero: int) -> np.ndarray:
    shape = [int(s) for s in shape]
    if not allowzero:  # ONNX: a 0 copies that dimension of the input
        shape = [data.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return data.reshape(shape)


def _fold_node(node: onnx.NodeProto, inputs: list[np.ndarray]) -> np.ndarray:
    attrs = _attributes(node)
    if node.op_type == "Constant":
        if "value" not in attrs:
            raise OnnxGraphError(f"Constant {node.name!r} without a tensor value: {sorted(attrs)}")
        return numpy_helper.to_array(attrs["value"])
    if node.op_type == "DequantizeLinear":
        q, scale, *rest = inputs
        return dequantize_linear(q, scale, rest[0] if rest else None, attrs.get("axis", 1), attrs.get("block_size", 0))
    if node.op_type == "Reshape":
        return _reshape(inputs[0], inputs[1], attrs.get("allowzero", 0))
    raise OnnxGraphError(f"cannot fold {node.op_type} {node.name!r}")


FOLDABLE = ("Constant", "DequantizeLinear", "Reshape")


def fold_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose constant ``Constant``/``DequantizeLinear``/``Reshape`` nodes
    are replaced by float32 initializers, unused initializers dropped, and graph inputs
    reduced to the real ones (the int8bq files still declare the float32 weights they no
    longer hold as inputs). A float32 graph comes back unchanged but for that clean-up."""
    graph = model.graph
    consts: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    kept: list[onnx.NodeProto] = []
    for node in graph.node:
        names = [i for i in node.input if i]
        if node.op_type in FOLDABLE and all(i in consts for i in names):
            consts[node.output[0]] = _fold_node(node, [consts[i] for i in names])
        else:
            kept.append(node)
    used = {i for n in kept for i in n.input} | {o.name for o in graph.output}
    initializers = [numpy_helper.from_array(np.ascontiguousarray(v), k) for k, v in consts.items() if k in used]
    inputs = [i for i in graph.input if i.name not in consts and i.name in used]
    folded = helper.make_graph(kept, graph.name, inputs, list(graph.output), initializers)
    out = helper.make_model(folded, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    out.producer_name = model.producer_name
    return out


def load_folded(data: bytes) -> onnx.ModelProto:
    """The ONNX model in ``data`` (a file's bytes) with its weights folded to float32."""
    return fold_weights(onnx.load_model_from_string(data))
