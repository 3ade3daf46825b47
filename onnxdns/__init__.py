"""onnxdns: compress ONNX models with Dynamic Network Surgery, Network Slimming and sparse plus low-rank factors."""

__version__ = "0.1.0"


def train(*args, **kwargs):
    """Fine-tune (and prune) a model on your data: see :func:`onnxdns.workflows.train.train`
    (needs ``onnxdns[train]``; imported on first use)."""
    from onnxdns.api import train as _train

    return _train(*args, **kwargs)


def slim(*args, **kwargs):
    """Network Slimming end to end: see :func:`onnxdns.workflows.slim.slim` (needs ``onnxdns[train]``)."""
    from onnxdns.api import slim as _slim

    return _slim(*args, **kwargs)
