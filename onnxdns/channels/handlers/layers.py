"""Layers: Conv (dense, grouped, depthwise), ConvTranspose, Gemm and MatMul.

They create channel slots for their outputs and are the *boundaries* where a removed input
channel is either ignored (zero weights) or folded into the bias as a constant.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxdns import graphutil
from onnxdns.channels.analysis import ChannelGraph
from onnxdns.channels.constants import unknown
from onnxdns.channels.handlers.base import const_input, Handler, _changed, _fold_value, _padded
from onnxdns.channels.layout import Layout
from onnxdns.external_data import drop_pages


class ConvHandler(Handler):
    """Conv: dense, grouped and depthwise (incl. channel multiplier)."""

    @staticmethod
    def _info(node: ir.Node, g: ChannelGraph):
        w = const_input(node.inputs[1])
        if w is None or w.ndim < 3:
            return None
        groups = graphutil.attr_int(node, "group", 1)
        c_out, ipg = w.shape[0], w.shape[1]
        c_in = ipg * groups
        kind = "dense" if groups == 1 else ("depthwise" if ipg == 1 else "grouped")
        return w, groups, c_in, c_out, kind

    def propagate(self, node, g):
        info = self._info(node, g)
        x = node.inputs[0]
        layout = g.layout(x)
        if info is None or (layout is not None and (layout.axis != 1 or layout.block != 1)):
            return Handler.propagate(self, node, g)
        _, groups, c_in, c_out, kind = info
        in_slots = layout.slots if layout is not None else g.untracked(c_in)
        if len(in_slots) != c_in:
            return Handler.propagate(self, node, g)
        name = g.node_name(node)
        if kind == "depthwise":
            g.set_layout(node.outputs[0], Layout(1, np.repeat(in_slots, c_out // c_in)))
            return
        out = g.new_slots(node, c_out)
        g.set_layout(node.outputs[0], Layout(1, out))
        g.spaces.append((name, out))
        if kind == "grouped":
            opg, ipg = c_out // groups, c_in // groups
            g.equal_counts.append((name, [out[i * opg:(i + 1) * opg] for i in range(groups)]))
            g.equal_counts.append((name, [in_slots[i * ipg:(i + 1) * ipg] for i in range(groups)]))

    def _tables(self, node, g):
        w, groups, c_in, c_out, kind = self._info(node, g)
        flat = w.reshape(c_out, w.shape[1], -1).astype(np.float64)
        return w, groups, c_in, c_out, kind, flat.sum(-1), (flat != 0).any(-1)

    def constants(self, node, g):
        if g.layout(node.outputs[0]) is None:
            return
        w, groups, c_in, c_out, kind, wsum, nz = self._tables(node, g)
        v = g.const(node.inputs[0], c_in)
        if _padded(node):  # zero padding makes a non-zero constant non-uniform at the borders
            v = np.where(v == 0, 0.0, np.nan)
        bias = const_input(node.inputs[2]) if len(node.inputs) > 2 else None
        bias = np.zeros(c_out) if bias is None else bias.astype(np.float64)
        opg, ipg = c_out // groups, c_in // groups
        vo = v.reshape(groups, ipg)[np.arange(c_out) // opg]  # inputs seen by each output
        valid = np.all(~nz | ~np.isnan(vo), axis=1)
        total = bias + np.where(nz, wsum * np.nan_to_num(vo), 0.0).sum(1)
        g.set_const(node.outputs[0], np.where(valid, total, np.nan))

    def check(self, node, g):
        layout = g.layout(node.inputs[0])
        if layout is None or g.layout(node.outputs[0]) is None:
            return
        w, groups, c_in, c_out, kind, wsum, nz = self._tables(node, g)
        if kind == "depthwise":
            return  # inside the group: its input and output channels are tied
        _check_consumer(g, node, layout, _ignored_conv(nz, groups, c_out), g.const(node.inputs[0]), not _padded(node))

    def rewrite(self, node, g):
        if g.layout(node.outputs[0]) is None:
            return
        w, groups, c_in, c_out, kind, wsum, nz = self._tables(node, g)
        keep_in, keep_out = g.keep(node.inputs[0], c_in), g.keep(node.outputs[0])
        if not _changed(keep_in, keep_out):
            return
        has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
        bias = const_input(node.inputs[2]).astype(np.float64) if has_bias else np.zeros(c_out)
        if kind == "depthwise":
            new_w = w[keep_out]
            node.attributes["group"] = ir.AttrInt64("group", int(keep_in.sum()))
        else:
            opg, ipg = c_out // groups, c_in // groups
            v = _fold_value(g.const(node.inputs[0], c_in), ~keep_in)
            rows = []
            for i in range(groups):
                ki, ko = keep_in[i * ipg:(i + 1) * ipg], keep_out[i * opg:(i + 1) * opg]
                sl = slice(i * opg, (i + 1) * opg)
                bias[sl] += wsum[sl] @ v[i * ipg:(i + 1) * ipg]
                rows.append(w[sl][ko][:, ki])
            if len({r.shape[1] for r in rows}) != 1:
                raise AssertionError(f"{g.node_name(node)}: unequal group sizes after removal")
            new_w = np.concatenate(rows, axis=0)
        graphutil.set_input_constant(g.graph, node, 1, np.ascontiguousarray(new_w))
        new_bias = bias[keep_out].astype(w.dtype)
        if has_bias or np.any(new_bias != 0):
            graphutil.set_input_constant(g.graph, node, 2, new_bias, name=f"{node.inputs[1].name}_bias")


def _ignored_conv(nz: np.ndarray, groups: int, c_out: int) -> np.ndarray:
    """Input channels whose weights are zero for every output that sees them."""
    opg = c_out // groups
    return np.concatenate([~nz[i * opg:(i + 1) * opg].any(0) for i in range(groups)])


def _check_consumer(g: ChannelGraph, node: ir.Node, layout: Layout, ignored: np.ndarray, v: np.ndarray, foldable: bool) -> None:
    """Pin input channels the consumer neither ignores nor can absorb as a constant."""
    name = g.node_name(node)
    for c, slot in enumerate(layout.slots.tolist()):
        if slot < 0 or ignored[c]:
            continue
        if np.isnan(v[c]):
            g.pin(np.array([slot]), f"feeds {node.op_type} {name} with a non-constant value", soft=True)
        elif v[c] != 0 and not foldable:
            g.pin(np.array([slot]), f"constant {v[c]:.4g} reaches zero-padded {node.op_type} {name} (not foldable exactly)", soft=True)


class ConvTransposeHandler(Handler):
    """ConvTranspose with group 1: weight [C_in, C_out, k...]. Constants fold only when zero."""

    def _info(self, node):
        w = const_input(node.inputs[1])
        if w is None or graphutil.attr_int(node, "group", 1) != 1:
            return None
        return w

    def propagate(self, node, g):
        w = self._info(node)
        layout = g.layout(node.inputs[0])
        if w is None or (layout is not None and (layout.axis != 1 or layout.block != 1 or len(layout) != w.shape[0])):
            return Handler.propagate(self, node, g)
        out = g.new_slots(node, w.shape[1])
        g.set_layout(node.outputs[0], Layout(1, out))
        g.spaces.append((g.node_name(node), out))

    def constants(self, node, g):
        if g.layout(node.outputs[0]) is None:
            return
        w = self._info(node)
        nz = (w.reshape(w.shape[0], w.shape[1], -1) != 0).any(-1)  # [C_in, C_out]
        v = g.const(node.inputs[0], w.shape[0])
        bias = const_input(node.inputs[2]) if len(node.inputs) > 2 else None
        bias = np.zeros(w.shape[1]) if bias is None else bias.astype(np.float64)
        valid = np.all(~nz | (v[:, None] == 0), axis=0)  # only all-zero contributions stay uniform
        g.set_const(node.outputs[0], np.where(valid, bias, np.nan))

    def check(self, node, g):
        layout = g.layout(node.inputs[0])
        if layout is None or g.layout(node.outputs[0]) is None:
            return
        w = self._info(node)
        ignored = ~(w.reshape(w.shape[0], -1) != 0).any(1)
        _check_consumer(g, node, layout, ignored, g.const(node.inputs[0]), foldable=False)

    def rewrite(self, node, g):
        if g.layout(node.outputs[0]) is None:
            return
        w = self._info(node)
        keep_in, keep_out = g.keep(node.inputs[0], w.shape[0]), g.keep(node.outputs[0])
        if not _changed(keep_in, keep_out):
            return
        graphutil.set_input_constant(g.graph, node, 1, np.ascontiguousarray(w[keep_in][:, keep_out]))
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            graphutil.set_input_constant(g.graph, node, 2, const_input(node.inputs[2])[keep_out])


class MatrixHandler(Handler):
    """Gemm (transA = 0) and MatMul with a constant 2-D right operand.

    Input features may be channel blocks (after Flatten of a NCHW tensor): channel ``c`` spans
    features ``[c*block, (c+1)*block)``.
    """

    def _info(self, node, g):
        """(weight as [K, N], alpha, beta, C array or None, feature axis) or None."""
        if node.op_type == "Gemm":
            if graphutil.attr_int(node, "transA", 0) != 0:
                return None
            b = const_input(node.inputs[1])
            if b is None or b.ndim != 2:
                return None
            wk = b.T if graphutil.attr_int(node, "transB", 0) else b
            c = const_input(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
            if len(node.inputs) > 2 and node.inputs[2] is not None and c is None:
                return None
            return wk, graphutil.attr_float(node, "alpha", 1.0), graphutil.attr_float(node, "beta", 1.0), c, 1
        b = const_input(node.inputs[1])
        rank = g.rank(node.inputs[0])
        if b is None or b.ndim != 2 or rank is None or rank < 2:
            return None
        return b, 1.0, 1.0, None, rank - 1

    def propagate(self, node, g):
        info = self._info(node, g)
        layout = g.layout(node.inputs[0])
        if info is None:
            return Handler.propagate(self, node, g)
        wk, _, _, c, axis = info
        if layout is not None and (layout.axis != axis or len(layout) * layout.block != wk.shape[0]):
            return Handler.propagate(self, node, g)
        out = g.new_slots(node, wk.shape[1])
        g.set_layout(node.outputs[0], Layout(axis, out))
        g.spaces.append((g.node_name(node), out))

    def _features(self, node, g, wk):
        layout = g.layout(node.inputs[0])
        block = layout.block if layout is not None else 1
        count = wk.shape[0] // block
        return layout, block, count

    def constants(self, node, g):
        if g.layout(node.outputs[0]) is None:
            return
        wk, alpha, beta, c, _ = self._info(node, g)
        layout, block, count = self._features(node, g, wk)
        vf = np.repeat(g.const(node.inputs[0], count), block)
        n = wk.shape[1]
        if c is None:
            cvec = np.zeros(n)
        elif c.ndim == 2 and c.shape[0] != 1:
            g.set_const(node.outputs[0], unknown(n))  # a bias that differs per row is not uniform
            return
        else:
            cvec = np.broadcast_to(c.astype(np.float64).reshape(-1) if c.size > 1 else c.reshape(()), (n,))
        # an output is constant when no non-zero weight meets a non-constant feature; only the
        # constant features' rows are read in float64 (the weight is never copied whole)
        known = ~np.isnan(vf)
        if known.all():
            valid = np.ones(n, dtype=bool)
        else:
            valid = ~_any_nonzero(wk if not known.any() else wk[~known], keep=1)
        total = beta * cvec
        if known.any():
            total = total + alpha * (vf[known] @ wk[known].astype(np.float64))
        g.set_const(node.outputs[0], np.where(valid, total, np.nan))

    def check(self, node, g):
        layout = g.layout(node.inputs[0])
        if layout is None or g.layout(node.outputs[0]) is None:
            return
        wk, *_ = self._info(node, g)
        _, block, count = self._features(node, g, wk)
        ignored = ~_any_nonzero(wk, keep=0).reshape(count, block).any(axis=1)
        _check_consumer(g, node, layout, ignored, g.const(node.inputs[0]), foldable=True)

    def rewrite(self, node, g):
        if g.layout(node.outputs[0]) is None:
            return
        wk, alpha, beta, c, _ = self._info(node, g)
        layout, block, count = self._features(node, g, wk)
        keep_in, keep_out = g.keep(node.inputs[0], count), g.keep(node.outputs[0])
        if not _changed(keep_in, keep_out):
            return
        vf = np.repeat(_fold_value(g.const(node.inputs[0], count), ~keep_in), block)
        fold = alpha * (vf @ wk.astype(np.float64))  # [N], contribution of removed constant features
        new_wk = np.ascontiguousarray(wk[np.repeat(keep_in, block)][:, keep_out])
        if node.op_type == "Gemm":
            trans_b = graphutil.attr_int(node, "transB", 0)
            graphutil.set_input_constant(g.graph, node, 1, np.ascontiguousarray(new_wk.T) if trans_b else new_wk)
            self._rewrite_gemm_bias(node, g, c, beta, fold, keep_out, wk.dtype)
        else:
            graphutil.set_input_constant(g.graph, node, 1, new_wk)
            if np.any(fold != 0):
                _add_bias_after(node, g, fold.astype(wk.dtype), keep_out)

    @staticmethod
    def _rewrite_gemm_bias(node, g, c, beta, fold, keep_out, dtype):
        n = len(keep_out)
        if c is None and not np.any(fold != 0):
            return
        if c is None:
            new_c = fold[keep_out]
            if beta != 1.0:
                node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
        else:
            if c.ndim == 2 and c.shape[0] != 1:  # per-row bias: add along the last axis
                full = c.astype(np.float64) + (fold / beta if beta != 0 else 0)
                new_c = full[..., keep_out] if c.shape[-1] == n else full
            else:
                full = np.broadcast_to(c.astype(np.float64).reshape(-1) if c.size > 1 else c.reshape(()), (n,)) + (fold / beta if beta != 0 else 0)
                new_c = full[keep_out].reshape((1, -1) if c.ndim == 2 else (-1,))
            if beta == 0 and np.any(fold != 0):
                raise AssertionError("Gemm with beta=0 and a bias input cannot absorb constants")
        graphutil.set_input_constant(g.graph, node, 2, new_c.astype(dtype), name=f"{node.inputs[1].name}_bias")


def _add_bias_after(node: ir.Node, g: ChannelGraph, bias: np.ndarray, keep_out: np.ndarray) -> None:
    """Add ``bias`` (one value per original output channel) to a MatMul's output.

    Into a following ``Add`` of a constant with one value per channel when there is one (that
    Add's own rewrite slices it afterwards), else into a new ``Add`` placed after the MatMul
    that inherits the output's channel layout.
    """
    out = node.outputs[0]
    uses = list(out.uses())
    if len(uses) == 1 and not out.is_graph_output():
        user, idx = uses[0].node, uses[0].idx
        other = user.inputs[1 - idx] if user.op_type == "Add" and len(user.inputs) == 2 else None
        arr = const_input(other)
        if arr is not None and arr.size == len(bias) and arr.shape[-1:] == (len(bias),):
            graphutil.set_input_constant(g.graph, user, 1 - idx, (arr + bias.reshape(arr.shape)).astype(arr.dtype))
            return
    bias_value = graphutil.add_initializer(g.graph, bias[keep_out], f"{node.inputs[1].name}_bias")
    new_out = ir.Value(name=graphutil.unique_name(g.graph, f"{out.name}_biased"), shape=out.shape, type=out.type)
    add = ir.Node("", "Add", [out, bias_value], outputs=[new_out], name=graphutil.unique_name(g.graph, f"{g.node_name(node)}_bias_add"))
    if out.is_graph_output():  # the Add takes over the output's name
        name = out.name
        out.name = graphutil.unique_name(g.graph, f"{name}_unbiased")
        new_out.name = name
    ir.convenience.replace_all_uses_with(out, new_out, replace_graph_outputs=True)
    add.replace_input_with(0, out)
    g.graph.insert_after(node, add)
    g.set_layout(new_out, g.layout(out))
    g.set_const(new_out, g.const(out))


#: Elements compared with zero at a time by :func:`_any_nonzero` (bounds its temporary arrays).
_CHUNK_ELEMENTS = 1 << 22


def _any_nonzero(a: np.ndarray, keep: int) -> np.ndarray:
    """``(a != 0).any(axis=1 - keep)`` for a 2-D ``a``, in chunks along its memory layout (no
    temporary array the size of ``a``; a transposed view is read in its stored order; the pages
    of a memory-mapped ``a`` are dropped from the resident set as it goes)."""
    if not a.flags.c_contiguous and a.T.flags.c_contiguous:
        a, keep = a.T, 1 - keep
    rows, cols = a.shape
    step = max(1, _CHUNK_ELEMENTS // max(1, cols))
    out = np.zeros(cols if keep == 1 else rows, dtype=bool)
    for i in range(0, rows, step):
        if keep == 1:
            out |= (a[i:i + step] != 0).any(axis=0)
        else:
            out[i:i + step] = (a[i:i + step] != 0).any(axis=1)
        drop_pages(a)  # a memory-mapped weight's pages leave the resident set once read
    return out
