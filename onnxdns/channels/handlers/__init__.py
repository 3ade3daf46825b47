"""The per-op channel-handler table, keyed by ``(domain, op_type)``.

Each handler answers four questions for one node (see :mod:`onnxdns.channels.analysis`):

``propagate``  which slots sit on the output channel axes (new slots for layers, the input's for
               channel-preserving ops, offsets for Concat/Split/Slice, indices for Gather) and which slots are tied
               or pinned;
``constants``  which output channels are input-independent constants, and their values;
``check``      at a boundary (a layer consuming channels), which input channels may go;
``rewrite``    slice weights and parameters, fold constants into biases, fix attributes.

An op without a handler pins every tracked channel reaching it (they are kept) and is counted
in the report: propagation stops there safely.
"""

from __future__ import annotations

import onnx_ir as ir

from onnxdns.channels.handlers.base import UNKNOWN, Handler
from onnxdns.channels.handlers.elementwise import BatchNormHandler, ElementwiseHandler, PassThroughHandler
from onnxdns.channels.handlers.layers import ConvHandler, ConvTransposeHandler, MatrixHandler
from onnxdns.channels.handlers.reshaping import (
    FlattenHandler,
    ReduceHandler,
    ReshapeHandler,
    ResizeHandler,
    ShapeHandler,
    SqueezeHandler,
    TransposeHandler,
)
from onnxdns.channels.handlers.routing import ConcatHandler, GatherHandler, SliceHandler, SplitHandler

_UNARY = (
    "Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu",
    "Celu", "Softplus", "Softsign", "Gelu", "Mish", "ThresholdedRelu", "Neg", "Abs", "Exp", "Log",
    "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Erf", "Sin", "Cos",
)
_BINARY = ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean")

#: The channel-handler table: ``(domain, op_type) -> handler``. Ops missing here pin.
HANDLERS: dict[tuple[str, str], Handler] = {
    ("", "Conv"): ConvHandler(),
    ("", "ConvTranspose"): ConvTransposeHandler(),
    ("", "Gemm"): MatrixHandler(),
    ("", "MatMul"): MatrixHandler(),
    ("", "BatchNormalization"): BatchNormHandler(),
    **{("", op): ElementwiseHandler() for op in _UNARY + _BINARY},
    ("", "Identity"): PassThroughHandler(),
    ("", "Dropout"): PassThroughHandler(),
    ("", "MaxPool"): PassThroughHandler(),
    ("", "AveragePool"): PassThroughHandler(),
    ("", "GlobalAveragePool"): PassThroughHandler(),
    ("", "GlobalMaxPool"): PassThroughHandler(),
    ("", "Flatten"): FlattenHandler(),
    ("", "Reshape"): ReshapeHandler(),
    ("", "Concat"): ConcatHandler(),
    ("", "Split"): SplitHandler(),
    ("", "Slice"): SliceHandler(),
    ("", "Gather"): GatherHandler(),
    ("", "Shape"): ShapeHandler(),
    ("", "Transpose"): TransposeHandler(),
    ("", "Squeeze"): SqueezeHandler(),
    ("", "Unsqueeze"): SqueezeHandler(),
    ("", "ReduceMean"): ReduceHandler(),
    ("", "ReduceMax"): ReduceHandler(),
    ("", "ReduceMin"): ReduceHandler(),
    ("", "Resize"): ResizeHandler(),
    ("", "Upsample"): ResizeHandler(),
}


def handler_for(node: ir.Node) -> Handler:
    domain = "" if node.domain == "ai.onnx" else node.domain
    return HANDLERS.get((domain, node.op_type), UNKNOWN)
