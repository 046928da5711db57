"""Pure-PyTorch reference of Native Sparse Attention's primitives: the oracle every fast backend is tested against.

Semantics are those of NSA_SPEC.md, written as directly as the primitives allow: interval attention (the
compressed branch and the window), block attention (the selection branch), block selection (Eq. 9, Eq. 10, the
top-n rule) and the gate mix, all on flat tensors q [Nq, HQ, D], k/v [Nk, H, D] with per-query index ranges.
`composition.nsa_attention_varlen` composes them (or a fast backend's) into NSA; `functional` is the batch API.

Everything is vectorized over heads, blocks and tokens; queries are processed in chunks whose score tensors have
a fixed element budget, so memory grows linearly with the sequence length (compute of the compressed branch is
inherently O(T^2 / d)). Under autograd each chunk is recomputed in the backward pass (activation checkpointing),
so training memory stays linear too.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .layout import QueryLayout, SparsePattern, compressed_intervals

__all__ = ["block_attention", "gate_branches", "interval_attention", "select_blocks_varlen", "top_blocks"]

# float32 elements in one chunk's score tensor: a constant, so peak memory does not grow with T
# (16 MiB on CPU; 512 MiB on a GPU, where fewer, larger chunks keep the device busy).
_SCORE_BUDGET = {"cpu": 1 << 22, "cuda": 1 << 27}
_MAX_CHUNK = 1024


def _chunk_size(elements_per_query: int, device: torch.device) -> int:
    budget = _SCORE_BUDGET.get(device.type, _SCORE_BUDGET["cpu"])
    max_chunk = _MAX_CHUNK if device.type == "cpu" else 16 * _MAX_CHUNK
    return max(1, min(max_chunk, budget // max(1, elements_per_query)))


def _run_chunked(fn: Callable[..., tuple[Tensor, ...]], num_queries: int, chunk: int, *inputs: Tensor) -> list[tuple[Tensor, ...]]:
    """Apply `fn(start, stop, *inputs)` per query chunk; recompute chunks in backward when grads are needed."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
    results = []
    for start in range(0, num_queries, chunk):
        stop = min(start + chunk, num_queries)
        if needs_grad:
            results.append(checkpoint(fn, start, stop, *inputs, use_reentrant=False))
        else:
            results.append(fn(start, stop, *inputs))
    return results


