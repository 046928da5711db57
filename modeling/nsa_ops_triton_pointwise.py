# Generated from src/nsa_hf by `nsa-hf export-remote-code` (nsa_hf/remote_code.py); do not edit.
"""The model's pointwise and row-wise ops as Triton kernels, forward and backward: RMSNorm, RoPE, SwiGLU's
silu(gate) * up, the gated mix of NSA's three branches and the language-model cross entropy.

In eager PyTorch each is several elementwise kernels, each a full pass over memory, and here on strided
slices of a stacked projection (slower kernels); each kernel below reads its inputs once and writes once,
computing in fp32. Under torch.compile the model keeps the PyTorch ops, which inductor fuses itself; called inside
a compiled function of one's own, each is a torch.library custom op (forward and backward ops, fake
implementations), and in eager mode an autograd Function over the same code, which spares the op dispatch.

Offsets inside a launch are int32, so each wrapper runs tensors past 2**31 elements (SwiGLU's gate/up of
a long batch) in launches over chunks of rows (`common._row_chunks`); the cross entropy, whose
single rows are long, addresses each row from an int64 base instead.
"""

from __future__ import annotations

import torch
try:  # optional package: in a try block, transformers' check_imports does not require it
    import triton
    import triton.language as tl
except ImportError:
    raise
from torch import Tensor

from .nsa_ops_library import records_grad
from .nsa_ops_triton_common import _cdiv, _multiprocessors, _next_pow2, _row_chunks, _rows_of

__all__ = ["apply_rotary", "cross_entropy", "gate_branches", "rms_norm", "silu_mul"]


@triton.jit
def _rms_norm_fwd_kernel(X, W, OUT, RSTD, num_rows, width, stride_x, stride_out, eps,
                         BLOCK: tl.constexpr, BLOCK_R: tl.constexpr):
    """BLOCK_R rows of w * (x / rms(x)), rounded as the PyTorch module rounds: x / rms(x) to x's dtype first."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK)
    mask = (rows < num_rows)[:, None] & (cols < width)[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / width + eps)
    x_hat = (x * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=cols < width, other=0.0).to(tl.float32)
    tl.store(OUT + rows[:, None] * stride_out + cols[None, :], (w[None, :] * x_hat).to(OUT.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=rows < num_rows)


@triton.jit
def _rms_norm_bwd_kernel(X, W, RSTD, GRAD, DX, DW_PART, num_rows, width, stride_x, stride_grad, stride_dx,
                         rows_per_program, BLOCK: tl.constexpr, BLOCK_R: tl.constexpr):
    """dx of `rows_per_program` rows, BLOCK_R at a time, and their share of dw (one fp32 row of DW_PART,
    summed afterwards: no atomics)."""
    cols = tl.arange(0, BLOCK)
    col_ok = cols < width
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], tl.float32)
    first = tl.program_id(0) * rows_per_program
    for start in range(first, tl.minimum(first + rows_per_program, num_rows), BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        row_ok = (rows < num_rows) & (rows < first + rows_per_program)
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        grad = tl.load(GRAD + rows[:, None] * stride_grad + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        x_hat = x * rstd[:, None]
        dw += tl.sum(grad * x_hat.to(X.dtype.element_ty).to(tl.float32), axis=0)
        d_hat = grad * w[None, :]
        # d(x * rstd)/dx with rstd = mean(x^2)^-1/2: rstd * (d_hat - x_hat * mean(d_hat * x_hat))
        dx = rstd[:, None] * (d_hat - x_hat * (tl.sum(d_hat * x_hat, axis=1) / width)[:, None])
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_PART + tl.program_id(0) * width + cols, dw, mask=col_ok)


def _rms_norm_forward(x: Tensor, weight: Tensor, eps: float, out_dtype: torch.dtype | None) -> tuple[Tensor, Tensor]:
    """(out [*x.shape[:-1], W], rstd [rows] fp32)."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    num_rows, width = rows.shape
    # Compared first: torch.promote_types is a dispatched op, one more per call on the host.
    out_dtype = out_dtype or (x.dtype if weight.dtype == x.dtype else torch.promote_types(weight.dtype, x.dtype))
    out = torch.empty(rows.shape, device=x.device, dtype=out_dtype)
    rstd = torch.empty(num_rows, device=x.device, dtype=torch.float32)
    block, block_r = _next_pow2(width), _norm_rows(width)
    for start, end in _row_chunks(num_rows, max(rows.stride(0), width)):
        _rms_norm_fwd_kernel[(_cdiv(end - start, block_r),)](
            _rows_of(rows, start, end), weight, _rows_of(out, start, end), _rows_of(rstd, start, end), end - start,
            width, rows.stride(0), out.stride(0), eps, BLOCK=block, BLOCK_R=block_r,
        )
    return out.view(*x.shape[:-1], width), rstd


