# Generated from src/nsa_hf by `nsa-hf export-remote-code` (nsa_hf/remote_code.py); do not edit.
"""NSA's primitives as torch.library custom ops, so torch.compile sees through the attention (fullgraph=True).

The public functions here (`interval_attention`, `block_attention`, `select_blocks`) call the ops while torch.compile
traces, and in eager mode run the same kernels through a plain autograd Function, which spares the op dispatch
on every call; `tests/test_compile.py` holds the two paths equal.

Each primitive is one op for every backend, the backend named by a string argument: interval attention (the
compressed branch and the window), block attention (the selection branch), each with its backward as a second op
(registered autograd), and block selection (not differentiable). The ops are opaque to the compiler, which only
needs their fake implementations (output shapes); inside, a backend runs eagerly: index work with host syncs, a
loop over query chunks, Triton launches.

A backend provides `Kernels`. One given as differentiable PyTorch functions (`composition.Primitives`, like the
reference) gets its backward ops by recomputation (`kernels_from_primitives`); Triton brings its own backward
kernels. `backends.py` registers them here when a backend is first resolved.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from .nsa_ops_layout import (
    BranchRanges,
    CompressionBlocks,
    QueryLayout,
    SparsePattern,
    cu_seqlens_from_starts,
    num_compressed_blocks,
)

__all__ = [
    "Kernels",
    "block_attention",
    "decode_attention",
    "document_layout",
    "eager_block_attention",
    "eager_interval_attention",
    "fuses_decoding",
    "interval_attention",
    "kernels_from_primitives",
    "register_kernels",
    "select_blocks",
]


def records_grad(*tensors: Tensor) -> bool:
    """Whether autograd records a call on these inputs. When not (decoding, inference), the eager wrappers call a
    forward directly: an autograd Function's apply costs host time that a decoding step pays in every layer."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _no_residual(q: Tensor, k: Tensor, v: Tensor, block_starts: Tensor) -> int:
    return 0


class Kernels(NamedTuple):
    """What one backend runs inside the ops; `run_length` and `documents` None mean "no hint" (the op schemas
    carry run_length 0 for it, turned back into None before a backend sees it)."""

    # (q, k, v, lo, hi, scale, run_length, documents) -> (o [Nq, HQ, Dv], lse [Nq, HQ] fp32)
    interval_forward: Callable[..., tuple[Tensor, Tensor]]
    # (do, dlse or None, q, k, v, o, lse, lo, hi, scale, run_length, documents, max_readers) -> (dq, dk, dv)
    interval_backward: Callable[..., tuple[Tensor, Tensor, Tensor]]
    # (q, k, v, block_starts, block_size, hi, scale) -> (o, lse [Nq, HQ] fp32, residual: int32 [R], what the
    # backward may reuse, of `block_residual_size` elements: a backend that returns one overrides that too)
    block_forward: Callable[..., tuple[Tensor, Tensor, Tensor]]
    # (do, q, k, v, o, lse, residual, block_starts, block_size, hi, scale) -> (dq, dk, dv)
    block_backward: Callable[..., tuple[Tensor, Tensor, Tensor]]
    # (q, k_cmp, lse, layout, pattern, scale) -> [Nq, H, n] int32
    select: Callable[..., Tensor]
    # (q, k, v, block_starts) -> R, from shapes alone (the op's fake implementation asks)
    block_residual_size: Callable[[Tensor, Tensor, Tensor, Tensor], int] = _no_residual
    # A decoding step's whole attention, gates included, where every row has one query (`layout.run_length == 1`),
    # not differentiable: (q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, layout, pattern, scale, ranges) -> o.
    # None: the composition of the primitives runs instead.
    decode: Callable[..., Tensor] | None = None


_KERNELS: dict[str, Kernels] = {}


def register_kernels(name: str, kernels: Kernels) -> None:
    """Make the ops run `kernels` when called with backend=`name` (`backends.resolve_primitives` calls this)."""
    _KERNELS[name] = kernels


def _kernels(name: str) -> Kernels:
    if name not in _KERNELS:
        raise ValueError(f"no NSA kernels registered under {name!r}: resolve the backend first (`backends.resolve_primitives`).")
    return _KERNELS[name]


