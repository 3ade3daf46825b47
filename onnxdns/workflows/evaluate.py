"""The one evaluator of ONNX files: accuracy on labelled data and fidelity to a reference model,
both run by onnxruntime on batches of any data source (:mod:`onnxdns.sources`)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import onnx

from onnxdns import runtime
from onnxdns.errors import OnnxdnsError
from onnxdns.metrics import Accuracy, Fidelity, is_classifier
from onnxdns.sources import Source, model_inputs, open_source


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """What :func:`evaluate` measured on ``samples`` samples.

    ``accuracy`` / ``reference_accuracy``: top-1 accuracy of the model's (and the reference's)
    first classifier output against the labels (None without labels or classifier output);
    ``fidelity``: per output, the relative L2 error, cosine similarity and top-1 agreement of the
    model's outputs with the reference's (empty without a reference).
    """

    samples: int
    accuracy: float | None
    reference_accuracy: float | None
    fidelity: dict[str, dict[str, float]]

    @property
    def top1_agreement(self) -> float | None:
        return next((row["top1_agreement"] for row in self.fidelity.values() if "top1_agreement" in row), None)


def evaluate(model: onnx.ModelProto | str | os.PathLike, data: Any, *, reference: Any = None,
             outputs: Sequence[str] | None = None, batch_size: int = 256, samples: int | None = None,
             threads: int = 0, **source_options: Any) -> Evaluation:
    """Run ``model`` (and ``reference``, a model with the same inputs and outputs) on ``data``
    (a :class:`~onnxdns.sources.Source` or a spec of :func:`onnxdns.sources.open_source`, opened
    with ``source_options`` such as ``split``, ``mean``, ``std``) in batches of ``batch_size``,
    over the first ``samples`` samples (all by default), and measure (see :class:`Evaluation`).
    ``outputs``: the outputs compared (default: all float outputs)."""
    session = runtime.make_session(model, threads=threads)
    ref_session = runtime.make_session(reference, threads=threads) if reference is not None else None
    source = data if isinstance(data, Source) else open_source(data, model_inputs(session), **source_options)
    names = _output_names(session, outputs)
    if ref_session is not None:
        missing = [n for n in names if n not in {o.name for o in ref_session.get_outputs()}]
        if missing:
            raise OnnxdnsError(f"the reference model has no output {', '.join(missing)}")
    accuracy, ref_accuracy, fidelity = Accuracy(), Accuracy(), Fidelity()
    seen = 0
    for batch in source.batches(batch_size):
        if samples is not None and seen >= samples:
            break
        if samples is not None and seen + len(batch) > samples:
            batch = batch.take(samples - seen)
        seen += len(batch)
        got = dict(zip(names, session.run(names, batch.inputs)))
        ref = dict(zip(names, ref_session.run(names, batch.inputs))) if ref_session is not None else None
        scores = next((name for name in names if is_classifier(got[name])), None)
        if batch.labels is not None and scores is not None:
            accuracy.update(got[scores], batch.labels)
            if ref is not None:
                ref_accuracy.update(ref[scores], batch.labels)
        if ref is not None:
            fidelity.update(got, ref)
    if not seen:
        raise OnnxdnsError(f"{source.name}: no samples to evaluate on")
    return Evaluation(samples=seen, accuracy=accuracy.value, reference_accuracy=ref_accuracy.value,
                      fidelity=fidelity.result())


def _output_names(session, outputs: Sequence[str] | None) -> list[str]:
    available = {o.name: o for o in session.get_outputs()}
    if outputs is None:
        names = [name for name, o in available.items() if "float" in o.type]
        if not names:
            raise OnnxdnsError("the model has no float output to evaluate")
        return names
    unknown = [n for n in outputs if n not in available]
    if unknown:
        raise OnnxdnsError(f"the model has no output {', '.join(unknown)} (outputs: {', '.join(available)})")
    return list(outputs)