def _rms_norm_backward(grad: Tensor, x: Tensor, weight: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    """(dx, dweight) of `_rms_norm_forward`."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    num_rows, width = rows.shape
    grad = grad.reshape(num_rows, width)
    if grad.stride(-1) != 1:
        grad = grad.contiguous()
    dx = torch.empty(rows.shape, device=rows.device, dtype=rows.dtype)
    if num_rows == 0:
        return dx.view(x.shape), torch.zeros_like(weight)
    chunks = _row_chunks(num_rows, max(rows.stride(0), grad.stride(0), width))
    dw_parts = [
        _rms_norm_bwd_launch(_rows_of(rows, a, b), weight, _rows_of(rstd, a, b), _rows_of(grad, a, b), _rows_of(dx, a, b))
        for a, b in chunks
    ]
    dw_part = dw_parts[0] if len(dw_parts) == 1 else torch.cat(dw_parts)
    return dx.view(x.shape), dw_part.sum(0).to(weight.dtype)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float, out_dtype: torch.dtype | None) -> Tensor:
        out, rstd = _rms_norm_forward(x, weight, eps, out_dtype)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        return *_rms_norm_backward(grad, *ctx.saved_tensors), None, None


@torch.library.custom_op("nsa_hf::rms_norm", mutates_args=())
def _rms_norm_op(x: Tensor, weight: Tensor, eps: float, out_dtype: torch.dtype | None) -> tuple[Tensor, Tensor]:
    out, rstd = _rms_norm_forward(x, weight, eps, out_dtype)
    return out.contiguous(), rstd


@_rms_norm_op.register_fake
def _(x, weight, eps, out_dtype):
    out = x.new_empty(x.shape, dtype=out_dtype or torch.promote_types(weight.dtype, x.dtype))
    return out, x.new_empty(x.numel() // max(1, x.shape[-1]), dtype=torch.float32)


@torch.library.custom_op("nsa_hf::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(grad: Tensor, x: Tensor, weight: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    dx, dw = _rms_norm_backward(grad, x, weight, rstd)
    return dx.contiguous(), dw


@_rms_norm_backward_op.register_fake
def _(grad, x, weight, rstd):
    return x.new_empty(x.shape), torch.empty_like(weight)


def _rms_norm_setup(ctx, inputs, output) -> None:
    x, weight, _, _ = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.mark_non_differentiable(output[1])


def _rms_norm_grad(ctx, grad: Tensor, _drstd: Tensor | None):
    return *_rms_norm_backward_op(grad, *ctx.saved_tensors), None, None


_rms_norm_op.register_autograd(_rms_norm_grad, setup_context=_rms_norm_setup)


def _rms_norm_bwd_launch(rows: Tensor, weight: Tensor, rstd: Tensor, grad: Tensor, dx: Tensor) -> Tensor:
    """dx of `rows` into `dx`; returns their fp32 partials of dw, one row per program."""
    num_rows, width = rows.shape
    block, block_r = _next_pow2(width), _norm_rows(width)
    # A few programs per multiprocessor, each over a contiguous range of rows: dw has one partial per
    # program (off CUDA, the interpreter, still a few: tests then cover the partials' sum).
    limit = 4 * _multiprocessors(rows.device) if rows.device.type == "cuda" else 3
    programs = min(_cdiv(num_rows, block_r), limit)
    per_program = _cdiv(_cdiv(num_rows, programs), block_r) * block_r
    programs = _cdiv(num_rows, per_program)
    dw_part = torch.empty(programs, width, device=rows.device, dtype=torch.float32)
    _rms_norm_bwd_kernel[(programs,)](
        rows, weight, rstd, grad, dx, dw_part, num_rows, width, rows.stride(0), grad.stride(0), dx.stride(0),
        per_program, BLOCK=block, BLOCK_R=block_r,
    )
    return dw_part


def _norm_rows(width: int) -> int:
    """Rows per RMSNorm tile: about 4096 elements (a 768-wide row pads to 1024: 4 rows)."""
    return max(1, 4096 // _next_pow2(width))


def rms_norm(x: Tensor, weight: Tensor, eps: float, out_dtype: torch.dtype | None = None) -> Tensor:
    """`NsaRMSNorm`'s function in one kernel each way: weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype),
    rounded once to `out_dtype` (None: the dtype PyTorch promotes weight and x to); statistics in fp32."""
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"`weight` must have shape {tuple(x.shape[-1:])} (x's last dim), got {tuple(weight.shape)}.")
    if torch.compiler.is_compiling():
        return _rms_norm_op(x, weight, eps, out_dtype)[0]
    if not records_grad(x, weight):
        return _rms_norm_forward(x, weight, eps, out_dtype)[0]
    return _RMSNorm.apply(x, weight, eps, out_dtype)


@triton.jit
def _rotate_rows(X, OUT, COS, SIN, num_tokens, stride_xt, stride_xh, stride_ct, stride_st, HEADS: tl.constexpr,
                 HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_R: tl.constexpr, INVERSE: tl.constexpr):
    """BLOCK_R (token, head) rows of x [N, HEADS, 2 * HALF] (last dim contiguous) into a contiguous OUT.
    INVERSE rotates by -angle: the backward pass, since the rotation's transpose is its inverse."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    token = rows // HEADS
    head = rows % HEADS
    d = tl.arange(0, BLOCK_HALF)
    mask = (token < num_tokens)[:, None] & (d < HALF)[None, :]
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


@triton.jit
def _rotary_kernel(
    X0, X1, X2, OUT0, OUT1, OUT2, COS, SIN, num_tokens, stride_x0t, stride_x0h, stride_x1t, stride_x1h,
    stride_x2t, stride_x2h, stride_ct, stride_st, H0: tl.constexpr, H1: tl.constexpr, H2: tl.constexpr,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_R: tl.constexpr, INVERSE: tl.constexpr,
):
    """Up to three tensors of the same tokens in one launch (RoPE's q and keys): program_id(1) picks one."""
    part = tl.program_id(1)
    if part == 0:
        _rotate_rows(X0, OUT0, COS, SIN, num_tokens, stride_x0t, stride_x0h, stride_ct, stride_st, H0, HALF, BLOCK_HALF,
                     BLOCK_R, INVERSE)
    elif part == 1:
        _rotate_rows(X1, OUT1, COS, SIN, num_tokens, stride_x1t, stride_x1h, stride_ct, stride_st, H1, HALF, BLOCK_HALF,
                     BLOCK_R, INVERSE)
    else:
        _rotate_rows(X2, OUT2, COS, SIN, num_tokens, stride_x2t, stride_x2h, stride_ct, stride_st, H2, HALF, BLOCK_HALF,
                     BLOCK_R, INVERSE)


def _rotate(xs: tuple[Tensor, ...], cos: Tensor, sin: Tensor, inverse: bool) -> tuple[Tensor, ...]:
    dim = xs[0].shape[-1]
    rows = []
    for x in xs:
        x_rows = x.reshape(-1, x.shape[-2], dim)  # a view for slices of the stacked projection
        rows.append(x_rows if x_rows.stride(-1) == 1 else x_rows.contiguous())
    cos, sin = cos.reshape(-1, dim), sin.reshape(-1, dim)
    if cos.stride(-1) != 1 or sin.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    outs = [torch.empty(r.shape, device=r.device, dtype=r.dtype) for r in rows]
    token_elements = max(t.stride(0) for t in (*rows, *outs, cos, sin))
    for a, b in _row_chunks(cos.shape[0], token_elements):
        _rotary_launch([_rows_of(r, a, b) for r in rows], [_rows_of(out, a, b) for out in outs], _rows_of(cos, a, b),
                       _rows_of(sin, a, b), inverse)
    return tuple(out.view(x.shape) for out, x in zip(outs, xs))


def _rotary_launch(rows: list[Tensor], outs: list[Tensor], cos: Tensor, sin: Tensor, inverse: bool) -> None:
    """One launch over the tokens of `rows` [N, H_x, D] (one to three), into `outs`."""
    num_tokens, dim, block_r = cos.shape[0], cos.shape[1], 64
    pad = 3 - len(rows)  # unused parts repeat the first: their programs never run
    padded_rows, padded_outs = rows + rows[:1] * pad, outs + outs[:1] * pad
    heads = [r.shape[1] for r in padded_rows]
    strides = [stride for r in padded_rows for stride in (r.stride(0), r.stride(1))]
    _rotary_kernel[(_cdiv(num_tokens * max(heads), block_r), len(rows))](
        *padded_rows, *padded_outs, cos, sin, num_tokens, *strides, cos.stride(0), sin.stride(0),
        H0=heads[0], H1=heads[1], H2=heads[2], HALF=dim // 2, BLOCK_HALF=_next_pow2(dim // 2),
        BLOCK_R=block_r, INVERSE=inverse,
    )


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cos: Tensor, sin: Tensor, *xs: Tensor) -> tuple[Tensor, ...]:
        ctx.save_for_backward(cos, sin)
        return _rotate(xs, cos, sin, inverse=False)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        cos, sin = ctx.saved_tensors
        return None, None, *_rotate(grads, cos, sin, inverse=True)


