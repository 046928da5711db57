# Generated from src/nsa_hf by `nsa-hf export-remote-code` (nsa_hf/remote_code.py); do not edit.
"""NSA's block selection as one fused Triton kernel: the top-n selection blocks per (query, key head) from the
compressed attention probabilities, the rule of `nsa_hf.ops.reference.select_blocks_varlen`.
"""

from __future__ import annotations

import torch
try:  # optional package: in a try block, transformers' check_imports does not require it
    import triton
    import triton.language as tl
except ImportError:
    raise
from torch import Tensor

from .nsa_ops_layout import QueryLayout, SparsePattern
from .nsa_ops_triton_common import (
    _at_row,
    _next_pow2,
    _num_splits,
    _pow2,
    _program_tile,
    _split_runs,
    _tile_tokens,
    _tuning_configs,
    known_tiles,
)

__all__ = ["ranked_blocks", "select_blocks", "selection_tile_blocks"]


@triton.autotune(configs=_tuning_configs(stages=(1, 2, 3)), key=["G_PAD", "BLOCK_T", "BLOCK_D", "BLOCK_J", "NUM_SPLITS"])
@triton.jit
def _select_blocks_kernel(
    Q, KC, LSE, CMP_OFF, POS, TILE_START, TILE_LEN, OUT, RANKED,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_ot, stride_oh, stride_rs, stride_ls,
    scale, run_length,
    G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_T: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    L: tl.constexpr, STRIDE: tl.constexpr, SEL: tl.constexpr, BLOCK_J: tl.constexpr, HALO: tl.constexpr,
    NUM_SELECTED: tl.constexpr, NUM_INIT: tl.constexpr, NUM_LOCAL: tl.constexpr, NUM_SPLITS: tl.constexpr,
    COMPUTED_TILES: tl.constexpr, LSE_SPLITS: tl.constexpr,
):
    """Block selection fused: Eq. 9 and 10 scores, forced blocks and top-n, for BLOCK_T tokens x one key head.

    A tile holds consecutive tokens of one document (so they share their compressed keys) x the G heads
    of one key head. It walks tiles of BLOCK_J selection blocks; each reads its own M * BLOCK_J
    compressed blocks (the R - 1 before it that also overlap it are carried from the previous tile),
    scores them, and merges them into a running top-BLOCK_J list by a bitonic sort. Nothing but the chosen indices reaches HBM.
    Scores are ranked as in `reference.top_blocks`: int64 keys of float32 bits above the reversed block
    index, so ties go to the lower index; forced blocks rank first; non-candidates are -1.
    With NUM_SPLITS > 1 (decoding), program_id(2) ranks one share of the selection blocks and writes its
    top-BLOCK_J keys to RANKED; the shares' lists are merged afterwards (`select_blocks`). LSE holds LSE_SPLITS
    partial lse `stride_ls` apart (the compressed branch's shares of the keys, `interval_partials`), merged here.
    """
    R: tl.constexpr = L // STRIDE
    M: tl.constexpr = SEL // STRIDE
    ROWS: tl.constexpr = BLOCK_T * G_PAD
    kv_head = tl.program_id(1)
    heads_q = G * tl.num_programs(1)
    first, length = _program_tile(TILE_START, TILE_LEN, run_length, COMPUTED_TILES, BLOCK_T)
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
    LSE = _at_row(LSE, first, heads_q) + token * heads_q + head
    lse = tl.load(LSE, mask=row_ok, other=float("-inf"))
    if LSE_SPLITS > 1:  # log-sum-exp of the shares; a share that saw no key adds exp(-inf) = 0
        # Unrolled: the shares' loads then wait on nothing (a loop issued one after another's result).
        top = lse
        for split in tl.static_range(1, LSE_SPLITS):
            top = tl.maximum(top, tl.load(_at_row(LSE, split, stride_ls), mask=row_ok, other=float("-inf")))
        top_safe = tl.where(top == float("-inf"), 0.0, top)
        total = tl.zeros_like(top_safe)
        for split in tl.static_range(LSE_SPLITS):
            total += tl.exp(tl.load(_at_row(LSE, split, stride_ls), mask=row_ok, other=float("-inf")) - top_safe)
        lse = tl.where(total > 0, top_safe + tl.log(tl.where(total > 0, total, 1.0)), float("-inf"))
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


def _document_tiles(layout: QueryLayout, tile: int) -> tuple[Tensor, Tensor, int, int]:
    """Tiles of at most `tile` consecutive queries that never cross a document: (first, length, count, run);
    without a host sync where the host knows them (`known_tiles`), and only otherwise with one."""
    positions = layout.positions
    known = known_tiles(layout.run_length, layout.documents, positions, tile)
    if known is not None:
        return known
    new_doc = torch.ones_like(positions, dtype=torch.bool)
    new_doc[1:] = (layout.cmp_offsets[1:] != layout.cmp_offsets[:-1]) | (positions[1:] != positions[:-1] + 1)
    doc_start = torch.nonzero(new_doc).flatten()
    doc_len = torch.diff(doc_start, append=doc_start.new_tensor([positions.numel()]))
    first, length = _split_runs(doc_start, doc_len, tile)
    return first.to(torch.int32), length.to(torch.int32), first.numel(), 0


