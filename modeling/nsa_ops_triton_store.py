# Generated from src/nsa_hf by `nsa-hf export-remote-code` (nsa_hf/remote_code.py); do not edit.
"""A static cache's decoding step written in few launches: `append_token` (the token), `store_compressed` (the
compressed entry of the block it completes).

`NsaStaticCacheLayer.append` stores a step's tokens with PyTorch ops (a copy into the selection history, one into
each mirrored ring, the slots' arithmetic, the counter) and the model then gathers the block of the last l raw
tokens for phi: about a dozen kernels per layer and step, each of which reads or writes a few kilobytes. Inside a
recorded decoding step their launches, not their bytes, set the time; `append_token` does all of it in one launch,
for a step of one token per row. Its semantics are `NsaStaticCacheLayer.append` followed by `take_blocks` over the
raw ring.

The block's compressed entry is then phi (`NsaCompressor`: a mean, a linear map or a two-layer MLP of the block),
RoPE on the key at the block's last token, and a scatter into the compressed stores (`write_compressed`): up to nine
more kernels per layer in PyTorch. `store_compressed` computes it in one launch (two for the MLP: its hidden layer
is a GEMM over every row's block that the output layer needs whole), K and V in the same launch.
"""

from __future__ import annotations

import torch
try:  # optional package: in a try block, transformers' check_imports does not require it
    import triton
    import triton.language as tl
except ImportError:
    raise
from torch import Tensor

from .nsa_ops_compression import PhiWeights
from .nsa_ops_triton_common import _at_row, _cdiv, _pow2, _prev_pow2

__all__ = ["append_token", "store_compressed"]


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


@triton.jit
def _dot(x, w, FP32: tl.constexpr):
    """x [M, K] @ w [K, N] in fp32; fp32 operands exactly (no TF32), as PyTorch's default matmul."""
    if FP32:
        return tl.dot(x, w, input_precision="ieee")
    return tl.dot(x, w)


@triton.jit
def _hidden_share(X, W, PARTIAL, num_rows, features, width, row0, col0, split, share,
                  BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_F: tl.constexpr, FP32: tl.constexpr):
    """The MLP phi's hidden pre-activations over one share of the features (`share` of them from split * share):
    PARTIAL[split, r, i] = sum over the share of X[r, f] * W[i, f], fp32, for a tile of rows and columns; X [R, F]
    and W [I, F] contiguous, W cast to X's dtype (as autocast would)."""
    r = row0 + tl.arange(0, BLOCK_R)
    i = col0 + tl.arange(0, BLOCK_I)
    r_ok, i_ok = r < num_rows, i < width
    acc = tl.zeros((BLOCK_R, BLOCK_I), dtype=tl.float32)
    for f0 in range(split * share, tl.minimum(split * share + share, features), BLOCK_F):
        f = f0 + tl.arange(0, BLOCK_F)
        f_ok = f < features
        x = tl.load(X + r[:, None] * features + f[None, :], mask=r_ok[:, None] & f_ok[None, :], other=0.0)
        w = tl.load(W + i[:, None] * features + f[None, :], mask=i_ok[:, None] & f_ok[None, :], other=0.0)
        acc += _dot(x, tl.trans(w.to(x.dtype)), FP32)
    tl.store(PARTIAL + split * num_rows * width + r[:, None] * width + i[None, :], acc,
             mask=r_ok[:, None] & i_ok[None, :])


@triton.jit
def _phi_hidden_kernel(XK, XV, WK, WV, PK, PV, num_rows, features_k, features_v, width, share_k, share_v,
                       BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_F: tl.constexpr, FP32: tl.constexpr):
    """The MLP phi's hidden layer, split over its columns, rows and feature shares (the weights are most of the
    bytes: many programs read them side by side); axis 2 = 2 * share + (0 for the keys' blocks, 1 the values')."""
    col0, row0 = tl.program_id(0) * BLOCK_I, tl.program_id(1) * BLOCK_R
    split = tl.program_id(2) // 2
    if tl.program_id(2) % 2 == 0:
        _hidden_share(XK, WK, PK, num_rows, features_k, width, row0, col0, split, share_k, BLOCK_R, BLOCK_I, BLOCK_F,
                      FP32)
    else:
        _hidden_share(XV, WV, PV, num_rows, features_v, width, row0, col0, split, share_v, BLOCK_R, BLOCK_I, BLOCK_F,
                      FP32)


