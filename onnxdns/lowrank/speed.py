"""Never slower than the input: the split model is timed against its input, splits that do not pay are undone.

The cost model that chose the splits is an estimate; onnxruntime may run the split model slower
(small layers where the extra nodes cost more than the saved multiply-adds, depthwise networks
whose time is not in the split layers, a different CPU). :func:`check` therefore measures the
input model and each candidate side by side on the target provider
(:func:`onnxdns.validate.measure_latency`: warm-up, interleaved repeats, medians, sessions
without spin-waiting) at batch 1 and at the cost batch. A candidate is accepted when its median
latency is at least ``min_speedup`` times lower at every batch measured. Otherwise the splits
with the least estimated saving are undone and the smaller candidate is measured: half of the
split layers are kept, then a quarter, ..., then none, in which case the pass returns its input
with only the exact clean-up it runs first (Identity nodes removed, constants and BatchNorm
folded). Every measurement is recorded in the report.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Callable, Sequence

import onnx
from onnxdns.runtime import ort

from onnxdns import runtime
from onnxdns.lowrank.calibration import Inputs
from onnxdns.validate import measure_latency

log = logging.getLogger(__name__)

#: Seconds of timed runs per model pair and batch size (after warm-up); repeats are clamped below.
MEASURE_SECONDS = 1.0
MIN_REPEATS, MAX_REPEATS = 15, 200


def measure(reference, candidate, inputs: Inputs, batches: Sequence[int], *, threads: int = 0,
            providers: Sequence[str] = ("CPUExecutionProvider",),
            seconds: float = MEASURE_SECONDS) -> dict[int, dict[str, float]]:
    """Median latency (ms) of both models (protos, or sessions made without spin-waiting) per batch
    size, measured side by side, and their ratio."""
    out = {}
    models = {label: m if isinstance(m, ort.InferenceSession) else runtime.make_session(
        m, providers=providers, threads=threads, spinning=False) for label, m in (("input", reference),
                                                                                  ("candidate", candidate))}
    for batch in batches:
        feeds = inputs.repeat_to(batch)
        probe = measure_latency(models, feeds, repeats=3, warmup=2, threads=threads)
        pair_ms = sum(v.median_ms for v in probe.values())
        repeats = int(min(MAX_REPEATS, max(MIN_REPEATS, math.ceil(seconds * 1e3 / max(pair_ms, 1e-3)))))
        lat = measure_latency(models, feeds, repeats=repeats, warmup=2, threads=threads)
        a, b = lat["input"].median_ms, lat["candidate"].median_ms
        out[batch] = {"input_ms": round(a, 4), "candidate_ms": round(b, 4),
                      "speedup": round(a / b, 4) if b > 0 else float("inf"), "repeats": repeats}
    return out


def check(reference: onnx.ModelProto, layers: Sequence[str], benefit: dict[str, float],
          build: Callable[[Sequence[str]], onnx.ModelProto], inputs: Inputs, batches: Sequence[int], *,
          min_speedup: float = 1.05, threads: int = 0, providers: Sequence[str] = ("CPUExecutionProvider",),
          progress: Callable[[int, int], None] | None = None) -> dict:
    """Find the largest set of split layers (by estimated benefit) whose model is measured faster.

    ``layers``: the split layers; ``benefit``: each one's estimated saving (larger = undone
    later); ``build(kept)`` returns the model with only the layers ``kept`` split (``build`` of
    every layer is the pass's full result). Returns the report: ``attempts`` (layers kept, layers
    undone, measurements per batch, accepted), ``kept`` (the layers of the accepted candidate,
    empty when none was faster: no layer is then to be split) and the rule.
    """
    order = sorted(layers, key=lambda name: -benefit.get(name, 0.0))
    sizes = []
    n = len(order)
    while n > 0:
        sizes.append(n)
        n //= 2
    attempts = []
    kept: list[str] = []
    t0 = time.perf_counter()
    reference_session = runtime.make_session(reference, providers=providers, threads=threads, spinning=False)
    for size in sizes:
        subset = order[:size]
        candidate = build(subset)
        timings = measure(reference_session, candidate, inputs, batches, threads=threads, providers=providers)
        worst = min(t["speedup"] for t in timings.values())
        accepted = worst >= min_speedup
        attempts.append({"split_layers": size, "undone": [name for name in order[size:]],
                         "latency": {str(b): t for b, t in timings.items()}, "accepted": accepted})
        log.info("sparse-lowrank: speed check with %d split layers: %s -> %s", size,
                 ", ".join(f"batch {b}: {t['input_ms']:.3f} vs {t['candidate_ms']:.3f} ms ({t['speedup']:.2f}x)"
                           for b, t in timings.items()), "accepted" if accepted else "not faster, undoing splits")
        if progress is not None:
            progress(1, len(sizes))
        if accepted:
            kept = subset
            break
    return {"skipped": False, "provider": providers[0], "batches": list(batches),
            "min_speedup": min_speedup, "attempts": attempts, "kept": kept,
            "fallback": "none" if kept == order else ("fewer splits" if kept else "no split"),
            "seconds": round(time.perf_counter() - t0, 2)}
