# Generated from src/nsa_hf by `nsa-hf export-remote-code` (nsa_hf/remote_code.py); do not edit.
"""A static cache's decoding step written in one launch: `append_token`.

`NsaStaticCacheLayer.append` stores a step's tokens with PyTorch ops (a copy into the selection history, one into
each mirrored ring, the slots' arithmetic, the counter) and the model then gathers the block of the last l raw
tokens for phi: about a dozen kernels per layer and step, each of which reads or writes a few kilobytes. Inside a
recorded decoding step their launches, not their bytes, set the time; this kernel does all of it for one token
per row. The semantics are `NsaStaticCacheLayer.append` followed by `take_blocks` over the raw ring.
"""

from __future__ import annotations

import torch
try:  # optional package: in a try block, transformers' check_imports does not require it
    import triton
    import triton.language as tl
except ImportError:
    raise
from torch import Tensor

from .nsa_ops_triton_common import _at_row, _pow2

__all__ = ["append_token"]


@triton.jit
def _token_at(X, row, head, stride_b, stride_h, d, d_ok):
    """A new token's vector: X [B, 1, H, D] at (row, head)."""
    return tl.load(_at_row(X, row, stride_b) + head * stride_h + d, mask=d_ok)


@triton.jit
def _store_token(STORE, row, slot, head, value, stride_b, stride_t, stride_h, d, d_ok):
    """`value` into STORE [B, N, H, D] at (row, slot, head), in the store's dtype."""
    tl.store(_at_row(_at_row(STORE, row, stride_b), slot, stride_t) + head * stride_h + d,
             value.to(STORE.dtype.element_ty), mask=d_ok)


@triton.jit
def _append_token_kernel(
    POSITION, K_SLC, V_SLC, K_WIN, V_WIN, K_RAW, V_RAW,
    KEYS, VALUES, WIN_KEYS, WIN_VALUES, RAW_KEYS, RAW_VALUES, COUNTER, K_BLOCK, V_BLOCK,
    s_ks_b, s_ks_h, s_vs_b, s_vs_h, s_kw_b, s_kw_h, s_vw_b, s_vw_h, s_kr_b, s_kr_h, s_vr_b, s_vr_h,  # new tokens
    s_kb, s_kt, s_kh, s_vb, s_vt, s_vh,  # the selection history [B, max_cache_len, H, D]
    s_wkb, s_wkt, s_wkh, s_wvb, s_wvt, s_wvh,  # the window ring [B, 2R_w, H, D]
    s_rkb, s_rkt, s_rkh, s_rvb, s_rvt, s_rvh,  # the raw compression ring [B, 2R, H, D]
    window_ring, raw_ring,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, L: tl.constexpr,
    BLOCK_L: tl.constexpr, SEPARATE_WINDOW: tl.constexpr,
):
    """One (row, key head): the new token into the history at its position and into both halves of each mirrored
    ring at (position mod R); the raw K/V of the block of l tokens that ends at it into K_BLOCK / V_BLOCK
    [B, H, l, D]; program (0, 0) sets the counter to position + 1."""
    row = tl.program_id(0)
    head = tl.program_id(1)
    position = tl.load(POSITION)
    dk = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    dk_ok, dv_ok = dk < D, dv < DV
    k_slc = _token_at(K_SLC, row, head, s_ks_b, s_ks_h, dk, dk_ok)
    v_slc = _token_at(V_SLC, row, head, s_vs_b, s_vs_h, dv, dv_ok)
    _store_token(KEYS, row, position, head, k_slc, s_kb, s_kt, s_kh, dk, dk_ok)
    _store_token(VALUES, row, position, head, v_slc, s_vb, s_vt, s_vh, dv, dv_ok)
    if SEPARATE_WINDOW:
        slot = position % window_ring
        k_win = _token_at(K_WIN, row, head, s_kw_b, s_kw_h, dk, dk_ok)
        v_win = _token_at(V_WIN, row, head, s_vw_b, s_vw_h, dv, dv_ok)
        for half in range(2):
            _store_token(WIN_KEYS, row, slot + half * window_ring, head, k_win, s_wkb, s_wkt, s_wkh, dk, dk_ok)
            _store_token(WIN_VALUES, row, slot + half * window_ring, head, v_win, s_wvb, s_wvt, s_wvh, dv, dv_ok)
    slot = position % raw_ring
    k_raw = _token_at(K_RAW, row, head, s_kr_b, s_kr_h, dk, dk_ok).to(RAW_KEYS.dtype.element_ty)
    v_raw = _token_at(V_RAW, row, head, s_vr_b, s_vr_h, dv, dv_ok).to(RAW_VALUES.dtype.element_ty)
    for half in range(2):
        _store_token(RAW_KEYS, row, slot + half * raw_ring, head, k_raw, s_rkb, s_rkt, s_rkh, dk, dk_ok)
        _store_token(RAW_VALUES, row, slot + half * raw_ring, head, v_raw, s_rvb, s_rvt, s_rvh, dv, dv_ok)
    # The block's first l - 1 tokens from the ring's upper half (slots this program does not write: the ring holds
    # at least l), its last one from registers.
    i = tl.arange(0, BLOCK_L)
    earlier = (i < L - 1)[:, None]
    first = slot + raw_ring - (L - 1)
    k_rows = _at_row(_at_row(RAW_KEYS, row, s_rkb), first, s_rkt) + head * s_rkh
    v_rows = _at_row(_at_row(RAW_VALUES, row, s_rvb), first, s_rvt) + head * s_rvh
    k_block = tl.load(k_rows + i[:, None] * s_rkt + dk[None, :], mask=earlier & dk_ok[None, :], other=0.0)
    v_block = tl.load(v_rows + i[:, None] * s_rvt + dv[None, :], mask=earlier & dv_ok[None, :], other=0.0)
    last = (i == L - 1)[:, None]
    k_block = tl.where(last, k_raw[None, :], k_block)
    v_block = tl.where(last, v_raw[None, :], v_block)
    in_block = (i < L)[:, None]
    program = row * tl.num_programs(1) + head
    tl.store(_at_row(K_BLOCK, program, L * D) + i[:, None] * D + dk[None, :], k_block, mask=in_block & dk_ok[None, :])
    tl.store(_at_row(V_BLOCK, program, L * DV) + i[:, None] * DV + dv[None, :], v_block,
             mask=in_block & dv_ok[None, :])
    if (row == 0) & (head == 0):
        tl.store(COUNTER, position + 1)


