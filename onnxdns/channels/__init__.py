"""Channel dependency analysis and removal across a whole ONNX graph.

``layout``: which channel of which tensor is which (slots, ties, pins).
``constants``: input-independent per-channel constants, evaluated with onnxruntime.
``handlers``: the per-op table keyed by ``(domain, op_type)``.
``analysis``: builds the channel graph, decides what can be removed, applies the rewrite.
"""
