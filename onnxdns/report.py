"""Plain-text tables and summaries printed by the command line."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from onnxdns.stats import COUNTED_OPS, ModelStats


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, left: int = 1) -> str:
    """A fixed-width table: the first ``left`` columns left-aligned, the others right-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row)]

    def line(row: Sequence[str]) -> str:
        parts = [c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(list(headers)), rule, *(line(r) for r in cells)])


def count(n: int | None) -> str:
    return "?" if n is None else f"{n:,}"


def size(n: int) -> str:
    """Bytes with a binary unit, e.g. ``1.7 MiB``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def percent(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def ratio(before: float, after: float) -> str:
    """How many times smaller ``after`` is (``before / after``)."""
    if after == 0:
        return "-" if before == 0 else "inf"
    return f"{before / after:.2f}x"


# --------------------------------------------------------------------------- stats


def layer_table(stats: ModelStats) -> str:
    """One row per layer; MACs left out of the model total are shown in parentheses."""
    rows = []
    for layer in stats.layers:
        macs = count(layer.macs)
        if layer.op not in COUNTED_OPS:
            macs = f"({macs})"
        rows.append((layer.name, layer.op, "x".join(map(str, layer.weight_shape)) if layer.weight_shape else "-",
                     count(layer.params), count(layer.nonzeros), percent(layer.density), macs))
    text = table(("layer", "op", "weight", "params", "non-zeros", "density", "MACs"), rows, left=3)
    if any(layer.op not in COUNTED_OPS for layer in stats.layers):
        text += "\n(MACs): BatchNormalization (x*s+t per element), not in the total; fold-batchnorm removes it"
    return text


def totals(stats: ModelStats) -> str:
    macs = count(stats.macs) + ("" if stats.macs_complete else " (some layers' shapes unknown)")
    lines = [
        f"parameters  {count(stats.params)}",
        f"non-zeros   {count(stats.nonzeros)} ({percent(stats.density)})",
        f"MACs        {macs} (Conv, ConvTranspose, Gemm, MatMul; batch 1)",
        f"nodes       {count(stats.nodes)}",
        f"file size   {size(stats.file_bytes)} ({count(stats.file_bytes)} bytes)",
    ]
    return "\n".join(lines)


def before_after(before: ModelStats, after: ModelStats) -> str:
    rows = [
        ("parameters", count(before.params), count(after.params), ratio(before.params, after.params)),
        ("non-zeros", count(before.nonzeros), count(after.nonzeros), ratio(before.nonzeros, after.nonzeros)),
        ("MACs (batch 1)", count(before.macs), count(after.macs), ratio(before.macs, after.macs)),
        ("nodes", count(before.nodes), count(after.nodes), ratio(before.nodes, after.nodes)),
        ("bytes on disk", count(before.file_bytes), count(after.file_bytes), ratio(before.file_bytes, after.file_bytes)),
    ]
    return table(("", "before", "after", "before/after"), rows)


# --------------------------------------------------------------------------- passes


def pass_lines(runs: Sequence[Any]) -> str:
    """One line per :class:`~onnxdns.api.PassRun`: name, modified, time, short details."""
    width = max((len(r.name) for r in runs), default=0)
    return "\n".join(
        f"{r.name.ljust(width)}  {'modified ' if r.modified else 'unchanged'}  {r.seconds * 1e3:8.1f} ms"
        + (f"  {details(r.details)}" if r.details else "")
        for r in runs
    )


def details(d: dict[str, Any], limit: int = 80) -> str:
    """``key=value`` pairs (collections shown by their size), cut to ``limit`` characters."""
    parts = []
    for k, v in d.items():
        if isinstance(v, (list, tuple, set, dict)):
            v = len(v)
        elif isinstance(v, float):
            v = f"{v:.4g}"
        parts.append(f"{k}={v}")
    return _cut(", ".join(parts), limit)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def passes_table(classes: Iterable[type]) -> str:
    rows = [(c.name, "exact" if c.exact else "lossy", c.summary) for c in classes]
    return table(("pass", "kind", "summary"), rows, left=3)


def models_table(models: dict[str, Any], input_shapes: dict[str, Sequence[int]]) -> str:
    """Zoo models: name, input shape (without batch), first line of the constructor's docstring."""
    rows = []
    for name, ctor in models.items():
        shape = input_shapes.get(name)
        paragraph = " ".join((getattr(ctor, "__doc__", None) or "").strip().split("\n\n")[0].split())
        sentence = paragraph.split(". ")[0].rstrip(".")
        rows.append((name, "x".join(map(str, shape)) if shape else "?", _cut(sentence.replace("``", ""), 80)))
    return table(("model", "input", "description"), rows, left=3)


# --------------------------------------------------------------------------- comparison


def comparison(cmp: Any, names: tuple[str, str] = ("A", "B")) -> str:
    """Summary of a :class:`~onnxdns.validate.Comparison`."""
    a, b = names
    lines = [
        f"data            {cmp.data}, {cmp.samples:,} samples, batch {cmp.batch}, on {', '.join(cmp.providers)}",
        f"max abs diff    {cmp.max_abs_diff:.3g} (relative to output scale {cmp.output_scale:.3g}: {cmp.max_rel_diff:.3g})",
        f"mean abs diff   {cmp.mean_abs_diff:.3g}",
    ]
    lines[1:1] = ([f"inputs          {cmp.inputs}"] if getattr(cmp, "inputs", "") else []) + [
        f"note            {note}" for note in getattr(cmp, "notes", ())]
    if cmp.top1_agreement is not None:
        lines.append(f"top-1 agreement {percent(cmp.top1_agreement)}")
    if cmp.accuracy_a is not None:
        lines.append(f"accuracy        {a} {percent(cmp.accuracy_a)}, {b} {percent(cmp.accuracy_b)}")
    if cmp.latency:
        rows = [(f"batch {row.batch}", f"{row.a.median_ms:.3f}", f"{row.b.median_ms:.3f}", f"{row.ratio:.2f}x")
                for row in cmp.latency]
        lines.append(f"latency, ms (median of {cmp.latency[0].a.repeats} interleaved runs; "
                     f"ratio = {a}/{b}, above 1: {b} faster):")
        lines.append(table(("", a, b, "ratio"), rows))
    return "\n".join(lines)


def optimize_summary(result: Any) -> str:
    """What ``onnxdns optimize`` prints for an :class:`~onnxdns.api.OptimizeResult`."""
    v = result.validation
    parts = [
        f"{result.input_path} -> {result.output_path} (target {result.target}, {result.precision})",
        pass_lines(result.passes),
        before_after(result.before, result.after),
        f"validation: {v.status}: {v.message}"
        + (f"\n{comparison(v.comparison, ('input', 'output'))}" if v.comparison is not None else ""),
    ]
    return "\n\n".join(parts)
