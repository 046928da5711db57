# Generated from src/nsa_hf by `nsa-hf export-remote-code` (nsa_hf/remote_code.py); do not edit.
"""NSA attention for one query per row (decoding) in three launches.

1. The compressed branch, each query's keys split over programs (`interval_partials`): partial (o, lse).
2. Block selection, the selection blocks split over programs (`ranked_blocks`), from those partial lse merged in
   its kernel: each share's top-BLOCK_J keys.
3. `_decode_merge_kernel`, one program per (row, key head): merges the compressed partials and the shares' top
   lists, attends to the n selected blocks and the window, and mixes the three branches with the gates.

The composed path runs eleven or more launches for the same step (each branch's kernel and its split merge, the
top-k over the shares, the block starts, the gate mix). The semantics are `composition.nsa_attention_varlen`'s.
"""

from __future__ import annotations

import torch
try:  # optional package: in a try block, transformers' check_imports does not require it
    import triton
    import triton.language as tl
except ImportError:
    raise
from torch import Tensor

from .nsa_ops_layout import BranchRanges, QueryLayout, SparsePattern, branch_ranges
from .nsa_ops_triton_common import _at_row, _key_bases, _kv_tile, _online_softmax_step, _pow2, _softmax_finish
from .nsa_ops_triton_interval import interval_partials
from .nsa_ops_triton_select import ranked_blocks

__all__ = ["decode_attention"]


@triton.jit
def _decode_merge_kernel(
    Q, O_CMP, LSE_CMP, CHOSEN, RANKED, KS, VS, KW, VW, GATES, KEY_OFF, KEY_END, WIN_LO, WIN_HI, OUT,
    stride_qt, stride_qh, stride_ks_t, stride_ks_h, stride_vs_t, stride_vs_h, stride_kw_t, stride_kw_h,
    stride_vw_t, stride_vw_h, stride_os, stride_ot, stride_oh, stride_ls, stride_ct, stride_ch, stride_rs,
    stride_gt, stride_gh, stride_outt, stride_outh, scale,
    G: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, CMP_SPLITS: tl.constexpr, SEL_SPLITS: tl.constexpr, SEL_SPLITS_PAD: tl.constexpr,
    BLOCK_J: tl.constexpr, NUM_SELECTED: tl.constexpr, N_PAD: tl.constexpr, SEL: tl.constexpr, BLOCK_S: tl.constexpr,
    TILE_KEYS: tl.constexpr, BLOCKS_PER_TILE: tl.constexpr,
):
    """One query (row) x one key head: its G heads in ROWS rows (padded to 16 for the tensor cores).
    SEL_SPLITS = 0: CHOSEN holds the selected blocks; else RANKED holds SEL_SPLITS top lists of BLOCK_J keys."""
    token = tl.program_id(0)
    kv_head = tl.program_id(1)
    heads_q = G * tl.num_programs(1)
    rows = tl.arange(0, ROWS)
    row_ok = rows < G
    head = kv_head * G + rows
    dq = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = tl.load(_at_row(Q, token, stride_qt) + head[:, None] * stride_qh + dq[None, :],
                mask=row_ok[:, None] & (dq < D)[None, :], other=0.0)

    # The compressed branch: its shares' partial (o, lse), weighted by their lse.
    O_CMP = _at_row(O_CMP, token, stride_ot) + head[:, None] * stride_oh + dv[None, :]
    LSE_CMP = _at_row(LSE_CMP, token, heads_q) + head
    top = tl.full([ROWS], float("-inf"), tl.float32)
    for split in range(CMP_SPLITS):
        top = tl.maximum(top, tl.load(_at_row(LSE_CMP, split, stride_ls), mask=row_ok, other=float("-inf")))
    top_safe = tl.where(top == float("-inf"), 0.0, top)
    total = tl.zeros([ROWS], tl.float32)
    o_cmp = tl.zeros([ROWS, BLOCK_DV], tl.float32)
    for split in range(CMP_SPLITS):
        weight = tl.exp(tl.load(_at_row(LSE_CMP, split, stride_ls), mask=row_ok, other=float("-inf")) - top_safe)
        # A share that saw no key weighs 0 and may not have written its o: never read it.
        part = tl.load(_at_row(O_CMP, split, stride_os), mask=(weight > 0)[:, None] & (dv < DV)[None, :], other=0.0)
        o_cmp += part.to(tl.float32) * weight[:, None]
        total += weight
    o_cmp = o_cmp / tl.where(total > 0, total, 1.0)[:, None]

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
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_DV], tl.float32)
    for first_slot in range(0, NUM_SELECTED, BLOCKS_PER_TILE):
        slot_of_column = first_slot + tile_slot
        block = tl.sum(tl.where(slot_of_column[:, None] == slot[None, :], chosen[None, :], 0), axis=1)
        keys_at = block * SEL + in_block
        key_ok = (slot_of_column < NUM_SELECTED) & (block >= 0) & (in_block < SEL) & (keys_at < row_keys)
        k, v = _kv_tile(k_row, v_row, keys_at, key_ok, stride_ks_t, stride_vs_t, D, DV, BLOCK_D, BLOCK_DV)
        s = tl.where(row_ok[:, None] & key_ok[None, :], tl.dot(q, tl.trans(k)) * scale, float("-inf"))
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc)
    o_slc, _ = _softmax_finish(acc, m_i, l_i)

    # The window: keys [lo, hi) of the window store.
    win_lo = tl.load(WIN_LO + token).to(tl.int32)
    span = tl.load(WIN_HI + token).to(tl.int32) - win_lo
    k_base, v_base = _key_bases(KW, VW, win_lo, kv_head, stride_kw_t, stride_kw_h, stride_vw_t, stride_vw_h)
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_DV], tl.float32)
    for start in range(0, span, TILE_KEYS):
        keys_at = start + column
        key_ok = keys_at < span
        k, v = _kv_tile(k_base, v_base, keys_at, key_ok, stride_kw_t, stride_vw_t, D, DV, BLOCK_D, BLOCK_DV)
        s = tl.where(row_ok[:, None] & key_ok[None, :], tl.dot(q, tl.trans(k)) * scale, float("-inf"))
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc)
    o_win, _ = _softmax_finish(acc, m_i, l_i)

    # Eq. 5: the gate mix.
    GATES = _at_row(GATES, token, stride_gt) + head * stride_gh
    g_cmp = tl.load(GATES, mask=row_ok, other=0.0).to(tl.float32)
    g_slc = tl.load(GATES + 1, mask=row_ok, other=0.0).to(tl.float32)
    g_win = tl.load(GATES + 2, mask=row_ok, other=0.0).to(tl.float32)
    out = o_cmp * g_cmp[:, None] + o_slc * g_slc[:, None] + o_win * g_win[:, None]
    tl.store(_at_row(OUT, token, stride_outt) + head[:, None] * stride_outh + dv[None, :],
             out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & (dv < DV)[None, :])