def _recomputed_grads(
    fn: Callable[..., Tensor | tuple[Tensor, ...]], inputs: tuple[Tensor, ...], grad_out: Tensor | tuple[Tensor, ...]
) -> tuple[Tensor, ...]:
    """Gradients of `fn(*inputs)` for `grad_out`, from a recomputation under autograd. An op's implementation
    runs with autograd dispatch excluded, which `enable_grad` alone does not undo: the guard lifts that too."""
    exclude = torch._C._dispatch_tls_local_exclude_set().remove(torch._C.DispatchKey.AutogradFunctionality)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        leaves = tuple(t.detach().requires_grad_() for t in inputs)
        outs = fn(*leaves)
        outs, grads = (outs, grad_out) if isinstance(outs, tuple) else ((outs,), (grad_out,))
        # An output computed without touching the inputs (no query sees a key) has no gradient to pass on.
        pairs = [(out, grad) for out, grad in zip(outs, grads, strict=True) if out.requires_grad]
        if not pairs:
            return tuple(torch.zeros_like(t) for t in inputs)
        used_outs, used_grads = zip(*pairs, strict=True)
        return torch.autograd.grad(used_outs, leaves, used_grads, allow_unused=True, materialize_grads=True)


def _op_documents(documents: Tensor | tuple[int, ...] | None) -> tuple[Tensor | None, list[int]]:
    """A layout's document boundaries as the ops take them: a tensor (boundaries that are data: packed documents
    found under torch.compile) or host ints, which the compiled graph holds as constants. Host ints keep a CPU
    tensor out of the graph, whose outputs CUDA graphs (mode="reduce-overhead") need in their own memory pool."""
    if documents is None or isinstance(documents, Tensor):
        return documents, []
    return None, list(documents)


def _documents(documents: Tensor | None, bounds: list[int]) -> Tensor | tuple[int, ...] | None:
    return documents if documents is not None else (tuple(bounds) or None)


def kernels_from_primitives(interval: Callable, block: Callable, select: Callable) -> Kernels:
    """The kernels of a backend given as differentiable functions: forward without autograd, backward by
    recomputing the forward under autograd (the reference checkpoints its query chunks, so memory stays linear)."""

    def interval_forward(q, k, v, lo, hi, scale, run_length, documents):
        return interval(q, k, v, lo, hi, scale, run_length)

    def interval_backward(do, dlse, q, k, v, o, lse, lo, hi, scale, run_length, documents, max_readers):
        def recompute(*qkv: Tensor) -> tuple[Tensor, Tensor]:
            o, lse = interval(*qkv, lo, hi, scale, run_length)
            return o, torch.where(torch.isfinite(lse), lse, 0)  # -inf where no key is seen: gradient 0 there, not NaN

        if dlse is None:
            return _recomputed_grads(lambda *qkv: recompute(*qkv)[0], (q, k, v), do)
        return _recomputed_grads(recompute, (q, k, v), (do, dlse))

    def block_forward(q, k, v, block_starts, block_size, hi, scale):
        lse = q.new_zeros(q.shape[0], q.shape[1], dtype=torch.float32)  # unused: the backward recomputes
        return block(q, k, v, block_starts, block_size, hi, scale), lse, q.new_empty(0, dtype=torch.int32)

    def block_backward(do, q, k, v, o, lse, residual, block_starts, block_size, hi, scale):
        return _recomputed_grads(lambda *x: block(*x, block_starts, block_size, hi, scale), (q, k, v), do)

    return Kernels(interval_forward, interval_backward, block_forward, block_backward, select)


# ---------------------------------------------------------------------------------------------------
# Interval attention: query i attends to keys [lo[i], hi[i]) of a flat store
# ---------------------------------------------------------------------------------------------------


@torch.library.custom_op("nsa_hf::interval_attention", mutates_args=())
def _interval_op(
    q: Tensor, k: Tensor, v: Tensor, lo: Tensor, hi: Tensor, scale: float, run_length: int, documents: Tensor | None,
    bounds: list[int], max_readers: int, backend: str,
) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        o, lse = _kernels(backend).interval_forward(q, k, v, lo, hi, scale, run_length or None, _documents(documents, bounds))
    return o.contiguous(), lse.contiguous()


