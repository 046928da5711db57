"""Interval attention as Triton kernels, forward and backward: query i attends to keys [lo[i], hi[i]) of a
flat store, exactly `nsa_hf.ops.reference.interval_attention`.

It runs the compressed branch (the document's complete blocks) and the sliding window. One program owns
BLOCK_T tokens x the G query heads of one key head, so each key tile is loaded once per GQA group; its rows are
(token, head) pairs flattened, so a group of 6 fills 60 of 64 rows rather than 48 (padding each group to 8). The
backward pass is FlashAttention-2 style: a query-centric kernel for dq and a key-centric kernel for dk/dv, which
needs lo and hi to be non-decreasing in the query index (true for every full pass: documents are in order).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..library import eager_interval_attention
from .common import (
    Documents,
    _at_row,
    _bisect_step,
    _cdiv,
    _combine_splits,
    _dkv_step,
    _key_bases,
    _kv_tile,
    _num_splits,
    _online_softmax_step,
    _pow2,
    _program_tile,
    _query_bases,
    _query_rows,
    _softmax_delta,
    _softmax_finish,
    _split_outputs,
    _split_runs,
    _tile_rows,
    _tile_tokens,
    known_tiles,
)

__all__ = ["interval_attention", "interval_backward", "interval_forward", "interval_partials"]


@triton.jit
def _interval_tile(LO, HI, TILE_START, TILE_LEN, kv_head, run_length, G: tl.constexpr, ROWS: tl.constexpr,
                   BLOCK_T: tl.constexpr, COMPUTED_TILES: tl.constexpr):
    """The first token of this program's query tile, its rows (token x group head), their key intervals, and the
    tile's key range."""
    first, length = _program_tile(TILE_START, TILE_LEN, run_length, COMPUTED_TILES, BLOCK_T)
    token, group, row_ok = _tile_rows(first, length, G, ROWS, BLOCK_T)
    lo = tl.load(LO + token, mask=row_ok, other=2147483647).to(tl.int32)
    hi = tl.load(HI + token, mask=row_ok, other=0).to(tl.int32)
    hi = tl.where(hi > lo, hi, 0)  # empty intervals take no part in the tile's key range
    lo = tl.where(hi > lo, lo, 2147483647)
    key_lo, key_hi = tl.min(lo, axis=0), tl.max(hi, axis=0)
    # A tile without keys gets the range [0, 0), not [2**31 - 1, 0): the compiled key loops step past
    # their start, and from 2**31 - 1 that step wraps around int32 to a negative key.
    empty = key_hi <= key_lo
    return first, token, kv_head * G + group, row_ok, lo, hi, tl.where(empty, 0, key_lo), tl.where(empty, 0, key_hi)