# phi's kinds, the kernels' MODE: constexpr globals, which the kernels may read (Triton rejects plain globals).
_MEAN: tl.constexpr = tl.constexpr(0)
_LINEAR: tl.constexpr = tl.constexpr(1)
_MLP: tl.constexpr = tl.constexpr(2)


@triton.jit
def _phi_input(X, HIDDEN_BIAS, r, f, r_ok, f_ok, num_rows, features, MODE: tl.constexpr, SPLITS: tl.constexpr,
               DOT_DTYPE: tl.constexpr):
    """Columns f of phi's output layer's input for rows r: the flat block (linear), or the MLP's hidden layer from
    its shares' pre-activations, its bias and SiLU, in the dtype PyTorch computes it in."""
    mask = r_ok[:, None] & f_ok[None, :]
    if MODE == _LINEAR:
        return tl.load(X + r[:, None] * features + f[None, :], mask=mask, other=0.0).to(DOT_DTYPE)
    pre = tl.zeros((r.shape[0], f.shape[0]), dtype=tl.float32)
    for split in tl.static_range(SPLITS):
        pre += tl.load(X + split * num_rows * features + r[:, None] * features + f[None, :], mask=mask, other=0.0)
    pre += tl.load(HIDDEN_BIAS + f, mask=f_ok, other=0.0).to(tl.float32)[None, :]
    return (pre * tl.sigmoid(pre)).to(DOT_DTYPE)


@triton.jit
def _phi_output(X, W, HIDDEN_BIAS, row0, num_rows, features, MODE: tl.constexpr, SPLITS: tl.constexpr,
                L: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_HALF: tl.constexpr,
                BLOCK_F: tl.constexpr, FP32: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """phi's output for BLOCK_R rows as its two halves (RoPE pairs column c with c + D/2), each [BLOCK_R,
    BLOCK_HALF] fp32, from one pass over the input: the block's mean (X [R, L, D]) or the output layer's input
    (`_phi_input`, F features) . W."""
    half = D // 2
    r = row0 + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_HALF)
    r_ok, c_ok = r < num_rows, c < half
    lo = tl.zeros((BLOCK_R, BLOCK_HALF), dtype=tl.float32)
    hi = tl.zeros((BLOCK_R, BLOCK_HALF), dtype=tl.float32)
    if MODE == _MEAN:
        mask = r_ok[:, None] & c_ok[None, :]
        for t in range(L):
            x = X + r[:, None] * (L * D) + t * D + c[None, :]
            lo += tl.load(x, mask=mask, other=0.0).to(tl.float32)
            hi += tl.load(x + half, mask=mask, other=0.0).to(tl.float32)
        lo, hi = lo / L, hi / L
    else:
        for f0 in range(0, features, BLOCK_F):
            f = f0 + tl.arange(0, BLOCK_F)
            f_ok = f < features
            x = _phi_input(X, HIDDEN_BIAS, r, f, r_ok, f_ok, num_rows, features, MODE, SPLITS, DOT_DTYPE)
            w = W + c[:, None] * features + f[None, :]
            w_mask = c_ok[:, None] & f_ok[None, :]
            lo += _dot(x, tl.trans(tl.load(w, mask=w_mask, other=0.0).to(DOT_DTYPE)), FP32)
            hi += _dot(x, tl.trans(tl.load(w + half * features, mask=w_mask, other=0.0).to(DOT_DTYPE)), FP32)
    return lo, hi


