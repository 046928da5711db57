# Generated from src/nsa_hf by `nsa-hf export-remote-code` (nsa_hf/remote_code.py); do not edit.
"""Triton kernels for NSA's two attention primitives, forward and backward.

Both work on the flat varlen tensors of `nsa_hf.ops.reference` (q [Nq, HQ, D], k/v [Nk, H, D]) and
compute exactly its functions:

- interval attention: query i attends to keys [lo[i], hi[i]) of a flat store. It runs the compressed
  branch (the document's complete blocks) and the sliding window. One program owns BLOCK_T tokens x the
  G query heads of one key head, so each key tile is loaded once per GQA group; its rows are (token, head)
  pairs flattened, so a group of 6 fills 60 of 64 rows rather than 48 (padding each group to 8). The backward pass is
  FlashAttention-2 style: a query-centric kernel for dq and a key-centric kernel for dk/dv, which needs
  lo and hi to be non-decreasing in the query index (true for every full pass: documents are in order).
- block attention (selection): query i reads the n blocks [start, start + block_size) it selected,
  keys s < hi[i]. Full passes are block-centric: the selection is inverted on the GPU (for each block,
  the queries that chose it, without a host sync) and each block is loaded once for BLOCK_Q of its
  queries x their G heads, so small GQA groups still fill the tensor cores. The forward writes a
  partial (o, lse) per query and slot, merged afterwards; the backward accumulates dk/dv in registers
  per block (only pieces of long query lists meet in fp32 atomics) and stores dq per slot. Decoding
  (few queries) runs query-centric: one program per token x key head, its n blocks split over programs.

Tensors may pass 2**31 elements (a decoding batch's key store, a long batch's queries): each program
addresses them from scalar int64 bases (its first query, its tile's first key, each selected block's
start), the offsets added to a base staying int32. The block-centric kernels gather queries by index, so
block attention runs queries past `_LAUNCH_ELEMENTS` gathered elements in chunks; the row-wise kernels
run in chunks of rows (`_row_chunks`). What stays int32 is the span of one tile's keys, one document's
at most (2**31 elements of keys: tens of millions of tokens).

Accumulation is fp32; inputs bf16, fp16 or fp32. Import is lazy (`nsa_hf.ops.backends`): the package
imports without Triton or CUDA, and CPU tests run these kernels under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import functools
from itertools import pairwise

import torch
try:  # optional package: in a try block, transformers' check_imports does not require it
    import triton
    import triton.language as tl
except ImportError:
    raise
from torch import Tensor

from .nsa_ops_layout import QueryLayout, SparsePattern, host_to_device, memoized

__all__ = ["block_attention", "interval_attention", "select_blocks"]


def _pow2(x: int, minimum: int = 16) -> int:
    return max(minimum, triton.next_power_of_2(x))


# The most elements one launch of a row-wise kernel addresses. Kernel offsets are int32 (vectors of int64
# offsets miscompiled in Triton 3.6), so a wrapper cuts a larger tensor into launches over row ranges, each
# through a view whose data pointer the host advanced: one launch whenever the tensors are smaller.
_LAUNCH_ELEMENTS = 2**31


def _row_chunks(num_rows: int, row_elements: int) -> list[tuple[int, int]]:
    """Row ranges [start, end) that each span at most `_LAUNCH_ELEMENTS` elements, a row spanning
    `row_elements` (the largest row stride among the tensors one launch addresses); one row at least."""
    per_chunk = max(1, _LAUNCH_ELEMENTS // max(1, row_elements))
    return [(start, min(start + per_chunk, num_rows)) for start in range(0, num_rows, per_chunk)]


@triton.jit
def _at_row(X, row, stride):
    """X advanced by `row` rows of `stride` elements, in int64: the attention kernels address tensors past 2**31
    elements from one such scalar base per program (or per key block), the offsets added to it staying int32
    (vectors of int64 offsets miscompiled in Triton 3.6)."""
    return X + tl.cast(row, tl.int64) * stride


@triton.jit
def _key_bases(K, V, first, kv_head, stride_kt, stride_kh, stride_vt, stride_vh):
    """K and V at key `first` of key head `kv_head`."""
    return _at_row(K, first, stride_kt) + kv_head * stride_kh, _at_row(V, first, stride_vt) + kv_head * stride_vh


@triton.jit
def _online_softmax_step(s, v, m_i, l_i, acc):
    """Fold one tile of masked scores s [M, N] (-inf = invisible) and values v [N, DV] into the running state."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet stay at exactly 0
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    return m_new, l_i * alpha + tl.sum(p, axis=1), acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)


@triton.jit
def _softmax_finish(acc, m_i, l_i):
    """Output and lse of the running state; a row that saw no key gives 0 and -inf."""
    has_keys = l_i > 0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    return out, tl.where(has_keys, m_i + tl.log(tl.where(has_keys, l_i, 1.0)), float("-inf"))


