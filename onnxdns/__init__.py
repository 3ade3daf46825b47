"""onnxdns: compress ONNX models with Dynamic Network Surgery, Network Slimming and sparse plus low-rank factors."""

__version__ = "0.1.0"
