"""The pass framework: one class per graph pass, usable on three model representations.

Every onnxdns pass is an onnx-ir :class:`~onnx_ir.passes.InPlacePass`, so it runs inside an
``onnx_ir.passes.PassManager`` unchanged. The same object is also callable on an
``onnx.ModelProto`` (returns a new ``ModelProto``; the input is not modified) and on an
``onnx_graphsurgeon.Graph`` (returns a new ``gs.Graph``)::

    from onnxdns.passes import FoldMasksPass
    proto_out = FoldMasksPass()(proto_in)              # onnx.ModelProto -> onnx.ModelProto
    graph_out = FoldMasksPass()(gs.import_onnx(proto)) # gs.Graph -> gs.Graph
    result = ir.passes.PassManager([FoldMasksPass()])(ir_model)  # -> PassResult

Contract of a pass (checked by ``tests/test_pass_contract.py`` for every registered pass):

* ``name``: a stable kebab-case name, listed by ``onnxdns passes``;
* the class docstring states what it guarantees: *exact* (outputs match onnxruntime before and
  after to float rounding) or its error bound;
* ``requires`` checks preconditions and raises ``PreconditionError`` with a reason;
* ``modified`` is honest, and a second run reports ``modified=False`` and changes nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from typing import Any, ClassVar

import onnx
import onnx_ir as ir

from onnxdns import modelio

logger = logging.getLogger(__name__)

@dataclasses.dataclass
class PassReport(ir.passes.PassResult):
    """A :class:`PassResult` with a pass-specific account of what was done (for reports)."""

    details: dict[str, Any] = dataclasses.field(default_factory=dict)


class GraphPass(ir.passes.InPlacePass):
    """Base class of onnxdns passes (see the module docstring for the contract)."""

    #: Stable kebab-case name used by the registry and the CLI.
    name: ClassVar[str] = ""
    #: True when the pass preserves outputs exactly (up to float rounding).
    exact: ClassVar[bool] = True
    #: One line for ``onnxdns passes``: what the pass does.
    summary: ClassVar[str] = ""

    def __call__(self, model: Any, /) -> Any:  # noqa: D401 - polymorphic entry point
        if isinstance(model, (ir.Model, ir.passes.PassResult)):
            return self._run_logged(model)
        return self.apply(model).model

    def _run_logged(self, model: Any) -> ir.passes.PassResult:
        start = time.perf_counter()
        result = super().__call__(model)
        logger.info("%s: %s in %.3f s", self.name, "modified" if result.modified else "unchanged",
                    time.perf_counter() - start)
        return result

    def apply(self, model: Any) -> "Applied":
        """Run on any supported representation; returns the same representation plus the report."""
        if isinstance(model, onnx.ModelProto):
            result = self._run_logged(modelio.to_ir(model))
            return Applied(modelio.to_proto(result.model), result.modified, _details(result))
        if _is_gs_graph(model):
            import onnx_graphsurgeon as gs

            proto = gs.export_onnx(model)
            result = self._run_logged(modelio.to_ir(proto))
            return Applied(gs.import_onnx(modelio.to_proto(result.model)), result.modified, _details(result))
        if isinstance(model, (ir.Model, ir.passes.PassResult)):
            result = self._run_logged(model)
            return Applied(result.model, result.modified, _details(result))
        raise TypeError(f"{self.name}: expected onnx.ModelProto, onnx_graphsurgeon.Graph or onnx_ir.Model, got {type(model).__name__}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@dataclasses.dataclass
class Applied:
    """Outcome of :meth:`GraphPass.apply`: the model (same representation as given) and report."""

    model: Any
    modified: bool
    details: dict[str, Any]


def _details(result: ir.passes.PassResult) -> dict[str, Any]:
    return dict(result.details) if isinstance(result, PassReport) else {}


def _is_gs_graph(obj: Any) -> bool:
    # onnx-graphsurgeon is optional: a gs.Graph can only exist once the user has imported it.
    gs = sys.modules.get("onnx_graphsurgeon")
    return gs is not None and isinstance(obj, gs.Graph)