@triton.jit
def _interval_fwd_kernel(
    Q, K, V, LO, HI, TILE_START, TILE_LEN, O, LSE,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_os, stride_ot, stride_oh, stride_ls,
    scale, run_length,
    G: tl.constexpr, ROWS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, NUM_SPLITS: tl.constexpr,
    COMPUTED_TILES: tl.constexpr,
):
    """One query tile x one key head; with NUM_SPLITS > 1, program_id(2) takes one share of the tile's key
    range and writes a partial (o, lse) for `_combine_splits` (flash-decoding: few tiles, long ranges)."""
    kv_head = tl.program_id(1)
    heads_q = G * tl.num_programs(1)
    first, token, head, row_ok, lo, hi, key_lo, key_hi = _interval_tile(LO, HI, TILE_START, TILE_LEN, kv_head, run_length,
                                                                         G, ROWS, BLOCK_T, COMPUTED_TILES)
    span = tl.maximum(key_hi - key_lo, 0)
    share = tl.cdiv(tl.cdiv(span, NUM_SPLITS), BLOCK_N) * BLOCK_N
    begin = tl.minimum(tl.program_id(2) * share, span)
    end = tl.minimum(begin + share, span)
    # int64 bases at the tile's first query and key; rows past them are counted in int32.
    K, V = _key_bases(K, V, key_lo, kv_head, stride_kt, stride_kh, stride_vt, stride_vh)
    split = tl.program_id(2)
    O = _at_row(_at_row(O, split, stride_os), first, stride_ot)
    LSE = _at_row(_at_row(LSE, split, stride_ls), first, heads_q)
    token -= first
    # The intervals counted from the tile's first key, as the key offsets are: comparing `key_lo + offsets` made
    # Triton 3.6 emit a longer inner loop (benchmarks/results/issue14/kernels.txt).
    lo -= key_lo
    hi -= key_lo

    dq = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = tl.load(
        _at_row(Q, first, stride_qt) + token[:, None] * stride_qt + head[:, None] * stride_qh + dq[None, :],
        mask=row_ok[:, None] & (dq < D)[None, :], other=0.0,
    )
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_DV], tl.float32)
    for start in range(begin, end, BLOCK_N):
        offsets = start + tl.arange(0, BLOCK_N)
        k, v = _kv_tile(K, V, offsets, offsets < end, stride_kt, stride_vt, D, DV, BLOCK_D, BLOCK_DV)
        s = tl.dot(q, tl.trans(k)) * scale
        valid = (offsets[None, :] >= lo[:, None]) & (offsets[None, :] < hi[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc)
    out, lse = _softmax_finish(acc, m_i, l_i)
    tl.store(O + token[:, None] * stride_ot + head[:, None] * stride_oh + dv[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & (dv < DV)[None, :])
    tl.store(LSE + token * heads_q + head, lse, mask=row_ok)


@triton.jit
def _interval_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, LO, HI, TILE_START, TILE_LEN, DQ,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    scale, run_length,
    G: tl.constexpr, ROWS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, COMPUTED_TILES: tl.constexpr,
):
    kv_head = tl.program_id(1)
    heads_q = G * tl.num_programs(1)
    first, token, head, row_ok, lo, hi, key_lo, key_hi = _interval_tile(LO, HI, TILE_START, TILE_LEN, kv_head, run_length,
                                                                         G, ROWS, BLOCK_T, COMPUTED_TILES)
    Q, DO, LSE, DELTA = _query_bases(Q, DO, LSE, DELTA, first, stride_qt, stride_dot, heads_q)
    DQ = _at_row(DQ, first, stride_qt)
    K, V = _key_bases(K, V, key_lo, kv_head, stride_kt, stride_kh, stride_vt, stride_vh)
    token -= first
    dq_idx = tl.arange(0, BLOCK_D)
    q, do, lse, delta = _query_rows(Q, DO, LSE, DELTA, token, head, row_ok, stride_qt, stride_qh,
                                    stride_dot, stride_doh, heads_q, D, DV, BLOCK_D, BLOCK_DV)
    acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
    for start in range(0, key_hi - key_lo, BLOCK_N):
        offsets = start + tl.arange(0, BLOCK_N)
        k, v = _kv_tile(K, V, offsets, offsets < key_hi - key_lo, stride_kt, stride_vt, D, DV, BLOCK_D, BLOCK_DV)
        keys = key_lo + offsets
        valid = (keys[None, :] >= lo[:, None]) & (keys[None, :] < hi[:, None])
        p = tl.where(valid, tl.exp(tl.dot(q, tl.trans(k)) * scale - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        acc += tl.dot(ds.to(k.dtype), k)
    tl.store(DQ + token[:, None] * stride_qt + head[:, None] * stride_qh + dq_idx[None, :],
             (acc * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & (dq_idx < D)[None, :])


@triton.jit
def _interval_bwd_dkv_kernel(
    Q, K, V, DO, LSE, DELTA, LO, HI, QLO, QHI, DK, DV,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    num_k, scale,
    G: tl.constexpr, ROWS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, Q_CHUNK: tl.constexpr,
    D: tl.constexpr, DV_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """dk, dv of BLOCK_N keys from one chunk of Q_CHUNK of the queries [QLO, QHI) that see them (`_tile_readers`;
    chunks meet in atomics)."""
    kv_head = tl.program_id(1)
    heads_q = G * tl.num_programs(1)
    keys = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    key_ok = keys < num_k
    q_lo = tl.load(QLO + tl.program_id(0)) + tl.program_id(2) * Q_CHUNK
    q_hi = tl.load(QHI + tl.program_id(0))
    q_hi = tl.minimum(q_hi, q_lo + Q_CHUNK)
    if q_lo >= q_hi:
        return
    dq_idx = tl.arange(0, BLOCK_D)
    dv_idx = tl.arange(0, BLOCK_DV)
    # int64 bases at the first key and query; rows past them are counted in int32 (dk, dv are laid out as k, v).
    key0 = tl.program_id(0) * BLOCK_N
    K, V = _key_bases(K, V, key0, kv_head, stride_kt, stride_kh, stride_vt, stride_vh)
    DK, DV = _key_bases(DK, DV, key0, kv_head, stride_kt, stride_kh, stride_vt, stride_vh)
    Q, DO, LSE, DELTA = _query_bases(Q, DO, LSE, DELTA, q_lo, stride_qt, stride_dot, heads_q)
    offsets = tl.arange(0, BLOCK_N)
    k, v = _kv_tile(K, V, offsets, key_ok, stride_kt, stride_vt, D, DV_DIM, BLOCK_D, BLOCK_DV)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for start in range(q_lo, q_hi, BLOCK_T):
        token, group, row_ok = _tile_rows(start, q_hi - start, G, ROWS, BLOCK_T)
        head = kv_head * G + group
        lo = tl.load(LO + token, mask=row_ok, other=2147483647).to(tl.int32)
        hi = tl.load(HI + token, mask=row_ok, other=0).to(tl.int32)
        q, do, lse, delta = _query_rows(Q, DO, LSE, DELTA, token - q_lo, head, row_ok, stride_qt, stride_qh,
                                        stride_dot, stride_doh, heads_q, D, DV_DIM, BLOCK_D, BLOCK_DV)
        valid = (keys[None, :] >= lo[:, None]) & (keys[None, :] < hi[:, None]) & key_ok[None, :]
        dk, dv, _ = _dkv_step(q, do, lse, delta, k, v, valid, scale, dk, dv)
    tl.atomic_add(DK + offsets[:, None] * stride_kt + dq_idx[None, :], dk * scale,
                  mask=key_ok[:, None] & (dq_idx < D)[None, :])
    tl.atomic_add(DV + offsets[:, None] * stride_vt + dv_idx[None, :], dv,
                  mask=key_ok[:, None] & (dv_idx < DV_DIM)[None, :])


def _query_tile(groups: int, run_length: int | None) -> tuple[int, int]:
    """(tokens, rows) of an interval-kernel query tile: tokens x group heads flattened (`_tile_rows`) and
    padded to a power of two."""
    tokens = _tile_tokens(groups, run_length)
    return tokens, _pow2(tokens * groups)


def _query_tiles(
    lo: Tensor, hi: Tensor, tile: int, run_length: int | None, documents: Documents
) -> tuple[Tensor, Tensor, int, int]:
    """Tiles of consecutive queries whose key intervals chain (a tile never spans two rows or documents,
    whose stores lie apart: a decoding batch would otherwise read every row's keys): (first, length, count, run).
    Without a host sync where the host knows them (`known_tiles`), else from the intervals."""
    known = known_tiles(run_length, documents, lo, tile)
    if known is not None:
        return known
    apart = torch.ones_like(lo, dtype=torch.bool)
    apart[1:] = (lo[1:] >= hi[:-1]) | (lo[1:] < lo[:-1])
    run_first = torch.nonzero(apart).flatten()
    run_len = torch.diff(run_first, append=run_first.new_tensor([lo.numel()]))
    first, length = _split_runs(run_first, run_len, tile)
    return first.to(torch.int32), length.to(torch.int32), first.numel(), 0


def interval_forward(
    q: Tensor, k: Tensor, v: Tensor, lo: Tensor, hi: Tensor, scale: float, run_length: int | None = None,
    documents: Documents = None, num_splits: int | None = None,
) -> tuple[Tensor, Tensor]:
    """(o, lse) of `reference.interval_attention`; the hints as in `interval_attention`."""
    return _combine_splits(*interval_partials(q, k, v, lo, hi, scale, run_length, documents, num_splits), q.dtype)


def interval_partials(
    q: Tensor, k: Tensor, v: Tensor, lo: Tensor, hi: Tensor, scale: float, run_length: int | None = None,
    documents: Documents = None, num_splits: int | None = None,
) -> tuple[Tensor, Tensor]:
    """`interval_forward` before its splits are merged: (o [S, Nq, HQ, Dv], lse [S, Nq, HQ] fp32) of S shares of
    each query's keys (o in q's dtype when S = 1, else fp32), for a consumer that merges them itself."""
    num_q, heads_q, dim = q.shape
    heads_kv, dim_v = k.shape[1], v.shape[2]
    groups = heads_q // heads_kv
    block_t, rows = _query_tile(groups, run_length)
    q, k, v, lo, hi = q.contiguous(), k.contiguous(), v.contiguous(), lo.contiguous(), hi.contiguous()
    if k.shape[0] == 0:
        # An empty store (every document shorter than a compressed block): no query sees a key. The kernels
        # never get an empty tensor: measured on the H200, its null pointer faults even behind masks.
        return q.new_zeros(1, num_q, heads_q, dim_v), q.new_full((1, num_q, heads_q), float("-inf"), dtype=torch.float32)
    tile_first, tile_len, num_tiles, run = _query_tiles(lo, hi, block_t, run_length, documents)
    splits = num_splits or _num_splits(num_tiles * heads_kv, q.device)
    o, lse = _split_outputs(splits, num_q, heads_q, dim_v, q.dtype, q.device)
    if num_q:
        _interval_fwd_kernel[(num_tiles, heads_kv, splits)](
            q, k, v, lo, hi, tile_first, tile_len, o, lse,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            o.stride(0), o.stride(1), o.stride(2), lse.stride(0), scale,
            G=groups, ROWS=rows, BLOCK_T=block_t, BLOCK_N=64, D=dim, DV=dim_v, BLOCK_D=_pow2(dim), BLOCK_DV=_pow2(dim_v),
            NUM_SPLITS=splits, run_length=run, COMPUTED_TILES=run > 0,
        )
    return o, lse


def interval_backward(
    do: Tensor, dlse: Tensor | None, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, lo: Tensor, hi: Tensor, scale: float,
    run_length: int | None = None, documents: Documents = None, max_readers: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of `interval_forward` for the gradients of its output (`do`) and lse (`dlse`, or None);
    needs lo and hi non-decreasing. `max_readers`: at most this many queries see any one key (None: unknown)."""
    num_k, heads_kv, dim_v = v.shape
    num_q, heads_q, dim = q.shape
    if num_k == 0 or num_q == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    q, k, v, lo, hi, do = q.contiguous(), k.contiguous(), v.contiguous(), lo.contiguous(), hi.contiguous(), do.contiguous()
    groups = heads_q // heads_kv
    block_t, rows = _query_tile(groups, run_length)
    tile_first, tile_len, num_tiles, run = _query_tiles(lo, hi, block_t, run_length, documents)
    delta = _softmax_delta(do, o)
    if dlse is not None:  # d lse / d s_j = p_j: it folds into FlashAttention's delta, ds_j = p_j (dp_j - delta + dlse)
        delta = delta - torch.where(torch.isfinite(lse), dlse.float(), 0.0)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1))
    meta = dict(G=groups, ROWS=rows, BLOCK_T=block_t, BLOCK_N=64, BLOCK_D=_pow2(dim), BLOCK_DV=_pow2(dim_v))
    dq = torch.empty_like(q)
    _interval_bwd_dq_kernel[(num_tiles, heads_kv)](
        q, k, v, do, lse, delta, lo, hi, tile_first, tile_len, dq, *strides, scale, D=dim, DV=dim_v,
        run_length=run, COMPUTED_TILES=run > 0, **meta,
    )
    dk = torch.zeros(k.shape, device=k.device, dtype=torch.float32)
    dv = torch.zeros(v.shape, device=v.device, dtype=torch.float32)
    keys_per_tile = meta["BLOCK_N"]
    q_lo, q_hi = _tile_readers(lo, hi, num_k, keys_per_tile)
    # Programs per key tile: enough for the longest reader range any tile could have, known without a host sync
    # (the keys of a tile and the `max_readers` queries after each, or all queries); those past a tile's own
    # range return at once.
    readers = num_q if max_readers is None else min(num_q, max_readers + keys_per_tile - 1)
    _interval_bwd_dkv_kernel[(_cdiv(num_k, keys_per_tile), heads_kv, _cdiv(readers, _READER_CHUNK))](
        q, k, v, do, lse, delta, lo, hi, q_lo, q_hi, dk, dv, *strides, num_k, scale,
        Q_CHUNK=_READER_CHUNK, D=dim, DV_DIM=dim_v, **meta, num_stages=2,  # H200, seed shape at 32k: 1.17 ms vs 1.24 with 3
    )
    return dq, dk.to(k.dtype), dv.to(v.dtype)


_READER_CHUNK = 1024  # queries per dk/dv program: longer reader ranges are split over programs


@triton.jit
def _tile_readers_kernel(LO, HI, QLO, QHI, num_q, num_k, num_tiles, search_steps, BLOCK_N: tl.constexpr,
                         BLOCK: tl.constexpr):
    """For BLOCK key tiles of BLOCK_N keys, the queries that see some key of the tile: [first hi > the tile's first
    key, first lo > its last key), by binary searches (lo and hi never decrease)."""
    tile = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = tile < num_tiles
    first_key = tile * BLOCK_N
    last_key = tl.minimum(first_key + BLOCK_N, num_k) - 1
    first_lo, first_hi = tl.zeros_like(tile), tl.zeros_like(tile) + num_q  # each answer lies in [x_lo, x_hi]
    past_lo, past_hi = tl.zeros_like(tile), tl.zeros_like(tile) + num_q
    for _ in range(search_steps):
        first_lo, first_hi = _bisect_step(HI, first_key, first_lo, first_hi, ok)
        past_lo, past_hi = _bisect_step(LO, last_key, past_lo, past_hi, ok)
    tl.store(QLO + tile, first_lo, mask=ok)
    tl.store(QHI + tile, past_lo, mask=ok)


def _tile_readers(lo: Tensor, hi: Tensor, num_k: int, keys_per_tile: int) -> tuple[Tensor, Tensor]:
    """For each tile of `keys_per_tile` keys, the queries [q_lo, q_hi) that see any of its keys (int32, one launch:
    the backward's dk/dv programs each read their tile's)."""
    num_tiles = _cdiv(num_k, keys_per_tile)
    readers = torch.empty(2, num_tiles, device=lo.device, dtype=torch.int32)
    num_q = lo.numel()
    _tile_readers_kernel[(_cdiv(num_tiles, 256),)](
        lo, hi, readers[0], readers[1], num_q, num_k, num_tiles, num_q.bit_length(), BLOCK_N=keys_per_tile, BLOCK=256,
    )
    return readers[0], readers[1]


def interval_attention(
    q: Tensor, k: Tensor, v: Tensor, lo: Tensor, hi: Tensor, scale: float, run_length: int | None = None,
    num_splits: int | None = None, documents: Documents = None, max_readers: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Triton version of `reference.interval_attention`, differentiable in o and lse, with the tuning knobs exposed
    (the model reaches the same `interval_forward` / `interval_backward` through `nsa_hf.ops.library`). Backward
    needs lo and hi non-decreasing.

    `run_length`: queries come in runs of this many per row (decoding), which spares a host sync.
    `num_splits`: programs that share each query tile's key range in the forward pass (None: enough to
    fill the GPU when there are few tiles, as when decoding).
    `documents`: host boundaries of the documents of a full pass (a tuple or a CPU tensor), each query's interval
    inside its document's part of the store: the query tiles are cut from them without a host sync.
    `max_readers`: a bound on how many queries see any one key (a window's w), which spares the backward programs
    for longer reader ranges.
    """
    forward = functools.partial(interval_forward, num_splits=num_splits) if num_splits else interval_forward
    return eager_interval_attention(forward, interval_backward, q, k, v, lo, hi, scale, run_length, documents, max_readers)
