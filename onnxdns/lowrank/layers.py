"""Which layers ``sparse-lowrank`` can split, and their shape facts (:class:`Geometry`).

A candidate is a node of the main graph with a constant float32 weight:

* ``Conv`` with a 4-D weight ``[m, C, kh, kw]``, ``group=1``, ``auto_pad`` NOTSET or VALID;
  its matrix is ``W.reshape(m, C*kh*kw)`` and input group ``c`` is input channel ``c`` with its
  ``kh*kw`` taps;
* ``Gemm`` with ``transA=0``, constant ``B`` (either ``transB``) and constant ``C`` of shape
  ``[m]``, ``[1, m]`` or a scalar (``alpha``/``beta`` folded in); groups are input features;
* ``MatMul`` with a constant 2-D second input ``[d, m]`` (no bias); groups are input features.

Its activation is ``relu`` when the layer's output feeds exactly one ``Relu`` node (and is no graph
output), else ``identity`` (the reconstruction is then measured on the layer output itself).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx_ir as ir

from onnxdns import graphutil

#: Substring of the names of every node the pass emits (a model holding one is already split).
MARK = ".slr_"


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Shape facts of one layer that decide its cost; independent of any graph."""

    op: str  # "Conv" | "Gemm" | "MatMul"
    in_channels: int  # C: input groups (channels or features)
    out_channels: int  # m
    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    #: Input shape of one sample (no batch dimension), e.g. (C, H, W) or (d,), when known.
    input_shape: tuple[int, ...] = ()
    #: Output positions per sample: H'*W' for a Conv, rows per sample for a Gemm/MatMul.
    positions: int = 1

    @property
    def group_size(self) -> int:
        return int(math.prod(self.kernel)) if self.kernel else 1

    @property
    def dim(self) -> int:
        return self.in_channels * self.group_size

    @property
    def full_rank(self) -> int:
        return min(self.out_channels, self.dim)

    def macs(self, rank: int | None, keep: int | None) -> int:
        """Multiply-accumulates per sample; ``rank=None`` means the dense (unsplit) layer."""
        if rank is None:
            return self.positions * self.out_channels * self.dim
        m = self.out_channels
        return self.positions * (rank * self.dim + m * rank + m * (keep or 0) * self.group_size)

    def params(self, rank: int | None, keep: int | None) -> int:
        """Weights and bias; ``rank=None`` means the dense layer."""
        m = self.out_channels
        if rank is None:
            return m * self.dim + m
        return rank * self.dim + m * rank + m * (keep or 0) * self.group_size + m


@dataclasses.dataclass
class Layer:
    """A candidate layer bound to its graph node, with its weight as an (m, d) matrix."""

    index: int
    name: str
    node: ir.Node
    geometry: Geometry
    weight: np.ndarray  # (m, d), float32
    bias: np.ndarray  # (m,), float32
    activation: str  # "relu" | "identity"
    input_name: str
    output_name: str  # the node's output (pre-activation)
    activated_name: str  # the activation's output (the node's output when there is none)


def find_layers(graph: ir.Graph) -> tuple[list[Layer], dict[str, str]]:
    """Candidate layers in graph order, and the skipped Conv/Gemm/MatMul nodes with the reason."""
    layers: list[Layer] = []
    skipped: dict[str, str] = {}
    seen: set[str] = set()
    for node in graph:
        if node.domain != "" or node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        name = node.name or f"{node.op_type}_{len(layers) + len(skipped)}"
        if name in seen:  # node names need not be unique: reports and fallbacks key layers by name
            name = f"{name}#{len(layers) + len(skipped)}"
        seen.add(name)
        try:
            geometry, weight, bias = _describe(node)
        except _Skip as e:
            skipped[name] = str(e)
            continue
        out = node.outputs[0]
        activation = _activation(out)
        activated = next(iter(out.uses())).node.outputs[0].name if activation == "relu" else out.name
        layers.append(Layer(len(layers), name, node, geometry, weight, bias, activation,
                            node.inputs[0].name, out.name, activated))
    return layers, skipped


