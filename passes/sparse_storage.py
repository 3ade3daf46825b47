"""Store mostly-zero initializers as ONNX sparse initializers (smaller files, same values)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxdns import modelio
from onnxdns.errors import OnnxdnsError
from onnxdns.external_data import drop_pages
from onnxdns.framework import GraphPass, PassReport

#: Element types considered (a pruned weight is float); others always stay dense.
_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE)

#: Elements compared at a time when counting zeros.
_CHUNK = 1 << 22


class SparseStoragePass(GraphPass):
    """Mark mostly-zero float initializers for sparse storage on disk.

    Guarantee: exact and bit-identical: the stored values, ``-0.0`` included, are unchanged;
    onnxruntime densifies sparse initializers when it loads the model, so compute and speed
    are the same and only the file shrinks.

    onnx-ir cannot hold sparse tensors, so the pass tags the value
    (``value.meta[modelio.SPARSE_TAG] = "sparse"``) and :func:`onnxdns.modelio.to_proto`
    writes it into ``graph.sparse_initializer`` (linear int64 indices, varint-packed; see
    :func:`onnxdns.modelio.array_to_sparse`). A main-graph initializer is stored sparsely when

    * it is float32, float16 or float64, has at least ``min_elements`` elements, and is no graph
      input or graph output;
    * at least ``min_sparsity`` of its elements are zero (``+0.0``; ``-0.0`` counts as a value);
    * its sparse encoding is strictly smaller in bytes than the dense one.

    Initializers that no longer qualify lose the tag (they are stored densely again).
    Caveat: ``onnx.checker.check_model(full_check=True)`` of onnx 1.16 rejects every model with
    sparse initializers (its strict shape inference types them as sparse tensors); the plain
    check passes and onnxruntime loads them.
    """

    name = "sparse-storage"
    exact = True
    summary = "store mostly-zero initializers as sparse initializers (smaller file, same values)"

    def __init__(self, min_sparsity: float = 0.5, min_elements: int = 128) -> None:
        super().__init__()
        if not 0.0 <= min_sparsity <= 1.0:
            raise OnnxdnsError(f"sparse-storage: min_sparsity must be in [0, 1], got {min_sparsity}")
        if min_elements < 1:
            raise OnnxdnsError(f"sparse-storage: min_elements must be >= 1, got {min_elements}")
        self.min_sparsity = float(min_sparsity)
        self.min_elements = int(min_elements)

    def __repr__(self) -> str:
        return f"SparseStoragePass(min_sparsity={self.min_sparsity}, min_elements={self.min_elements})"

    def call(self, model: ir.Model) -> PassReport:
        tagged: list[str] = []
        untagged: list[str] = []
        saved = 0
        for name, value in model.graph.initializers.items():
            was_sparse = value.meta.get(modelio.SPARSE_TAG) == "sparse"
            gain = self._bytes_saved(value)
            if gain > 0:
                saved += gain
                if not was_sparse:
                    value.meta[modelio.SPARSE_TAG] = "sparse"
                    tagged.append(name)
            elif was_sparse:
                del value.meta[modelio.SPARSE_TAG]
                untagged.append(name)
        details = {"sparse": tagged, "dense_again": untagged, "bytes_saved": saved}
        return PassReport(model, bool(tagged or untagged), details)

    def _bytes_saved(self, value: ir.Value) -> int:
        """Bytes the sparse encoding saves over the dense one (<= 0 when not eligible)."""
        tensor = value.const_value
        if tensor is None or value.is_graph_input() or value.is_graph_output():
            return 0
        if tensor.dtype not in _FLOAT_TYPES or tensor.size < self.min_elements:
            return 0
        array = tensor.numpy()
        bits = array.reshape(-1).view(np.dtype(f"u{array.dtype.itemsize}"))
        zeros = 0
        for i in range(0, bits.size, _CHUNK):  # no temporary the size of the weight
            zeros += int(np.count_nonzero(bits[i:i + _CHUNK] == 0))
            drop_pages(array)  # a memory-mapped weight's pages leave the resident set once read
        if zeros < self.min_sparsity * array.size:
            return 0
        dense = ir.serde.serialize_tensor(tensor).ByteSize()  # what modelio.to_proto compares with
        return dense - modelio.array_to_sparse(value.name, array).ByteSize()