@triton.jit
def _program_tile(TILE_START, TILE_LEN, RUN_LENGTH: tl.constexpr, BLOCK_T: tl.constexpr):
    """First query and length of this program's tile: read from the tile arrays, or, when queries come in
    runs of RUN_LENGTH (decoding), computed (the arrays would cost several small launches per step)."""
    if RUN_LENGTH == 0:
        first = tl.load(TILE_START + tl.program_id(0))
        length = tl.load(TILE_LEN + tl.program_id(0))
    else:
        PER_RUN: tl.constexpr = (RUN_LENGTH + BLOCK_T - 1) // BLOCK_T
        start = (tl.program_id(0) % PER_RUN) * BLOCK_T
        first = (tl.program_id(0) // PER_RUN) * RUN_LENGTH + start
        length = tl.minimum(RUN_LENGTH - start, BLOCK_T)
    return first, length


@triton.jit
def _tile_rows(first, length, G: tl.constexpr, ROWS: tl.constexpr, BLOCK_T: tl.constexpr):
    """ROWS rows for BLOCK_T consecutive tokens from `first` (`length` of them real) x the G heads of a group,
    flattened: the tile pads only its last rows to a power of two, not every group (G = 6 would waste 1/4)."""
    rows = tl.arange(0, ROWS)
    token = first + rows // G
    return token, rows % G, (rows // G < length) & (rows < BLOCK_T * G)


@triton.jit
def _interval_tile(LO, HI, TILE_START, TILE_LEN, kv_head, G: tl.constexpr, ROWS: tl.constexpr, BLOCK_T: tl.constexpr,
                   RUN_LENGTH: tl.constexpr):
    """The first token of this program's query tile, its rows (token x group head), their key intervals, and the
    tile's key range."""
    first, length = _program_tile(TILE_START, TILE_LEN, RUN_LENGTH, BLOCK_T)
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
def _kv_tile(K, V, keys, key_ok, stride_kt, stride_vt,
             D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """K [N, BLOCK_D] and V [N, BLOCK_DV]: rows `keys` counted from the bases K and V (`_key_bases`); masked rows
    and columns read 0."""
    dk_idx = tl.arange(0, BLOCK_D)
    dv_idx = tl.arange(0, BLOCK_DV)
    k = tl.load(K + keys[:, None] * stride_kt + dk_idx[None, :], mask=key_ok[:, None] & (dk_idx < D)[None, :],
                other=0.0)
    v = tl.load(V + keys[:, None] * stride_vt + dv_idx[None, :], mask=key_ok[:, None] & (dv_idx < DV)[None, :],
                other=0.0)
    return k, v


@triton.jit
def _query_rows(Q, DO, LSE, DELTA, token, head, row_ok, stride_qt, stride_qh, stride_dot, stride_doh, heads_q,
                D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """What the backward pass reads per query row: q, dO, lse (-inf as 0: such rows have p = 0) and delta; `token`
    counted from the bases Q, DO, LSE and DELTA (`_query_bases`)."""
    dq_idx = tl.arange(0, BLOCK_D)
    dv_idx = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + token[:, None] * stride_qt + head[:, None] * stride_qh + dq_idx[None, :],
                mask=row_ok[:, None] & (dq_idx < D)[None, :], other=0.0)
    do = tl.load(DO + token[:, None] * stride_dot + head[:, None] * stride_doh + dv_idx[None, :],
                 mask=row_ok[:, None] & (dv_idx < DV)[None, :], other=0.0)
    lse = tl.load(LSE + token * heads_q + head, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + token * heads_q + head, mask=row_ok, other=0.0)
    return q, do, tl.where(lse == float("-inf"), 0.0, lse), delta


@triton.jit
def _query_bases(Q, DO, LSE, DELTA, first, stride_qt, stride_dot, heads_q):
    """Q, DO, LSE and DELTA at query `first`."""
    return (_at_row(Q, first, stride_qt), _at_row(DO, first, stride_dot), _at_row(LSE, first, heads_q),
            _at_row(DELTA, first, heads_q))


@triton.jit
def _dkv_step(q, do, lse, delta, k, v, valid, scale, dk, dv):
    """Accumulate one tile of query rows into a key tile's dk (unscaled) and dv; also returns the tile's dS."""
    p = tl.where(valid, tl.exp(tl.dot(q, tl.trans(k)) * scale - lse[:, None]), 0.0)
    dv += tl.dot(tl.trans(p).to(do.dtype), do)
    ds = tl.where(valid, p * (tl.dot(do, tl.trans(v)) - delta[:, None]), 0.0)
    return dk + tl.dot(tl.trans(ds).to(q.dtype), q), dv, ds


@triton.jit
def _interval_fwd_kernel(
    Q, K, V, LO, HI, TILE_START, TILE_LEN, O, LSE,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_os, stride_ot, stride_oh, stride_ls,
    scale,
    G: tl.constexpr, ROWS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, NUM_SPLITS: tl.constexpr,
    RUN_LENGTH: tl.constexpr,
):
    """One query tile x one key head; with NUM_SPLITS > 1, program_id(2) takes one share of the tile's key
    range and writes a partial (o, lse) for `_combine_splits` (flash-decoding: few tiles, long ranges)."""
    kv_head = tl.program_id(1)
    heads_q = G * tl.num_programs(1)
    first, token, head, row_ok, lo, hi, key_lo, key_hi = _interval_tile(LO, HI, TILE_START, TILE_LEN, kv_head, G, ROWS,
                                                                         BLOCK_T, RUN_LENGTH)
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
        keys = key_lo + offsets
        valid = (keys[None, :] >= lo[:, None]) & (keys[None, :] < hi[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc)
    out, lse = _softmax_finish(acc, m_i, l_i)
    tl.store(O + token[:, None] * stride_ot + head[:, None] * stride_oh + dv[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & (dv < DV)[None, :])
    tl.store(LSE + token * heads_q + head, lse, mask=row_ok)


@triton.jit
def _combine_splits_kernel(O_PART, LSE_PART, O, LSE, num_rows, stride_ps, stride_ls, DV: tl.constexpr,
                           BLOCK_DV: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
                           BLOCK_R: tl.constexpr):
    """Merge the partial (o, lse) of every split of BLOCK_R (query, head) rows, softmax-weighted by their lse.
    A split's partials lie `stride_ps` (o) and `stride_ls` (lse) elements after the previous split's."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < num_rows
    splits = tl.arange(0, SPLITS_PAD)
    dv = tl.arange(0, BLOCK_DV)
    lse = tl.load(LSE_PART + splits[:, None] * stride_ls + rows[None, :],
                  mask=(splits < NUM_SPLITS)[:, None] & row_ok[None, :], other=float("-inf"))
    top = tl.max(lse, axis=0)
    top_safe = tl.where(top == float("-inf"), 0.0, top)
    total = tl.sum(tl.exp(lse - top_safe[None, :]), axis=0)  # splits that saw no key weigh 0
    out = tl.zeros([BLOCK_R, BLOCK_DV], tl.float32)
    for split in range(NUM_SPLITS):
        lse_split = tl.load(LSE_PART + split * stride_ls + rows, mask=row_ok, other=float("-inf"))
        # Such a split may not have written its o (block-centric slots without a block): never read it.
        part = tl.load(_at_row(O_PART, split, stride_ps) + rows[:, None] * DV + dv[None, :],
                       mask=(lse_split > float("-inf"))[:, None] & (dv < DV)[None, :], other=0.0)
        out += part * tl.exp(lse_split - top_safe)[:, None]
    out = out / tl.where(total > 0, total, 1.0)[:, None]
    tl.store(O + rows[:, None] * DV + dv[None, :], out.to(O.dtype.element_ty), mask=row_ok[:, None] & (dv < DV)[None, :])
    tl.store(LSE + rows, tl.where(total > 0, top_safe + tl.log(tl.where(total > 0, total, 1.0)), float("-inf")),
             mask=row_ok)


@triton.jit
def _row_dot_kernel(A, B, OUT, num_rows, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    """OUT[r] = sum_d A[r, d] * B[r, d] in fp32 for BLOCK_R contiguous rows."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    mask = (rows < num_rows)[:, None] & (d < D)[None, :]
    a = tl.load(A + rows[:, None] * D + d[None, :], mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + rows[:, None] * D + d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + rows, tl.sum(a * b, axis=1), mask=rows < num_rows)


@triton.jit
def _interval_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, LO, HI, TILE_START, TILE_LEN, DQ,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    scale,
    G: tl.constexpr, ROWS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, RUN_LENGTH: tl.constexpr,
):
    kv_head = tl.program_id(1)
    heads_q = G * tl.num_programs(1)
    first, token, head, row_ok, lo, hi, key_lo, key_hi = _interval_tile(LO, HI, TILE_START, TILE_LEN, kv_head, G, ROWS,
                                                                         BLOCK_T, RUN_LENGTH)
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
    """dk, dv of BLOCK_N keys from one chunk of Q_CHUNK of the queries that see them (chunks meet in atomics)."""
    kv_head = tl.program_id(1)
    heads_q = G * tl.num_programs(1)
    keys = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    key_ok = keys < num_k
    q_lo = tl.min(tl.load(QLO + keys, mask=key_ok, other=2147483647), axis=0)
    q_hi = tl.max(tl.load(QHI + keys, mask=key_ok, other=0), axis=0)
    q_lo = q_lo + tl.program_id(2) * Q_CHUNK
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


@functools.cache
def _device_multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _multiprocessors(device: torch.device) -> int:
    return _device_multiprocessors(device.index if device.index is not None else torch.cuda.current_device())


def _num_splits(programs: int, device: torch.device, limit: int = 32) -> int:
    """How many programs share one unit of work so that a small grid (decoding) still fills the GPU:
    about four programs per multiprocessor. 1 off CUDA (the interpreter gains nothing)."""
    if device.type != "cuda" or programs == 0:
        return 1
    return max(1, min(limit, triton.cdiv(4 * _multiprocessors(device), programs)))


def _split_outputs(splits: int, num_q: int, heads_q: int, dim_v: int, dtype: torch.dtype, device: torch.device):
    """Output buffers with a leading split axis: the final (o, lse) when there is one split, else fp32 partials."""
    o_dtype = dtype if splits == 1 else torch.float32
    o = torch.empty(splits, num_q, heads_q, dim_v, device=device, dtype=o_dtype)
    return o, torch.empty(splits, num_q, heads_q, device=device, dtype=torch.float32)


def _combine_splits(o: Tensor, lse: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(o, lse) [S, Nq, HQ, ...] of S splits -> the attention over all of them."""
    splits, num_q, heads_q, dim_v = o.shape
    if splits == 1:
        return o[0].to(dtype), lse[0]
    out = torch.empty(num_q, heads_q, dim_v, device=o.device, dtype=dtype)
    out_lse = torch.empty(num_q, heads_q, device=o.device, dtype=torch.float32)
    # Chunks of whole queries: the split offsets come from the kernel's int64 bases, the row offsets stay int32.
    for start, end in _row_chunks(num_q, heads_q * dim_v):
        rows = (end - start) * heads_q
        _combine_splits_kernel[(triton.cdiv(rows, 32),)](
            o[:, start:end], lse[:, start:end], out[start:end], out_lse[start:end], rows, o.stride(0), lse.stride(0),
            DV=dim_v, BLOCK_DV=_pow2(dim_v), NUM_SPLITS=splits, SPLITS_PAD=_pow2(splits, 2), BLOCK_R=32,
        )
    return out, out_lse


def _query_tile(groups: int, run_length: int | None) -> tuple[int, int]:
    """(tokens, rows) of an interval-kernel query tile: tokens x group heads flattened (`_tile_rows`) and
    padded to a power of two."""
    tokens = _tile_tokens(groups, run_length)
    return tokens, _pow2(tokens * groups)


def _softmax_delta(do: Tensor, o: Tensor) -> Tensor:
    """FlashAttention's delta, sum(dO * O) over the value dim in fp32 ([Nq, HQ]), read once from the
    low-precision tensors (the PyTorch expression writes two fp32 copies and their product first)."""
    do, o = do.contiguous(), o.contiguous()
    num_q, heads_q, dim_v = do.shape
    delta = torch.empty(do.shape[:2], device=do.device, dtype=torch.float32)
    for start, end in _row_chunks(num_q, heads_q * dim_v):
        rows = (end - start) * heads_q
        _row_dot_kernel[(triton.cdiv(rows, 64),)](
            do[start:end], o[start:end], delta[start:end], rows, D=dim_v, BLOCK_D=_pow2(dim_v), BLOCK_R=64,
        )
    return delta


def _tile_tokens(width: int, run_length: int | None, rows: int = 64) -> int:
    """Tokens per query tile of `rows` rows, each token taking `width` rows (its group heads; block selection
    pads them to a power of two, as it sums scores over each group), or when decoding, just enough for the
    run (tl.dot needs 16 rows)."""
    tokens = max(1, rows // width)
    if run_length is None:
        return tokens
    return min(tokens, max(1, 16 // width, triton.next_power_of_2(run_length)))


def _split_runs(run_first: Tensor, run_len: Tensor, piece: int, num_pieces: int | None = None) -> tuple[Tensor, Tensor]:
    """Cut runs [first, first + len) into pieces of at most `piece`: (first, length) per piece.
    `num_pieces`, when the host knows it, spares the host sync that sizes the result."""
    pieces_per_run = (run_len + piece - 1) // piece
    runs = torch.arange(run_first.numel(), device=run_first.device)
    run = torch.repeat_interleave(runs, pieces_per_run, output_size=num_pieces)
    index = torch.arange(run.numel(), device=run_first.device) - (torch.cumsum(pieces_per_run, 0) - pieces_per_run)[run]
    first = run_first[run] + index * piece
    return first, torch.minimum(run_len[run] - index * piece, torch.full_like(first, piece))


def _document_pieces(documents: tuple[int, ...], tile: int, device: torch.device) -> tuple[Tensor, Tensor, int]:
    """Tiles of at most `tile` consecutive queries cut from host document boundaries: (first, length, count).
    The count comes from the host copy, the tiles from the GPU (small CPU tensor ops cost a millisecond
    each on a busy host, measured on the H200 machine)."""
    count = sum(-(-(end - start) // tile) for start, end in pairwise(documents))
    bounds = host_to_device(torch.tensor(documents), device)
    first, length = _split_runs(bounds[:-1], bounds.diff(), tile, num_pieces=count)
    return first.int(), length.int(), count


def _query_tiles(
    lo: Tensor, hi: Tensor, tile: int, run_length: int | None, documents: tuple[int, ...] | None
) -> tuple[Tensor, Tensor, int]:
    """Tiles of consecutive queries whose key intervals chain (a tile never spans two rows or documents,
    whose stores lie apart: a decoding batch would otherwise read every row's keys): (first, length, count).
    Runs of `run_length` queries (decoding) need no arrays: the kernels compute their tiles; host
    `documents` give them without a host sync too."""
    if run_length is not None:
        return lo, lo, lo.numel() // run_length * triton.cdiv(run_length, tile)
    if documents is not None:
        return _document_pieces(documents, tile, lo.device)
    apart = torch.ones_like(lo, dtype=torch.bool)
    apart[1:] = (lo[1:] >= hi[:-1]) | (lo[1:] < lo[:-1])
    run_first = torch.nonzero(apart).flatten()
    run_len = torch.diff(run_first, append=run_first.new_tensor([lo.numel()]))
    first, length = _split_runs(run_first, run_len, tile)
    return first.to(torch.int32), length.to(torch.int32), first.numel()


class _IntervalAttention(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, q: Tensor, k: Tensor, v: Tensor, lo: Tensor, hi: Tensor, scale: float, run_length: int | None,
        num_splits: int | None, memo: dict | None, documents: tuple[int, ...] | None,
    ):
        num_q, heads_q, dim = q.shape
        heads_kv, dim_v = k.shape[1], v.shape[2]
        groups = heads_q // heads_kv
        block_t, rows = _query_tile(groups, run_length)
        q, k, v, lo, hi = q.contiguous(), k.contiguous(), v.contiguous(), lo.contiguous(), hi.contiguous()
        ctx.no_keys = k.shape[0] == 0
        if ctx.no_keys:
            # An empty store (every document shorter than a compressed block): no query sees a key. The kernels
            # never get an empty tensor: measured on the H200, its null pointer faults even behind masks.
            ctx.mark_non_differentiable(lse := q.new_full((num_q, heads_q), float("-inf"), dtype=torch.float32))
            ctx.shapes = (k.shape, v.shape)
            return q.new_zeros(num_q, heads_q, dim_v), lse
        tile_first, tile_len, num_tiles = memoized(
            memo, ("tiles", block_t), lambda: _query_tiles(lo, hi, block_t, run_length, documents)
        )
        splits = num_splits or _num_splits(num_tiles * heads_kv, q.device)
        o, lse = _split_outputs(splits, num_q, heads_q, dim_v, q.dtype, q.device)
        if num_q:
            _interval_fwd_kernel[(num_tiles, heads_kv, splits)](
                q, k, v, lo, hi, tile_first, tile_len, o, lse,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                o.stride(0), o.stride(1), o.stride(2), lse.stride(0), scale,
                G=groups, ROWS=rows, BLOCK_T=block_t, BLOCK_N=64, D=dim, DV=dim_v, BLOCK_D=_pow2(dim), BLOCK_DV=_pow2(dim_v),
                NUM_SPLITS=splits, RUN_LENGTH=run_length or 0,
            )
        o, lse = _combine_splits(o, lse, q.dtype)
        q_lo = q_hi = ctx.reader_span = None
        if any(ctx.needs_input_grad[:3]):
            # Built here, not in backward: the backward pass reads the span on the host, long after the GPU
            # has computed it, so that read never waits.
            num_k = k.shape[0]
            q_lo, q_hi, ctx.reader_span = memoized(memo, ("readers", num_k), lambda: _key_readers(lo, hi, num_k))
        ctx.save_for_backward(q, k, v, lo, hi, tile_first, tile_len, o, lse, q_lo, q_hi)
        ctx.scale, ctx.block_t, ctx.rows, ctx.num_tiles, ctx.run_length = scale, block_t, rows, num_tiles, run_length
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do: Tensor, _dlse: Tensor):
        if ctx.no_keys:
            k_shape, v_shape = ctx.shapes
            dq = do.new_zeros(do.shape[0], do.shape[1], k_shape[2])
            return dq, do.new_zeros(k_shape), do.new_zeros(v_shape), None, None, None, None, None, None, None
        q, k, v, lo, hi, tile_first, tile_len, o, lse, q_lo, q_hi = ctx.saved_tensors
        heads_q, dim = q.shape[1:]
        num_k, heads_kv, dim_v = v.shape
        groups = heads_q // heads_kv
        do = do.contiguous()
        delta = _softmax_delta(do, o)
        strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1))
        meta = dict(G=groups, ROWS=ctx.rows, BLOCK_T=ctx.block_t, BLOCK_N=64, BLOCK_D=_pow2(dim), BLOCK_DV=_pow2(dim_v))
        dq = torch.empty_like(q)
        _interval_bwd_dq_kernel[(ctx.num_tiles, heads_kv)](
            q, k, v, do, lse, delta, lo, hi, tile_first, tile_len, dq, *strides, ctx.scale, D=dim, DV=dim_v,
            RUN_LENGTH=ctx.run_length or 0, **meta,
        )
        dk = torch.zeros(k.shape, device=k.device, dtype=torch.float32)
        dv = torch.zeros(v.shape, device=v.device, dtype=torch.float32)
        reader_chunks = triton.cdiv(max(1, ctx.reader_span.get()), _READER_CHUNK)
        _interval_bwd_dkv_kernel[(triton.cdiv(num_k, 64), heads_kv, reader_chunks)](
            q, k, v, do, lse, delta, lo, hi, q_lo, q_hi, dk, dv, *strides, num_k, ctx.scale,
            Q_CHUNK=_READER_CHUNK, D=dim, DV_DIM=dim_v, **meta, num_stages=2,  # H200, seed shape at 32k: 1.17 ms vs 1.24 with 3
        )
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None, None


_READER_CHUNK = 1024  # queries per dk/dv program: longer reader ranges are split over programs


class _HostScalar:
    """A GPU scalar copied to the host without waiting for it; `get` waits only if the copy is not done yet."""

    def __init__(self, value: Tensor):
        if value.device.type != "cuda":
            self._host, self._copied = value, None
            return
        self._host = torch.empty((), dtype=value.dtype, pin_memory=True)
        self._host.copy_(value, non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()

    def get(self) -> int:
        if self._copied is not None:
            self._copied.synchronize()
        return int(self._host)


def _key_readers(lo: Tensor, hi: Tensor, num_k: int) -> tuple[Tensor, Tensor, _HostScalar]:
    """For each key c, the queries that see it: [first hi > c, first lo > c), since lo and hi never
    decrease; and the longest such range of a 64-key tile (long ranges, as of early compressed keys that
    the whole document sees, are split over programs)."""
    key_index = torch.arange(num_k, device=lo.device, dtype=lo.dtype)
    q_lo = torch.searchsorted(hi, key_index, right=True).to(torch.int32)
    q_hi = torch.searchsorted(lo, key_index, right=True).to(torch.int32)
    pad = -num_k % 64
    block_lo = torch.nn.functional.pad(q_lo, (0, pad), value=lo.numel()).view(-1, 64).amin(1)
    block_hi = torch.nn.functional.pad(q_hi, (0, pad), value=0).view(-1, 64).amax(1)
    return q_lo, q_hi, _HostScalar((block_hi - block_lo).max() if num_k else q_lo.new_zeros(()))


def interval_attention(
    q: Tensor, k: Tensor, v: Tensor, lo: Tensor, hi: Tensor, scale: float, run_length: int | None = None,
    num_splits: int | None = None, memo: dict | None = None, documents: tuple[int, ...] | None = None,
) -> tuple[Tensor, Tensor]:
    """Triton version of `reference.interval_attention`. Backward needs lo and hi non-decreasing.

    `run_length`: queries come in runs of this many per row (decoding), which spares a host sync.
    `num_splits`: programs that share each query tile's key range in the forward pass (None: enough to
    fill the GPU when there are few tiles, as when decoding).
    `memo`: a dict shared by calls with the same lo and hi (the layers of one pass), where the query tiles
    and key readers are kept, so that only the first call builds them.
    `documents`: host boundaries of the documents of a full pass, each query's interval inside its
    document's part of the store: the query tiles are cut from them without a host sync.
    """
    return _IntervalAttention.apply(q, k, v, lo, hi, scale, run_length, num_splits, memo, documents)


@triton.jit
def _block_fwd_kernel(
    Q, K, V, STARTS, HI, O, LSE,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_os, stride_ot, stride_oh, stride_ls,
    stride_st, stride_sh, scale,
    G: tl.constexpr, G_PAD: tl.constexpr, NUM_SLOTS: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_S: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, SLOTS_PER_SPLIT: tl.constexpr,
):
    """One token x one key head over the slots of split program_id(2) (all slots unless decoding)."""
    token = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    group = tl.arange(0, G_PAD)
    row_ok = group < G
    head = kv_head * G + group
    dq = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    hi = tl.load(HI + token).to(tl.int32)
    q = tl.load(_at_row(Q, token, stride_qt) + head[:, None] * stride_qh + dq[None, :],
                mask=row_ok[:, None] & (dq < D)[None, :], other=0.0)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, BLOCK_DV], tl.float32)
    offsets = tl.arange(0, BLOCK_S)
    starts = _at_row(STARTS, token, stride_st) + kv_head * stride_sh
    for i in range(SLOTS_PER_SPLIT):
        slot = split * SLOTS_PER_SPLIT + i
        start = tl.load(starts + slot, mask=slot < NUM_SLOTS, other=-1).to(tl.int32)
        if start >= 0:
            key_ok = (offsets < BLOCK_SIZE) & (start + offsets < hi)
            k_block, v_block = _key_bases(K, V, start, kv_head, stride_kt, stride_kh, stride_vt, stride_vh)
            k, v = _kv_tile(k_block, v_block, offsets, key_ok, stride_kt, stride_vt, D, DV, BLOCK_D, BLOCK_DV)
            s = tl.dot(q, tl.trans(k)) * scale
            s = tl.where(key_ok[None, :], s, float("-inf"))
            m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc)
    out, lse = _softmax_finish(acc, m_i, l_i)
    tl.store(_at_row(_at_row(O, split, stride_os), token, stride_ot) + head[:, None] * stride_oh + dv[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & (dv < DV)[None, :])
    tl.store(_at_row(_at_row(LSE, split, stride_ls), token, G * tl.num_programs(1)) + head, lse, mask=row_ok)


@triton.jit
def _piece(PIECE_FIRST, PIECE_LEN, SORTED_KEY, piece, num_k, BLOCK_SIZE: tl.constexpr, BLOCK_S: tl.constexpr):
    """Entries, key head, block start and keys of one piece of a selected block's query list (`_queries_per_block`)."""
    first = tl.load(PIECE_FIRST + piece)
    length = tl.load(PIECE_LEN + piece)
    block_key = tl.load(SORTED_KEY + first)
    start = block_key % num_k
    keys = start + tl.arange(0, BLOCK_S)
    in_block = (tl.arange(0, BLOCK_S) < BLOCK_SIZE) & (keys < num_k)  # the last block of a store may be partial
    return first, length, block_key // num_k, start, keys, in_block


@triton.jit
def _entry_rows(ENTRY, HI, first, e0, length, kv_head, heads_kv, num_slots, G: tl.constexpr, ROWS: tl.constexpr,
                BLOCK_Q: tl.constexpr):
    """Rows (entry x group head, flattened as in `_tile_rows`) of one tile of a piece: token, slot, head,
    validity and key bound."""
    index, group, row_ok = _tile_rows(e0, length - e0, G, ROWS, BLOCK_Q)
    entry = tl.load(ENTRY + first + index, mask=row_ok, other=0)
    token = entry // (heads_kv * num_slots)
    hi = tl.load(HI + token, mask=row_ok, other=0).to(tl.int32)
    return token, entry % num_slots, kv_head * G + group, row_ok, hi


def _tuning_configs(stages: tuple[int, ...] = (1, 2)) -> list[triton.Config]:
    """Launch settings tuned on a GPU, once per shape, for the kernels whose best one moves with the shape (the
    block-centric kernels and block selection: their loops gather rows or merge lists, so how many warps hide
    the latency depends on the head dims and tile heights); the interpreter runs one."""
    if not torch.cuda.is_available():
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in stages]


@triton.autotune(configs=_tuning_configs(), key=["G", "ROWS", "BLOCK_D", "BLOCK_DV"])
@triton.jit
def _block_fwd_by_block_kernel(
    Q, K, V, HI, TOTAL, PIECE_FIRST, PIECE_LEN, SORTED_KEY, ENTRY, O_PART, LSE_PART,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_os, stride_ot, stride_oh, stride_ls,
    heads_kv, num_slots, num_k, scale,
    G: tl.constexpr, ROWS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_S: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Block-centric forward: each selected block is loaded once and attended by the queries that chose
    it, BLOCK_Q at a time; every (query, slot) gets its partial (o, lse), merged by `_combine_splits`."""
    dq_idx = tl.arange(0, BLOCK_D)
    dv_idx = tl.arange(0, BLOCK_DV)
    for piece in range(tl.program_id(0), tl.load(TOTAL), tl.num_programs(0)):  # persistent: no host sync
        first, length, kv_head, start, keys, in_block = _piece(PIECE_FIRST, PIECE_LEN, SORTED_KEY, piece, num_k,
                                                               BLOCK_SIZE, BLOCK_S)
        k_block, v_block = _key_bases(K, V, start, kv_head, stride_kt, stride_kh, stride_vt, stride_vh)
        k, v = _kv_tile(k_block, v_block, keys - start, in_block, stride_kt, stride_vt, D, DV, BLOCK_D, BLOCK_DV)
        for e0 in range(0, length, BLOCK_Q):
            token, slot, head, row_ok, hi = _entry_rows(ENTRY, HI, first, e0, length, kv_head, heads_kv, num_slots,
                                                        G, ROWS, BLOCK_Q)
            q = tl.load(Q + token[:, None] * stride_qt + head[:, None] * stride_qh + dq_idx[None, :],
                        mask=row_ok[:, None] & (dq_idx < D)[None, :], other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale
            s = tl.where(row_ok[:, None] & in_block[None, :] & (keys[None, :] < hi[:, None]), s, float("-inf"))
            m_i = tl.max(s, axis=1)
            m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
            p = tl.exp(s - m_safe[:, None])
            out, lse = _softmax_finish(tl.dot(p.to(v.dtype), v), m_i, tl.sum(p, axis=1))
            tl.store(O_PART + slot[:, None] * stride_os + token[:, None] * stride_ot + head[:, None] * stride_oh
                     + dv_idx[None, :], out, mask=row_ok[:, None] & (dv_idx < DV)[None, :])
            tl.store(LSE_PART + slot * stride_ls + token * (G * heads_kv) + head, lse, mask=row_ok)


@triton.jit
def _block_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, STARTS, HI, DQ,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh, stride_st, stride_sh,
    scale,
    G: tl.constexpr, G_PAD: tl.constexpr, NUM_SLOTS: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_S: tl.constexpr,
    D: tl.constexpr, DV_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Query-centric dq (when per-slot dq partials would not fit): one token x the group of one key head."""
    token = tl.program_id(0)
    kv_head = tl.program_id(1)
    heads_q = G * tl.num_programs(1)
    group = tl.arange(0, G_PAD)
    row_ok = group < G
    head = kv_head * G + group
    dq_idx = tl.arange(0, BLOCK_D)
    dv_idx = tl.arange(0, BLOCK_DV)
    hi = tl.load(HI + token).to(tl.int32)
    Q, DO, LSE, DELTA = _query_bases(Q, DO, LSE, DELTA, token, stride_qt, stride_dot, heads_q)
    q = tl.load(Q + head[:, None] * stride_qh + dq_idx[None, :], mask=row_ok[:, None] & (dq_idx < D)[None, :],
                other=0.0)
    do = tl.load(DO + head[:, None] * stride_doh + dv_idx[None, :],
                 mask=row_ok[:, None] & (dv_idx < DV_DIM)[None, :], other=0.0)
    lse = tl.load(LSE + head, mask=row_ok, other=0.0)
    lse = tl.where(lse == float("-inf"), 0.0, lse)
    delta = tl.load(DELTA + head, mask=row_ok, other=0.0)
    dq = tl.zeros([G_PAD, BLOCK_D], tl.float32)
    offsets = tl.arange(0, BLOCK_S)
    starts = _at_row(STARTS, token, stride_st) + kv_head * stride_sh
    for slot in range(NUM_SLOTS):
        start = tl.load(starts + slot).to(tl.int32)
        if start >= 0:
            key_ok = (offsets < BLOCK_SIZE) & (start + offsets < hi)
            k_block, v_block = _key_bases(K, V, start, kv_head, stride_kt, stride_kh, stride_vt, stride_vh)
            k, v = _kv_tile(k_block, v_block, offsets, key_ok, stride_kt, stride_vt, D, DV_DIM, BLOCK_D, BLOCK_DV)
            p = tl.where(row_ok[:, None] & key_ok[None, :], tl.exp(tl.dot(q, tl.trans(k)) * scale - lse[:, None]), 0.0)
            ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k)
    tl.store(_at_row(DQ, token, stride_qt) + head[:, None] * stride_qh + dq_idx[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & (dq_idx < D)[None, :])


# 3 stages: 2.5% faster than the best of 1-2 at the seed shape, 32k (H200); the gathers pipeline deeper here.
@triton.autotune(configs=_tuning_configs(stages=(1, 2, 3)), key=["G", "ROWS", "BLOCK_D", "BLOCK_DV", "DQ_PARTIALS"],
                 reset_to_zero=["DK", "DV"])
@triton.jit
def _block_bwd_kernel(
    Q, K, V, DO, LSE, DELTA, HI, TOTAL, PIECE_FIRST, PIECE_LEN, SORTED_KEY, ENTRY, DQ, DK, DV,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqs, stride_dqt, stride_dqh, stride_dkt, stride_dkh, stride_dvt, stride_dvh, heads_kv, num_slots, num_k, scale,
    G: tl.constexpr, ROWS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_S: tl.constexpr,
    D: tl.constexpr, DV_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, DQ_PARTIALS: tl.constexpr,
):
    """Block-centric backward: dk, dv of one selected block from (a piece of) the queries that chose it,
    accumulated in registers (fp32 atomics only where a long query list is cut into pieces). Each query
    reads n blocks, so its dq has n parts: with DQ_PARTIALS they are stored per slot (DQ [n, Nq, HQ, D],
    summed afterwards); without, `_block_bwd_dq_kernel` computes dq (atomics for it measured slower)."""
    dq_idx = tl.arange(0, BLOCK_D)
    dv_idx = tl.arange(0, BLOCK_DV)
    for piece in range(tl.program_id(0), tl.load(TOTAL), tl.num_programs(0)):
        first, length, kv_head, start, keys, in_block = _piece(PIECE_FIRST, PIECE_LEN, SORTED_KEY, piece, num_k,
                                                               BLOCK_SIZE, BLOCK_S)
        k_block, v_block = _key_bases(K, V, start, kv_head, stride_kt, stride_kh, stride_vt, stride_vh)
        k, v = _kv_tile(k_block, v_block, keys - start, in_block, stride_kt, stride_vt, D, DV_DIM, BLOCK_D, BLOCK_DV)
        dk = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_S, BLOCK_DV], tl.float32)
        for e0 in range(0, length, BLOCK_Q):
            token, slot, head, row_ok, hi = _entry_rows(ENTRY, HI, first, e0, length, kv_head, heads_kv, num_slots,
                                                        G, ROWS, BLOCK_Q)
            q, do, lse, delta = _query_rows(Q, DO, LSE, DELTA, token, head, row_ok, stride_qt, stride_qh,
                                            stride_dot, stride_doh, G * heads_kv, D, DV_DIM, BLOCK_D, BLOCK_DV)
            valid = row_ok[:, None] & in_block[None, :] & (keys[None, :] < hi[:, None])
            dk, dv, ds = _dkv_step(q, do, lse, delta, k, v, valid, scale, dk, dv)
            if DQ_PARTIALS:
                tl.store(DQ + slot[:, None] * stride_dqs + token[:, None] * stride_dqt + head[:, None] * stride_dqh
                         + dq_idx[None, :], tl.dot(ds.to(k.dtype), k) * scale, mask=row_ok[:, None] & (dq_idx < D)[None, :])
        dk_block, dv_block = _key_bases(DK, DV, start, kv_head, stride_dkt, stride_dkh, stride_dvt, stride_dvh)
        tl.atomic_add(dk_block + (keys - start)[:, None] * stride_dkt + dq_idx[None, :], dk * scale,
                      mask=in_block[:, None] & (dq_idx < D)[None, :])
        tl.atomic_add(dv_block + (keys - start)[:, None] * stride_dvt + dv_idx[None, :], dv,
                      mask=in_block[:, None] & (dv_idx < DV_DIM)[None, :])


@triton.jit
def _sum_dq_parts_kernel(DQ_PART, STARTS, DQ, num_q, stride_ps, stride_st, stride_sh, heads_kv,
                         G: tl.constexpr, NUM_SLOTS: tl.constexpr, BLOCK_R: tl.constexpr, D: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    """dq of BLOCK_R (query, head) rows: the sum of their slots' parts, reading only slots that hold a block
    (the others were never written, so the part buffer needs no zero fill)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < num_q * G * heads_kv
    token = rows // (G * heads_kv)
    kv_head = rows % (G * heads_kv) // G
    d = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for slot in range(NUM_SLOTS):
        start = tl.load(STARTS + token * stride_st + kv_head * stride_sh + slot, mask=row_ok, other=-1)
        acc += tl.load(DQ_PART + slot * stride_ps + rows[:, None] * D + d[None, :],
                       mask=(start >= 0)[:, None] & (d < D)[None, :], other=0.0)
    tl.store(DQ + rows[:, None] * D + d[None, :], acc.to(DQ.dtype.element_ty), mask=row_ok[:, None] & (d < D)[None, :])


@triton.jit
def _block_keys_kernel(STARTS, KEYS, num_entries, heads_kv, num_slots, num_keys, BLOCK: tl.constexpr):
    """Sort key of each entry (query, key head, slot): key head * num_keys + block start, or heads_kv * num_keys
    (after every real block) for an empty slot."""
    entry = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = entry < num_entries
    start = tl.load(STARTS + entry, mask=ok, other=-1).to(tl.int32)
    head = (entry // num_slots) % heads_kv
    tl.store(KEYS + entry, tl.where(start >= 0, head * num_keys + start, heads_kv * num_keys), mask=ok)


@triton.jit
def _block_pieces_kernel(SORTED_KEY, COUNT, PIECE_FIRST, PIECE_LEN, num_entries, none, search_steps,
                         PIECE: tl.constexpr, BLOCK: tl.constexpr):
    """Cut BLOCK sorted entries into pieces: a piece starts at every PIECE-th entry of a block's run of equal keys
    and holds at most PIECE entries of that run. The run's bounds come from binary searches over the sorted
    keys; the starts are compacted through the COUNT ticket, so pieces of different programs land in any order."""
    index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = index < num_entries
    key = tl.load(SORTED_KEY + index, mask=ok, other=none)
    run_lo = tl.zeros_like(index)  # the first entry with this key lies in [run_lo, run_hi]
    run_hi = index
    end_lo = index + 1  # the first entry past the run lies in [end_lo, end_hi]
    end_hi = tl.zeros_like(index) + num_entries
    for _ in range(search_steps):
        mid = (run_lo + run_hi) // 2
        below = tl.load(SORTED_KEY + mid, mask=ok & (run_lo < run_hi), other=none) < key
        run_lo, run_hi = tl.where(below, mid + 1, run_lo), tl.where(below, run_hi, mid)
        mid = (end_lo + end_hi) // 2
        inside = tl.load(SORTED_KEY + mid, mask=ok & (end_lo < end_hi), other=none) == key
        end_lo, end_hi = tl.where(inside, mid + 1, end_lo), tl.where(inside, end_hi, mid)
    starts = ok & (key < none) & ((index - run_lo) % PIECE == 0)
    slot = tl.atomic_add(COUNT, tl.sum(starts.to(tl.int32), axis=0)) + tl.cumsum(starts.to(tl.int32), axis=0) - 1
    tl.store(PIECE_FIRST + slot, index, mask=starts)
    tl.store(PIECE_LEN + slot, tl.minimum(end_lo - index, PIECE), mask=starts)


def _queries_per_block(block_starts: Tensor, num_keys: int, piece: int) -> tuple[Tensor, ...]:
    """Invert the selection without a host sync: entries (query, key head, slot) sorted by the block they
    read, and the pieces of at most `piece` entries of one block that the block-centric kernels take.

    Returns (count [1], piece_first [E], piece_len [E], sorted_key [E], entry [E]) with E = Nq * H * n:
    pieces below `count` are valid, in no particular order; a piece's key is key head * num_keys + block start;
    an entry is (query * H + key head) * n + slot. Every array has a size known on the host, so nothing waits
    for the GPU (the kernels read `count` themselves). Two small kernels around one sort: the host queues
    five launches per layer where PyTorch ops took some thirty, each about 20 us on the H200 machine's host.
    """
    _, heads_kv, slots = block_starts.shape
    num_entries = block_starts.numel()
    device = block_starts.device
    none = heads_kv * num_keys  # sorts after every real block
    if none >= 2**31:  # past ~2**31 * head dim elements of keys: more than any GPU holds
        raise ValueError(
            f"block attention sorts its (key head, key) pairs as int32: the store may hold at most 2**31 - 1 of "
            f"them, got {heads_kv} key heads x {num_keys} keys."
        )
    keys = torch.empty(num_entries, device=device, dtype=torch.int32)
    count = torch.zeros(1, device=device, dtype=torch.int32)
    piece_first = torch.empty(num_entries, device=device, dtype=torch.int32)
    piece_len = torch.empty(num_entries, device=device, dtype=torch.int32)
    if num_entries == 0:
        return count, piece_first, piece_len, keys, keys
    grid = (triton.cdiv(num_entries, 1024),)
    _block_keys_kernel[grid](block_starts, keys, num_entries, heads_kv, slots, num_keys, BLOCK=1024)
    sorted_key, entry = torch.sort(keys, stable=True)
    _block_pieces_kernel[grid](
        sorted_key, count, piece_first, piece_len, num_entries, none, num_entries.bit_length(), PIECE=piece, BLOCK=1024,
    )
    return count, piece_first, piece_len, sorted_key, entry.int()


def _persistent_programs(device: torch.device, work: int) -> int:
    """Programs of a persistent kernel: a few per multiprocessor (one off CUDA: the interpreter is serial)."""
    if device.type != "cuda":
        return 1
    return max(1, min(work, 8 * _multiprocessors(device)))


# The block-centric passes keep a partial o (forward) and a dq part (backward) per (query, slot), in the
# input dtype: they are merged in fp32, and their traffic is what these passes spend most time on. Above
# this many bytes of partials (G >= 16 at long T) the query-centric kernels, which need none, run instead.
# It also keeps the partials below 2**31 elements, which the kernels gather with int32 offsets.
_PARTIALS_BUDGET = 2 << 30


_PIECE = 256  # queries of one selected block per program and pass (long lists meet in atomics)


def _block_centric_tile(groups: int) -> dict[str, int]:
    """One block-centric tile: BLOCK_Q queries x the group's heads, flattened into ROWS (64 or more) rows."""
    block_q = _tile_tokens(groups, None)
    return dict(ROWS=_pow2(block_q * groups, 64), BLOCK_Q=block_q)


def _partials_fit(slots: int, num_q: int, heads_q: int, dim: int, dtype: torch.dtype) -> bool:
    return slots * num_q * heads_q * dim * dtype.itemsize <= _PARTIALS_BUDGET


def _use_block_centric(num_q: int, heads_q: int, slots: int, dim_v: int, dtype: torch.dtype, num_splits: int | None) -> bool:
    """Block-centric unless the queries are few (decoding: each block has about one reader, so the
    query-centric kernel split over slots fills the GPU better) or the partials would be too large."""
    return num_splits is None and num_q >= 256 and _partials_fit(slots, num_q, heads_q, dim_v, dtype)


class _BlockAttention(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, q: Tensor, k: Tensor, v: Tensor, block_starts: Tensor, block_size: int, hi: Tensor, scale: float,
        num_splits: int | None, block_centric: bool,
    ):
        num_q, heads_q, dim = q.shape
        num_k, heads_kv, dim_v = v.shape
        groups = heads_q // heads_kv
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        starts, hi = block_starts.contiguous(), hi.contiguous()  # int32 or int64
        slots = starts.shape[-1]
        meta = dict(
            G=groups, BLOCK_SIZE=block_size, BLOCK_S=_pow2(block_size), D=dim, BLOCK_D=_pow2(dim), BLOCK_DV=_pow2(dim_v),
        )
        pieces = None
        if block_centric and num_q:
            pieces = _queries_per_block(starts, num_k, piece=_PIECE)
            o = torch.empty(slots, num_q, heads_q, dim_v, device=q.device, dtype=q.dtype)
            lse = torch.full((slots, num_q, heads_q), float("-inf"), device=q.device, dtype=torch.float32)
            _block_fwd_by_block_kernel[(_persistent_programs(q.device, pieces[1].numel()),)](
                q, k, v, hi, *pieces, o, lse,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                o.stride(0), o.stride(1), o.stride(2), lse.stride(0), heads_kv, slots, num_k, scale,
                DV=dim_v, **_block_centric_tile(groups), **meta,
            )
        else:
            splits = min(num_splits or _num_splits(num_q * heads_kv, q.device), slots)
            per_split = triton.cdiv(slots, splits)
            splits = triton.cdiv(slots, per_split)
            o, lse = _split_outputs(splits, num_q, heads_q, dim_v, q.dtype, q.device)
            if num_q:
                _block_fwd_kernel[(num_q, heads_kv, splits)](
                    q, k, v, starts, hi, o, lse,
                    q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                    o.stride(0), o.stride(1), o.stride(2), lse.stride(0), starts.stride(0), starts.stride(1), scale,
                    G_PAD=_pow2(groups), NUM_SLOTS=slots, DV=dim_v, SLOTS_PER_SPLIT=per_split, **meta,
                )
        o, lse = _combine_splits(o, lse, q.dtype)
        ctx.save_for_backward(q, k, v, starts, hi, o, lse, *(pieces or ()))
        ctx.scale, ctx.meta = scale, meta
        return o

    @staticmethod
    def backward(ctx, do: Tensor):
        q, k, v, starts, hi, o, lse, *pieces = ctx.saved_tensors
        num_q, heads_q, dim = q.shape
        num_k, heads_kv, dim_v = v.shape
        do = do.contiguous()
        delta = _softmax_delta(do, o)
        slots = starts.shape[-1]
        dq_partials = _partials_fit(slots, num_q, heads_q, dim, q.dtype)
        dq = torch.empty_like(q)
        # Per-slot dq parts, summed below; unused slots are never written, so no zero fill.
        dq_parts = torch.empty(slots, *q.shape, device=q.device, dtype=q.dtype) if dq_partials else dq
        dk = torch.zeros(k.shape, device=k.device, dtype=torch.float32)
        dv = torch.zeros(v.shape, device=v.device, dtype=torch.float32)
        if num_q:
            pieces = pieces or _queries_per_block(starts, num_k, piece=_PIECE)
            if not dq_partials:
                _block_bwd_dq_kernel[(num_q, heads_kv)](
                    q, k, v, do, lse, delta, starts, hi, dq, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                    v.stride(0), v.stride(1), do.stride(0), do.stride(1), starts.stride(0), starts.stride(1), ctx.scale,
                    G_PAD=_pow2(ctx.meta["G"]), NUM_SLOTS=slots, DV_DIM=dim_v, **ctx.meta,
                )
            dq_strides = dq_parts.stride()[:3] if dq_partials else (0, 0, 0)
            _block_bwd_kernel[(_persistent_programs(q.device, pieces[1].numel()),)](
                q, k, v, do, lse, delta, hi, *pieces, dq_parts, dk, dv,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
                *dq_strides, dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
                heads_kv, slots, num_k, ctx.scale,
                DV_DIM=dim_v, DQ_PARTIALS=dq_partials, **_block_centric_tile(ctx.meta["G"]), **ctx.meta,
            )
            if dq_partials:
                _sum_dq_parts_kernel[(triton.cdiv(num_q * heads_q, 32),)](
                    dq_parts, starts, dq, num_q, dq_parts.stride(0), starts.stride(0), starts.stride(1), heads_kv,
                    G=ctx.meta["G"], NUM_SLOTS=slots, BLOCK_R=32, D=dim, BLOCK_D=ctx.meta["BLOCK_D"],
                )
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None


def block_attention(
    q: Tensor, k: Tensor, v: Tensor, block_starts: Tensor, block_size: int, hi: Tensor, scale: float,
    num_splits: int | None = None, block_centric: bool | None = None,
) -> Tensor:
    """Triton version of `reference.block_attention`.

    `block_centric`: the forward loads each selected block once for all the queries that chose it
    (partial results per query and slot, then merged), instead of once per query. None picks it for
    full passes (many queries) whose partials fit `_PARTIALS_BUDGET`. The backward is always block-centric.
    `num_splits`: for the query-centric forward, programs that share each query's selected blocks
    (None: enough to fill the GPU when there are few queries, as when decoding); it implies query-centric.
    Queries past `_LAUNCH_ELEMENTS` of gathered elements (`_gathered_per_query`) run in chunks, each its own
    pass: the block-centric kernels gather queries with int32 offsets.
    """
    num_q, heads_q, dim = q.shape
    heads_kv, dim_v = v.shape[1:]
    slots = block_starts.shape[-1]
    if block_centric is None:
        block_centric = _use_block_centric(num_q, heads_q, slots, dim_v, q.dtype, num_splits)
    chunks = _row_chunks(num_q, _gathered_per_query(heads_q, heads_kv, dim, dim_v, slots, block_centric))
    if len(chunks) <= 1:
        return _BlockAttention.apply(q, k, v, block_starts, block_size, hi, scale, num_splits, block_centric)
    # Queries are independent given their blocks: the chunks' outputs concatenate, their k and v gradients add up.
    return torch.cat([
        _BlockAttention.apply(q[a:b], k, v, block_starts[a:b], block_size, hi[a:b], scale, num_splits, block_centric)
        for a, b in chunks
    ])


def _gathered_per_query(heads_q: int, heads_kv: int, dim: int, dim_v: int, slots: int, block_centric: bool) -> int:
    """Elements per query of the largest tensor that the block-centric kernels index by query, in int32: q, o and
    dO, the entries of the inverted selection, and with a block-centric forward its per-slot partial outputs (the
    backward's dq parts are bounded by `_PARTIALS_BUDGET`; the key store is addressed from int64 block bases)."""
    return max(heads_q * max(dim, dim_v) * (slots if block_centric else 1), heads_kv * slots)


@triton.autotune(configs=_tuning_configs(stages=(1, 2, 3)), key=["G_PAD", "BLOCK_T", "BLOCK_D", "BLOCK_J", "NUM_SPLITS"])
@triton.jit
def _select_blocks_kernel(
    Q, KC, LSE, CMP_OFF, POS, TILE_START, TILE_LEN, OUT, RANKED,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_ot, stride_oh, stride_rs,
    scale,
    G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_T: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    L: tl.constexpr, STRIDE: tl.constexpr, SEL: tl.constexpr, BLOCK_J: tl.constexpr, HALO: tl.constexpr,
    NUM_SELECTED: tl.constexpr, NUM_INIT: tl.constexpr, NUM_LOCAL: tl.constexpr, NUM_SPLITS: tl.constexpr,
    RUN_LENGTH: tl.constexpr,
):
    """Block selection fused: Eq. 9 and 10 scores, forced blocks and top-n, for BLOCK_T tokens x one key head.

    A tile holds consecutive tokens of one document (so they share their compressed keys) x the G heads
    of one key head. It walks tiles of BLOCK_J selection blocks; each reads its own M * BLOCK_J
    compressed blocks (the R - 1 before it that also overlap it are carried from the previous tile),
    scores them, and merges them into a running top-BLOCK_J list by a bitonic sort. Nothing but the chosen indices reaches HBM.
    Scores are ranked as in `reference.top_blocks`: int64 keys of float32 bits above the reversed block
    index, so ties go to the lower index; forced blocks rank first; non-candidates are -1.
    With NUM_SPLITS > 1 (decoding), program_id(2) ranks one share of the selection blocks and writes its
    top-BLOCK_J keys to RANKED; the shares' lists are merged afterwards (`select_blocks`).
    """
    R: tl.constexpr = L // STRIDE
    M: tl.constexpr = SEL // STRIDE
    ROWS: tl.constexpr = BLOCK_T * G_PAD
    kv_head = tl.program_id(1)
    heads_q = G * tl.num_programs(1)
    first, length = _program_tile(TILE_START, TILE_LEN, RUN_LENGTH, BLOCK_T)
    rows = tl.arange(0, ROWS)
    token = first + rows // G_PAD
    group = rows % G_PAD
    row_ok = (rows // G_PAD < length) & (group < G)
    head = kv_head * G + group
    offset = tl.load(CMP_OFF + first).to(tl.int32)
    pos = tl.load(POS + token, mask=row_ok, other=-1).to(tl.int32)
    count = tl.where(pos + 1 >= L, (pos + 1 - L) // STRIDE + 1, 0)
    tile_tokens = first + tl.arange(0, BLOCK_T)
    t_ok = tl.arange(0, BLOCK_T) < length
    tile_pos = tl.load(POS + tile_tokens, mask=t_ok, other=-1).to(tl.int32)
    current = tile_pos // SEL  # the block holding each token
    # int64 bases at the tile's first token and its document's first compressed key; offsets past them are int32.
    KC = _at_row(KC, offset, stride_kt) + kv_head * stride_kh
    token -= first
    dq = tl.arange(0, BLOCK_D)
    q = tl.load(_at_row(Q, first, stride_qt) + token[:, None] * stride_qt + head[:, None] * stride_qh + dq[None, :],
                mask=row_ok[:, None] & (dq < D)[None, :], other=0.0)
    lse = tl.load(_at_row(LSE, first, heads_q) + token * heads_q + head, mask=row_ok, other=0.0)
    lse = tl.where(lse == float("-inf"), 0.0, lse)
    local_i = tl.arange(0, BLOCK_J * M)
    local_j = tl.arange(0, BLOCK_J)
    halo_i = tl.arange(0, HALO) - HALO
    TAIL_CHUNKS: tl.constexpr = BLOCK_J * M // HALO
    carry = tl.zeros([BLOCK_T, BLOCK_J], tl.float32)
    best = tl.full([BLOCK_T, BLOCK_J], -1, tl.int64)
    # This split's share of the tiles of BLOCK_J selection blocks.
    num_tiles = tl.max(current, axis=0) // BLOCK_J + 1
    share = tl.cdiv(num_tiles, NUM_SPLITS)
    tile_begin = tl.minimum(tl.program_id(2) * share, num_tiles)
    tile_end = tl.minimum(tile_begin + share, num_tiles)
    # With R > 1, a share starts one tile early: that tile only computes the carry into its first tile.
    first_j = tile_begin * BLOCK_J
    if R > 1:  # a compile-time branch: nested, not joined with the runtime condition
        if (tile_begin > 0) & (tile_begin < tile_end):
            tile_begin -= 1
    for tile in range(tile_begin, tile_end):
        j0 = tile * BLOCK_J
        j = j0 + local_j
        # Main part: compressed blocks i in [j0*M, (j0 + BLOCK_J)*M).
        i = j0 * M + local_i
        k = tl.load(KC + i[:, None] * stride_kt + dq[None, :],
                    mask=(i < tl.max(count, axis=0))[:, None] & (dq < D)[None, :], other=0.0)
        p = tl.exp(tl.dot(q, tl.trans(k)) * scale - lse[:, None])
        p = tl.where(row_ok[:, None] & (i[None, :] < count[:, None]), p, 0.0)
        p = tl.sum(tl.reshape(p, [BLOCK_T, G_PAD, BLOCK_J * M]), axis=1)  # Eq. 10: sum over the group
        overlap = tl.minimum(i[:, None] + R, (j[None, :] + 1) * M) - tl.maximum(i[:, None], j[None, :] * M)
        weights = tl.maximum(overlap, 0).to(tl.float32)  # Eq. 9, in units of d tokens
        if BLOCK_T >= 16 and BLOCK_J >= 16:  # large tiles: on the tensor cores, in exact fp32
            scores = tl.dot(p, weights, input_precision="ieee")
        else:
            scores = tl.sum(p[:, :, None] * weights[None, :, :], axis=1)  # [BLOCK_T, BLOCK_J]
        if R > 1:
            # Compressed blocks that start before a tile and reach into it are the previous tile's last
            # R - 1: their share was carried over; the tail of this tile is carried to the next one.
            scores += carry
            tail = tl.reshape(p, [BLOCK_T, TAIL_CHUNKS, HALO])
            tail = tl.sum(tl.where(tl.arange(0, TAIL_CHUNKS)[None, :, None] == TAIL_CHUNKS - 1, tail, 0.0), axis=1)
            next_j0 = j0 + BLOCK_J
            i = next_j0 * M + halo_i
            next_j = next_j0 + local_j
            overlap = tl.minimum(i[:, None] + R, (next_j[None, :] + 1) * M) - tl.maximum(i[:, None], next_j[None, :] * M)
            overlap = tl.where((i >= next_j0 * M - R + 1)[:, None], tl.maximum(overlap, 0), 0)
            carry = tl.sum(tail[:, :, None] * overlap.to(tl.float32)[None, :, :], axis=1)
        candidate = (j[None, :] <= current[:, None]) & (j[None, :] >= first_j)
        forced = candidate & ((j[None, :] < NUM_INIT) | (j[None, :] > current[:, None] - NUM_LOCAL))
        bits = tl.where(forced, float("inf"), tl.maximum(scores, 0.0)).to(tl.int32, bitcast=True).to(tl.int64)
        keys = tl.where(candidate, (bits << 32) | (2147483647 - j[None, :]).to(tl.int64), -1)
        # Merge the best BLOCK_J of the running list and this tile by one bitonic sort of both. Always: skipping
        # tiles whose keys all lose to the list's worst needs a reduction over the whole tile, which cost more
        # than the sorts it saved (H200, seed shape at 32k: 1.10 ms per layer always, 1.27 with the test).
        merged = tl.sort(tl.reshape(tl.join(best, keys), [BLOCK_T, 2 * BLOCK_J]), dim=1, descending=True)
        best, _ = tl.split(tl.permute(tl.reshape(merged, [BLOCK_T, 2, BLOCK_J]), [0, 2, 1]))
    if NUM_SPLITS == 1:
        chosen = tl.where(best >= 0, 2147483647 - (best & 0xFFFFFFFF), -1).to(tl.int32)
        out = _at_row(OUT, first, stride_ot) + kv_head * stride_oh + tl.arange(0, BLOCK_T)[:, None] * stride_ot
        tl.store(out + local_j[None, :], chosen, mask=t_ok[:, None] & (local_j[None, :] < NUM_SELECTED))
    else:  # RANKED [NUM_SPLITS, Nq, H, BLOCK_J]
        ranked = _at_row(_at_row(RANKED, tl.program_id(2), stride_rs), first, tl.num_programs(1) * BLOCK_J)
        ranked += (tl.arange(0, BLOCK_T)[:, None] * tl.num_programs(1) + kv_head) * BLOCK_J
        tl.store(ranked + local_j[None, :], best, mask=t_ok[:, None])


def _document_tiles(layout: QueryLayout, tile: int) -> tuple[Tensor, Tensor, int]:
    """Tiles of at most `tile` consecutive queries that never cross a document: (first, length, count);
    computed in the kernel for runs of `layout.run_length` queries (decoding), from the host document
    boundaries of a full pass, and only otherwise with a host sync."""
    positions = layout.positions
    if layout.run_length is not None:
        return positions, positions, positions.numel() // layout.run_length * triton.cdiv(layout.run_length, tile)
    if layout.documents is not None:
        return _document_pieces(layout.documents, tile, positions.device)
    new_doc = torch.ones_like(positions, dtype=torch.bool)
    new_doc[1:] = (layout.cmp_offsets[1:] != layout.cmp_offsets[:-1]) | (positions[1:] != positions[:-1] + 1)
    doc_start = torch.nonzero(new_doc).flatten()
    doc_len = torch.diff(doc_start, append=doc_start.new_tensor([positions.numel()]))
    first, length = _split_runs(doc_start, doc_len, tile)
    return first.to(torch.int32), length.to(torch.int32), first.numel()


@torch.no_grad()
def select_blocks(
    q: Tensor, k_cmp: Tensor, lse: Tensor, layout: QueryLayout, pattern: SparsePattern, scale: float,
    num_splits: int | None = None,
) -> Tensor:
    """Triton version of `reference.select_blocks_varlen`: [Nq, H, n] int32, the same rule, one fused kernel.

    `num_splits`: programs that share each tile's selection blocks, their top lists merged by one top-k
    (None: enough to fill the GPU when there are few tiles, as when decoding).
    """
    m = pattern.select_block_size // pattern.compress_stride
    if m & (m - 1):
        raise ValueError("the Triton backend needs select_block_size / compress_stride to be a power of two.")
    num_q, heads_q, dim = q.shape
    heads_kv = k_cmp.shape[1]
    groups = heads_q // heads_kv
    q, k_cmp = q.contiguous(), k_cmp.contiguous()
    if k_cmp.shape[0] == 0:  # no compressed block yet: every score is 0; a one-row store keeps the pointer valid
        k_cmp = k_cmp.new_zeros(1, *k_cmp.shape[1:])
    n = pattern.num_selected_blocks
    out = torch.empty(num_q, heads_kv, n, device=q.device, dtype=torch.int32)
    if num_q == 0:
        return out
    r = pattern.compress_block_size // pattern.compress_stride
    g_pad = triton.next_power_of_2(groups)
    # At least 16 tokens per tile where that stays within 128 rows: the scores then run on the tensor cores
    # and each step's keys and top-n merge serve more tokens (H200, seed shape G = 6 at 32k: 1.24 ms per
    # layer with 16 tokens, 1.78 with 8). G = 16 keeps 64 rows: 128 measured slower there.
    block_t = _tile_tokens(g_pad, layout.run_length, rows=max(64, 16 * g_pad) if g_pad <= 8 else 64)
    block_j = max(triton.next_power_of_2(n), 16 if m <= 4 else 64 // m)
    first, length, num_tiles = memoized(layout.memo, ("document_tiles", block_t), lambda: _document_tiles(layout, block_t))
    splits = num_splits or _num_splits(num_tiles * heads_kv, q.device)
    ranked = torch.empty(splits, num_q, heads_kv, block_j, device=q.device, dtype=torch.int64) if splits > 1 else out
    _select_blocks_kernel[(num_tiles, heads_kv, splits)](
        q, k_cmp, lse.contiguous(), layout.cmp_offsets.contiguous(), layout.positions.contiguous(), first, length, out, ranked,
        q.stride(0), q.stride(1), k_cmp.stride(0), k_cmp.stride(1), out.stride(0), out.stride(1),
        num_q * heads_kv * block_j, scale,
        G=groups, G_PAD=g_pad, BLOCK_T=block_t, D=dim, BLOCK_D=_pow2(dim), L=pattern.compress_block_size,
        STRIDE=pattern.compress_stride, SEL=pattern.select_block_size, BLOCK_J=block_j, HALO=_pow2(r - 1),
        NUM_SELECTED=n, NUM_INIT=pattern.num_init_blocks, NUM_LOCAL=pattern.num_local_blocks, NUM_SPLITS=splits,
        RUN_LENGTH=layout.run_length or 0,
    )
    if splits == 1:
        return out
    # The top n of the union of the shares' top lists is the top n overall.
    best = torch.topk(ranked.permute(1, 2, 0, 3).reshape(num_q, heads_kv, -1), n, dim=-1).values
    return torch.where(best >= 0, 2**31 - 1 - (best & 0xFFFFFFFF), -1).to(torch.int32)

