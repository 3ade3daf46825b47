"""Fitting math and plumbing of the ``sparse-lowrank`` pass (``passes/sparse_lowrank.py``).

* :mod:`~onnxdns.lowrank.layers`: which Conv/Gemm/MatMul nodes can be split, their geometry;
* :mod:`~onnxdns.lowrank.calibration`: calibration inputs (any inputs, dtypes, batch axes) and layer rows
  read with onnxruntime;
* :mod:`~onnxdns.lowrank.fit`: the linear S + L fit, ADMM on the post-activation error, baselines;
* :mod:`~onnxdns.lowrank.cost`: option costs (onnxruntime CPU latency model, MACs, parameters);
* :mod:`~onnxdns.lowrank.budget`: per-layer option grids, estimated errors, the global allocation;
* :mod:`~onnxdns.lowrank.sensitivity`: per-layer output sensitivity (allocation weights);
* :mod:`~onnxdns.lowrank.emit`: the split layer as standard ONNX nodes;
* :mod:`~onnxdns.lowrank.split`: the driver (calibrate, allocate, fit layer by layer, rewrite);
* :mod:`~onnxdns.lowrank.speed`: the split model timed against its input; splits that do not pay undone;
* :mod:`~onnxdns.lowrank.finetune`: fine-tuning a split model with onnxruntime-training;
* :mod:`~onnxdns.lowrank.report`: the per-layer table printed by the CLI;
* :mod:`~onnxdns.lowrank.blas`: BLAS thread control while fitting.

See ``docs/sparse_lowrank.md``.
"""
