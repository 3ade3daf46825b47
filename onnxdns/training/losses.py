"""Training losses as ``onnxblock`` blocks: cross-entropy with labels, or distillation from the
input model (the teacher) without them, plus an optional penalty term (Network Slimming's L1).

* ``ce``: mean cross-entropy of the one selected ``[batch, classes]`` output against the graph
  input ``labels`` (int64 ``[batch]``): ``LogSoftmax`` of the logits (for a classifier exported
  with its softmax, of the Softmax's input).
* ``distill``: for every selected output ``y`` the training model takes the teacher's value as
  an extra graph input ``teacher.<y>`` (same type; the loop runs the input model with
  onnxruntime on the same batch and feeds it). Classifier logits (a rank-2 float output) get
  ``KL(softmax(t / T) || softmax(s / T)) * T^2`` averaged over the batch (Hinton et al. 2015; for
  an output that already is a softmax, the student's logits are the Softmax's input and the
  teacher's ``log p``;
  ``T`` = ``temperature``, default :data:`DEFAULT_TEMPERATURE`); every other float output (maps,
  embeddings, sequences) the mean squared error over all its elements. The loss is their sum.

The graph uses only ops every opset since 11 has with the same meaning (reductions over all
elements, no ``axes``), so models exported at opset 11 train too. ``penalty`` is any object with
``build(emit) -> name`` (see :class:`Emit`) whose scalar is added to the loss.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np
import onnx

from onnxdns.errors import OnnxdnsError

LOSSES = ("ce", "distill")
#: Distillation temperature when none is given: Hinton et al.'s range is 1-20; 4 is the value most
#: often used for image classifiers (e.g. torchdistill's and many KD papers' CIFAR/ImageNet recipes).
DEFAULT_TEMPERATURE = 4.0
LABELS = "labels"
TEACHER_PREFIX = "teacher."


def teacher_input(output: str) -> str:
    """The training model's input holding the teacher's value of ``output``."""
    return f"{TEACHER_PREFIX}{output}"


@dataclasses.dataclass(frozen=True)
class OutputInfo:
    """A model output as the loss sees it: name, element type, rank (None: unknown)."""

    name: str
    elem_type: int
    rank: int | None

    @property
    def is_float(self) -> bool:
        return self.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                                  onnx.TensorProto.BFLOAT16)

    @property
    def is_classifier(self) -> bool:
        """Classifier logits: a rank-2 float output ``[batch, classes]``."""
        return self.is_float and self.rank == 2


def output_infos(model: onnx.ModelProto) -> list[OutputInfo]:
    out = []
    for value in model.graph.output:
        tensor = value.type.tensor_type
        out.append(OutputInfo(value.name, tensor.elem_type, len(tensor.shape.dim) if tensor.HasField("shape") else None))
    return out


def num_classes(model: onnx.ModelProto, output: str) -> int | None:
    """The fixed size of the last axis of ``output`` (None when symbolic or unknown)."""
    for value in model.graph.output:
        if value.name == output:
            dims = value.type.tensor_type.shape.dim
            return dims[-1].dim_value if dims and dims[-1].HasField("dim_value") else None
    return None


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """What the loss block computes (JSON-friendly; the run's configuration decides it)."""

    kind: str
    outputs: tuple[str, ...]
    #: Per selected output: True for classifier logits (KL with temperature), False for MSE.
    classifier: tuple[bool, ...]
    temperature: float = DEFAULT_TEMPERATURE

    def extra_inputs(self) -> tuple[str, ...]:
        """Graph inputs the loss adds after the model's inputs, in order."""
        return (LABELS,) if self.kind == "ce" else tuple(teacher_input(o) for o in self.outputs)


def choose(model: onnx.ModelProto, *, loss: str | None, loss_outputs: Sequence[str] | None, has_labels: bool,
           temperature: float | None) -> LossSpec:
    """The loss of a run: ``loss`` (default ``ce`` with labels, ``distill`` without) on
    ``loss_outputs`` (default: all float outputs for ``distill``, the single classifier output for
    ``ce``). Misfits are one-line :class:`OnnxdnsError` s."""
    infos = {i.name: i for i in output_infos(model)}
    kind = loss or ("ce" if has_labels else "distill")
    if kind not in LOSSES:
        raise OnnxdnsError(f"unknown loss '{kind}'; choose one of: {', '.join(LOSSES)}")
    if temperature is not None and not temperature > 0:
        raise OnnxdnsError(f"temperature must be positive, got {temperature}")
    if loss_outputs:
        unknown = [n for n in loss_outputs if n not in infos]
        if unknown:
            raise OnnxdnsError(f"--loss-output {unknown[0]}: the model has no such output (outputs: "
                               f"{', '.join(infos)})")
        if len(set(loss_outputs)) != len(loss_outputs):
            raise OnnxdnsError("--loss-output: an output is named twice")
        not_float = [n for n in loss_outputs if not infos[n].is_float]
        if not_float:
            raise OnnxdnsError(f"--loss-output {not_float[0]}: not a float output; a loss needs float values")
        chosen = list(loss_outputs)
    elif kind == "distill":
        chosen = [n for n, i in infos.items() if i.is_float]
        if not chosen:
            raise OnnxdnsError("distillation needs a float model output; this model has none")
    else:
        chosen = [n for n, i in infos.items() if i.is_classifier]
        if len(chosen) != 1:
            what = "none" if not chosen else f"{len(chosen)} ({', '.join(chosen)}); pick one with --loss-output"
            raise OnnxdnsError(f"--loss ce needs one classifier output [batch, classes]; the model has {what}")
    if kind == "ce":
        if not has_labels:
            raise OnnxdnsError("--loss ce needs labels; the data has none (use --loss distill, or give labels)")
        if len(chosen) != 1 or not infos[chosen[0]].is_classifier:
            raise OnnxdnsError(f"--loss ce needs one classifier output [batch, classes]; {', '.join(chosen)} is not")
    return LossSpec(kind, tuple(chosen), tuple(infos[n].is_classifier for n in chosen),
                    float(DEFAULT_TEMPERATURE if temperature is None else temperature))


class Emit:
    """Appends nodes and constants to a graph under unique names (what loss and penalty terms use)."""

    def __init__(self, graph: onnx.GraphProto, prefix: str) -> None:
        from onnxruntime.training.onnxblock import _graph_utils

        self.graph, self.prefix, self._name = graph, prefix, _graph_utils.generate_graph_name

    def name(self, base: str) -> str:
        return self._name(f"{self.prefix}.{base}")

    def const(self, base: str, value: Any, dtype=np.float32) -> str:
        tensor_name = self.name(base)
        self.graph.initializer.append(onnx.numpy_helper.from_array(np.array(value, dtype=dtype), tensor_name))
        return tensor_name

    def node(self, op: str, inputs: Sequence[str], **attrs) -> str:
        out = self.name(f"{op.lower()}_output")
        self.graph.node.append(onnx.helper.make_node(op, list(inputs), [out], name=self.name(op), **attrs))
        return out


def block_factory(spec: LossSpec, penalty: Any = None) -> Callable[[], Any]:
    """A factory of the loss block (``ArtifactSpec.loss``) of ``spec``, plus ``penalty``."""

    def make():
        return _block_class()(spec, penalty)

    return make


def _block_class():
    from onnxruntime.training import onnxblock  # imports torch: keep it lazy
    from onnxruntime.training.onnxblock import _graph_utils

    class Loss(onnxblock.Block):
        def __init__(self, spec: LossSpec, penalty: Any) -> None:
            super().__init__()
            self.spec, self.penalty = spec, penalty

        def build(self, *model_outputs: str) -> str:
            spec = self.spec
            emit = Emit(self.base.graph, "loss")
            if spec.kind == "ce":
                labels = onnx.helper.make_tensor_value_info(LABELS, onnx.TensorProto.INT64, ["batch"])
                self.base.graph.input.append(labels)
                total = _ce(emit, spec.outputs[0], LABELS, _softmax_logits(emit, self.base.graph, spec.outputs[0]))
            else:
                terms = []
                for name, is_classifier in zip(spec.outputs, spec.classifier):
                    teacher = teacher_input(name)
                    value = onnx.ValueInfoProto()
                    value.CopyFrom(_graph_utils.get_output_from_output_name(self.base, name))
                    value.name = teacher
                    self.base.graph.input.append(value)
                    if not is_classifier:
                        terms.append(_mse(emit, name, teacher))
                    else:  # an output that is a softmax: the student's logits, the log of the teacher's
                        logits = _softmax_logits(emit, self.base.graph, name)
                        terms.append(_kl(emit, name, teacher, spec.temperature) if logits is None else
                                     _kl(emit, logits, _log(emit, teacher), spec.temperature))
                total = terms[0]
                for term in terms[1:]:
                    total = emit.node("Add", [total, term])
            if self.penalty is not None:
                total = emit.node("Add", [total, self.penalty.build(Emit(self.base.graph, "penalty"))])
            return total

    return Loss


def _softmax_chain(graph: onnx.GraphProto, name: str) -> list[onnx.NodeProto] | None:
    """``[Softmax, *Identity/Reshape nodes]`` computing ``name`` (the opset converter wraps an old
    Softmax in Flatten / Reshape), or None when ``name`` is not a softmax: probabilities."""
    producers = {o: n for n in graph.node for o in n.output}
    chain = []
    node = producers.get(name)
    while node is not None and node.op_type in ("Identity", "Reshape"):
        chain.append(node)
        node = producers.get(node.input[0])
    return [node, *reversed(chain)] if node is not None and node.op_type == "Softmax" else None


def _softmax_logits(emit: Emit, graph: onnx.GraphProto, name: str) -> str | None:
    """The logits of an output computed by a softmax: the Softmax's input sent through the same
    Reshapes, so of the output's shape (None: ``name`` is no softmax). ``log p`` would be the same
    up to a per-row constant, but its gradient vanishes where a probability underflows to 0 (a
    confidently wrong student, such as a freshly compressed one, would learn nothing)."""
    chain = _softmax_chain(graph, name)
    if chain is None:
        return None
    value = chain[0].input[0]
    for node in chain[1:]:
        if node.op_type == "Reshape":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            value = emit.node("Reshape", [value, node.input[1]], **attrs)
    return value


def _ce(emit: Emit, output: str, labels: str, logits: str | None) -> str:
    """Mean cross-entropy ``-sum(onehot(labels) * log p) / batch`` with ``log p`` the
    ``LogSoftmax`` of the output, or of ``logits`` when the output already is their softmax.
    Opset-11 ops only (``SoftmaxCrossEntropyLoss`` is opset 12)."""
    log_p = emit.node("LogSoftmax", [output if logits is None else logits], axis=1)
    depth = emit.node("Gather", [emit.node("Shape", [output]), emit.const("one", 1, np.int64)], axis=0)
    onehot = emit.node("OneHot", [labels, depth, emit.const("off_on", [0.0, 1.0])], axis=-1)
    total = emit.node("ReduceSum", [emit.node("Mul", [onehot, log_p])], keepdims=0)
    batch = emit.node("Cast", [emit.node("Gather", [emit.node("Shape", [output]), emit.const("zero", 0, np.int64)],
                                         axis=0)], to=onnx.TensorProto.FLOAT)
    return emit.node("Neg", [emit.node("Div", [total, batch])])


def _log(emit: Emit, probabilities: str) -> str:
    """``log(p + 1e-12)``: the teacher's logits up to a per-row constant, which neither
    ``LogSoftmax`` nor ``softmax(. / T)`` sees (the epsilon keeps a probability that underflowed to
    0 finite; the teacher needs no gradient)."""
    return emit.node("Log", [emit.node("Add", [probabilities, emit.const("eps", 1e-12)])])


def _kl(emit: Emit, student: str, teacher: str, temperature: float) -> str:
    """``sum(p_t * (log p_t - log p_s)) / batch * T^2`` with ``p = softmax(logits / T)``."""
    t = emit.const("temperature", temperature)
    log_s = emit.node("LogSoftmax", [emit.node("Div", [student, t])], axis=-1)
    scaled_t = emit.node("Div", [teacher, t])
    p_t = emit.node("Softmax", [scaled_t], axis=-1)
    log_t = emit.node("LogSoftmax", [scaled_t], axis=-1)
    total = emit.node("ReduceSum", [emit.node("Mul", [p_t, emit.node("Sub", [log_t, log_s])])], keepdims=0)
    batch = emit.node("Cast", [emit.node("Gather", [emit.node("Shape", [student]), emit.const("zero", 0, np.int64)],
                                         axis=0)], to=onnx.TensorProto.FLOAT)
    return emit.node("Mul", [emit.node("Div", [total, batch]), emit.const("t_squared", temperature ** 2)])


def _mse(emit: Emit, student: str, teacher: str) -> str:
    diff = emit.node("Sub", [student, teacher])
    return emit.node("ReduceMean", [emit.node("Mul", [diff, diff])], keepdims=0)


# --------------------------------------------------------------------------- the same in numpy


def kl_numpy(student: np.ndarray, teacher: np.ndarray, temperature: float) -> float:
    """What :func:`_kl` computes (float64), for tests and checks."""
    def log_softmax(x):
        x = x - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))

    s, t = np.asarray(student, np.float64) / temperature, np.asarray(teacher, np.float64) / temperature
    log_t, log_s = log_softmax(t), log_softmax(s)
    return float((np.exp(log_t) * (log_t - log_s)).sum() / len(s) * temperature ** 2)
