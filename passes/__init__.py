"""The graph passes of onnxdns, one per file; installed as ``onnxdns.passes``.

``PASSES`` is the registry, in the order ``onnxdns passes`` lists them. Nothing registers itself
at import time: a pass exists for the CLI when it is in this tuple.
"""

from __future__ import annotations

from .convert_fp16 import ConvertFp16Pass
from .eliminate_identity import EliminateIdentityPass
from .fold_batchnorm import FoldBatchNormPass
from .fold_constants import FoldConstantsPass
from .infer_shapes import InferShapesPass
from .remove_dead_nodes import RemoveDeadNodesPass
from .sparse_storage import SparseStoragePass
from .topological_sort import TopologicalSortPass
from .add_masks import AddMasksPass
from .fold_masks import FoldMasksPass
from .remove_channels import RemoveChannelsPass
from .slim_channels import SlimChannelsPass
from .insert_channel_scales import InsertChannelScalesPass
from .fold_channel_scales import FoldChannelScalesPass
from .sparse_lowrank import SparseLowRankPass

PASSES: tuple[type, ...] = (
    FoldMasksPass,
    RemoveChannelsPass,
    SlimChannelsPass,
    InsertChannelScalesPass,
    FoldChannelScalesPass,
    SparseLowRankPass,
    AddMasksPass,
    FoldBatchNormPass,
    EliminateIdentityPass,
    FoldConstantsPass,
    RemoveDeadNodesPass,
    TopologicalSortPass,
    InferShapesPass,
    SparseStoragePass,
    ConvertFp16Pass,
)

__all__ = ["PASSES"]
