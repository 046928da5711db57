"""NSA's composition: the three branches and the gates, over one backend's kernels.

`nsa_attention_varlen` is the function every backend computes: the compressed branch, block selection from its
attention probabilities, the selection branch over the chosen blocks, the sliding window, and the gate mix. The
branches call the custom ops of `library` with the backend's name, so torch.compile traces this composition and
sees each primitive as one op; index building (`QueryLayout`, `BranchRanges`) and the top-n rule are shared, so no
backend can drift from the reference there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from . import library
from .layout import BranchRanges, QueryLayout, SparsePattern, branch_ranges, compressed_intervals, window_intervals
from .reference import _check_gqa, block_attention, gate_branches, interval_attention, select_blocks_varlen

__all__ = [
    "REFERENCE",
    "Primitives",
    "compressed_attention_varlen",
    "nsa_attention_varlen",
    "selection_attention_varlen",
    "sliding_window_attention_varlen",
]


class Primitives(NamedTuple):
    """A backend as differentiable functions with the reference's signatures (`backends.register_backend`)."""

    interval: Callable[..., tuple[Tensor, Tensor]]  # (q, k, v, lo, hi, scale, run_length=None) -> (o, lse)
    block: Callable[..., Tensor]  # (q, k, v, block_starts, block_size, hi, scale) -> o
    select: Callable[..., Tensor]  # (q, k_cmp, lse, layout, pattern, scale) -> block indices [Nq, H, n]
    gate: Callable[..., Tensor] = gate_branches  # (o_cmp, o_slc, o_win, gates) -> o


REFERENCE = Primitives(interval_attention, block_attention, select_blocks_varlen)
# The oracle needs no resolving: the functions here default to it.
library.register_kernels("reference", library.kernels_from_primitives(*REFERENCE[:3]))


def compressed_attention_varlen(
    q: Tensor, k_cmp: Tensor, v_cmp: Tensor, layout: QueryLayout, pattern: SparsePattern, scale: float,
    backend: str = "reference", ranges: BranchRanges | None = None,
) -> tuple[Tensor, Tensor]:
    """Compressed branch on flat tensors: query t sees its document's blocks i with i*d + l - 1 <= t."""
    _check_gqa(q, k_cmp, "k_cmp")
    lo, hi = compressed_intervals(layout, pattern) if ranges is None else (ranges.cmp_lo, ranges.cmp_hi)
    return library.interval_attention(
        q, k_cmp, v_cmp, lo, hi, scale, backend=backend, run_length=layout.run_length,
        documents=layout.documents,
    )


def selection_attention_varlen(
    q: Tensor, k: Tensor, v: Tensor, block_indices: Tensor, layout: QueryLayout, block_size: int, scale: float,
    backend: str = "reference", key_ends: Tensor | None = None,
) -> Tensor:
    """Selection branch on flat tensors; block_indices [Nq, H, n] are relative to each query's document."""
    starts = (block_indices * block_size + layout.key_offsets[:, None, None]).masked_fill_(block_indices < 0, -1)
    key_ends = layout.key_offsets + layout.positions + 1 if key_ends is None else key_ends
    return library.block_attention(q, k, v, starts, block_size, key_ends, scale, backend=backend)


def sliding_window_attention_varlen(
    q: Tensor, k: Tensor, v: Tensor, layout: QueryLayout, window_size: int, scale: float,
    backend: str = "reference", ranges: BranchRanges | None = None,
) -> Tensor:
    """Window branch on flat tensors: keys at positions [t - w + 1, t] of the query's document."""
    lo, hi = window_intervals(layout, window_size) if ranges is None else (ranges.win_lo, ranges.win_hi)
    return library.interval_attention(
        q, k, v, lo, hi, scale, backend=backend, run_length=layout.run_length, max_readers=window_size,
        documents=layout.documents,
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
    backend: str = "reference",
    ranges: BranchRanges | None = None,
    gate: Callable[..., Tensor] = gate_branches,
) -> Tensor:
    """All three branches and the gates on flat tensors. gates [Nq, HQ, 3] (cmp, slc, win), already in (0, 1).
    `ranges`: the pass's `BranchRanges` when its layers share them; `gate`: the backend's gate mix (PyTorch's under
    torch.compile, which fuses it). A decoding step (one query per row) without gradients runs as one fused function
    on backends that have one (`library.fuses_decoding`)."""
    ranges = branch_ranges(layout, pattern) if ranges is None else ranges
    inputs = (q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates)
    if layout.run_length == 1 and library.fuses_decoding(backend) and not library.records_grad(*inputs):
        return library.decode_attention(*inputs, layout, pattern, scale, ranges, backend=backend)
    o_cmp, lse = compressed_attention_varlen(q, k_cmp, v_cmp, layout, pattern, scale, backend, ranges)
    block_indices = library.select_blocks(q, k_cmp, lse, layout, pattern, scale, backend=backend)
    o_slc = selection_attention_varlen(
        q, k_slc, v_slc, block_indices, layout, pattern.select_block_size, scale, backend, ranges.key_ends
    )
    o_win = sliding_window_attention_varlen(q, k_win, v_win, layout, pattern.window_size, scale, backend, ranges)
    if torch.compiler.is_compiling():
        gate = gate_branches
    return gate(o_cmp, o_slc, o_win, gates)
