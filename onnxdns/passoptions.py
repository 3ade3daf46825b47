"""Pass constructor options from text: ``--pass-option slim-channels.ratio=0.3`` on the command line.

Every keyword of a registered pass's constructor is an option, typed from its annotation (or its
default when the annotation says nothing usable): ``int``, ``float``, ``bool`` (true/false, yes/no,
on/off, 1/0), ``str``, a sequence of strings (comma-separated) and, when the annotation allows
``None``, the word ``none``. Unknown passes or options and values of the wrong type raise
:class:`~onnxdns.errors.OnnxdnsError` in one line.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import typing
from typing import Any, Iterable, Mapping

from onnxdns.errors import OnnxdnsError

_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


@dataclasses.dataclass(frozen=True)
class Option:
    """One constructor keyword of a pass: its value kind and default."""

    name: str
    kind: str  # "int", "float", "bool", "str", "list" or "any" (the text as given)
    optional: bool  # "none" is accepted
    default: Any

    def describe(self) -> str:
        shown = "none" if self.default is None else (",".join(map(str, self.default)) if self.kind == "list"
                                                     else str(self.default).lower() if self.kind == "bool"
                                                     else str(self.default))
        kind = {"list": "names", "any": "text"}.get(self.kind, self.kind)
        return f"{self.name}={shown} ({kind}{' or none' if self.optional else ''})"


def options_of(cls: type) -> dict[str, Option]:
    """The options of a pass class, in constructor order."""
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # noqa: BLE001 - an annotation that does not evaluate: fall back to defaults
        hints = {}
    out: dict[str, Option] = {}
    for p in inspect.signature(cls.__init__).parameters.values():
        if p.name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        default = None if p.default is p.empty else p.default
        kind, optional = _kind(hints.get(p.name), default)
        out[p.name] = Option(p.name, kind, optional, default)
    return out


def _kind(hint: Any, default: Any) -> tuple[str, bool]:
    args = typing.get_args(hint)
    optional = default is None or type(None) in args
    members = [a for a in args if a is not type(None)] if typing.get_origin(hint) in (typing.Union, _union_type()) \
        else [hint]
    for t in members:
        if t in (bool, int, float, str):
            return t.__name__, optional
        origin = typing.get_origin(t)
        if origin is not None and origin not in (typing.Union,) and typing.get_args(t) \
                and all(a in (str, Ellipsis) for a in typing.get_args(t)):
            return "list", optional
    for t in (bool, int, float, str):  # no usable annotation: the default's type
        if isinstance(default, t):
            return t.__name__, optional
    if isinstance(default, (tuple, list)):
        return "list", optional
    return "any", optional


def _union_type():
    import types

    return getattr(types, "UnionType", typing.Union)


def parse_value(option: Option, text: str, where: str) -> Any:
    """``text`` as a value of ``option`` (``where`` names it in errors)."""
    low = text.strip().lower()
    if option.optional and low == "none":
        return None
    try:
        if option.kind == "bool":
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError
        if option.kind == "int":
            return int(text)
        if option.kind == "float":
            value = float(text)
            if not math.isfinite(value):
                raise ValueError
            return value
    except ValueError:
        expected = {"bool": "true or false", "int": "an integer", "float": "a finite number"}[option.kind]
        raise OnnxdnsError(f"{where}: expected {expected}{' or none' if option.optional else ''}, got '{text}'") from None
    if option.kind == "list":
        return tuple(x.strip() for x in text.split(",") if x.strip())
    return text


def parse_pass_options(items: Iterable[str], classes: Mapping[str, type] | None = None) -> dict[str, dict[str, Any]]:
    """``PASS.OPTION=VALUE`` items as constructor options keyed like
    :func:`onnxdns.pipelines.get_pipeline` wants them (pass name with ``_`` for ``-``)."""
    if classes is None:
        from onnxdns.pipelines import option_classes

        classes = option_classes()
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        name, dot, option = key.strip().rpartition(".")
        if not sep or not dot or not name or not option:
            raise OnnxdnsError(f"--pass-option: expected PASS.OPTION=VALUE (e.g. slim-channels.ratio=0.3), got '{item}'")
        if name not in classes:
            raise OnnxdnsError(f"--pass-option {key}: unknown pass '{name}'; known passes: {', '.join(classes)}")
        options = options_of(classes[name])
        option = option.replace("-", "_")
        if option not in options:
            known = ", ".join(options) or "none"
            raise OnnxdnsError(f"--pass-option {key}: pass '{name}' has no option '{option}'; its options: {known}")
        out.setdefault(name.replace("-", "_"), {})[option] = parse_value(options[option], text, f"--pass-option {key}")
    return out


def options_help(classes: Iterable[type]) -> str:
    """One line per pass with options: ``name: opt=default (type), ...``."""
    lines = []
    for cls in classes:
        options = options_of(cls)
        if not options:
            continue
        line = f"  {cls.name}:"
        for i, o in enumerate(options.values()):
            item = o.describe() + ("," if i < len(options) - 1 else "")
            if len(line) + 1 + len(item) > 100:
                lines.append(line)
                line = "     "
            line += " " + item
        lines.append(line)
    return "\n".join(lines)


__all__ = ["Option", "options_of", "parse_pass_options", "parse_value", "options_help"]
