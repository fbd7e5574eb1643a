"""The Triton launchers under the names of `v4d.kernels.ops` (imported lazily by ops)."""

from v4d.kernels.elementwise import rms_norm, rope
from v4d.kernels.fp8_gemm import fp8_linear
from v4d.kernels.indexer import indexer_topk
from v4d.kernels.kv_pack import pack_index, pack_main
from v4d.kernels.moe import dense_expert, moe_experts
from v4d.kernels.paged import gated_pool_indexed, paged_indexer_scores, paged_sparse_attention
from v4d.kernels.routing import moe_route
from v4d.kernels.rows import copy_rows
from v4d.kernels.sinkhorn import hc_mixes, hc_mixes_sinkhorn, hc_post, hc_pre, hc_split_sinkhorn

__all__ = [
    "copy_rows",
    "dense_expert",
    "fp8_linear",
    "gated_pool_indexed",
    "hc_mixes",
    "hc_mixes_sinkhorn",
    "hc_post",
    "hc_pre",
    "hc_split_sinkhorn",
    "indexer_topk",
    "moe_experts",
    "moe_route",
    "pack_index",
    "pack_main",
    "paged_indexer_scores",
    "paged_sparse_attention",
    "rms_norm",
    "rope",
]