@torch.library.custom_op("nsa_hf::rotary", mutates_args=())
def _rotary_op(xs: list[Tensor], cos: Tensor, sin: Tensor, inverse: bool) -> list[Tensor]:
    return list(_rotate(tuple(xs), cos, sin, inverse))


@_rotary_op.register_fake
def _(xs, cos, sin, inverse):
    return [x.new_empty(x.shape) for x in xs]


def _rotary_setup(ctx, inputs, output) -> None:
    _, cos, sin, inverse = inputs
    ctx.save_for_backward(cos, sin)
    ctx.inverse = inverse


def _rotary_grad(ctx, grads: list[Tensor]):
    cos, sin = ctx.saved_tensors
    # The rotation's transpose is the inverse rotation: the same op, the other way.
    return _rotary_op(list(grads), cos, sin, not ctx.inverse), None, None, None


_rotary_op.register_autograd(_rotary_grad, setup_context=_rotary_setup)


def apply_rotary(xs: tuple[Tensor, ...], cos: Tensor, sin: Tensor) -> tuple[Tensor, ...]:
    """Rotate each x [..., H_x, D] of `xs` (one to three tensors of the same tokens, e.g. q and the keys) by
    cos/sin [..., D] (one phase per token, shared by its heads), in one launch; contiguous results. No
    gradient flows to cos and sin (they are functions of positions)."""
    if not 1 <= len(xs) <= 3:
        raise ValueError(f"`xs` must hold one to three tensors, got {len(xs)}.")
    for x in xs:
        if x.shape[-1] % 2 or cos.shape != (*x.shape[:-2], x.shape[-1]) or sin.shape != cos.shape:
            raise ValueError(
                f"`cos` and `sin` must have shape {(*x.shape[:-2], x.shape[-1])} (x {tuple(x.shape)} without its "
                f"heads, even head dim), got {tuple(cos.shape)} and {tuple(sin.shape)}."
            )
        if x.dtype != xs[0].dtype:
            raise ValueError(f"the tensors of `xs` must share one dtype, got {x.dtype} and {xs[0].dtype}.")
    if torch.compiler.is_compiling():
        return tuple(_rotary_op(list(xs), cos, sin, False))
    if not records_grad(*xs):
        return _rotate(xs, cos, sin, inverse=False)
    return _Rotary.apply(cos, sin, *xs)