def _softmax_attend(scores: Tensor, valid: Tensor, values: Tensor, equation: str) -> tuple[Tensor, Tensor]:
    """Softmax of `scores` over its last axis restricted to `valid`, contracted with `values`.

    A row with no valid key gives output 0 and lse -inf, and finite gradients (never NaN).
    """
    scores = scores.masked_fill(~valid, float("-inf"))
    # The max only stabilises the exponent; softmax and lse do not depend on it, so it carries no gradient.
    row_max = scores.amax(-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    denom = weights.sum(-1, keepdim=True)
    has_keys = denom > 0
    denom = torch.where(has_keys, denom, torch.ones_like(denom))
    out = torch.einsum(equation, weights / denom, values)
    lse = torch.where(has_keys, row_max + denom.log(), torch.full_like(denom, float("-inf")))
    return out, lse.squeeze(-1)


def _acc(x: Tensor) -> Tensor:
    """Accumulation precision: fp32 for half types, the input's own for fp32/fp64 (gradcheck runs in fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check_gqa(q: Tensor, k: Tensor, name: str = "k") -> int:
    if q.shape[-2] % k.shape[-2]:
        raise ValueError(
            f"query heads ({q.shape[-2]}) must be a multiple of the key/value heads of `{name}` ({k.shape[-2]})."
        )
    return q.shape[-2] // k.shape[-2]


# ---------------------------------------------------------------------------------------------------
# Varlen primitives: flat tensors + per-query index ranges
# ---------------------------------------------------------------------------------------------------


def interval_attention(
    q: Tensor, k: Tensor, v: Tensor, lo: Tensor, hi: Tensor, scale: float, run_length: int | None = None,
    memo: dict | None = None, documents: tuple[int, ...] | None = None,
) -> tuple[Tensor, Tensor]:
    """Each query i attends to the contiguous keys [lo[i], hi[i]) of a flat store.

    q [Nq, HQ, D], k [Nk, H, D], v [Nk, H, Dv], lo/hi [Nq] -> (o [Nq, HQ, Dv] in q's dtype, lse [Nq, HQ] fp32).
    Serves the sliding window and the compressed branch: a chunk of queries reads one slice of keys.
    `run_length` (queries per row when decoding) and `documents` (host document boundaries of a full pass,
    each query's interval inside its document's part of the store) are tiling hints for fast backends, and
    `memo` a dict where they may keep index work shared by calls with the same lo and hi; all unused here.
    """
    num_q, heads_q, _ = q.shape
    heads_kv = k.shape[1]
    groups = _check_gqa(q, k)
    nonempty = hi > lo
    span = int((hi - lo).clamp(min=0).max()) if num_q else 0
    chunk = _chunk_size(heads_q * (span + _MAX_CHUNK), q.device)
    # Key range of every chunk in one host sync: the union of its queries' intervals.
    pad = -num_q % chunk
    lo_fill = torch.where(nonempty, lo, torch.full_like(lo, k.shape[0]))
    hi_fill = torch.where(nonempty, hi, torch.zeros_like(hi))
    chunk_lo = F.pad(lo_fill, (0, pad), value=k.shape[0]).view(-1, chunk).amin(1)
    chunk_hi = F.pad(hi_fill, (0, pad), value=0).view(-1, chunk).amax(1)
    bounds = torch.stack([chunk_lo, chunk_hi], 1).tolist()

    def attend(start: int, stop: int, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        key_lo, key_hi = bounds[start // chunk]
        qc = _acc(q[start:stop].view(stop - start, heads_kv, groups, -1))
        if key_hi <= key_lo:  # no query of the chunk sees a key: output 0, still connected to the graph
            out = qc.new_zeros(stop - start, heads_q, v.shape[-1]) + 0 * qc.sum() + 0 * v[:0].sum()
            return out, qc.new_full((stop - start, heads_q), float("-inf"))
        keys, values = _acc(k[key_lo:key_hi]), _acc(v[key_lo:key_hi])
        scores = torch.einsum("chgd,khd->chgk", qc, keys) * scale
        key_index = torch.arange(key_lo, key_hi, device=q.device)
        valid = (key_index >= lo[start:stop, None]) & (key_index < hi[start:stop, None])
        out, lse = _softmax_attend(scores, valid[:, None, None, :], values, "chgk,khd->chgd")
        return out.reshape(stop - start, heads_q, -1), lse.reshape(stop - start, heads_q)

    parts = _run_chunked(attend, num_q, chunk, q, k, v)
    if not parts:
        return q.new_zeros(0, heads_q, v.shape[-1]), q.new_zeros(0, heads_q, dtype=torch.float32)
    out = torch.cat([p[0] for p in parts]).to(q.dtype)
    lse = torch.cat([p[1] for p in parts])
    return out, lse


def block_attention(
    q: Tensor, k: Tensor, v: Tensor, block_starts: Tensor, block_size: int, hi: Tensor, scale: float
) -> Tensor:
    """Each query attends to the keys s < hi[i] inside the blocks [start, start + block_size) it selected.

    q [Nq, HQ, D], k/v [Nk, H, D*], block_starts [Nq, H, n] (flat key index of each selected block's first
    token, negative for an empty slot; shared by the G query heads of a key head) -> o [Nq, HQ, Dv].
    """
    num_q, heads_q, _ = q.shape
    heads_kv, num_slots = block_starts.shape[1], block_starts.shape[2]
    groups = _check_gqa(q, k)
    keys_per_query = num_slots * block_size
    chunk = _chunk_size(max(heads_q, heads_kv * k.shape[-1]) * keys_per_query, q.device)
    offsets = torch.arange(block_size, device=q.device)
    heads = torch.arange(heads_kv, device=q.device)[None, :, None]

    def attend(start: int, stop: int, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor]:
        starts = block_starts[start:stop].long()
        index = (starts[..., None] + offsets).flatten(2)  # [C, H, n * block_size]
        valid = (starts >= 0).repeat_interleave(block_size, dim=-1) & (index < hi[start:stop, None, None])
        index = index.clamp(0, k.shape[0] - 1)
        keys, values = _acc(k[index, heads]), _acc(v[index, heads])  # [C, H, K, D]
        qc = _acc(q[start:stop].view(stop - start, heads_kv, groups, -1))
        scores = torch.einsum("chgd,chkd->chgk", qc, keys) * scale
        out, _ = _softmax_attend(scores, valid[:, :, None, :], values, "chgk,chkd->chgd")
        return (out.reshape(stop - start, heads_q, -1),)

    parts = _run_chunked(attend, num_q, chunk, q, k, v)
    if not parts:
        return q.new_zeros(0, heads_q, v.shape[-1])
    return torch.cat([p[0] for p in parts]).to(q.dtype)




def _overlap_weights(pattern: SparsePattern, device: torch.device) -> Tensor:
    """Eq. 9 as a stride-m convolution over compressed-block scores.

    In units of d tokens, compressed block i covers units [i, i + r) and selection block j covers
    [j*m, (j+1)*m), with r = l/d and m = l'/d. Their shared tokens / d is the number of shared units, so
    the weights over blocks i = j*m - r + 1 ... (j+1)*m - 1 are the full convolution of ones(r) with
    ones(m): 1,2,2,2,1 for the paper's l=32, d=16, l'=64, and [1] (identity) for l = d = l'.
    """
    r = pattern.compress_block_size // pattern.compress_stride
    m = pattern.select_block_size // pattern.compress_stride
    k = torch.arange(r + m - 1, device=device)
    return torch.minimum(torch.minimum(k + 1, torch.full_like(k, min(r, m))), r + m - 1 - k).float()


def top_blocks(block_scores: Tensor, positions: Tensor, pattern: SparsePattern) -> Tensor:
    """Top-n selection over [C, H, J] block scores: forced blocks first, ties to the lower index, -1 for empty slots.

    Shared by every backend. Scores are compared in float32: each becomes an int64 key (float bits above,
    reversed block index below), so a plain top-k breaks ties toward the lower index deterministically.
    """
    num_blocks = block_scores.shape[-1]
    current = (positions // pattern.select_block_size)[:, None, None]  # block holding the query
    j = torch.arange(num_blocks, device=block_scores.device)
    candidate = j <= current
    forced = candidate & ((j < pattern.num_init_blocks) | (j > current - pattern.num_local_blocks))
    score_bits = block_scores.float().clamp(min=0).view(torch.int32).long()  # monotone for non-negative floats
    forced_bits = torch.tensor(float("inf")).view(torch.int32).long()
    keys = (torch.where(forced, forced_bits, score_bits) << 32) | (2**31 - 1 - j)
    keys = torch.where(candidate, keys, -1)
    n = pattern.num_selected_blocks
    ranked, order = torch.topk(keys, min(n, num_blocks), dim=-1)
    chosen = torch.where(ranked >= 0, order, -1)
    if num_blocks < n:
        chosen = F.pad(chosen, (0, n - num_blocks), value=-1)
    return chosen.to(torch.int32)


def select_blocks_varlen(
    q: Tensor, k_cmp: Tensor, lse: Tensor, layout: QueryLayout, pattern: SparsePattern, scale: float
) -> Tensor:
    """Top-n selection blocks per (query, key head) from the compressed attention probabilities.

    q [Nq, HQ, D], k_cmp [Nc, H, D], lse [Nq, HQ] (from the compressed branch) -> [Nq, H, n] int32 indices
    of selection blocks relative to each query's document, -1 for empty slots. Not differentiable.
    """
    num_q, heads_q, _ = q.shape
    heads_kv = k_cmp.shape[1]
    groups = _check_gqa(q, k_cmp, "k_cmp")
    lo, hi = compressed_intervals(layout, pattern)
    counts = hi - lo
    weights = _overlap_weights(pattern, q.device).view(1, 1, -1)
    r = pattern.compress_block_size // pattern.compress_stride
    m = pattern.select_block_size // pattern.compress_stride
    max_blocks = int(counts.max()) if num_q else 0
    max_sel = int(layout.positions.max()) // pattern.select_block_size + 1 if num_q else 0
    chunk = _chunk_size(heads_q * (max_blocks + _MAX_CHUNK) + heads_kv * max_sel, q.device)

    @torch.no_grad()
    def select(start: int, stop: int) -> Tensor:
        size = stop - start
        c_lo, c_hi, c_counts = lo[start:stop], hi[start:stop], counts[start:stop]
        positions = layout.positions[start:stop]
        num_sel = int(positions.max()) // pattern.select_block_size + 1
        num_cmp = int(c_counts.max())
        probs_rel = q.new_zeros(size, heads_kv, num_cmp, dtype=_acc(q).dtype)
        if num_cmp > 0:
            key_lo, key_hi = int(c_lo.min()), int(c_hi.max())
            qc = _acc(q[start:stop].view(size, heads_kv, groups, -1))
            scores = torch.einsum("chgd,khd->chgk", qc, _acc(k_cmp[key_lo:key_hi])) * scale
            lse_c = lse[start:stop].view(size, heads_kv, groups, 1)
            probs = torch.exp(scores - torch.where(torch.isfinite(lse_c), lse_c, torch.zeros_like(lse_c)))
            # Re-index each query's probabilities by its own block number i (column = cmp_offset + i).
            rel = torch.arange(num_cmp, device=q.device)
            column = (c_lo - key_lo)[:, None] + rel
            valid = rel < c_counts[:, None]
            column = column.clamp(max=key_hi - key_lo - 1)[:, None, None, :].expand(size, heads_kv, groups, num_cmp)
            # where, not multiply: an invisible block's exp may overflow to inf, and inf * 0 is NaN.
            probs = torch.where(valid[:, None, None, :], probs.gather(-1, column), 0.0)
            probs_rel = probs.sum(2)  # Eq. 10 first: the group's heads share one selection
        padded = F.pad(probs_rel, (r - 1, max(0, num_sel * m - num_cmp)))[..., : num_sel * m + r - 1]
        block_scores = F.conv1d(padded.reshape(-1, 1, padded.shape[-1]), weights.to(padded.dtype), stride=m)
        return top_blocks(block_scores.view(size, heads_kv, num_sel), positions, pattern)

    parts = [select(s, min(s + chunk, num_q)) for s in range(0, num_q, chunk)]
    if not parts:
        return torch.empty(0, heads_kv, pattern.num_selected_blocks, dtype=torch.int32, device=q.device)
    return torch.cat(parts)


def gate_branches(o_cmp: Tensor, o_slc: Tensor, o_win: Tensor, gates: Tensor) -> Tensor:
    """Eq. 5's mix: sum over branches c of g_c * o_c; o_* [Nq, HQ, Dv], gates [Nq, HQ, 3] (cmp, slc, win)."""
    gates = gates.to(o_cmp.dtype)
    return (o_cmp * gates[..., 0:1]).addcmul_(o_slc, gates[..., 1:2]).addcmul_(o_win, gates[..., 2:3])