@_interval_op.register_fake
def _(q, k, v, lo, hi, scale, run_length, documents, bounds, max_readers, backend):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[2]), q.new_empty(q.shape[0], q.shape[1], dtype=torch.float32)


@torch.library.custom_op("nsa_hf::interval_attention_backward", mutates_args=())
def _interval_backward_op(
    do: Tensor, dlse: Tensor | None, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, lo: Tensor, hi: Tensor, scale: float,
    run_length: int, documents: Tensor | None, bounds: list[int], max_readers: int, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = _kernels(backend).interval_backward(
        do, dlse, q, k, v, o, lse, lo, hi, scale, run_length or None, _documents(documents, bounds), max_readers or None
    )
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_interval_backward_op.register_fake
def _(do, dlse, q, k, v, o, lse, lo, hi, scale, run_length, documents, bounds, max_readers, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _interval_setup(ctx, inputs, output) -> None:
    q, k, v, lo, hi, scale, run_length, documents, bounds, max_readers, backend = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, lo, hi, o, lse, documents)
    ctx.scale, ctx.run_length, ctx.bounds, ctx.max_readers, ctx.backend = scale, run_length, bounds, max_readers, backend


def _interval_grad(ctx, do: Tensor | None, dlse: Tensor | None):
    q, k, v, lo, hi, o, lse, documents = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(o)
    dq, dk, dv = _interval_backward_op(
        do, dlse, q, k, v, o, lse, lo, hi, ctx.scale, ctx.run_length, documents, ctx.bounds, ctx.max_readers, ctx.backend
    )
    return dq, dk, dv, None, None, None, None, None, None, None, None


_interval_op.register_autograd(_interval_grad, setup_context=_interval_setup)


class _IntervalFunction(torch.autograd.Function):
    """The eager path of interval attention: a backend's forward and backward functions, without the op dispatch
    (tens of microseconds a call, which a decoding step pays per layer and branch)."""

    @staticmethod
    def forward(ctx, q, k, v, lo, hi, scale, run_length, documents, max_readers, forward, backward):
        o, lse = forward(q, k, v, lo, hi, scale, run_length, documents)
        ctx.save_for_backward(q, k, v, lo, hi, o, lse)
        ctx.scale, ctx.run_length, ctx.documents, ctx.max_readers = scale, run_length, documents, max_readers
        ctx.backward = backward
        ctx.set_materialize_grads(False)
        return o, lse

    @staticmethod
    def backward(ctx, do: Tensor | None, dlse: Tensor | None):
        q, k, v, lo, hi, o, lse = ctx.saved_tensors
        do = torch.zeros_like(o) if do is None else do
        dq, dk, dv = ctx.backward(do, dlse, q, k, v, o, lse, lo, hi, ctx.scale, ctx.run_length, ctx.documents, ctx.max_readers)
        return dq, dk, dv, None, None, None, None, None, None, None, None


def eager_interval_attention(
    forward: Callable[..., tuple[Tensor, Tensor]], backward: Callable[..., tuple[Tensor, Tensor, Tensor]], q: Tensor,
    k: Tensor, v: Tensor, lo: Tensor, hi: Tensor, scale: float, run_length: int | None = None,
    documents: Tensor | tuple[int, ...] | None = None, max_readers: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Differentiable interval attention from a `Kernels.interval_forward` / `interval_backward` pair."""
    if not records_grad(q, k, v):
        return forward(q, k, v, lo, hi, scale, run_length, documents)
    return _IntervalFunction.apply(q, k, v, lo, hi, scale, run_length, documents, max_readers, forward, backward)


def interval_attention(
    q: Tensor, k: Tensor, v: Tensor, lo: Tensor, hi: Tensor, scale: float, *, backend: str,
    run_length: int | None = None, documents: Tensor | None = None, max_readers: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Each query i attends to the keys [lo[i], hi[i]) of k/v on `backend` (a registered name, not "auto"):
    q [Nq, HQ, D], k/v [Nk, H, D*] -> (o [Nq, HQ, Dv], lse [Nq, HQ] fp32; both differentiable). `run_length`
    (queries per row when decoding) and `documents` (a full pass's host boundaries) are tiling hints; `max_readers`, a
    bound on how many queries see one key (the window's w), spares the backward programs for longer reader ranges."""
    if torch.compiler.is_compiling():
        return _interval_op(q, k, v, lo, hi, float(scale), run_length or 0, *_op_documents(documents), max_readers or 0, backend)
    kernels = _kernels(backend)
    return eager_interval_attention(
        kernels.interval_forward, kernels.interval_backward, q, k, v, lo, hi, float(scale), run_length or None,
        documents, max_readers,
    )


# ---------------------------------------------------------------------------------------------------
# Block attention: each query attends to the blocks it selected, below hi[i]
# ---------------------------------------------------------------------------------------------------


@torch.library.custom_op("nsa_hf::block_attention", mutates_args=())
def _block_op(
    q: Tensor, k: Tensor, v: Tensor, block_starts: Tensor, block_size: int, hi: Tensor, scale: float, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    with torch.no_grad():
        o, lse, residual = _kernels(backend).block_forward(q, k, v, block_starts, block_size, hi, scale)
    return o.contiguous(), lse.contiguous(), residual


@_block_op.register_fake
def _(q, k, v, block_starts, block_size, hi, scale, backend):
    residual = _kernels(backend).block_residual_size(q, k, v, block_starts)
    return (q.new_empty(q.shape[0], q.shape[1], v.shape[2]), q.new_empty(q.shape[0], q.shape[1], dtype=torch.float32),
            q.new_empty(residual, dtype=torch.int32))


@torch.library.custom_op("nsa_hf::block_attention_backward", mutates_args=())
def _block_backward_op(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, residual: Tensor, block_starts: Tensor,
    block_size: int, hi: Tensor, scale: float, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = _kernels(backend).block_backward(do, q, k, v, o, lse, residual, block_starts, block_size, hi, scale)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_block_backward_op.register_fake
def _(do, q, k, v, o, lse, residual, block_starts, block_size, hi, scale, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _block_setup(ctx, inputs, output) -> None:
    q, k, v, block_starts, block_size, hi, scale, backend = inputs
    o, lse, residual = output
    ctx.save_for_backward(q, k, v, o, lse, residual, block_starts, hi)
    ctx.block_size, ctx.scale, ctx.backend = block_size, scale, backend
    ctx.mark_non_differentiable(lse, residual)


def _block_grad(ctx, do: Tensor | None, _dlse: Tensor | None, _dresidual: Tensor | None):
    q, k, v, o, lse, residual, block_starts, hi = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(o)
    dq, dk, dv = _block_backward_op(
        do, q, k, v, o, lse, residual, block_starts, ctx.block_size, hi, ctx.scale, ctx.backend
    )
    return dq, dk, dv, None, None, None, None, None


_block_op.register_autograd(_block_grad, setup_context=_block_setup)


class _BlockFunction(torch.autograd.Function):
    """The eager path of block attention (see `_IntervalFunction`)."""

    @staticmethod
    def forward(ctx, q, k, v, block_starts, block_size, hi, scale, forward, backward):
        o, lse, residual = forward(q, k, v, block_starts, block_size, hi, scale)
        ctx.save_for_backward(q, k, v, o, lse, residual, block_starts, hi)
        ctx.block_size, ctx.scale, ctx.backward = block_size, scale, backward
        return o

    @staticmethod
    def backward(ctx, do: Tensor):
        q, k, v, o, lse, residual, block_starts, hi = ctx.saved_tensors
        dq, dk, dv = ctx.backward(do, q, k, v, o, lse, residual, block_starts, ctx.block_size, hi, ctx.scale)
        return dq, dk, dv, None, None, None, None, None, None


def eager_block_attention(
    forward: Callable[..., tuple[Tensor, Tensor, Tensor]], backward: Callable[..., tuple[Tensor, Tensor, Tensor]], q: Tensor,
    k: Tensor, v: Tensor, block_starts: Tensor, block_size: int, hi: Tensor, scale: float,
) -> Tensor:
    """Differentiable block attention from a `Kernels.block_forward` / `block_backward` pair."""
    if not records_grad(q, k, v):
        return forward(q, k, v, block_starts, block_size, hi, scale)[0]
    return _BlockFunction.apply(q, k, v, block_starts, block_size, hi, scale, forward, backward)


def block_attention(
    q: Tensor, k: Tensor, v: Tensor, block_starts: Tensor, block_size: int, hi: Tensor, scale: float, *, backend: str,
) -> Tensor:
    """Each query attends to the keys s < hi[i] of the blocks [start, start + block_size) it selected, on
    `backend`: q [Nq, HQ, D], k/v [Nk, H, D*], block_starts [Nq, H, n] (negative: empty slot) -> o [Nq, HQ, Dv]."""
    if torch.compiler.is_compiling():
        return _block_op(q, k, v, block_starts, block_size, hi, float(scale), backend)[0]
    kernels = _kernels(backend)
    return eager_block_attention(kernels.block_forward, kernels.block_backward, q, k, v, block_starts, block_size, hi, float(scale))


# ---------------------------------------------------------------------------------------------------
# Block selection: top-n selection blocks from the compressed attention probabilities
# ---------------------------------------------------------------------------------------------------


@torch.library.custom_op("nsa_hf::select_blocks", mutates_args=())
def _select_op(
    q: Tensor, k_cmp: Tensor, lse: Tensor, positions: Tensor, cmp_offsets: Tensor, run_length: int,
    documents: Tensor | None, bounds: list[int], pattern: list[int], scale: float, backend: str,
) -> Tensor:
    layout = QueryLayout(positions, positions, cmp_offsets, positions, run_length or None, _documents(documents, bounds))
    with torch.no_grad():
        return _kernels(backend).select(q, k_cmp, lse, layout, SparsePattern(*pattern), scale).contiguous()


@_select_op.register_fake
def _(q, k_cmp, lse, positions, cmp_offsets, run_length, documents, bounds, pattern, scale, backend):
    return q.new_empty(q.shape[0], k_cmp.shape[1], pattern[3], dtype=torch.int32)


def select_blocks(
    q: Tensor, k_cmp: Tensor, lse: Tensor, layout: QueryLayout, pattern: SparsePattern, scale: float, *, backend: str,
) -> Tensor:
    """Top-n selection blocks per (query, key head) on `backend`: [Nq, H, n] int32, relative to each query's
    document, -1 for empty slots (`reference.select_blocks_varlen`'s rule). Not differentiable."""
    if not torch.compiler.is_compiling():
        with torch.no_grad():
            return _kernels(backend).select(q, k_cmp, lse, layout, pattern, scale)
    return _select_op(
        q.detach(), k_cmp.detach(), lse.detach(), layout.positions, layout.cmp_offsets, layout.run_length or 0,
        *_op_documents(layout.documents), _pattern_fields(pattern), float(scale), backend,
    )


def _pattern_fields(pattern: SparsePattern) -> list[int]:
    """A pattern as an op argument (`SparsePattern(*fields)` rebuilds it)."""
    return [
        pattern.compress_block_size, pattern.compress_stride, pattern.select_block_size, pattern.num_selected_blocks,
        pattern.num_init_blocks, pattern.num_local_blocks, pattern.window_size,
    ]


# ---------------------------------------------------------------------------------------------------
# Decoding: a step's whole attention in one op, for backends that fuse it
# ---------------------------------------------------------------------------------------------------


@torch.library.custom_op("nsa_hf::decode_attention", mutates_args=())
def _decode_op(
    q: Tensor, k_cmp: Tensor, v_cmp: Tensor, k_slc: Tensor, v_slc: Tensor, k_win: Tensor, v_win: Tensor, gates: Tensor,
    positions: Tensor, key_offsets: Tensor, cmp_offsets: Tensor, window_offsets: Tensor, cmp_lo: Tensor,
    cmp_hi: Tensor, win_lo: Tensor, win_hi: Tensor, key_ends: Tensor, pattern: list[int], scale: float, backend: str,
) -> Tensor:
    layout = QueryLayout(positions, key_offsets, cmp_offsets, window_offsets, run_length=1)
    ranges = BranchRanges(cmp_lo, cmp_hi, win_lo, win_hi, key_ends)
    return _kernels(backend).decode(
        q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, layout, SparsePattern(*pattern), scale, ranges
    ).contiguous()


@_decode_op.register_fake
def _(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, positions, key_offsets, cmp_offsets, window_offsets, cmp_lo,
      cmp_hi, win_lo, win_hi, key_ends, pattern, scale, backend):
    return q.new_empty(q.shape[0], q.shape[1], v_slc.shape[2])


def fuses_decoding(backend: str) -> bool:
    """Whether `backend` runs a decoding step's attention as one fused function (`Kernels.decode`)."""
    return _kernels(backend).decode is not None


def decode_attention(
    q: Tensor, k_cmp: Tensor, v_cmp: Tensor, k_slc: Tensor, v_slc: Tensor, k_win: Tensor, v_win: Tensor, gates: Tensor,
    layout: QueryLayout, pattern: SparsePattern, scale: float, ranges: BranchRanges, *, backend: str,
) -> Tensor:
    """`composition.nsa_attention_varlen` for one query per row on a backend that fuses it (`fuses_decoding`): the
    same arguments, gates included; not differentiable."""
    if not torch.compiler.is_compiling():
        return _kernels(backend).decode(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, layout, pattern, scale, ranges)
    return _decode_op(
        q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, layout.positions, layout.key_offsets, layout.cmp_offsets,
        layout.window_offsets, *ranges[:4], ranges.key_ends, _pattern_fields(pattern), float(scale), backend,
    )


# ---------------------------------------------------------------------------------------------------
# The layout of packed documents: data-dependent index building, one op so the compiled graph stays whole
# ---------------------------------------------------------------------------------------------------


@torch.library.custom_op("nsa_hf::document_layout", mutates_args=())
def _document_layout_op(
    doc_starts: Tensor | None, cu_seqlens: Tensor | None, invalid: Tensor | None, invalid_message: str, num_tokens: int,
    block_size: int, stride: int, device: torch.device,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    if invalid is not None and bool(invalid):
        raise ValueError(invalid_message)
    if cu_seqlens is None:
        cu_seqlens = cu_seqlens_from_starts(doc_starts)
    layout, blocks = QueryLayout.from_cu_seqlens(cu_seqlens, block_size, stride, num_tokens, device=device)
    # Padded to the most blocks any documents of num_tokens can hold, so the output size is known before the
    # boundaries are: slots past the real blocks hold a valid block that no query reads.
    pad = num_compressed_blocks(num_tokens, block_size, stride) - blocks.count
    token_starts = torch.nn.functional.pad(blocks.token_starts, (0, pad))
    positions = torch.nn.functional.pad(blocks.positions, (0, pad), value=block_size - 1)
    documents = torch.tensor(layout.documents + (num_tokens,) * (num_tokens + 1 - len(layout.documents)), dtype=torch.long)
    return layout.positions, layout.key_offsets, layout.cmp_offsets, token_starts, positions, documents


@_document_layout_op.register_fake
def _(doc_starts, cu_seqlens, invalid, invalid_message, num_tokens, block_size, stride, device):
    tokens = torch.empty(num_tokens, dtype=torch.long, device=device)
    blocks = torch.empty(num_compressed_blocks(num_tokens, block_size, stride), dtype=torch.long, device=device)
    return tokens, torch.empty_like(tokens), torch.empty_like(tokens), blocks, torch.empty_like(blocks), torch.empty(
        num_tokens + 1, dtype=torch.long
    )


def document_layout(
    num_tokens: int, block_size: int, stride: int, device: torch.device, *, doc_starts: Tensor | None = None,
    cu_seqlens: Tensor | None = None, invalid: Tensor | None = None, invalid_message: str = "",
) -> tuple[QueryLayout, CompressionBlocks]:
    """The layout of packed documents over `num_tokens` flat tokens, from a mask of document starts [B, T] (every
    row starts one, marked or not) or from `cu_seqlens`, its index tensors on `device`; compressed blocks padded to `num_compressed_blocks(num_tokens)` slots.
    One host sync when the boundaries live on a GPU. `invalid` (a bool tensor) raises `invalid_message` when true:
    a check on the inputs that needs the host, done here where the host waits anyway."""
    positions, key_offsets, cmp_offsets, token_starts, block_positions, documents = _document_layout_op(
        doc_starts, cu_seqlens, invalid, invalid_message, num_tokens, block_size, stride, torch.device(device)
    )
    layout = QueryLayout(positions, key_offsets, cmp_offsets, key_offsets, documents=documents)
    return layout, CompressionBlocks(token_starts, block_positions, token_starts.shape[0])