@triton.jit
def _silu_mul_kernel(GATE_UP, GRAD, OUT, width, stride_row, stride_grad, stride_out, BLOCK: tl.constexpr,
                     BACKWARD: tl.constexpr):
    """One row's BLOCK columns of silu(gate) * up, gate and up the two halves of GATE_UP's row. The backward
    writes d(gate) and d(up) into OUT laid out like GATE_UP."""
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    gate = tl.load(GATE_UP + row * stride_row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(GATE_UP + row * stride_row + width + cols, mask=mask, other=0.0).to(tl.float32)
    sigmoid = 1.0 / (1.0 + tl.exp(-gate))
    silu = gate * sigmoid
    if BACKWARD:
        grad = tl.load(GRAD + row * stride_grad + cols, mask=mask, other=0.0).to(tl.float32)
        d_gate = grad * up * sigmoid * (1.0 + gate * (1.0 - sigmoid))
        tl.store(OUT + row * stride_out + cols, d_gate.to(OUT.dtype.element_ty), mask=mask)
        tl.store(OUT + row * stride_out + width + cols, (grad * silu).to(OUT.dtype.element_ty), mask=mask)
    else:
        tl.store(OUT + row * stride_out + cols, (silu * up).to(OUT.dtype.element_ty), mask=mask)


def _silu_mul_launch(gate_up: Tensor, grad: Tensor | None, out: Tensor, width: int) -> None:
    block = min(1024, _next_pow2(width))
    grad_or_input = grad if grad is not None else gate_up  # the forward never reads GRAD
    row_elements = max(gate_up.stride(0), grad_or_input.stride(0), out.stride(0))
    for a, b in _row_chunks(out.shape[0], row_elements):
        _silu_mul_kernel[(b - a, _cdiv(width, block))](
            _rows_of(gate_up, a, b), _rows_of(grad_or_input, a, b), _rows_of(out, a, b), width, gate_up.stride(0),
            grad_or_input.stride(0), out.stride(0), BLOCK=block, BACKWARD=grad is not None,
        )


def _silu_mul_forward(gate_up: Tensor, width: int) -> Tensor:
    rows = gate_up.reshape(-1, gate_up.shape[-1])
    out = torch.empty(rows.shape[0], width, device=gate_up.device, dtype=gate_up.dtype)
    _silu_mul_launch(rows, None, out, width)
    return out.view(*gate_up.shape[:-1], width)


def _silu_mul_backward(grad: Tensor, gate_up: Tensor, width: int) -> Tensor:
    rows = gate_up.reshape(-1, gate_up.shape[-1])
    # Columns past 2 * width (padding of the stacked projection) get a zero gradient.
    empty = torch.empty if rows.shape[1] == 2 * width else torch.zeros
    d_gate_up = empty(rows.shape, device=rows.device, dtype=rows.dtype)
    _silu_mul_launch(rows, grad.reshape(-1, width).contiguous(), d_gate_up, width)
    return d_gate_up.view(gate_up.shape)


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up: Tensor, width: int) -> Tensor:
        ctx.save_for_backward(gate_up)
        ctx.width = width
        return _silu_mul_forward(gate_up, width)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _silu_mul_backward(grad, *ctx.saved_tensors, ctx.width), None


