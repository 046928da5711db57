# Generated from src/nsa_hf by `nsa-hf export-remote-code` (nsa_hf/remote_code.py); do not edit.
"""NSA's composition: the three branches and the gates, over one backend's primitives.

`nsa_attention_varlen` is the function every backend computes: the compressed branch, block selection from its
attention probabilities, the selection branch over the chosen blocks, the sliding window, and the gate mix. A
backend only swaps the primitives (`Primitives`); the index building (`QueryLayout`, the intervals) and the
top-n rule are shared, so no backend can drift from the reference there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from torch import Tensor

from .nsa_ops_layout import QueryLayout, SparsePattern, compressed_intervals, memoized, window_intervals
from .nsa_ops_reference import _check_gqa, block_attention, gate_branches, interval_attention, select_blocks_varlen

__all__ = [
    "REFERENCE",
    "Primitives",
    "compressed_attention_varlen",
    "nsa_attention_varlen",
    "selection_attention_varlen",
    "sliding_window_attention_varlen",
]


class Primitives(NamedTuple):
    """What a backend provides; index building and the top-n rule are shared code."""

    interval: Callable[..., tuple[Tensor, Tensor]]  # (q, k, v, lo, hi, scale, run_length, memo=, documents=) -> (o, lse)
    block: Callable[..., Tensor]  # (q, k, v, block_starts, block_size, hi, scale) -> o
    select: Callable[..., Tensor]  # (q, k_cmp, lse, layout, pattern, scale) -> block indices [Nq, H, n]
    gate: Callable[..., Tensor] = gate_branches  # (o_cmp, o_slc, o_win, gates) -> o


REFERENCE = Primitives(interval_attention, block_attention, select_blocks_varlen)


def compressed_attention_varlen(
    q: Tensor, k_cmp: Tensor, v_cmp: Tensor, layout: QueryLayout, pattern: SparsePattern, scale: float,
    primitives: Primitives = REFERENCE,
) -> tuple[Tensor, Tensor]:
    """Compressed branch on flat tensors: query t sees its document's blocks i with i*d + l - 1 <= t."""
    _check_gqa(q, k_cmp, "k_cmp")
    lo, hi = memoized(
        layout.memo, ("compressed_intervals", pattern.compress_block_size, pattern.compress_stride),
        lambda: compressed_intervals(layout, pattern),
    )
    return primitives.interval(
        q, k_cmp, v_cmp, lo, hi, scale, layout.run_length, memo=layout.memo.setdefault("compressed", {}), documents=layout.documents
    )


def selection_attention_varlen(
    q: Tensor, k: Tensor, v: Tensor, block_indices: Tensor, layout: QueryLayout, block_size: int, scale: float,
    primitives: Primitives = REFERENCE,
) -> Tensor:
    """Selection branch on flat tensors; block_indices [Nq, H, n] are relative to each query's document."""
    starts = (block_indices * block_size + layout.key_offsets[:, None, None]).masked_fill_(block_indices < 0, -1)
    key_ends = memoized(layout.memo, "key_ends", lambda: layout.key_offsets + layout.positions + 1)
    return primitives.block(q, k, v, starts, block_size, key_ends, scale)


def sliding_window_attention_varlen(
    q: Tensor, k: Tensor, v: Tensor, layout: QueryLayout, window_size: int, scale: float,
    primitives: Primitives = REFERENCE,
) -> Tensor:
    """Window branch on flat tensors: keys at positions [t - w + 1, t] of the query's document."""
    lo, hi = memoized(layout.memo, ("window_intervals", window_size), lambda: window_intervals(layout, window_size))
    return primitives.interval(
        q, k, v, lo, hi, scale, layout.run_length, memo=layout.memo.setdefault("window", {}), documents=layout.documents
    )[0]


def nsa_attention_varlen(
    q: Tensor,
    k_cmp: Tensor,
    v_cmp: Tensor,
    k_slc: Tensor,
    v_slc: Tensor,
    k_win: Tensor,
    v_win: Tensor,
    gates: Tensor,
    layout: QueryLayout,
    pattern: SparsePattern,
    scale: float,
    primitives: Primitives = REFERENCE,
) -> Tensor:
    """All three branches and the gates on flat tensors. gates [Nq, HQ, 3] (cmp, slc, win), already in (0, 1)."""
    o_cmp, lse = compressed_attention_varlen(q, k_cmp, v_cmp, layout, pattern, scale, primitives)
    block_indices = primitives.select(q, k_cmp, lse, layout, pattern, scale)
    o_slc = selection_attention_varlen(q, k_slc, v_slc, block_indices, layout, pattern.select_block_size, scale, primitives)
    o_win = sliding_window_attention_varlen(q, k_win, v_win, layout, pattern.window_size, scale, primitives)
    return primitives.gate(o_cmp, o_slc, o_win, gates)
