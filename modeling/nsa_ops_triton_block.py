# Generated from src/nsa_hf by `nsa-hf export-remote-code` (nsa_hf/remote_code.py); do not edit.
"""Block attention (selection) as Triton kernels, forward and backward: query i reads the n blocks
[start, start + block_size) it selected, keys s < hi[i], exactly `nsa_hf.ops.reference.block_attention`.

Full passes are block-centric: the selection is inverted on the GPU (for each block, the queries that chose it,
without a host sync: `_queries_per_block`) and each block is loaded once for BLOCK_Q of its queries x their G
heads, so small GQA groups still fill the tensor cores. The forward writes a partial (o, lse) per query and
slot, merged afterwards; the backward accumulates dk/dv in registers per block (only pieces of long query lists
meet in fp32 atomics) and stores dq per slot. Decoding (few queries) runs query-centric: one program per token x
key head, its n blocks split over programs.

The block-centric kernels gather queries by index, so block attention runs queries past `_LAUNCH_ELEMENTS`
gathered elements in chunks.
"""

from __future__ import annotations

import functools

import torch
try:  # optional package: in a try block, transformers' check_imports does not require it
    import triton
    import triton.language as tl
except ImportError:
    raise
from torch import Tensor

from .nsa_ops_library import eager_block_attention
from .nsa_ops_triton_common import _LAUNCH_ELEMENTS as common__LAUNCH_ELEMENTS
from .nsa_ops_triton_common import (
    _at_row,
    _bisect_step,
    _cdiv,
    _combine_splits,
    _dkv_step,
    _key_bases,
    _kv_tile,
    _multiprocessors,
    _num_splits,
    _online_softmax_step,
    _pow2,
    _query_bases,
    _query_rows,
    _row_chunks,
    _softmax_delta,
    _softmax_finish,
    _split_outputs,
    _tile_rows,
    _tile_tokens,
    _tuning_configs,
)