@torch.library.custom_op("nsa_hf::silu_mul", mutates_args=())
def _silu_mul_op(gate_up: Tensor, width: int) -> Tensor:
    return _silu_mul_forward(gate_up, width)


@_silu_mul_op.register_fake
def _(gate_up, width):
    return gate_up.new_empty(*gate_up.shape[:-1], width)


@torch.library.custom_op("nsa_hf::silu_mul_backward", mutates_args=())
def _silu_mul_backward_op(grad: Tensor, gate_up: Tensor, width: int) -> Tensor:
    return _silu_mul_backward(grad, gate_up, width)


@_silu_mul_backward_op.register_fake
def _(grad, gate_up, width):
    return gate_up.new_empty(gate_up.shape)


def _silu_mul_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0])
    ctx.width = inputs[1]


_silu_mul_op.register_autograd(
    lambda ctx, grad: (_silu_mul_backward_op(grad, *ctx.saved_tensors, ctx.width), None), setup_context=_silu_mul_setup
)


def silu_mul(gate_up: Tensor, width: int) -> Tensor:
    """silu(gate_up[..., :width]) * gate_up[..., width:2 * width] (SwiGLU's gating), contiguous."""
    if gate_up.shape[-1] < 2 * width or gate_up.stride(-1) != 1:
        raise ValueError(
            f"`gate_up` must hold gate and up ({2 * width} columns, last dim contiguous), got {tuple(gate_up.shape)}."
        )
    if torch.compiler.is_compiling():
        return _silu_mul_op(gate_up, width)
    if not records_grad(gate_up):
        return _silu_mul_forward(gate_up, width)
    return _SiluMul.apply(gate_up, width)