def _merge_tile_keys(dim: int, dim_v: int) -> int:
    """Keys per step of the merge kernel: K and V tiles of 8K elements each (128 keys at head dim 64, 64 at 128), as
    many as 8 warps hold without spilling registers (sm_90, compiled ahead of time)."""
    return max(16, min(256, 8192 // _pow2(max(dim, dim_v))))


@torch.no_grad()
def decode_attention(
    q: Tensor, k_cmp: Tensor, v_cmp: Tensor, k_slc: Tensor, v_slc: Tensor, k_win: Tensor, v_win: Tensor, gates: Tensor,
    layout: QueryLayout, pattern: SparsePattern, scale: float, ranges: BranchRanges | None = None,
    num_splits: int | None = None,
) -> Tensor:
    """`composition.nsa_attention_varlen` for one query per row (`layout.run_length == 1`), in three launches;
    not differentiable. Arguments as there; `num_splits` sets the shares of the first two launches (None: enough
    to fill the GPU)."""
    if layout.run_length != 1:
        raise ValueError(f"decode_attention takes one query per row (layout.run_length == 1), got {layout.run_length}.")
    num_q, heads_q, dim = q.shape
    heads_kv, dim_v = k_slc.shape[1], v_slc.shape[2]
    groups = heads_q // heads_kv
    ranges = branch_ranges(layout, pattern) if ranges is None else ranges
    o_cmp, lse_cmp = interval_partials(q, k_cmp, v_cmp, ranges.cmp_lo, ranges.cmp_hi, scale, 1, num_splits=num_splits)
    chosen, ranked = ranked_blocks(q, k_cmp, lse_cmp, layout, pattern, scale, num_splits)
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
    _decode_merge_kernel[(num_q, heads_kv)](
        q, o_cmp, lse_cmp, chosen, ranked, k_slc, v_slc, k_win, v_win, gates,
        layout.key_offsets.contiguous(), ranges.key_ends.contiguous(), ranges.win_lo.contiguous(),
        ranges.win_hi.contiguous(), out,
        q.stride(0), q.stride(1), k_slc.stride(0), k_slc.stride(1), v_slc.stride(0), v_slc.stride(1),
        k_win.stride(0), k_win.stride(1), v_win.stride(0), v_win.stride(1),
        o_cmp.stride(0), o_cmp.stride(1), o_cmp.stride(2), lse_cmp.stride(0), chosen.stride(0), chosen.stride(1),
        ranked.stride(0) if sel_splits else 0, gates.stride(0), gates.stride(1), out.stride(0), out.stride(1), scale,
        G=groups, ROWS=_pow2(groups), D=dim, DV=dim_v, BLOCK_D=_pow2(dim), BLOCK_DV=_pow2(dim_v),
        CMP_SPLITS=o_cmp.shape[0], SEL_SPLITS=sel_splits, SEL_SPLITS_PAD=_pow2(max(sel_splits, 1), 1),
        BLOCK_J=ranked.shape[-1] if sel_splits else 1, NUM_SELECTED=pattern.num_selected_blocks,
        N_PAD=_pow2(pattern.num_selected_blocks, 1), SEL=pattern.select_block_size,
        BLOCK_S=block_s, TILE_KEYS=tile_keys, BLOCKS_PER_TILE=tile_keys // block_s, num_warps=8,
    )
    return out
