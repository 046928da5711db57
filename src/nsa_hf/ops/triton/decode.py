"""NSA attention for one query per row (decoding) in three launches.

1. The compressed branch, each query's keys split over programs (`interval_partials`): partial (o, lse).
2. Block selection, the selection blocks split over programs (`ranked_blocks`), from those partial lse merged in
   its kernel: each share's top-BLOCK_J keys.
3. `_decode_merge_kernel`, a few programs per (row, key head), each attending to a share of the n selected blocks
   and the window; the last of them to finish merges their softmax states and the compressed partials, and mixes
   the three branches with the gates. (One program per (row, key head) left a batch-1 step with a handful of
   programs, each walking all its keys one tile after another.)

The composed path runs eleven or more launches for the same step (each branch's kernel and its split merge, the
top-k over the shares, the block starts, the gate mix). The semantics are `composition.nsa_attention_varlen`'s.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..layout import BranchRanges, QueryLayout, SparsePattern, branch_ranges
from .common import (
    _at_row, _cdiv, _key_bases, _kv_tile, _num_splits, _online_softmax_step, _pow2, _prev_pow2, _softmax_finish,
)
from .interval import interval_partials
from .select import ranked_blocks, selection_tile_blocks

__all__ = ["decode_attention"]


@triton.jit
def _merge_partials(WORK, base, split_stride, read, NUM: tl.constexpr, NUM_PAD: tl.constexpr, ROWS: tl.constexpr,
                    BLOCK_DV: tl.constexpr):
    """One branch's output from NUM programs' online-softmax states (m, l [ROWS], acc [ROWS, BLOCK_DV], fp32, laid
    out from offset `base` every `split_stride` elements; NUM_PAD a power of two >= NUM), read only in the rows
    `read` [ROWS]; rows no program saw keys for give 0. The largest m from one load of all of them, then an unrolled
    loop whose loads wait on nothing but that (a loop issued each load after the previous one's result). L1 is
    bypassed: other multiprocessors wrote the states."""
    split = tl.arange(0, NUM_PAD)
    rows = tl.arange(0, ROWS)
    dv = tl.arange(0, BLOCK_DV)
    m = tl.load(WORK + base + split[:, None] * split_stride + rows[None, :],
                mask=(split < NUM)[:, None] & read[None, :], other=float("-inf"), cache_modifier=".cg")
    top = tl.max(m, axis=0)
    top_safe = tl.where(top == float("-inf"), 0.0, top)
    total = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_DV], tl.float32)
    for i in tl.static_range(NUM):
        at = WORK + base + i * split_stride
        weight = tl.exp(tl.load(at + rows, mask=read, other=float("-inf"), cache_modifier=".cg") - top_safe)
        total += tl.load(at + ROWS + rows, mask=read, other=0.0, cache_modifier=".cg") * weight
        acc += tl.load(at + 2 * ROWS + rows[:, None] * BLOCK_DV + dv[None, :], mask=read[:, None], other=0.0,
                       cache_modifier=".cg") * weight[:, None]
    return acc / tl.where(total > 0, total, 1.0)[:, None]


@triton.jit
def _store_partial(WORK, base, m_i, l_i, acc, ROWS: tl.constexpr, BLOCK_DV: tl.constexpr):
    """One branch's online-softmax state at offset `base` of WORK, as `_merge_partials` reads it."""
    rows = tl.arange(0, ROWS)
    tl.store(WORK + base + rows, m_i)
    tl.store(WORK + base + ROWS + rows, l_i)
    tl.store(WORK + base + 2 * ROWS + rows[:, None] * BLOCK_DV + tl.arange(0, BLOCK_DV)[None, :], acc)


@triton.jit
def _decode_merge_kernel(
    Q, O_CMP, LSE_CMP, CHOSEN, RANKED, KS, VS, KW, VW, GATES, KEY_OFF, KEY_END, WIN_LO, WIN_HI, OUT, WORK, ARRIVED,
    stride_qt, stride_qh, stride_ks_t, stride_ks_h, stride_vs_t, stride_vs_h, stride_kw_t, stride_kw_h,
    stride_vw_t, stride_vw_h, stride_os, stride_ot, stride_oh, stride_ls, stride_ct, stride_ch, stride_rs,
    stride_gt, stride_gh, stride_outt, stride_outh, scale,
    G: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, CMP_SPLITS: tl.constexpr, SEL_SPLITS: tl.constexpr, SEL_SPLITS_PAD: tl.constexpr,
    BLOCK_J: tl.constexpr, NUM_SELECTED: tl.constexpr, N_PAD: tl.constexpr, SEL: tl.constexpr, BLOCK_S: tl.constexpr,
    TILE_KEYS: tl.constexpr, BLOCKS_PER_TILE: tl.constexpr, KEY_SPLITS: tl.constexpr,
    KEY_SPLITS_PAD: tl.constexpr, CMP_SPLITS_PAD: tl.constexpr,
):
    """One query (row) x one key head x one share of its keys: its G heads in ROWS rows (padded to 16 for the tensor
    cores). SEL_SPLITS = 0: CHOSEN holds the selected blocks; else RANKED holds SEL_SPLITS top lists of BLOCK_J keys.
    The selection tiles, then the window's, go round-robin to KEY_SPLITS programs; with more than one, each leaves
    its two online-softmax states in WORK and the last to arrive (ARRIVED counts them) merges them, adds the
    compressed branch and mixes the gates."""
    token = tl.program_id(0)
    kv_head = tl.program_id(1)
    share = tl.program_id(2)
    heads_q = G * tl.num_programs(1)
    rows = tl.arange(0, ROWS)
    row_ok = rows < G
    head = kv_head * G + rows
    dq = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = tl.load(_at_row(Q, token, stride_qt) + head[:, None] * stride_qh + dq[None, :],
                mask=row_ok[:, None] & (dq < D)[None, :], other=0.0)

    # The selected blocks: the top NUM_SELECTED keys of the shares' lists (unique: the shares own disjoint blocks).
    slot = tl.arange(0, N_PAD)
    if SEL_SPLITS == 0:
        chosen = tl.load(_at_row(CHOSEN, token, stride_ct) + kv_head * stride_ch + slot, mask=slot < NUM_SELECTED,
                         other=-1)
    else:
        entry = tl.arange(0, SEL_SPLITS_PAD)[:, None] * stride_rs + tl.arange(0, BLOCK_J)[None, :]
        keys = tl.load(_at_row(RANKED, token * tl.num_programs(1) + kv_head, BLOCK_J) + entry,
                       mask=(tl.arange(0, SEL_SPLITS_PAD) < SEL_SPLITS)[:, None], other=-1)
        chosen = tl.full([N_PAD], -1, tl.int32)
        for i in range(NUM_SELECTED):
            best = tl.max(tl.max(keys, axis=1), axis=0)
            block = tl.where(best >= 0, 2147483647 - (best & 0xFFFFFFFF), -1).to(tl.int32)
            chosen = tl.where(slot == i, block, chosen)
            keys = tl.where(keys == best, -1, keys)
    # The selected blocks, BLOCKS_PER_TILE of them per step of TILE_KEYS keys: their keys are gathered by offsets
    # from the row's first key (int32, as any document's keys are: see common.py), so one step loads several
    # blocks at once and the loop has no branch (a step per block left a batch-1 step waiting on memory latency).
    key_off = tl.load(KEY_OFF + token)
    row_keys = (tl.load(KEY_END + token) - key_off).to(tl.int32)
    k_row, v_row = _key_bases(KS, VS, key_off, kv_head, stride_ks_t, stride_ks_h, stride_vs_t, stride_vs_h)
    column = tl.arange(0, TILE_KEYS)
    tile_slot = column // BLOCK_S
    in_block = column % BLOCK_S
    m_slc = tl.full([ROWS], float("-inf"), tl.float32)
    l_slc = tl.zeros([ROWS], tl.float32)
    acc_slc = tl.zeros([ROWS, BLOCK_DV], tl.float32)
    for first_slot in range(share * BLOCKS_PER_TILE, NUM_SELECTED, KEY_SPLITS * BLOCKS_PER_TILE):
        slot_of_column = first_slot + tile_slot
        block = tl.sum(tl.where(slot_of_column[:, None] == slot[None, :], chosen[None, :], 0), axis=1)
        keys_at = block * SEL + in_block
        key_ok = (slot_of_column < NUM_SELECTED) & (block >= 0) & (in_block < SEL) & (keys_at < row_keys)
        k, v = _kv_tile(k_row, v_row, keys_at, key_ok, stride_ks_t, stride_vs_t, D, DV, BLOCK_D, BLOCK_DV)
        s = tl.where(row_ok[:, None] & key_ok[None, :], tl.dot(q, tl.trans(k)) * scale, float("-inf"))
        m_slc, l_slc, acc_slc = _online_softmax_step(s, v, m_slc, l_slc, acc_slc)

    # The window: keys [lo, hi) of the window store, its tiles continuing the selection's round robin.
    win_lo = tl.load(WIN_LO + token).to(tl.int32)
    span = tl.load(WIN_HI + token).to(tl.int32) - win_lo
    k_base, v_base = _key_bases(KW, VW, win_lo, kv_head, stride_kw_t, stride_kw_h, stride_vw_t, stride_vw_h)
    m_win = tl.full([ROWS], float("-inf"), tl.float32)
    l_win = tl.zeros([ROWS], tl.float32)
    acc_win = tl.zeros([ROWS, BLOCK_DV], tl.float32)
    selection_tiles = (NUM_SELECTED + BLOCKS_PER_TILE - 1) // BLOCKS_PER_TILE
    first_window_tile = (share + KEY_SPLITS - selection_tiles % KEY_SPLITS) % KEY_SPLITS
    for start in range(first_window_tile * TILE_KEYS, span, KEY_SPLITS * TILE_KEYS):
        keys_at = start + column
        key_ok = keys_at < span
        k, v = _kv_tile(k_base, v_base, keys_at, key_ok, stride_kw_t, stride_vw_t, D, DV, BLOCK_D, BLOCK_DV)
        s = tl.where(row_ok[:, None] & key_ok[None, :], tl.dot(q, tl.trans(k)) * scale, float("-inf"))
        m_win, l_win, acc_win = _online_softmax_step(s, v, m_win, l_win, acc_win)

    if KEY_SPLITS == 1:
        o_slc, _ = _softmax_finish(acc_slc, m_slc, l_slc)
        o_win, _ = _softmax_finish(acc_win, m_win, l_win)
        take = row_ok
    else:
        # Two states of 2 * ROWS + ROWS * BLOCK_DV floats per program, the shares of one (row, key head) adjacent.
        state = ROWS * (2 + BLOCK_DV)
        group = token * tl.num_programs(1) + kv_head
        first = tl.cast(group, tl.int64) * KEY_SPLITS * (2 * state)
        base = first + share * (2 * state)
        _store_partial(WORK, base, m_slc, l_slc, acc_slc, ROWS, BLOCK_DV)
        _store_partial(WORK, base + state, m_win, l_win, acc_win, ROWS, BLOCK_DV)
        tl.debug_barrier()  # every thread's stores before the release below
        # The last share to arrive finishes (its acquire orders its reads after the others' stores); the others stop
        # here in effect: they read nothing more and store nothing.
        arrived = tl.atomic_add(ARRIVED + group, 1, sem="acq_rel")
        # Broadcast before comparing: Triton's interpreter turns a scalar bool & a vector into integers.
        take = row_ok & (tl.zeros([ROWS], tl.int32) + arrived == KEY_SPLITS - 1)
        o_slc = _merge_partials(WORK, first, 2 * state, take, KEY_SPLITS, KEY_SPLITS_PAD, ROWS, BLOCK_DV)
        o_win = _merge_partials(WORK, first + state, 2 * state, take, KEY_SPLITS, KEY_SPLITS_PAD, ROWS, BLOCK_DV)

    # The compressed branch: its shares' partial (o, lse), weighted by their lse. The largest lse from one load of
    # all of them, then an unrolled loop whose loads wait on nothing but that.
    O_CMP = _at_row(O_CMP, token, stride_ot) + head[:, None] * stride_oh + dv[None, :]
    LSE_CMP = _at_row(LSE_CMP, token, heads_q) + head
    cmp_split = tl.arange(0, CMP_SPLITS_PAD)
    # Offsets past the row's base in int32: at most CMP_SPLITS x the rows x heads of one decoding step.
    top = tl.max(tl.load(LSE_CMP[None, :] + cmp_split[:, None] * stride_ls,
                         mask=(cmp_split < CMP_SPLITS)[:, None] & take[None, :], other=float("-inf")), axis=0)
    top_safe = tl.where(top == float("-inf"), 0.0, top)
    total = tl.zeros([ROWS], tl.float32)
    o_cmp = tl.zeros([ROWS, BLOCK_DV], tl.float32)
    for split in tl.static_range(CMP_SPLITS):
        weight = tl.exp(tl.load(LSE_CMP + split * stride_ls, mask=take, other=float("-inf")) - top_safe)
        # A share that saw no key weighs 0 and may not have written its o: never read it.
        part = tl.load(_at_row(O_CMP, split, stride_os), mask=(weight > 0)[:, None] & (dv < DV)[None, :], other=0.0)
        o_cmp += part.to(tl.float32) * weight[:, None]
        total += weight
    o_cmp = o_cmp / tl.where(total > 0, total, 1.0)[:, None]

    # Eq. 5: the gate mix.
    GATES = _at_row(GATES, token, stride_gt) + head * stride_gh
    g_cmp = tl.load(GATES, mask=take, other=0.0).to(tl.float32)
    g_slc = tl.load(GATES + 1, mask=take, other=0.0).to(tl.float32)
    g_win = tl.load(GATES + 2, mask=take, other=0.0).to(tl.float32)
    out = o_cmp * g_cmp[:, None] + o_slc * g_slc[:, None] + o_win * g_win[:, None]
    tl.store(_at_row(OUT, token, stride_outt) + head[:, None] * stride_outh + dv[None, :],
             out.to(OUT.dtype.element_ty), mask=take[:, None] & (dv < DV)[None, :])


# Warps of a merge-kernel program: `_merge_tile_keys` sizes its tiles for 8.
_MERGE_WARPS = 8


def _merge_tile_keys(dim: int, dim_v: int) -> int:
    """Keys per step of the merge kernel: K and V tiles of 8K elements each (128 keys at head dim 64, 64 at 128), as
    many as 8 warps hold without spilling registers (sm_90, compiled ahead of time)."""
    return max(16, min(256, 8192 // _pow2(max(dim, dim_v))))


def _key_splits(programs: int, tiles: int, device: torch.device) -> int:
    """Programs per (row, key head) in the merge kernel: about two key tiles each, and no more than fill the GPU
    (`_num_splits`); 1 off CUDA."""
    return max(1, min(_num_splits(programs, device, limit=8), _cdiv(tiles, 2)))


def _store_splits(num_q: int, heads_kv: int, store_keys: int, pattern: SparsePattern,
                  device: torch.device) -> tuple[int, int]:
    """Shares of each row's compressed keys in the first launch and of its selection blocks in the second: enough
    programs to fill the GPU (`_num_splits`), but none with less than two steps of work (128 compressed keys; two
    tiles of selection blocks), since every share costs its fixed work and a partial the next launch merges. Sized
    by the store (`store_keys` compressed keys of all rows, which a static cache gives each row alike), known on the
    host, not by the rows' lengths on the GPU; a power of two below that bound, since each count compiles the
    kernels anew and a growing cache's store changes size as it decodes."""
    fill = _num_splits(num_q * heads_kv, device)
    keys = _cdiv(store_keys, max(num_q, 1))
    blocks = _cdiv(keys * pattern.compress_stride, pattern.select_block_size)

    def shares(work: int, step: int) -> int:
        return min(fill, _prev_pow2(max(1, work // step)))

    return shares(keys, 128), shares(blocks, 2 * selection_tile_blocks(pattern))


@torch.no_grad()
def decode_attention(
    q: Tensor, k_cmp: Tensor, v_cmp: Tensor, k_slc: Tensor, v_slc: Tensor, k_win: Tensor, v_win: Tensor, gates: Tensor,
    layout: QueryLayout, pattern: SparsePattern, scale: float, ranges: BranchRanges | None = None,
    num_splits: int | None = None, key_splits: int | None = None,
) -> Tensor:
    """`composition.nsa_attention_varlen` for one query per row (`layout.run_length == 1`), in three launches;
    not differentiable. Arguments as there; `num_splits` sets the shares of the first two launches (None: by the
    store's size, `_store_splits`) and `key_splits` those of the merge kernel's selected and window keys (None:
    enough to fill the GPU)."""
    if layout.run_length != 1:
        raise ValueError(f"decode_attention takes one query per row (layout.run_length == 1), got {layout.run_length}.")
    num_q, heads_q, dim = q.shape
    heads_kv, dim_v = k_slc.shape[1], v_slc.shape[2]
    groups = heads_q // heads_kv
    ranges = branch_ranges(layout, pattern) if ranges is None else ranges
    cmp_shares, select_shares = (num_splits, num_splits) if num_splits else _store_splits(
        num_q, heads_kv, k_cmp.shape[0], pattern, q.device)
    o_cmp, lse_cmp = interval_partials(q, k_cmp, v_cmp, ranges.cmp_lo, ranges.cmp_hi, scale, 1, num_splits=cmp_shares)
    chosen, ranked = ranked_blocks(q, k_cmp, lse_cmp, layout, pattern, scale, select_shares)
    out = torch.empty(num_q, heads_q, dim_v, device=q.device, dtype=q.dtype)
    if num_q == 0:
        return out
    q, k_slc, v_slc, k_win, v_win, gates = (x.contiguous() for x in (q, k_slc, v_slc, k_win, v_win, gates))
    sel_splits = 0 if ranked is None else ranked.shape[0]
    ranked = chosen if ranked is None else ranked  # a valid pointer where the kernel reads none
    block_s = _pow2(pattern.select_block_size)
    # Whole selected blocks per step: a block larger than the tile (128 keys at head dim 128) makes a larger tile, which
    # may spill registers; correct either way.
    tile_keys = max(block_s, _merge_tile_keys(dim, dim_v))
    blocks_per_tile = tile_keys // block_s
    rows, block_dv = _pow2(groups), _pow2(dim_v)
    if key_splits is None:
        tiles = _cdiv(pattern.num_selected_blocks, blocks_per_tile) + _cdiv(pattern.window_size, tile_keys)
        key_splits = _key_splits(num_q * heads_kv, tiles, q.device)
    work = arrived = out  # valid pointers that one share per (row, key head) never reads
    if key_splits > 1:
        # Each share's two softmax states, and a count of the shares done per (row, key head): zeroed per call, so
        # that calls on other streams never share a count.
        work = torch.empty(num_q * heads_kv * key_splits * 2 * rows * (2 + block_dv), device=q.device,
                           dtype=torch.float32)
        arrived = torch.zeros(num_q * heads_kv, device=q.device, dtype=torch.int32)
    _decode_merge_kernel[(num_q, heads_kv, key_splits)](
        q, o_cmp, lse_cmp, chosen, ranked, k_slc, v_slc, k_win, v_win, gates,
        layout.key_offsets.contiguous(), ranges.key_ends.contiguous(), ranges.win_lo.contiguous(),
        ranges.win_hi.contiguous(), out, work, arrived,
        q.stride(0), q.stride(1), k_slc.stride(0), k_slc.stride(1), v_slc.stride(0), v_slc.stride(1),
        k_win.stride(0), k_win.stride(1), v_win.stride(0), v_win.stride(1),
        o_cmp.stride(0), o_cmp.stride(1), o_cmp.stride(2), lse_cmp.stride(0), chosen.stride(0), chosen.stride(1),
        ranked.stride(0) if sel_splits else 0, gates.stride(0), gates.stride(1), out.stride(0), out.stride(1), scale,
        G=groups, ROWS=rows, D=dim, DV=dim_v, BLOCK_D=_pow2(dim), BLOCK_DV=block_dv,
        CMP_SPLITS=o_cmp.shape[0], SEL_SPLITS=sel_splits, SEL_SPLITS_PAD=_pow2(max(sel_splits, 1), 1),
        BLOCK_J=ranked.shape[-1] if sel_splits else 1, NUM_SELECTED=pattern.num_selected_blocks,
        N_PAD=_pow2(pattern.num_selected_blocks, 1), SEL=pattern.select_block_size,
        BLOCK_S=block_s, TILE_KEYS=tile_keys, BLOCKS_PER_TILE=blocks_per_tile, KEY_SPLITS=key_splits,
        KEY_SPLITS_PAD=_pow2(key_splits, 2), CMP_SPLITS_PAD=_pow2(o_cmp.shape[0], 2), num_warps=_MERGE_WARPS,
    )
    return out