@triton.jit
def _gate_kernel(O_CMP, O_SLC, O_WIN, GATES, GRAD, OUT, D_SLC, D_WIN, D_GATES, num_rows, DIM: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BACKWARD: tl.constexpr):
    """BLOCK_R (query, head) rows of sum_c g_c * o_c; the backward writes d(o_c) = g_c * grad into OUT (cmp),
    D_SLC and D_WIN, and d(g_c) = <grad, o_c> into D_GATES ([rows, 3])."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < num_rows
    d = tl.arange(0, BLOCK_D)
    mask = row_ok[:, None] & (d < DIM)[None, :]
    at = rows[:, None] * DIM + d[None, :]
    g_cmp = tl.load(GATES + rows * 3, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    g_slc = tl.load(GATES + rows * 3 + 1, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    g_win = tl.load(GATES + rows * 3 + 2, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    o_cmp = tl.load(O_CMP + at, mask=mask, other=0.0).to(tl.float32)
    o_slc = tl.load(O_SLC + at, mask=mask, other=0.0).to(tl.float32)
    o_win = tl.load(O_WIN + at, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        grad = tl.load(GRAD + at, mask=mask, other=0.0).to(tl.float32)
        tl.store(OUT + at, (g_cmp * grad).to(OUT.dtype.element_ty), mask=mask)
        tl.store(D_SLC + at, (g_slc * grad).to(D_SLC.dtype.element_ty), mask=mask)
        tl.store(D_WIN + at, (g_win * grad).to(D_WIN.dtype.element_ty), mask=mask)
        tl.store(D_GATES + rows * 3, tl.sum(grad * o_cmp, axis=1).to(D_GATES.dtype.element_ty), mask=row_ok)
        tl.store(D_GATES + rows * 3 + 1, tl.sum(grad * o_slc, axis=1).to(D_GATES.dtype.element_ty), mask=row_ok)
        tl.store(D_GATES + rows * 3 + 2, tl.sum(grad * o_win, axis=1).to(D_GATES.dtype.element_ty), mask=row_ok)
    else:
        out = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win
        tl.store(OUT + at, out.to(OUT.dtype.element_ty), mask=mask)


def _gate_launch(outputs: tuple[Tensor, Tensor, Tensor], gates: Tensor, grad: Tensor | None = None,
                 d_outputs: tuple[Tensor, Tensor, Tensor] | None = None, d_gates: Tensor | None = None,
                 out: Tensor | None = None) -> None:
    """The forward (`out`) or, with `grad`, the backward (`d_outputs`, `d_gates`); unused pointers repeat an input."""
    num_q, heads, dim = outputs[0].shape
    block_r = 32
    tensors = (*outputs, gates, grad if grad is not None else outputs[0],
               *(d_outputs if d_outputs is not None else (out, out, out)), d_gates if d_gates is not None else gates)
    for a, b in _row_chunks(num_q, heads * max(dim, 3)):
        num_rows = (b - a) * heads
        _gate_kernel[(_cdiv(num_rows, block_r),)](
            *(_rows_of(t, a, b) for t in tensors), num_rows, DIM=dim, BLOCK_D=_next_pow2(dim), BLOCK_R=block_r,
            BACKWARD=grad is not None,
        )


def _gate_forward(o_cmp: Tensor, o_slc: Tensor, o_win: Tensor, gates: Tensor) -> Tensor:
    outputs = tuple(o.contiguous() for o in (o_cmp, o_slc, o_win))
    out = torch.empty_like(outputs[0])
    if out.numel():
        _gate_launch(outputs, gates.contiguous(), out=out)
    return out


def _gate_backward(grad: Tensor, o_cmp: Tensor, o_slc: Tensor, o_win: Tensor, gates: Tensor) -> tuple[Tensor, ...]:
    outputs = tuple(o.contiguous() for o in (o_cmp, o_slc, o_win))
    gates = gates.contiguous()
    d_outputs = tuple(torch.empty_like(o) for o in outputs)
    d_gates = torch.empty_like(gates)
    if grad.numel():
        _gate_launch(outputs, gates, grad.contiguous(), d_outputs, d_gates)
    return *d_outputs, d_gates


class _GateBranches(torch.autograd.Function):
    @staticmethod
    def forward(ctx, o_cmp: Tensor, o_slc: Tensor, o_win: Tensor, gates: Tensor) -> Tensor:
        ctx.save_for_backward(o_cmp, o_slc, o_win, gates)
        return _gate_forward(o_cmp, o_slc, o_win, gates)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _gate_backward(grad, *ctx.saved_tensors)


@torch.library.custom_op("nsa_hf::gate_branches", mutates_args=())
def _gate_op(o_cmp: Tensor, o_slc: Tensor, o_win: Tensor, gates: Tensor) -> Tensor:
    return _gate_forward(o_cmp, o_slc, o_win, gates)


@_gate_op.register_fake
def _(o_cmp, o_slc, o_win, gates):
    return o_cmp.new_empty(o_cmp.shape)


@torch.library.custom_op("nsa_hf::gate_branches_backward", mutates_args=())
def _gate_backward_op(
    grad: Tensor, o_cmp: Tensor, o_slc: Tensor, o_win: Tensor, gates: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _gate_backward(grad, o_cmp, o_slc, o_win, gates)


@_gate_backward_op.register_fake
def _(grad, o_cmp, o_slc, o_win, gates):
    return tuple(t.new_empty(t.shape) for t in (o_cmp, o_slc, o_win, gates))


def _gate_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


_gate_op.register_autograd(lambda ctx, grad: _gate_backward_op(grad, *ctx.saved_tensors), setup_context=_gate_setup)


def gate_branches(o_cmp: Tensor, o_slc: Tensor, o_win: Tensor, gates: Tensor) -> Tensor:
    """`reference.gate_branches` in one kernel: o_* [Nq, HQ, Dv] (one dtype), gates [Nq, HQ, 3]."""
    if not (o_cmp.shape == o_slc.shape == o_win.shape) or gates.shape != (*o_cmp.shape[:-1], 3):
        raise ValueError(
            f"branch outputs must share one shape [Nq, HQ, Dv] and `gates` be [Nq, HQ, 3], got {tuple(o_cmp.shape)}, "
            f"{tuple(o_slc.shape)}, {tuple(o_win.shape)} and {tuple(gates.shape)}."
        )
    if not (o_cmp.dtype == o_slc.dtype == o_win.dtype):
        raise ValueError(f"branch outputs must share one dtype, got {o_cmp.dtype}, {o_slc.dtype} and {o_win.dtype}.")
    if torch.compiler.is_compiling():
        return _gate_op(o_cmp, o_slc, o_win, gates)
    if not records_grad(o_cmp, o_slc, o_win, gates):
        return _gate_forward(o_cmp, o_slc, o_win, gates)
    return _GateBranches.apply(o_cmp, o_slc, o_win, gates)


@triton.jit
def _cross_entropy_fwd_kernel(LOGITS, LABELS, LOSS, LSE, vocab, stride_row, ignore_index, BLOCK: tl.constexpr):
    """One row: its logsumexp (online over BLOCK-wide chunks, in fp32) and lse - logit[label]; 0 for an ignored
    row, NaN for a label outside [0, vocab) (PyTorch raises there; a host check would cost a sync)."""
    row = tl.program_id(0)
    logits = LOGITS + row.to(tl.int64) * stride_row
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK], tl.float32)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(logits + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        total = total * tl.exp(m - m_safe) + tl.exp(x - m_safe)
        m = m_new
    top = tl.max(m, axis=0)
    lse = top + tl.log(tl.sum(total * tl.exp(m - top), axis=0))
    label = tl.load(LABELS + row).to(tl.int32)
    valid = (label >= 0) & (label < vocab)
    target = tl.load(logits + label, mask=valid, other=0.0).to(tl.float32)
    loss = tl.where(valid, lse - target, float("nan"))
    tl.store(LOSS + row, tl.where(label == ignore_index, 0.0, loss))
    tl.store(LSE + row, lse)


@triton.jit
def _cross_entropy_bwd_kernel(LOGITS, LABELS, LSE, GRAD, DLOGITS, vocab, stride_row, stride_drow, ignore_index,
                              BLOCK: tl.constexpr):
    """BLOCK columns of one row's d(logits) = grad * (softmax - onehot(label)), 0 for an ignored row."""
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < vocab
    x = tl.load(LOGITS + row.to(tl.int64) * stride_row + cols, mask=mask, other=0.0).to(tl.float32)
    label = tl.load(LABELS + row).to(tl.int32)
    grad = tl.where(label == ignore_index, 0.0, tl.load(GRAD + row))
    d = (tl.exp(x - tl.load(LSE + row)) - (cols == label).to(tl.float32)) * grad
    tl.store(DLOGITS + row.to(tl.int64) * stride_drow + cols, d.to(DLOGITS.dtype.element_ty), mask=mask)


