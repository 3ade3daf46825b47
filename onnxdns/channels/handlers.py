"""The per-op channel-handler table, keyed by ``(domain, op_type)``.

Each handler answers four questions for one node (see :mod:`onnxdns.channels.analysis`):

``propagate``  which slots sit on the output channel axes (new slots for layers, the input's for
               channel-preserving ops, offsets for Concat/Split/Slice) and which slots are tied
               or pinned;
``constants``  which output channels are input-independent constants, and their values;
``check``      at a boundary (a layer consuming channels), which input channels may go;
``rewrite``    slice weights and parameters, fold constants into biases, fix attributes.

An op without a handler pins every tracked channel reaching it (they are kept) and is counted
in the report: propagation stops there safely.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxdns import graphutil
from onnxdns.channels.analysis import ChannelGraph
from onnxdns.channels.constants import evaluate_node, unknown
from onnxdns.channels.layout import Layout


class Handler:
    """Default behaviour: an op we know nothing about (pins its inputs, outputs untracked)."""

    def propagate(self, node: ir.Node, g: ChannelGraph) -> None:
        if any(g.layout(v) is not None for v in node.inputs):
            g.unknown_ops[f"{node.domain + '::' if node.domain else ''}{node.op_type}"] += 1
        g.pin_inputs(node, f"consumed by {node.op_type} node {g.node_name(node)} (no channel handler)")

    def constants(self, node: ir.Node, g: ChannelGraph) -> None:
        pass

    def check(self, node: ir.Node, g: ChannelGraph) -> None:
        pass

    def rewrite(self, node: ir.Node, g: ChannelGraph) -> None:
        pass


UNKNOWN = Handler()


def _padded(node: ir.Node) -> bool:
    auto_pad = node.attributes.get("auto_pad")
    if auto_pad is not None and auto_pad.as_string() not in ("NOTSET", "VALID"):
        return True
    return any(p != 0 for p in (graphutil.attr_ints(node, "pads") or []))


def _changed(*masks: np.ndarray) -> bool:
    return any(not m.all() for m in masks)


def _fold_value(v: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """Constants of removed channels with NaN (ignored channels) read as 0."""
    return np.where(removed & ~np.isnan(v), v, 0.0)


# ---------------------------------------------------------------------------------- layers


class ConvHandler(Handler):
    """Conv: dense, grouped and depthwise (incl. channel multiplier)."""

    @staticmethod
    def _info(node: ir.Node, g: ChannelGraph):
        w = graphutil.const_array(node.inputs[1])
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
        bias = graphutil.const_array(node.inputs[2]) if len(node.inputs) > 2 else None
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
        _check_consumer(g, node, layout, _ignored_conv(nz, groups, c_in, c_out), g.const(node.inputs[0]), not _padded(node))

    def rewrite(self, node, g):
        if g.layout(node.outputs[0]) is None:
            return
        w, groups, c_in, c_out, kind, wsum, nz = self._tables(node, g)
        keep_in, keep_out = g.keep(node.inputs[0], c_in), g.keep(node.outputs[0])
        if not _changed(keep_in, keep_out):
            return
        has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
        bias = graphutil.const_array(node.inputs[2]).astype(np.float64) if has_bias else np.zeros(c_out)
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


def _ignored_conv(nz: np.ndarray, groups: int, c_in: int, c_out: int) -> np.ndarray:
    """Input channels whose weights are zero for every output that sees them."""
    opg, ipg = c_out // groups, c_in // groups
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
        w = graphutil.const_array(node.inputs[1])
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
        bias = graphutil.const_array(node.inputs[2]) if len(node.inputs) > 2 else None
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
            graphutil.set_input_constant(g.graph, node, 2, graphutil.const_array(node.inputs[2])[keep_out])


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
            b = graphutil.const_array(node.inputs[1])
            if b is None or b.ndim != 2:
                return None
            wk = b.T if graphutil.attr_int(node, "transB", 0) else b
            c = graphutil.const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
            if len(node.inputs) > 2 and node.inputs[2] is not None and c is None:
                return None
            return wk, graphutil.attr_float(node, "alpha", 1.0), graphutil.attr_float(node, "beta", 1.0), c, 1
        b = graphutil.const_array(node.inputs[1])
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
        nz = wk != 0
        n = wk.shape[1]
        if c is None:
            cvec = np.zeros(n)
        elif c.ndim == 2 and c.shape[0] != 1:
            g.set_const(node.outputs[0], unknown(n))  # a bias that differs per row is not uniform
            return
        else:
            cvec = np.broadcast_to(c.astype(np.float64).reshape(-1) if c.size > 1 else c.reshape(()), (n,))
        valid = np.all(~nz | ~np.isnan(vf)[:, None], axis=0)
        total = beta * cvec + alpha * (np.nan_to_num(vf) @ np.where(nz, wk, 0.0).astype(np.float64))
        g.set_const(node.outputs[0], np.where(valid, total, np.nan))

    def check(self, node, g):
        layout = g.layout(node.inputs[0])
        if layout is None or g.layout(node.outputs[0]) is None:
            return
        wk, *_ = self._info(node, g)
        _, block, count = self._features(node, g, wk)
        ignored = ~(wk.reshape(count, block, -1) != 0).any(axis=(1, 2))
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
        arr = graphutil.const_array(other)
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


# ------------------------------------------------------------------ channel-preserving ops


class BatchNormHandler(Handler):
    """BatchNormalization (inference form, one output). gamma = 0 makes a channel constant beta."""

    def propagate(self, node, g):
        layout = g.layout(node.inputs[0])
        params = [graphutil.const_array(v) for v in node.inputs[1:5]]
        if len(node.outputs) != 1 or any(p is None for p in params):
            return Handler.propagate(self, node, g)
        if layout is None:
            return
        if layout.axis != 1 or layout.block != 1:
            return Handler.propagate(self, node, g)
        g.set_layout(node.outputs[0], layout)

    def constants(self, node, g):
        layout = g.layout(node.outputs[0])
        if layout is None:
            return
        v = g.const(node.inputs[0])
        rank = g.rank(node.inputs[0]) or 4
        params = [graphutil.const_array(x) for x in node.inputs[1:5]]
        out = evaluate_node(node, [(v, 1, rank), *params], 1, rank, g.opset)
        if out is None:
            return
        gamma, beta = params[0], params[1]
        absorbed = gamma == 0
        out[absorbed] = beta[absorbed]
        g.set_const(node.outputs[0], out)

    def rewrite(self, node, g):
        if g.layout(node.outputs[0]) is None:
            return
        keep = g.keep(node.outputs[0])
        if keep.all():
            return
        for i in range(1, 5):
            graphutil.set_input_constant(g.graph, node, i, graphutil.const_array(node.inputs[i])[keep])


def _aligned_axis(out_axis: int, out_rank: int, rank: int) -> int:
    return out_axis - (out_rank - rank)


class ElementwiseHandler(Handler):
    """Unary, binary and variadic elementwise ops with numpy-style broadcasting.

    Tracked inputs of full channel length are tied; constant operands with one value per
    channel are sliced; a tracked input broadcast along channels (length 1) is pinned. A
    non-constant untracked input of full channel length pins the output's channels.
    """

    def _classify(self, node, g):
        ranks = []
        for v in node.inputs:
            if v is None:
                continue
            arr = graphutil.const_array(v)
            r = arr.ndim if arr is not None else g.rank(v)
            if r is None:
                return None
            ranks.append(r)
        out_rank = max(ranks) if ranks else 0
        axis = None
        for v in node.inputs:
            layout = g.layout(v)
            if layout is not None:
                a = layout.axis + out_rank - g.rank(v)
                if (axis is not None and a != axis) or layout.block != 1:
                    return None
                axis = a
        return out_rank, axis

    def propagate(self, node, g):
        tracked = [v for v in node.inputs if g.layout(v) is not None]
        if not tracked:
            return
        info = self._classify(node, g)
        if info is None or len([o for o in node.outputs if o.uses() or o.is_graph_output()]) > 1:
            return Handler.propagate(self, node, g)
        out_rank, axis = info
        channels = max(len(g.layout(v)) for v in tracked)
        main = next(g.layout(v) for v in tracked if len(g.layout(v)) == channels)
        reason = f"combined elementwise in {node.op_type} {g.node_name(node)}"
        for v in node.inputs:
            if v is None:
                continue
            layout = g.layout(v)
            if layout is not None:
                if len(layout) == channels:
                    g.slots.tie(main.slots, layout.slots, reason)
                else:
                    g.pin(layout.slots, f"broadcast along channels in {node.op_type} {g.node_name(node)}")
                continue
            arr = graphutil.const_array(v)
            shape = arr.shape if arr is not None else g.shape(v)
            a = _aligned_axis(axis, out_rank, len(shape))
            dim = shape[a] if a >= 0 else 1
            if arr is None and dim != 1:
                g.pin(main.slots, f"{node.op_type} {g.node_name(node)} adds a non-constant untracked tensor")
            elif arr is not None and dim not in (1, channels):
                return Handler.propagate(self, node, g)
        g.set_layout(node.outputs[0], Layout(axis, main.slots))

    def constants(self, node, g):
        layout = g.layout(node.outputs[0])
        if layout is None:
            return
        out_rank, axis = self._classify(node, g)
        inputs = []
        for v in node.inputs:
            if v is None:
                inputs.append(None)
            elif g.layout(v) is not None:
                inputs.append((g.const(v), g.layout(v).axis, g.rank(v)))
            else:
                arr = graphutil.const_array(v)
                if arr is None:
                    return  # a non-constant operand: nothing is constant
                inputs.append(arr)
        out = evaluate_node(node, inputs, axis, out_rank, g.opset)
        if out is not None and len(out) == len(layout):
            if node.op_type == "Mul":  # x * 0 is 0 whatever x is
                for arr in inputs:
                    if isinstance(arr, np.ndarray):
                        zero = _per_channel(arr, axis, out_rank, len(out))
                        if zero is not None:
                            out[zero == 0] = 0.0
            g.set_const(node.outputs[0], out)

    def rewrite(self, node, g):
        layout = g.layout(node.outputs[0])
        if layout is None:
            return
        keep = g.keep(node.outputs[0])
        if keep.all():
            return
        out_rank, axis = self._classify(node, g)
        for i, v in enumerate(node.inputs):
            if v is None or g.layout(v) is not None:
                continue
            arr = graphutil.const_array(v)
            if arr is None:
                continue
            a = _aligned_axis(axis, out_rank, arr.ndim)
            if a >= 0 and arr.shape[a] == len(keep) and len(keep) > 1:
                graphutil.set_input_constant(g.graph, node, i, np.compress(keep, arr, axis=a))


def _per_channel(arr: np.ndarray, axis: int, out_rank: int, channels: int) -> np.ndarray | None:
    """A constant operand as one value per channel, if it is uniform along the other axes."""
    a = _aligned_axis(axis, out_rank, arr.ndim)
    moved = np.moveaxis(arr, a, 0).reshape(arr.shape[a], -1) if a >= 0 else arr.reshape(1, -1)
    if not np.all(moved == moved[:, :1]):
        return None
    return np.broadcast_to(moved[:, 0], (channels,))


class PassThroughHandler(Handler):
    """Identity, inference Dropout, pools: output channel i is input channel i."""

    def __init__(self, keeps_constants: bool = True):
        self.keeps_constants = keeps_constants

    def propagate(self, node, g):
        layout = g.layout(node.inputs[0])
        if layout is None:
            return
        used = [o for o in node.outputs[1:] if o.uses() or o.is_graph_output()]
        pooling = node.op_type not in ("Identity", "Dropout")
        if used or (pooling and (layout.axis != 1 or layout.block != 1)):
            return Handler.propagate(self, node, g)
        g.set_layout(node.outputs[0], layout)

    def constants(self, node, g):
        if g.layout(node.outputs[0]) is None:
            return
        v = g.const(node.inputs[0])
        if node.op_type == "AveragePool" and _padded(node) and graphutil.attr_int(node, "count_include_pad", 0):
            v = np.where(v == 0, 0.0, np.nan)  # padded zeros enter the average at the borders
        g.set_const(node.outputs[0], v)


class FlattenHandler(Handler):
    """Flatten(axis=1) of a [N, C, ...] tensor: channel c becomes a block of prod(spatial) features."""

    def propagate(self, node, g):
        layout = g.layout(node.inputs[0])
        if layout is None:
            return
        shape = g.shape(node.inputs[0])
        axis = graphutil.attr_int(node, "axis", 1)
        if shape is None or axis != 1 or layout.axis != 1 or any(d is None for d in shape[2:]):
            return Handler.propagate(self, node, g)
        block = layout.block * int(np.prod(shape[2:], dtype=np.int64))
        g.set_layout(node.outputs[0], Layout(1, layout.slots, block))

    def constants(self, node, g):
        if g.layout(node.outputs[0]) is not None:
            g.set_const(node.outputs[0], g.const(node.inputs[0]))


class ReshapeHandler(Handler):
    """Reshape that keeps the channel axis or flattens [N, C, ...] into [N, C*...]."""

    def _plan(self, node, g):
        layout = g.layout(node.inputs[0])
        shape_in = g.shape(node.inputs[0])
        target = graphutil.const_array(node.inputs[1])
        if layout is None or shape_in is None or target is None or layout.block != 1:
            return None
        a = layout.axis
        if any(d is None for d in shape_in[a:]) or len(target) <= a:
            return None
        lead = list(target[:a])
        if not all(t == 0 or (shape_in[i] is not None and t == shape_in[i]) or (t == -1 and i == 0 and a == 1) for i, t in enumerate(lead)):
            return None
        rest = int(np.prod(shape_in[a + 1:], dtype=np.int64))
        tail_in = list(shape_in[a + 1:])
        if len(target) == a + 1 and target[a] in (-1, shape_in[a] * rest):
            return Layout(a, layout.slots, rest)  # flatten channels with everything after them
        if target[a] in (0, shape_in[a]) and (list(target[a + 1:]) == tail_in or (len(target) > a + 1 and int(np.prod([t for t in target[a + 1:]])) in (rest, -rest))):
            return Layout(a, layout.slots, 1)  # channel axis kept, trailing dims reshaped
        return None

    def propagate(self, node, g):
        if g.layout(node.inputs[0]) is None:
            return
        out = self._plan(node, g)
        if out is None:
            return Handler.propagate(self, node, g)
        g.set_layout(node.outputs[0], out)

    def constants(self, node, g):
        if g.layout(node.outputs[0]) is not None:
            g.set_const(node.outputs[0], g.const(node.inputs[0]))

    def rewrite(self, node, g):
        layout = g.layout(node.outputs[0])
        if layout is None:
            return
        keep = g.keep(node.outputs[0])
        target = graphutil.const_array(node.inputs[1])
        a = layout.axis
        if keep.all() or target[a] in (-1, 0):
            return
        new = target.copy()
        new[a] = int(keep.sum()) * layout.block
        graphutil.set_input_constant(g.graph, node, 1, new)


class ConcatHandler(Handler):
    """Concat along the channel axis maps channels through offsets; along another axis it ties."""

    def propagate(self, node, g):
        if not any(g.layout(v) is not None for v in node.inputs):
            return
        rank = g.rank(node.outputs[0]) or g.rank(next(v for v in node.inputs if g.layout(v) is not None))
        axis = graphutil.attr_int(node, "axis", 0) % rank
        parts = []
        layouts = [g.layout(v) for v in node.inputs]
        channel_axis = next(l.axis for l in layouts if l is not None)
        if any(l is not None and (l.axis != channel_axis or l.block != 1) for l in layouts):
            return Handler.propagate(self, node, g)
        if axis == channel_axis:
            for v, l in zip(node.inputs, layouts):
                if l is not None:
                    parts.append(l.slots)
                    continue
                shape = g.shape(v)
                if shape is None or shape[axis] is None:
                    return Handler.propagate(self, node, g)
                parts.append(g.untracked(shape[axis]))
            g.set_layout(node.outputs[0], Layout(axis, np.concatenate(parts)))
            return
        main = next(l for l in layouts if l is not None)
        for v, l in zip(node.inputs, layouts):
            if l is None:
                g.pin(main.slots, f"Concat {g.node_name(node)} joins an untracked tensor")
            elif len(l) != len(main):
                return Handler.propagate(self, node, g)
            else:
                g.slots.tie(main.slots, l.slots, f"Concat {g.node_name(node)}")
        g.set_layout(node.outputs[0], main)

    def constants(self, node, g):
        layout = g.layout(node.outputs[0])
        if layout is None:
            return
        rank = g.rank(node.outputs[0]) or 4
        if graphutil.attr_int(node, "axis", 0) % rank == layout.axis:
            parts = []
            for v in node.inputs:
                l = g.layout(v)
                parts.append(g.const(v) if l is not None else unknown(g.shape(v)[layout.axis]))
            g.set_const(node.outputs[0], np.concatenate(parts))
        else:
            consts = [g.const(v) if g.layout(v) is not None else unknown(len(layout)) for v in node.inputs]
            same = np.all([np.array_equal(c, consts[0], equal_nan=True) for c in consts], axis=0)
            g.set_const(node.outputs[0], consts[0] if same else unknown(len(layout)))


class SplitHandler(Handler):
    """Split along the channel axis gives each output its range of slots; split sizes rewritten."""

    def _sizes(self, node, g, layout):
        axis = graphutil.attr_int(node, "axis", 0) % (g.rank(node.inputs[0]) or 1)
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            sizes = graphutil.const_array(node.inputs[1])
        else:
            sizes = graphutil.attr_ints(node, "split")
            if sizes is None:
                n = len(node.outputs)
                total = len(layout) if axis == layout.axis else None
                if total is None or total % n:
                    return axis, None
                sizes = [total // n] * n
        return axis, None if sizes is None else [int(s) for s in sizes]

    def propagate(self, node, g):
        layout = g.layout(node.inputs[0])
        if layout is None:
            return
        axis, sizes = self._sizes(node, g, layout)
        if axis != layout.axis:
            for o in node.outputs:
                g.set_layout(o, layout)
            return
        if sizes is None or sum(sizes) != len(layout) or layout.block != 1:
            return Handler.propagate(self, node, g)
        offsets = np.cumsum([0] + sizes)
        for o, start, stop in zip(node.outputs, offsets[:-1], offsets[1:]):
            g.set_layout(o, Layout(axis, layout.slots[start:stop]))

    def constants(self, node, g):
        src = g.layout(node.inputs[0])
        if src is None:
            return
        v = g.const(node.inputs[0])
        axis, _ = self._sizes(node, g, src)
        start = 0
        for o in node.outputs:
            layout = g.layout(o)
            if layout is None:
                continue
            if axis == src.axis:
                g.set_const(o, v[start:start + len(layout)])
                start += len(layout)
            else:
                g.set_const(o, v)

    def rewrite(self, node, g):
        layout = g.layout(node.inputs[0])
        if layout is None:
            return
        axis, sizes = self._sizes(node, g, layout)
        if axis != layout.axis:
            return
        new_sizes = np.array([int(g.keep(o).sum()) for o in node.outputs], dtype=np.int64)
        if list(new_sizes) == sizes:
            return
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            graphutil.set_input_constant(g.graph, node, 1, new_sizes)
        elif g.opset >= 13:
            node.attributes.pop("num_outputs", None)
            node.attributes.pop("split", None)
            value = graphutil.add_initializer(g.graph, new_sizes, f"{g.node_name(node)}_split")
            node.resize_inputs(2)
            node.replace_input_with(1, value)
        else:
            node.attributes["split"] = ir.AttrInt64s("split", [int(s) for s in new_sizes])


class SliceHandler(Handler):
    """Slice (opset >= 10) of a contiguous channel range with step 1; other axes pass through."""

    def _params(self, node, g):
        inputs = list(node.inputs) + [None] * (5 - len(node.inputs))
        _, starts, ends, axes, steps = (graphutil.const_array(v) for v in inputs[:5])
        rank = g.rank(node.inputs[0])
        if starts is None or ends is None or rank is None:
            return None
        axes = np.arange(len(starts)) if axes is None else axes % rank
        steps = np.ones(len(starts), dtype=np.int64) if steps is None else steps
        return starts, ends, axes, steps

    def propagate(self, node, g):
        layout = g.layout(node.inputs[0])
        if layout is None:
            return
        params = self._params(node, g)
        if params is None:
            return Handler.propagate(self, node, g)
        starts, ends, axes, steps = params
        if layout.axis not in axes.tolist():
            g.set_layout(node.outputs[0], layout)
            return
        i = axes.tolist().index(layout.axis)
        if steps[i] != 1 or layout.block != 1:
            return Handler.propagate(self, node, g)
        lo, hi, _ = slice(int(starts[i]), int(ends[i])).indices(len(layout))
        g.set_layout(node.outputs[0], Layout(layout.axis, layout.slots[lo:hi]))

    def constants(self, node, g):
        out = g.layout(node.outputs[0])
        if out is None:
            return
        starts, ends, axes, steps = self._params(node, g)
        src = g.layout(node.inputs[0])
        if src.axis in axes.tolist():
            i = axes.tolist().index(src.axis)
            lo, hi, _ = slice(int(starts[i]), int(ends[i])).indices(len(src))
            g.set_const(node.outputs[0], g.const(node.inputs[0])[lo:hi])
        else:
            g.set_const(node.outputs[0], g.const(node.inputs[0]))

    def rewrite(self, node, g):
        src = g.layout(node.inputs[0])
        if src is None or g.layout(node.outputs[0]) is None:
            return
        starts, ends, axes, steps = self._params(node, g)
        if src.axis not in axes.tolist():
            return
        i = axes.tolist().index(src.axis)
        keep = g.keep(node.inputs[0])
        if keep.all():
            return
        lo, hi, _ = slice(int(starts[i]), int(ends[i])).indices(len(src))
        new_lo = int(keep[:lo].sum())
        new_hi = new_lo + int(keep[lo:hi].sum())
        new_starts, new_ends = starts.copy(), ends.copy()
        new_starts[i], new_ends[i] = new_lo, new_hi
        graphutil.set_input_constant(g.graph, node, 1, new_starts)
        graphutil.set_input_constant(g.graph, node, 2, new_ends)


class ShapeHandler(Handler):
    """Shape of a tracked tensor is harmless when only non-channel dimensions are read."""

    def propagate(self, node, g):
        layout = g.layout(node.inputs[0])
        if layout is None:
            return
        start = graphutil.attr_int(node, "start", 0)
        rank = g.rank(node.inputs[0])
        ok = rank is not None
        for use in node.outputs[0].uses():
            idx = graphutil.const_array(use.node.inputs[1]) if use.node.op_type == "Gather" and use.idx == 0 else None
            if idx is None or idx.ndim != 0 or (int(idx) + start) % rank == layout.axis:
                ok = False
        if not ok or node.outputs[0].is_graph_output():
            return Handler.propagate(self, node, g)


class TransposeHandler(Handler):
    """Transpose moves the channel axis."""

    def propagate(self, node, g):
        layout = g.layout(node.inputs[0])
        if layout is None:
            return
        perm = graphutil.attr_ints(node, "perm")
        rank = g.rank(node.inputs[0])
        if rank is None or layout.block != 1:
            return Handler.propagate(self, node, g)
        perm = list(reversed(range(rank))) if perm is None else perm
        g.set_layout(node.outputs[0], layout.with_axis(perm.index(layout.axis)))

    def constants(self, node, g):
        if g.layout(node.outputs[0]) is not None:
            g.set_const(node.outputs[0], g.const(node.inputs[0]))


class SqueezeHandler(Handler):
    """Squeeze/Unsqueeze of axes other than the channel axis shift it."""

    def propagate(self, node, g):
        layout = g.layout(node.inputs[0])
        if layout is None:
            return
        rank = g.rank(node.inputs[0])
        axes = graphutil.const_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else graphutil.attr_ints(node, "axes")
        if rank is None or axes is None or layout.block != 1:
            return Handler.propagate(self, node, g)
        axes = [int(a) for a in np.atleast_1d(axes)]
        if node.op_type == "Squeeze":
            axes = [a % rank for a in axes]
            if layout.axis in axes:
                return Handler.propagate(self, node, g)
            new_axis = layout.axis - sum(a < layout.axis for a in axes)
        else:
            out_rank = rank + len(axes)
            axes = sorted(a % out_rank for a in axes)
            new_axis = layout.axis
            for a in axes:
                if a <= new_axis:
                    new_axis += 1
        g.set_layout(node.outputs[0], layout.with_axis(new_axis))

    def constants(self, node, g):
        if g.layout(node.outputs[0]) is not None:
            g.set_const(node.outputs[0], g.const(node.inputs[0]))


class ReduceHandler(Handler):
    """ReduceMean/Max/Min over axes other than the channel axis (constants unchanged)."""

    def propagate(self, node, g):
        layout = g.layout(node.inputs[0])
        if layout is None:
            return
        rank = g.rank(node.inputs[0])
        axes = graphutil.const_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else graphutil.attr_ints(node, "axes")
        if rank is None or axes is None or layout.block != 1:
            return Handler.propagate(self, node, g)
        axes = [int(a) % rank for a in np.atleast_1d(axes)]
        if layout.axis in axes:
            return Handler.propagate(self, node, g)
        keepdims = graphutil.attr_int(node, "keepdims", 1)
        new_axis = layout.axis if keepdims else layout.axis - sum(a < layout.axis for a in axes)
        g.set_layout(node.outputs[0], layout.with_axis(new_axis))

    def constants(self, node, g):
        if g.layout(node.outputs[0]) is not None:
            g.set_const(node.outputs[0], g.const(node.inputs[0]))


class ResizeHandler(Handler):
    """Resize/Upsample with scale 1 on the channel axis; interpolating a constant keeps it."""

    def propagate(self, node, g):
        layout = g.layout(node.inputs[0])
        if layout is None:
            return
        scales = graphutil.const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        if node.op_type == "Upsample":
            scales = graphutil.const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        sizes = graphutil.const_array(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
        ok = layout.block == 1 and (
            (scales is not None and scales.size > layout.axis and scales[layout.axis] == 1)
            or (sizes is not None and sizes.size > layout.axis and sizes[layout.axis] == len(layout))
        )
        if not ok:
            return Handler.propagate(self, node, g)
        g.set_layout(node.outputs[0], layout)

    def constants(self, node, g):
        if g.layout(node.outputs[0]) is not None:
            g.set_const(node.outputs[0], g.const(node.inputs[0]))

    def rewrite(self, node, g):
        layout = g.layout(node.outputs[0])
        sizes = graphutil.const_array(node.inputs[3]) if layout is not None and len(node.inputs) > 3 and node.inputs[3] is not None else None
        if sizes is None or sizes.size == 0:
            return
        keep = g.keep(node.outputs[0])
        if not keep.all():
            new = sizes.copy()
            new[layout.axis] = int(keep.sum())
            graphutil.set_input_constant(g.graph, node, 3, new)


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
