"""Look up passes by their kebab-case names (``onnxdns passes`` prints this table)."""

from __future__ import annotations

from onnxdns.errors import OnnxdnsError
from onnxdns.framework import GraphPass


def pass_classes() -> dict[str, type[GraphPass]]:
    from onnxdns.passes import PASSES

    return {cls.name: cls for cls in PASSES}


def get_pass(name: str, **options) -> GraphPass:
    classes = pass_classes()
    if name not in classes:
        raise OnnxdnsError(f"unknown pass '{name}'; known passes: {', '.join(classes)}")
    return classes[name](**options)
