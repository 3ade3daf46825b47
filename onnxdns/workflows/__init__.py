"""Workflows: data -> calibrate / train -> passes -> validate -> report, one module per method.

Passes (``passes/``) are pure graph rewrites; everything that reads data, runs a model, trains or
times lives here, shared by the CLI, the Python API and the benchmarks:

* :mod:`~onnxdns.workflows.sparse_lowrank`: calibrate, fit the sparse + low-rank split with ADMM,
  check its speed, apply it with the ``sparse-lowrank`` pass, fine-tune.
"""