__all__ = ["block_attention", "block_backward", "block_forward", "block_residual_size"]


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
            key_ok = (offsets < BLOCK_SIZE) & (offsets < hi - start)  # offsets, not keys: see `_piece`
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
    """Entries, key head, block start, key offsets in the block and their validity of one piece of a selected block's
    query list (`_queries_per_block`). The forward kernels compare offsets, not keys, with each query's bound
    (hi - start): masks built from `start + offsets` beside loads from the block's base made Triton 3.6 emit a slower
    loop (benchmarks/results/issue14/kernels.txt). The backward, below 2**31 key elements, compares keys instead: it
    reads from the store's own base (`_block_bwd_kernel`)."""
    first = tl.load(PIECE_FIRST + piece)
    length = tl.load(PIECE_LEN + piece)
    block_key = tl.load(SORTED_KEY + first)
    start = block_key % num_k
    offsets = tl.arange(0, BLOCK_S)
    in_block = (offsets < BLOCK_SIZE) & (offsets < num_k - start)  # the last block of a store may be partial
    return first, length, block_key // num_k, start, offsets, in_block


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
        first, length, kv_head, start, offsets, in_block = _piece(PIECE_FIRST, PIECE_LEN, SORTED_KEY, piece, num_k,
                                                                  BLOCK_SIZE, BLOCK_S)
        k_block, v_block = _key_bases(K, V, start, kv_head, stride_kt, stride_kh, stride_vt, stride_vh)
        k, v = _kv_tile(k_block, v_block, offsets, in_block, stride_kt, stride_vt, D, DV, BLOCK_D, BLOCK_DV)
        for e0 in range(0, length, BLOCK_Q):
            token, slot, head, row_ok, hi = _entry_rows(ENTRY, HI, first, e0, length, kv_head, heads_kv, num_slots,
                                                        G, ROWS, BLOCK_Q)
            q = tl.load(Q + token[:, None] * stride_qt + head[:, None] * stride_qh + dq_idx[None, :],
                        mask=row_ok[:, None] & (dq_idx < D)[None, :], other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale
            s = tl.where(row_ok[:, None] & in_block[None, :] & (offsets[None, :] < (hi - start)[:, None]), s, float("-inf"))
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
            key_ok = (offsets < BLOCK_SIZE) & (offsets < hi - start)  # offsets, not keys: see `_piece`
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
    WIDE_KEYS: tl.constexpr,
):
    """Block-centric backward: dk, dv of one selected block from (a piece of) the queries that chose it,
    accumulated in registers (fp32 atomics only where a long query list is cut into pieces). Each query
    reads n blocks, so its dq has n parts: with DQ_PARTIALS they are stored per slot (DQ [n, Nq, HQ, D],
    summed afterwards); without, `_block_bwd_dq_kernel` computes dq (atomics for it measured slower).

    WIDE_KEYS (a key store past `_LAUNCH_ELEMENTS`): K, V, DK and DV are addressed from int64 bases at each block.
    Otherwise from the stores' own bases with int32 rows, as this kernel runs faster: unlike the forward's, its
    loop holds dk and dv, and the int64 bases cost it registers (a spill at 4 warps)."""
    dq_idx = tl.arange(0, BLOCK_D)
    dv_idx = tl.arange(0, BLOCK_DV)
    for piece in range(tl.program_id(0), tl.load(TOTAL), tl.num_programs(0)):
        first, length, kv_head, start, offsets, in_block = _piece(PIECE_FIRST, PIECE_LEN, SORTED_KEY, piece, num_k,
                                                                  BLOCK_SIZE, BLOCK_S)
        if WIDE_KEYS:  # int64 bases at the block, rows counted from it
            row0, rows = start, offsets
        else:  # the stores' own bases and int32 rows, the masks built from the rows too
            row0, rows = 0, start + offsets
            in_block = (offsets < BLOCK_SIZE) & (rows < num_k)
        k_block, v_block = _key_bases(K, V, row0, kv_head, stride_kt, stride_kh, stride_vt, stride_vh)
        k, v = _kv_tile(k_block, v_block, rows, in_block, stride_kt, stride_vt, D, DV_DIM, BLOCK_D, BLOCK_DV)
        dk = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_S, BLOCK_DV], tl.float32)
        for e0 in range(0, length, BLOCK_Q):
            token, slot, head, row_ok, hi = _entry_rows(ENTRY, HI, first, e0, length, kv_head, heads_kv, num_slots,
                                                        G, ROWS, BLOCK_Q)
            q, do, lse, delta = _query_rows(Q, DO, LSE, DELTA, token, head, row_ok, stride_qt, stride_qh,
                                            stride_dot, stride_doh, G * heads_kv, D, DV_DIM, BLOCK_D, BLOCK_DV)
            valid = row_ok[:, None] & in_block[None, :] & (rows[None, :] < (hi - row0)[:, None])
            dk, dv, ds = _dkv_step(q, do, lse, delta, k, v, valid, scale, dk, dv)
            if DQ_PARTIALS:
                tl.store(DQ + slot[:, None] * stride_dqs + token[:, None] * stride_dqt + head[:, None] * stride_dqh
                         + dq_idx[None, :], tl.dot(ds.to(k.dtype), k) * scale, mask=row_ok[:, None] & (dq_idx < D)[None, :])
        dk_block, dv_block = _key_bases(DK, DV, row0, kv_head, stride_dkt, stride_dkh, stride_dvt, stride_dvh)
        tl.atomic_add(dk_block + rows[:, None] * stride_dkt + dq_idx[None, :], dk * scale,
                      mask=in_block[:, None] & (dq_idx < D)[None, :])
        tl.atomic_add(dv_block + rows[:, None] * stride_dvt + dv_idx[None, :], dv,
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
    for _ in range(search_steps):  # the first entry with this key, the first past it
        run_lo, run_hi = _bisect_step(SORTED_KEY, key - 1, run_lo, run_hi, ok)
        end_lo, end_hi = _bisect_step(SORTED_KEY, key, end_lo, end_hi, ok)
    starts = ok & (key < none) & ((index - run_lo) % PIECE == 0)
    slot = tl.atomic_add(COUNT, tl.sum(starts.to(tl.int32), axis=0)) + tl.cumsum(starts.to(tl.int32), axis=0) - 1
    tl.store(PIECE_FIRST + slot, index, mask=starts)
    tl.store(PIECE_LEN + slot, tl.minimum(end_lo - index, PIECE), mask=starts)


def _queries_per_block(block_starts: Tensor, num_keys: int, piece: int) -> Tensor:
    """Invert the selection without a host sync: entries (query, key head, slot) sorted by the block they
    read, and the pieces of at most `piece` entries of one block that the block-centric kernels take.

    Returns one int32 buffer [4 E + 1], E = Nq * H * n, that `_inverted_views` cuts into (count [1], piece_first [E],
    piece_len [E], sorted_key [E], entry [E]): pieces below `count` are valid, in no particular order; a piece's key
    is key head * num_keys + block start; an entry is (query * H + key head) * n + slot. Every array has a size
    known on the host, so nothing waits for the GPU (the kernels read `count` themselves). One buffer, so that the
    forward can keep it for the backward as one tensor. Two small kernels around one sort: the host queues five
    launches per layer where PyTorch ops took some thirty, each about 20 us on the H200 machine's host.
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
    inverted = torch.empty(4 * num_entries + 1, device=device, dtype=torch.int32)
    count, piece_first, piece_len, sorted_key, entry = _inverted_views(inverted)
    count.zero_()
    if num_entries == 0:
        return inverted
    keys = torch.empty(num_entries, device=device, dtype=torch.int32)
    grid = (_cdiv(num_entries, 1024),)
    _block_keys_kernel[grid](block_starts, keys, num_entries, heads_kv, slots, num_keys, BLOCK=1024)
    _, order = torch.sort(keys, stable=True, out=(sorted_key, torch.empty(0, device=device, dtype=torch.long)))
    entry.copy_(order)
    _block_pieces_kernel[grid](
        sorted_key, count, piece_first, piece_len, num_entries, none, num_entries.bit_length(), PIECE=piece, BLOCK=1024,
    )
    return inverted


def _inverted_views(inverted: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(count, piece_first, piece_len, sorted_key, entry) of a `_queries_per_block` buffer."""
    entries = (inverted.numel() - 1) // 4
    return inverted[:1], *inverted[1:].view(4, entries).unbind(0)


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


def _block_forward_pass(
    q: Tensor, k: Tensor, v: Tensor, starts: Tensor, block_size: int, hi: Tensor, scale: float, num_splits: int | None,
    block_centric: bool,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(o, lse, the inverted selection when block-centric) of one launch's queries (fewer than `_LAUNCH_ELEMENTS`
    gathered elements)."""
    num_q, heads_q, dim = q.shape
    num_k, heads_kv, dim_v = v.shape
    groups = heads_q // heads_kv
    slots = starts.shape[-1]
    meta = _block_meta(groups, block_size, dim, dim_v)
    inverted = None
    if block_centric and num_q:
        inverted = _queries_per_block(starts, num_k, piece=_PIECE)
        pieces = _inverted_views(inverted)
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
        per_split = _cdiv(slots, splits)
        splits = _cdiv(slots, per_split)
        o, lse = _split_outputs(splits, num_q, heads_q, dim_v, q.dtype, q.device)
        if num_q:
            _block_fwd_kernel[(num_q, heads_kv, splits)](
                q, k, v, starts, hi, o, lse,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                o.stride(0), o.stride(1), o.stride(2), lse.stride(0), starts.stride(0), starts.stride(1), scale,
                G_PAD=_pow2(groups), NUM_SLOTS=slots, DV=dim_v, SLOTS_PER_SPLIT=per_split, **meta,
            )
    return *_combine_splits(o, lse, q.dtype), inverted


def _block_backward_pass(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, delta: Tensor, starts: Tensor, block_size: int, hi: Tensor,
    scale: float, dk: Tensor, dv: Tensor, inverted: Tensor | None,
) -> Tensor:
    """dq of one launch's queries; their dk and dv are added into the fp32 `dk` and `dv`. `inverted`: the forward's
    inverted selection of these queries, or None to invert it again."""
    num_q, heads_q, dim = q.shape
    num_k, heads_kv, dim_v = v.shape
    groups = heads_q // heads_kv
    slots = starts.shape[-1]
    meta = _block_meta(groups, block_size, dim, dim_v)
    dq_partials = _partials_fit(slots, num_q, heads_q, dim, q.dtype)
    dq = torch.empty_like(q)
    if not num_q:
        return dq
    # Per-slot dq parts, summed below; unused slots are never written, so no zero fill.
    dq_parts = torch.empty(slots, *q.shape, device=q.device, dtype=q.dtype) if dq_partials else dq
    pieces = _inverted_views(_queries_per_block(starts, num_k, piece=_PIECE) if inverted is None else inverted)
    if not dq_partials:
        _block_bwd_dq_kernel[(num_q, heads_kv)](
            q, k, v, do, lse, delta, starts, hi, dq, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            v.stride(0), v.stride(1), do.stride(0), do.stride(1), starts.stride(0), starts.stride(1), scale,
            G_PAD=_pow2(groups), NUM_SLOTS=slots, DV_DIM=dim_v, **meta,
        )
    dq_strides = dq_parts.stride()[:3] if dq_partials else (0, 0, 0)
    _block_bwd_kernel[(_persistent_programs(q.device, pieces[1].numel()),)](
        q, k, v, do, lse, delta, hi, *pieces, dq_parts, dk, dv,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
        *dq_strides, dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        heads_kv, slots, num_k, scale,
        DV_DIM=dim_v, DQ_PARTIALS=dq_partials, WIDE_KEYS=max(k.numel(), v.numel()) > common__LAUNCH_ELEMENTS,
        **_block_centric_tile(groups), **meta,
    )
    if dq_partials:
        _sum_dq_parts_kernel[(_cdiv(num_q * heads_q, 32),)](
            dq_parts, starts, dq, num_q, dq_parts.stride(0), starts.stride(0), starts.stride(1), heads_kv,
            G=groups, NUM_SLOTS=slots, BLOCK_R=32, D=dim, BLOCK_D=meta["BLOCK_D"],
        )
    return dq


def _block_meta(groups: int, block_size: int, dim: int, dim_v: int) -> dict[str, int]:
    return dict(G=groups, BLOCK_SIZE=block_size, BLOCK_S=_pow2(block_size), D=dim, BLOCK_D=_pow2(dim), BLOCK_DV=_pow2(dim_v))


def _launches(q: Tensor, v: Tensor, slots: int, block_centric: bool) -> list[tuple[int, int]]:
    """Query ranges of the launches: below `_LAUNCH_ELEMENTS` gathered elements each (`_gathered_per_query`)."""
    heads_q, dim = q.shape[1:]
    heads_kv, dim_v = v.shape[1:]
    return _row_chunks(q.shape[0], _gathered_per_query(heads_q, heads_kv, dim, dim_v, slots, block_centric))


def block_forward(
    q: Tensor, k: Tensor, v: Tensor, block_starts: Tensor, block_size: int, hi: Tensor, scale: float,
    num_splits: int | None = None, block_centric: bool | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(o, lse, residual) of `reference.block_attention`; `num_splits` and `block_centric` as in `block_attention`.
    The residual (int32) is the inverted selection when the forward ran block-centric in one launch, which
    `block_backward` then takes instead of sorting again; empty otherwise (`block_residual_size`)."""
    num_q, heads_q, _ = q.shape
    dim_v = v.shape[2]
    slots = block_starts.shape[-1]
    if block_centric is None:
        block_centric = _use_block_centric(num_q, heads_q, slots, dim_v, q.dtype, num_splits)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    starts, hi = block_starts.contiguous(), hi.contiguous()  # int32 or int64
    # Queries are independent given their blocks: the launches' outputs concatenate.
    parts = [
        _block_forward_pass(q[a:b], k, v, starts[a:b], block_size, hi[a:b], scale, num_splits, block_centric)
        for a, b in _launches(q, v, slots, block_centric)
    ]
    no_residual = q.new_empty(0, dtype=torch.int32)
    if len(parts) == 1:
        o, lse, inverted = parts[0]
        return o, lse, no_residual if inverted is None else inverted
    if not parts:
        return q.new_zeros(0, heads_q, dim_v), q.new_zeros(0, heads_q, dtype=torch.float32), no_residual
    return torch.cat([part[0] for part in parts]), torch.cat([part[1] for part in parts]), no_residual


def block_residual_size(q: Tensor, k: Tensor, v: Tensor, block_starts: Tensor) -> int:
    """Elements of the residual that `block_forward` returns with its default settings (for the op's fake): as
    `_launches` decides, but by comparisons only, so that a symbolic query count stays symbolic under
    torch.compile (dynamic shapes)."""
    num_q, heads_q, dim = q.shape
    heads_kv, dim_v = v.shape[1:]
    slots = block_starts.shape[-1]
    if not _use_block_centric(num_q, heads_q, slots, dim_v, q.dtype, None):
        return 0
    per_query = _gathered_per_query(heads_q, heads_kv, dim, dim_v, slots, block_centric=True)
    return 4 * block_starts.numel() + 1 if num_q * per_query <= common__LAUNCH_ELEMENTS else 0


def block_backward(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, residual: Tensor, block_starts: Tensor,
    block_size: int, hi: Tensor, scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of `block_forward` for the output gradient `do` (block-centric, whichever forward ran);
    `residual` as `block_forward` returned it."""
    q, k, v, do = q.contiguous(), k.contiguous(), v.contiguous(), do.contiguous()
    starts, hi = block_starts.contiguous(), hi.contiguous()
    delta = _softmax_delta(do, o)
    dk = torch.zeros(k.shape, device=k.device, dtype=torch.float32)
    dv = torch.zeros(v.shape, device=v.device, dtype=torch.float32)
    launches = _launches(q, v, starts.shape[-1], block_centric=False)
    # A forward in one launch means a backward in one (its launches gather fewer elements per query).
    inverted = residual if residual.numel() and len(launches) == 1 else None
    # The launches' k and v gradients add up in dk and dv.
    dq = [
        _block_backward_pass(
            do[a:b], q[a:b], k, v, lse[a:b], delta[a:b], starts[a:b], block_size, hi[a:b], scale, dk, dv, inverted
        )
        for a, b in launches
    ]
    dq = dq[0] if len(dq) == 1 else (torch.cat(dq) if dq else torch.zeros_like(q))
    return dq, dk.to(k.dtype), dv.to(v.dtype)


def block_attention(
    q: Tensor, k: Tensor, v: Tensor, block_starts: Tensor, block_size: int, hi: Tensor, scale: float,
    num_splits: int | None = None, block_centric: bool | None = None,
) -> Tensor:
    """Triton version of `reference.block_attention`, with the tuning knobs exposed (the model reaches the same
    `block_forward` / `block_backward` through `nsa_hf.ops.library`).

    `block_centric`: the forward loads each selected block once for all the queries that chose it
    (partial results per query and slot, then merged), instead of once per query. None picks it for
    full passes (many queries) whose partials fit `_PARTIALS_BUDGET`. The backward is always block-centric.
    `num_splits`: for the query-centric forward, programs that share each query's selected blocks
    (None: enough to fill the GPU when there are few queries, as when decoding); it implies query-centric.
    Queries past `_LAUNCH_ELEMENTS` of gathered elements (`_gathered_per_query`) run in chunks, each its own
    launch: the block-centric kernels gather queries with int32 offsets.
    """
    forward = functools.partial(block_forward, num_splits=num_splits, block_centric=block_centric)
    return eager_block_attention(forward, block_backward, q, k, v, block_starts, block_size, hi, scale)


def _gathered_per_query(heads_q: int, heads_kv: int, dim: int, dim_v: int, slots: int, block_centric: bool) -> int:
    """Elements per query of the largest tensor that the block-centric kernels index by query, in int32: q, o and
    dO, the entries of the inverted selection, and with a block-centric forward its per-slot partial outputs (the
    backward's dq parts are bounded by `_PARTIALS_BUDGET`; the key store is addressed from int64 block bases)."""
    return max(heads_q * max(dim, dim_v) * (slots if block_centric else 1), heads_kv * slots)