@torch.no_grad()
def select_blocks(
    q: Tensor, k_cmp: Tensor, lse: Tensor, layout: QueryLayout, pattern: SparsePattern, scale: float,
    num_splits: int | None = None,
) -> Tensor:
    """Triton version of `reference.select_blocks_varlen`: [Nq, H, n] int32, the same rule, one fused kernel.

    `num_splits`: programs that share each tile's selection blocks, their top lists merged by one top-k
    (None: enough to fill the GPU when there are few tiles, as when decoding).
    """
    chosen, ranked = ranked_blocks(q, k_cmp, lse, layout, pattern, scale, num_splits)
    if ranked is None:
        return chosen
    # The top n of the union of the shares' top lists is the top n overall.
    best = torch.topk(ranked.permute(1, 2, 0, 3).reshape(q.shape[0], k_cmp.shape[1], -1), chosen.shape[-1], dim=-1).values
    return torch.where(best >= 0, 2**31 - 1 - (best & 0xFFFFFFFF), -1).to(torch.int32)


def selection_tile_blocks(pattern: SparsePattern) -> int:
    """Selection blocks per step of the selection kernel (BLOCK_J), and the length of a share's top list."""
    m = pattern.select_block_size // pattern.compress_stride
    return max(_next_pow2(pattern.num_selected_blocks), 16 if m <= 4 else 64 // m)


def ranked_blocks(
    q: Tensor, k_cmp: Tensor, lse: Tensor, layout: QueryLayout, pattern: SparsePattern, scale: float,
    num_splits: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """`select_blocks` before the shares' top lists are merged: (chosen [Nq, H, n] int32, None) with one share,
    else (unwritten, ranked [S, Nq, H, BLOCK_J] int64 keys, -1 for none), for a consumer that merges them itself.
    `lse`: [Nq, HQ], or the compressed branch's partials [S', Nq, HQ] (`interval_partials`), merged in the kernel."""
    m = pattern.select_block_size // pattern.compress_stride
    if m & (m - 1):
        raise ValueError("the Triton backend needs select_block_size / compress_stride to be a power of two.")
    num_q, heads_q, dim = q.shape
    heads_kv = k_cmp.shape[1]
    groups = heads_q // heads_kv
    q, k_cmp, lse = q.contiguous(), k_cmp.contiguous(), lse.contiguous()
    lse_splits = lse.shape[0] if lse.dim() == 3 else 1
    if k_cmp.shape[0] == 0:  # no compressed block yet: every score is 0; a one-row store keeps the pointer valid
        k_cmp = k_cmp.new_zeros(1, *k_cmp.shape[1:])
    n = pattern.num_selected_blocks
    out = torch.empty(num_q, heads_kv, n, device=q.device, dtype=torch.int32)
    if num_q == 0:
        return out, None
    r = pattern.compress_block_size // pattern.compress_stride
    g_pad = _next_pow2(groups)
    # At least 16 tokens per tile where that stays within 128 rows: the scores then run on the tensor cores
    # and each step's keys and top-n merge serve more tokens (H200, seed shape G = 6 at 32k: 1.24 ms per
    # layer with 16 tokens, 1.78 with 8). G = 16 keeps 64 rows: 128 measured slower there.
    block_t = _tile_tokens(g_pad, layout.run_length, rows=max(64, 16 * g_pad) if g_pad <= 8 else 64)
    block_j = selection_tile_blocks(pattern)
    first, length, num_tiles, run = _document_tiles(layout, block_t)
    splits = num_splits or _num_splits(num_tiles * heads_kv, q.device)
    ranked = torch.empty(splits, num_q, heads_kv, block_j, device=q.device, dtype=torch.int64) if splits > 1 else out
    _select_blocks_kernel[(num_tiles, heads_kv, splits)](
        q, k_cmp, lse, layout.cmp_offsets.contiguous(), layout.positions.contiguous(), first, length, out, ranked,
        q.stride(0), q.stride(1), k_cmp.stride(0), k_cmp.stride(1), out.stride(0), out.stride(1),
        num_q * heads_kv * block_j, num_q * heads_q, scale,
        G=groups, G_PAD=g_pad, BLOCK_T=block_t, D=dim, BLOCK_D=_pow2(dim), L=pattern.compress_block_size,
        STRIDE=pattern.compress_stride, SEL=pattern.select_block_size, BLOCK_J=block_j, HALO=_pow2(r - 1),
        NUM_SELECTED=n, NUM_INIT=pattern.num_init_blocks, NUM_LOCAL=pattern.num_local_blocks, NUM_SPLITS=splits,
        run_length=run, COMPUTED_TILES=run > 0, LSE_SPLITS=lse_splits,
    )
    return (out, None) if splits == 1 else (out, ranked)
