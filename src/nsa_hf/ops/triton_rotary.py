"""Rotary position embedding as one Triton kernel, forward and backward.

Computes the model's `apply_rotary` (x * cos + rotate_half(x) * sin, cos and sin shared by the heads of a
token) in fp32 and writes x's dtype. In eager PyTorch the same is six elementwise kernels over q and every
key, each a full pass over memory, on strided slices of the stacked projection; here it is one read and
one write. Under torch.compile the model keeps the PyTorch ops, which inductor fuses itself.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["apply_rotary"]


@triton.jit
def _rotary_kernel(
    X, COS, SIN, OUT, num_rows, heads, stride_xt, stride_xh, stride_ct, stride_st,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_R: tl.constexpr, INVERSE: tl.constexpr,
):
    """BLOCK_R (token, head) rows of x [N, H, 2 * HALF] (last dim contiguous) into a contiguous OUT.
    INVERSE rotates by -angle: the backward pass, since the rotation's transpose is its inverse."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    token = rows // heads
    head = rows % heads
    d = tl.arange(0, BLOCK_HALF)
    mask = (rows < num_rows)[:, None] & (d < HALF)[None, :]
    x = X + token[:, None] * stride_xt + head[:, None] * stride_xh + d[None, :]
    x1 = tl.load(x, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x + HALF, mask=mask, other=0.0).to(tl.float32)
    cos = COS + token[:, None] * stride_ct + d[None, :]
    sin = SIN + token[:, None] * stride_st + d[None, :]
    cos1 = tl.load(cos, mask=mask, other=0.0).to(tl.float32)
    cos2 = tl.load(cos + HALF, mask=mask, other=0.0).to(tl.float32)
    sin1 = tl.load(sin, mask=mask, other=0.0).to(tl.float32)
    sin2 = tl.load(sin + HALF, mask=mask, other=0.0).to(tl.float32)
    if INVERSE:
        out1, out2 = x1 * cos1 + x2 * sin2, x2 * cos2 - x1 * sin1
    else:
        out1, out2 = x1 * cos1 - x2 * sin1, x2 * cos2 + x1 * sin2
    out = OUT + rows[:, None] * (2 * HALF) + d[None, :]
    tl.store(out, out1.to(OUT.dtype.element_ty), mask=mask)
    tl.store(out + HALF, out2.to(OUT.dtype.element_ty), mask=mask)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, inverse: bool) -> Tensor:
    *lead, heads, dim = x.shape
    rows = x.reshape(-1, heads, dim)  # a view for slices of the stacked projection
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    if rows.shape[0] * rows.stride(0) > 2**31:  # int32 offsets, as in the attention kernels
        raise ValueError(f"the Triton RoPE addresses at most 2**31 elements; got {tuple(x.shape)} (split the batch).")
    cos, sin = cos.reshape(-1, dim), sin.reshape(-1, dim)
    if cos.stride(-1) != 1 or sin.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty(rows.shape, device=x.device, dtype=x.dtype)
    num_rows = rows.shape[0] * heads
    block_r = 64
    _rotary_kernel[(triton.cdiv(num_rows, block_r),)](
        rows, cos, sin, out, num_rows, heads, rows.stride(0), rows.stride(1), cos.stride(0), sin.stride(0),
        HALF=dim // 2, BLOCK_HALF=triton.next_power_of_2(dim // 2), BLOCK_R=block_r, INVERSE=inverse,
    )
    return out.view(*lead, heads, dim)


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, inverse=False)

    @staticmethod
    def backward(ctx, grad: Tensor):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, inverse=True), None, None


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [..., H, D] by cos/sin [..., D] (one phase per token, shared by its heads); no gradient
    flows to cos and sin (they are functions of positions)."""
    if x.shape[-1] % 2 or cos.shape != (*x.shape[:-2], x.shape[-1]) or sin.shape != cos.shape:
        raise ValueError(
            f"`cos` and `sin` must have shape {(*x.shape[:-2], x.shape[-1])} (x {tuple(x.shape)} without its heads, "
            f"even head dim), got {tuple(cos.shape)} and {tuple(sin.shape)}."
        )
    return _Rotary.apply(x, cos, sin)