_CE_BLOCK = 4096  # logits per chunk of a row (16 KB of fp32 in flight per program)


def _cross_entropy_forward(logits: Tensor, labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """(losses [N] fp32, lse [N] fp32)."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    labels = labels.contiguous()
    num_rows, vocab = logits.shape
    losses = torch.empty(num_rows, device=logits.device, dtype=torch.float32)
    lse = torch.empty_like(losses)
    block = min(_CE_BLOCK, _next_pow2(vocab))
    if num_rows:
        _cross_entropy_fwd_kernel[(num_rows,)](logits, labels, losses, lse, vocab, logits.stride(0), ignore_index,
                                               BLOCK=block)
    return losses, lse


def _cross_entropy_backward(grad: Tensor, logits: Tensor, labels: Tensor, lse: Tensor, ignore_index: int) -> Tensor:
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    num_rows, vocab = logits.shape
    d_logits = torch.empty(logits.shape, device=logits.device, dtype=logits.dtype)
    block = min(_CE_BLOCK, _next_pow2(vocab))
    if num_rows:
        _cross_entropy_bwd_kernel[(num_rows, _cdiv(vocab, block))](
            logits, labels.contiguous(), lse, grad.float().contiguous(), d_logits, vocab, logits.stride(0),
            d_logits.stride(0), ignore_index, BLOCK=block,
        )
    return d_logits


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
        losses, lse = _cross_entropy_forward(logits, labels, ignore_index)
        ctx.save_for_backward(logits, labels, lse)
        ctx.ignore_index = ignore_index
        ctx.mark_non_differentiable(labels)
        return losses

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _cross_entropy_backward(grad, *ctx.saved_tensors, ctx.ignore_index), None, None


@torch.library.custom_op("nsa_hf::cross_entropy", mutates_args=())
def _cross_entropy_op(logits: Tensor, labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    return _cross_entropy_forward(logits, labels, ignore_index)


@_cross_entropy_op.register_fake
def _(logits, labels, ignore_index):
    return (logits.new_empty(logits.shape[0], dtype=torch.float32), logits.new_empty(logits.shape[0], dtype=torch.float32))


@torch.library.custom_op("nsa_hf::cross_entropy_backward", mutates_args=())
def _cross_entropy_backward_op(grad: Tensor, logits: Tensor, labels: Tensor, lse: Tensor, ignore_index: int) -> Tensor:
    return _cross_entropy_backward(grad, logits, labels, lse, ignore_index)


@_cross_entropy_backward_op.register_fake
def _(grad, logits, labels, lse, ignore_index):
    return logits.new_empty(logits.shape)


def _cross_entropy_setup(ctx, inputs, output) -> None:
    logits, labels, ignore_index = inputs
    ctx.save_for_backward(logits, labels, output[1])
    ctx.ignore_index = ignore_index
    ctx.mark_non_differentiable(output[1])


def _cross_entropy_grad(ctx, grad: Tensor, _dlse: Tensor | None):
    return _cross_entropy_backward_op(grad, *ctx.saved_tensors, ctx.ignore_index), None, None


_cross_entropy_op.register_autograd(_cross_entropy_grad, setup_context=_cross_entropy_setup)


def cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Per-row cross entropy of logits [N, V] (any float dtype, read once and upcast in the kernel, never
    copied to fp32) against labels [N]: fp32 [N], 0 where the label is `ignore_index`. The logits' gradient
    comes back in their dtype."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"`logits` must be [N, V] and `labels` [N], got {tuple(logits.shape)} and {tuple(labels.shape)}."
        )
    if labels.dtype.is_floating_point:
        raise ValueError(f"`labels` must be an integer tensor, got {labels.dtype}.")
    if torch.compiler.is_compiling():
        return _cross_entropy_op(logits, labels, ignore_index)[0]
    return _CrossEntropy.apply(logits, labels, ignore_index)
