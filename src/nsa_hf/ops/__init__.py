"""NSA attention operators.

`functional` is the public API in the batch layout of other NSA libraries (q [B, T, HQ, D], k/v [B, T, H, D]),
each function with `backend=`; `composition` composes a backend's primitives into NSA on flat varlen tensors with a
`QueryLayout`; `reference` holds the pure-PyTorch primitives (the oracle, any device); `backends` chooses them.
"""

from .compression import compress_blocks, gather_blocks, mean_compress
from .functional import (
    compressed_attention,
    nsa_attention,
    select_blocks,
    selection_attention,
    sliding_window_attention,
)
from .layout import (
    CompressionBlocks,
    QueryLayout,
    SparsePattern,
    cu_seqlens_from_batch,
    cu_seqlens_from_left_padding,
    cu_seqlens_from_position_ids,
    cu_seqlens_from_seq_idx,
    num_compressed_blocks,
)

__all__ = [
    "CompressionBlocks",
    "QueryLayout",
    "SparsePattern",
    "compress_blocks",
    "compressed_attention",
    "cu_seqlens_from_batch",
    "cu_seqlens_from_left_padding",
    "cu_seqlens_from_position_ids",
    "cu_seqlens_from_seq_idx",
    "gather_blocks",
    "mean_compress",
    "nsa_attention",
    "num_compressed_blocks",
    "select_blocks",
    "selection_attention",
    "sliding_window_attention",
]