@triton.jit
def _entry_part(X, W, HIDDEN_BIAS, BIAS, COS, SIN, SLOTS, STORE, row0, num_rows, features, heads, s_b, s_t, s_h,
                ROTATE: tl.constexpr, MODE: tl.constexpr, SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr,
                L: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_HALF: tl.constexpr,
                BLOCK_F: tl.constexpr, FP32: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """phi's output for BLOCK_R rows (row = batch row * heads + head), RoPE'd at the row's (cos, sin) [B, D] when
    ROTATE, into STORE [B, N, H, D] at the row's slot SLOTS [B]."""
    half = D // 2
    lo, hi = _phi_output(X, W, HIDDEN_BIAS, row0, num_rows, features, MODE, SPLITS, L, D, BLOCK_R, BLOCK_HALF,
                         BLOCK_F, FP32, DOT_DTYPE)
    r = row0 + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_HALF)
    r_ok, c_ok = r < num_rows, c < half
    mask = r_ok[:, None] & c_ok[None, :]
    if HAS_BIAS:
        lo += tl.load(BIAS + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        hi += tl.load(BIAS + half + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    batch_row = r // heads  # int32, as row0, heads and the phase below: B * H rows and B * D phases are small
    head = r % heads
    if ROTATE:  # as `apply_rotary`: x * cos + rotate_half(x) * sin, rotate_half(x) = (-x_hi, x_lo)
        phase = batch_row[:, None] * D + c[None, :]
        cos_lo = tl.load(COS + phase, mask=mask, other=0.0).to(tl.float32)
        cos_hi = tl.load(COS + phase + half, mask=mask, other=0.0).to(tl.float32)
        sin_lo = tl.load(SIN + phase, mask=mask, other=0.0).to(tl.float32)
        sin_hi = tl.load(SIN + phase + half, mask=mask, other=0.0).to(tl.float32)
        lo, hi = lo * cos_lo - hi * sin_lo, hi * cos_hi + lo * sin_hi
    slot = tl.load(SLOTS + batch_row, mask=r_ok, other=0).to(tl.int32)  # < N: an int32 offset
    # A store may pass 2**31 elements: one int64 base per program, at the tile's first batch row, and int32 offsets
    # from it (vectors of int64 offsets miscompiled in Triton 3.6); `store_compressed` checks that they fit.
    first = row0 // heads
    entry = (_at_row(STORE, first, s_b) + (batch_row - first)[:, None] * s_b + slot[:, None] * s_t
             + head[:, None] * s_h + c[None, :])
    tl.store(entry, lo.to(STORE.dtype.element_ty), mask=mask)
    tl.store(entry + half, hi.to(STORE.dtype.element_ty), mask=mask)


@triton.jit
def _store_compressed_kernel(
    XK, XV, WK, WV, HBK, HBV, BK, BV, COS, SIN, SLOTS, CMP_K, CMP_V, num_rows, features_k, features_v, heads,
    s_kb, s_kt, s_kh, s_vb, s_vt, s_vh,
    MODE: tl.constexpr, SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr, L: tl.constexpr, D: tl.constexpr,
    DV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_HALF_V: tl.constexpr,
    BLOCK_F: tl.constexpr, FP32: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """A tile of rows' compressed keys (axis 1 = 0, rotated) or values (1)."""
    row0 = tl.program_id(0) * BLOCK_R
    if tl.program_id(1) == 0:
        _entry_part(XK, WK, HBK, BK, COS, SIN, SLOTS, CMP_K, row0, num_rows, features_k, heads, s_kb, s_kt, s_kh,
                    True, MODE, SPLITS, HAS_BIAS, L, D, BLOCK_R, BLOCK_HALF, BLOCK_F, FP32, DOT_DTYPE)
    else:
        _entry_part(XV, WV, HBV, BV, COS, SIN, SLOTS, CMP_V, row0, num_rows, features_v, heads, s_vb, s_vt, s_vh,
                    False, MODE, SPLITS, HAS_BIAS, L, DV, BLOCK_R, BLOCK_HALF_V, BLOCK_F, FP32, DOT_DTYPE)


_PHI_KINDS = {"mean": _MEAN.value, "linear": _LINEAR.value, "mlp": _MLP.value}
_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}
# Programs the MLP's hidden layer aims for: its weights (1 MiB per compressor at the seed shape) are read by many
# programs at once, each a share of the columns and features.
_HIDDEN_PROGRAMS = 128
_HIDDEN_BLOCK_I, _HIDDEN_BLOCK_F = 16, 128
_INT32_LIMIT = 2**31  # offsets added to a program's int64 base stay below it


def _check_float(name: str, tensor: Tensor, device: torch.device) -> None:
    """`tensor` is a kernel operand: of a dtype the kernels compute in, on the blocks' device."""
    if tensor.dtype not in _TL_DTYPES:
        raise ValueError(f"`{name}` must be bfloat16, float16 or float32, got {tensor.dtype}.")
    if tensor.device != device:
        raise ValueError(f"`{name}` must be on the blocks' device {device}, got {tensor.device}.")


def _check_phi(name: str, phi: PhiWeights, features: int, dim: int, device: torch.device) -> None:
    """`phi` is a `PhiWeights` of the kernels' kinds whose weights fit blocks of `features` (l * D) features and
    head dim `dim`."""
    if phi.kind not in _PHI_KINDS:
        raise ValueError(f"`{name}.kind` must be one of {tuple(_PHI_KINDS)}, got {phi.kind!r}.")
    if phi.kind == "mean":
        return
    required = ("hidden", "hidden_bias", "out", "out_bias") if phi.kind == "mlp" else ("out",)
    for field in required:
        if getattr(phi, field) is None:
            raise ValueError(f"`{name}.{field}` must be given for the {phi.kind} phi, got None.")
    for field in ("hidden", "hidden_bias", "out", "out_bias"):
        if getattr(phi, field) is not None:
            _check_float(f"{name}.{field}", getattr(phi, field), device)
    width = phi.hidden.shape[0] if phi.kind == "mlp" else features
    if phi.kind == "mlp" and (phi.hidden.dim() != 2 or phi.hidden.shape[1] != features):
        raise ValueError(f"`{name}.hidden` must be [I, l * D] = [I, {features}], got {tuple(phi.hidden.shape)}.")
    if phi.kind == "mlp" and tuple(phi.hidden_bias.shape) != (width,):
        raise ValueError(f"`{name}.hidden_bias` must be [I] = [{width}], got {tuple(phi.hidden_bias.shape)}.")
    if tuple(phi.out.shape) != (dim, width):
        raise ValueError(f"`{name}.out` must be [D, {width}] = [{dim}, {width}], got {tuple(phi.out.shape)}.")
    if phi.out_bias is not None and tuple(phi.out_bias.shape) != (dim,):
        raise ValueError(f"`{name}.out_bias` must be [D] = [{dim}], got {tuple(phi.out_bias.shape)}.")


def _check_store(name: str, store: Tensor, batch: int, heads: int, dim: int, device: torch.device) -> None:
    """`store` is a compressed store [B, N, H, D] of unit stride in D that the kernel can write."""
    _check_float(name, store, device)
    if store.dim() != 4 or (store.shape[0], store.shape[2], store.shape[3]) != (batch, heads, dim):
        raise ValueError(f"`{name}` must be [B, N, H, D] = [{batch}, N, {heads}, {dim}], got {tuple(store.shape)}.")
    if store.stride(-1) != 1:
        raise ValueError(f"`{name}` must have unit stride in its last dim, got strides {store.stride()}.")


def _check_tile_offsets(name: str, store: Tensor, batch_rows: int) -> None:
    """A program of `_store_compressed_kernel` addresses `store` from an int64 base at its tile's first batch row,
    adding int32 offsets over at most `batch_rows` batch rows: they must stay below 2**31 (a store row of tens of
    millions of elements: unreachable in practice)."""
    within_row = sum((size - 1) * stride for size, stride in zip(store.shape[1:], store.stride()[1:], strict=True))
    largest = (batch_rows - 1) * store.stride(0) + within_row
    if max(largest, store.stride(0)) >= _INT32_LIMIT:
        raise ValueError(f"`{name}`: a tile of {batch_rows} batch rows spans offsets up to {largest} (strides "
                         f"{store.stride()}), past the kernel's int32 offsets; use a smaller batch stride.")


def _hidden_shares(width: int, row_tiles: int, features: int) -> int:
    """How many feature shares the MLP's hidden layer splits into: a power of two that brings its programs near
    `_HIDDEN_PROGRAMS`, each share at least one BLOCK_F of features."""
    base = _cdiv(width, _HIDDEN_BLOCK_I) * row_tiles * 2
    return max(1, min(_prev_pow2(max(1, _HIDDEN_PROGRAMS // base)), _prev_pow2(max(1, features // _HIDDEN_BLOCK_F))))


def store_compressed(
    k_blocks: Tensor, v_blocks: Tensor, phi_k: PhiWeights, phi_v: PhiWeights, cos: Tensor, sin: Tensor,
    slots: Tensor, cmp_keys: Tensor, cmp_values: Tensor,
) -> None:
    """The compressed entries of one block per row, written in place: `cmp_keys[b, slots[b]] = RoPE(phi_k(k
    block), cos[b], sin[b])` and `cmp_values[b, slots[b]] = phi_v(v block)`, per head, as `NsaCompressor`,
    `apply_rotary` and `NsaStaticCacheLayer.write_compressed` compute them. It accumulates in fp32 and rounds to
    the blocks' dtype at the MLP's hidden layer (once, after SiLU: the output GEMM's input, which PyTorch rounds
    after fc1 and again after SiLU) and once at the end, so in bf16/fp16 it rounds less often than PyTorch (which
    also rounds phi's output before RoPE); in fp32 its GEMMs are exact fp32 (no TF32), as PyTorch's default
    matmul. Weights of another float dtype than the blocks are cast to the blocks' dtype, as autocast would.

    `k_blocks`/`v_blocks` [B, 1, l, H, D] (D may differ between them): `append_token`'s blocks (views of
    [B, H, l, D] storage), of one dtype; `cos`/`sin` [B, 1, D]; `slots` [B, 1], integers; the stores [B, N, H, D],
    unit stride in D. Every tensor on one device, every float one bf16, fp16 or fp32; a bad argument raises a
    ValueError naming it before any launch. One launch (two for the MLP phi). No autograd: a decoding step's cache
    write (the model takes this path only without grad mode)."""
    if k_blocks.dim() != 5 or v_blocks.dim() != 5:
        raise ValueError(f"`k_blocks` and `v_blocks` must be [B, 1, l, H, D], got {tuple(k_blocks.shape)} and "
                         f"{tuple(v_blocks.shape)}.")
    batch, one, block, heads, dim = k_blocks.shape
    dim_v = v_blocks.shape[-1]
    if one != 1 or v_blocks.shape[:4] != k_blocks.shape[:4]:
        raise ValueError(f"store_compressed takes one block per row: `k_blocks` [B, 1, l, H, D], `v_blocks` alike, "
                         f"got {tuple(k_blocks.shape)} and {tuple(v_blocks.shape)}.")
    device = k_blocks.device
    _check_float("k_blocks", k_blocks, device)
    _check_float("v_blocks", v_blocks, device)
    if v_blocks.dtype != k_blocks.dtype:
        raise ValueError(f"`v_blocks` must have the dtype of `k_blocks` ({k_blocks.dtype}), got {v_blocks.dtype}.")
    if phi_k.kind != phi_v.kind:
        raise ValueError(f"`phi_k` and `phi_v` must be of one kind, got {phi_k.kind!r} and {phi_v.kind!r}.")
    if dim % 2 or dim_v % 2:
        raise ValueError(f"the head dims of `k_blocks` and `v_blocks` must be even (RoPE's halves), got {dim} and "
                         f"{dim_v}.")
    _check_phi("phi_k", phi_k, block * dim, dim, device)
    _check_phi("phi_v", phi_v, block * dim_v, dim_v, device)
    if phi_k.kind == "mlp" and phi_v.hidden.shape[0] != phi_k.hidden.shape[0]:
        raise ValueError(f"`phi_v.hidden` must have the hidden width of `phi_k.hidden` ({phi_k.hidden.shape[0]}), "
                         f"got {phi_v.hidden.shape[0]}.")
    if (phi_k.out_bias is None) != (phi_v.out_bias is None):
        raise ValueError("`phi_k.out_bias` and `phi_v.out_bias` must both be given or both be None.")
    for name, table in (("cos", cos), ("sin", sin)):
        _check_float(name, table, device)
        if table.numel() != batch * dim:
            raise ValueError(f"`{name}` must be [B, 1, D] = [{batch}, 1, {dim}], got {tuple(table.shape)}.")
    if slots.numel() != batch or slots.dtype.is_floating_point or slots.dtype.is_complex or slots.dtype == torch.bool:
        raise ValueError(f"`slots` must be [B, 1] = [{batch}, 1] integers, got {tuple(slots.shape)} {slots.dtype}.")
    if slots.device != device:
        raise ValueError(f"`slots` must be on the blocks' device {device}, got {slots.device}.")
    _check_store("cmp_keys", cmp_keys, batch, heads, dim, device)
    _check_store("cmp_values", cmp_values, batch, heads, dim_v, device)
    rows = batch * heads
    block_r = min(64, _pow2(rows))
    batch_rows = min(batch, (block_r - 1) // heads + 2)  # the most batch rows one tile of rows touches
    _check_tile_offsets("cmp_keys", cmp_keys, batch_rows)
    _check_tile_offsets("cmp_values", cmp_values, batch_rows)

    # [B, H, l, D] contiguous: each row's block is l * D features in phi's order (`NsaCompressor` flattens (l, D)).
    xk = k_blocks.transpose(-3, -2).contiguous()
    xv = v_blocks.transpose(-3, -2).contiguous()
    fp32 = xk.dtype == torch.float32
    mode = _PHI_KINDS[phi_k.kind]
    features_k, features_v = block * dim, block * dim_v
    weights_k = weights_v = hidden_bias_k = hidden_bias_v = bias_k = bias_v = xk  # unread placeholders
    splits = 1
    if mode == _MLP.value:
        width = phi_k.hidden.shape[0]
        row_tiles = _cdiv(rows, block_r)
        splits = _hidden_shares(width, row_tiles, max(features_k, features_v))
        share_k, share_v = (_cdiv(_cdiv(f, splits), _HIDDEN_BLOCK_F) * _HIDDEN_BLOCK_F
                            for f in (features_k, features_v))
        partial_k, partial_v = (torch.empty(splits, rows, width, device=device, dtype=torch.float32) for _ in "kv")
        _phi_hidden_kernel[(_cdiv(width, _HIDDEN_BLOCK_I), row_tiles, 2 * splits)](
            xk, xv, phi_k.hidden.contiguous(), phi_v.hidden.contiguous(), partial_k, partial_v, rows, features_k,
            features_v, width, share_k, share_v, BLOCK_R=block_r, BLOCK_I=_HIDDEN_BLOCK_I, BLOCK_F=_HIDDEN_BLOCK_F,
            FP32=fp32, num_warps=4,
        )
        xk, xv, features_k, features_v = partial_k, partial_v, width, width
        hidden_bias_k, hidden_bias_v = phi_k.hidden_bias.contiguous(), phi_v.hidden_bias.contiguous()
    if mode != _MEAN.value:
        weights_k, weights_v = phi_k.out.contiguous(), phi_v.out.contiguous()
    has_bias = phi_k.out_bias is not None
    if has_bias:
        bias_k, bias_v = phi_k.out_bias.contiguous(), phi_v.out_bias.contiguous()
    _store_compressed_kernel[(_cdiv(rows, block_r), 2)](
        xk, xv, weights_k, weights_v, hidden_bias_k, hidden_bias_v, bias_k, bias_v,
        cos.reshape(batch, dim).contiguous(), sin.reshape(batch, dim).contiguous(), slots.reshape(batch).contiguous(),
        cmp_keys, cmp_values, rows, features_k, features_v, heads,
        cmp_keys.stride(0), cmp_keys.stride(1), cmp_keys.stride(2),
        cmp_values.stride(0), cmp_values.stride(1), cmp_values.stride(2),
        MODE=mode, SPLITS=splits, HAS_BIAS=has_bias, L=block, D=dim, DV=dim_v, BLOCK_R=block_r,
        BLOCK_HALF=_pow2(dim // 2), BLOCK_HALF_V=_pow2(dim_v // 2), BLOCK_F=64, FP32=fp32,
        DOT_DTYPE=_TL_DTYPES[k_blocks.dtype], num_warps=4,
    )
