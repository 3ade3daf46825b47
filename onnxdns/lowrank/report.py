"""The per-layer table of a ``sparse-lowrank`` run (printed by ``onnxdns optimize``)."""

from __future__ import annotations

from typing import Any

from onnxdns.report import count, ratio, table


def layer_table(details: dict[str, Any]) -> str:
    """One row per candidate layer: rank, kept input groups, MACs, parameters, relative error."""
    rows = []
    for r in details["layers"]:
        split = r["status"] == "split"
        rows.append((
            r["name"], r["op"],
            "-" if r["rank"] is None else str(r["rank"]),
            f"{r['keep']}/{r['in_channels']}",
            count(r["macs_before"]), count(r["macs_after"]), ratio(r["macs_before"], r["macs_after"]),
            count(r["params_before"]), count(r["params_after"]),
            f"{r['rel_error']:.4f}" if split else ("undone" if r["status"] == "undone" else "dense"),
        ))
    text = table(("layer", "op", "rank", "kept", "MACs", "after", "x", "params", "after", "rel. error"), rows, left=2)
    macs, params, target = details["macs"], details["params"], details["target"]
    goals = [f"speed-up {target['speedup']}" if target["speedup"] is not None else "",
             f"compression {target['compression']}" if target["compression"] is not None else ""]
    goal = " and ".join(g for g in goals if g)
    lines = [text, "",
             f"split {details['split_layers']} of {len(details['layers'])} candidate layers; "
             f"MACs {ratio(macs['before'], macs['after'])} and parameters {ratio(params['before'], params['after'])} "
             f"fewer over them",
             ("allocation before the speed check: " if _undone(details) else "")
             + f"target {goal} ({target['cost']} cost): estimated {target['estimated_ratio']}x, "
             f"model parameters {target['params_ratio']}x fewer"
             + ("" if target["reached"] else " (not reachable: cheapest options taken)"),
             "rel. error: ||h(split) - h(original)||_F / ||h(original)||_F of the layer output after its "
             "activation, on held-out calibration images"]
    if "data" in details.get("calibration", {}):
        lines.append(f"calibration: {details['calibration']['data']}")
    narrowed = details.get("narrowed")
    if narrowed and narrowed["removed_channels"]:
        lines.append(f"narrowed producers (exact): {sum(narrowed['removed_channels'].values())} channels no split layer "
                     f"reads removed from {len(narrowed['removed_channels'])} layers; model MACs "
                     f"{count(narrowed['macs_before'])} -> {count(narrowed['macs_after'])}")
    for name, reason in details.get("skipped", {}).items():
        lines.append(f"kept dense: {name}: {reason}")
    lines.extend(speed_lines(details.get("speed_check")))
    return "\n".join(lines)


def _undone(details: dict[str, Any]) -> bool:
    check = details.get("speed_check") or {}
    return not check.get("skipped", True) and check.get("fallback") != "none"


def speed_lines(check: dict[str, Any] | None) -> list[str]:
    """What the speed check measured and did (see :mod:`onnxdns.lowrank.speed`)."""
    if not check:
        return []
    if check.get("skipped"):
        return [f"speed check skipped: {check['reason']}"]
    lines = []
    for attempt in check["attempts"]:
        timings = ", ".join(f"batch {b}: {t['input_ms']:.3f} -> {t['candidate_ms']:.3f} ms ({t['speedup']:.2f}x)"
                            for b, t in attempt["latency"].items())
        verdict = "accepted" if attempt["accepted"] else f"not {check['min_speedup']}x faster"
        lines.append(f"speed check, {attempt['split_layers']} split layers: {timings}: {verdict}")
    outcome = {"none": "the split model is faster than its input (medians of interleaved onnxruntime CPU runs)",
               "fewer splits": f"kept {len(check['kept'])} splits; undid the splits that did not pay",
               "no split": "no split made the model faster: no layer is split (only the exact clean-up applied)"}
    lines.append(f"speed check: {outcome[check['fallback']]}")
    return lines