def is_split(graph: ir.Graph) -> bool:
    """True when the graph holds nodes emitted by ``sparse-lowrank``."""
    return any(MARK in (node.name or "") for node in graph)


class _Skip(Exception):
    pass


def _float_const(value: ir.Value | None, what: str) -> np.ndarray:
    arr = graphutil.const_array(value)
    if arr is None:
        raise _Skip(f"{what} is not a constant")
    if arr.dtype != np.float32:
        raise _Skip(f"{what} is {arr.dtype}, only float32 is handled")
    return arr


def _describe(node: ir.Node) -> tuple[Geometry, np.ndarray, np.ndarray]:
    if len(node.inputs) < 2 or node.inputs[0] is None or node.inputs[0].name is None:
        raise _Skip("missing inputs")
    if node.op_type == "Conv":
        return _describe_conv(node)
    if node.op_type == "Gemm":
        return _describe_gemm(node)
    return _describe_matmul(node)


def _describe_conv(node: ir.Node) -> tuple[Geometry, np.ndarray, np.ndarray]:
    w = _float_const(node.inputs[1], "weight")
    if w.ndim != 4:
        raise _Skip(f"{w.ndim - 2}-D convolution (only 2-D is handled)")
    if graphutil.attr_int(node, "group", 1) != 1:
        raise _Skip("grouped or depthwise convolution")
    auto_pad = node.attributes.get("auto_pad")
    if auto_pad is not None and auto_pad.as_string() not in ("NOTSET", "VALID"):
        raise _Skip(f"auto_pad={auto_pad.as_string()}")
    m, c, kh, kw = w.shape
    bias = _float_const(node.inputs[2], "bias") if len(node.inputs) > 2 and node.inputs[2] is not None \
        else np.zeros(m, np.float32)
    kernel = (kh, kw)
    ks = graphutil.attr_ints(node, "kernel_shape")
    if ks is not None and tuple(ks) != kernel:
        raise _Skip("kernel_shape does not match the weight")
    geometry = Geometry("Conv", c, m, kernel, tuple(graphutil.attr_ints(node, "strides", [1, 1])),
                        tuple(graphutil.attr_ints(node, "pads", [0, 0, 0, 0])),
                        tuple(graphutil.attr_ints(node, "dilations", [1, 1])))
    return geometry, w.reshape(m, -1), bias.reshape(m)


def _describe_gemm(node: ir.Node) -> tuple[Geometry, np.ndarray, np.ndarray]:
    if graphutil.attr_int(node, "transA", 0):
        raise _Skip("transA=1")
    b = _float_const(node.inputs[1], "weight")
    if b.ndim != 2:
        raise _Skip("weight is not 2-D")
    w = b if graphutil.attr_int(node, "transB", 0) else b.T
    m, d = w.shape
    alpha = graphutil.attr_float(node, "alpha", 1.0)
    beta = graphutil.attr_float(node, "beta", 1.0)
    bias = np.zeros(m, np.float32)
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        c = _float_const(node.inputs[2], "bias")
        if c.size == 1:
            bias = np.full(m, float(c.reshape(-1)[0]), np.float32)
        elif c.shape in ((m,), (1, m)):
            bias = c.reshape(m)
        else:
            raise _Skip(f"bias of shape {list(c.shape)}")
    return Geometry("Gemm", d, m), (alpha * w).astype(np.float32), (beta * bias).astype(np.float32)


def _describe_matmul(node: ir.Node) -> tuple[Geometry, np.ndarray, np.ndarray]:
    if graphutil.const_array(node.inputs[0]) is not None:
        raise _Skip("constant first input")
    w = _float_const(node.inputs[1], "weight")
    if w.ndim != 2:
        raise _Skip("weight is not 2-D")
    d, m = w.shape
    return Geometry("MatMul", d, m), np.ascontiguousarray(w.T), np.zeros(m, np.float32)


def _activation(out: ir.Value) -> str:
    if out.is_graph_output():
        return "identity"
    uses = list(out.uses())
    if len(uses) == 1 and uses[0].node.op_type == "Relu" and uses[0].node.domain == "":
        return "relu"
    return "identity"