def append_token(
    keys: Tensor, values: Tensor, window_keys: Tensor | None, window_values: Tensor | None, raw_keys: Tensor,
    raw_values: Tensor, counter: Tensor, k_slc: Tensor, v_slc: Tensor, k_win: Tensor | None, v_win: Tensor | None,
    k_raw: Tensor, v_raw: Tensor, position: Tensor, block_size: int,
) -> tuple[Tensor, Tensor]:
    """Store one decoding token per row (the new K/V [B, 1, H, D]) at `position` [1] (the counter's value, read
    once per step by the model's plan) in a static cache layer's stores, in place: the selection history
    `keys`/`values` [B, max_cache_len, H, D], the mirrored window ring (None when the window shares the history)
    and raw compression ring [B, 2R, H, D]; `counter` becomes position + 1. Returns the raw K/V of the `block_size`
    tokens ending at the new one, [B, 1, l, H, D] views of [B, 1, H, l, D] storage (as `take_blocks` lays them
    out for phi); for a row past fewer tokens, the leading entries are whatever the ring held."""
    batch, steps, heads, dim = k_slc.shape
    dim_v = v_slc.shape[-1]
    if steps != 1:
        raise ValueError(f"append_token stores one token per row, got {steps}.")
    if k_raw.shape[-1] != dim or v_raw.shape[-1] != dim_v:
        raise ValueError(f"`k_raw`/`v_raw` must have head dims {dim}/{dim_v} as the selection K/V, got "
                         f"{k_raw.shape[-1]}/{v_raw.shape[-1]}.")
    raw_ring = raw_keys.shape[1] // 2
    if raw_ring < block_size:
        raise ValueError(f"the raw ring ({raw_ring} slots) must hold a block of {block_size} tokens.")
    separate = window_keys is not None
    new = [k_slc, v_slc, k_win if separate else k_slc, v_win if separate else v_slc, k_raw, v_raw]
    new = [x if x.stride(-1) == 1 else x.contiguous() for x in new]
    stores = [keys, values, *((window_keys, window_values) if separate else (keys, values)), raw_keys, raw_values]
    k_block = torch.empty(batch, 1, heads, block_size, dim, device=keys.device, dtype=raw_keys.dtype)
    v_block = torch.empty(batch, 1, heads, block_size, dim_v, device=keys.device, dtype=raw_values.dtype)
    _append_token_kernel[(batch, heads)](
        position, *new, *stores, counter, k_block, v_block,
        *(stride for x in new for stride in (x.stride(0), x.stride(2))),
        *(stride for x in stores for stride in (x.stride(0), x.stride(1), x.stride(2))),
        window_keys.shape[1] // 2 if separate else 1, raw_ring,  # a shared window has no ring of its own
        D=dim, DV=dim_v, BLOCK_D=_pow2(dim), BLOCK_DV=_pow2(dim_v), L=block_size, BLOCK_L=_pow2(block_size, 1),
        SEPARATE_WINDOW=separate, num_warps=1 if block_size * max(dim, dim_v) <= 4096 else 4,
    )
    return k_block.transpose(-3, -2), v_block.transpose(-3, -2)
