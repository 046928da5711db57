"""NSA's operators in the batch layout of other NSA libraries: q [B, T, HQ, D], k/v [B, T, H, D], and optional
`cu_seqlens` (B == 1) for packed documents, whose blocks, windows and selection restart at each document.

Every function takes `backend=`: "auto" (the default: the Triton kernels on CUDA when installed, else the PyTorch
reference), "reference", "triton", or a backend added with `backends.register_backend`.
"""

from __future__ import annotations

from torch import Tensor

from . import library
from .backends import backend_gate, resolve_primitives
from .composition import (
    compressed_attention_varlen,
    nsa_attention_varlen,
    selection_attention_varlen,
    sliding_window_attention_varlen,
)
from .layout import PAPER, QueryLayout, SparsePattern, cu_seqlens_from_batch
from .reference import _acc

__all__ = ["compressed_attention", "nsa_attention", "select_blocks", "selection_attention", "sliding_window_attention"]


def _check_qkv(q: Tensor, same_length: tuple[str, ...] = (), **tensors: Tensor) -> None:
    """Shapes and dtypes of the batch-layout API; `same_length` names tensors that must have q's T."""
    if q.dim() != 4:
        raise ValueError(f"`q` must have shape [B, T, HQ, D], got {tuple(q.shape)}.")
    if not q.is_floating_point():
        raise ValueError(f"`q` must be a floating-point tensor, got {q.dtype}.")
    heads_kv = None
    for name, t in tensors.items():
        if t.dim() != 4:
            raise ValueError(f"`{name}` must have shape [B, T, H, D], got {tuple(t.shape)}.")
        if t.shape[0] != q.shape[0]:
            raise ValueError(f"`{name}` has batch size {t.shape[0]} but `q` has {q.shape[0]}.")
        if t.dtype != q.dtype:
            raise ValueError(f"`{name}` has dtype {t.dtype} but `q` has {q.dtype}.")
        if name in same_length and t.shape[1] != q.shape[1]:
            raise ValueError(f"`{name}` has {t.shape[1]} tokens but `q` has {q.shape[1]}.")
        if heads_kv is not None and t.shape[2] != heads_kv:
            raise ValueError(f"`{name}` has {t.shape[2]} key/value heads but the other key/value tensors have {heads_kv}.")
        heads_kv = t.shape[2]
        if q.shape[2] % heads_kv:
            raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of the key/value heads of `{name}` ({heads_kv}).")


def _batch_layout(q: Tensor, pattern: SparsePattern, cu_seqlens: Tensor | None) -> tuple[QueryLayout, int]:
    """The flat layout of q's tokens and the number of compressed blocks they hold."""
    batch, seq_len = q.shape[:2]
    if cu_seqlens is None:
        cu_seqlens = cu_seqlens_from_batch(batch, seq_len)  # on the host: the layout needs no host sync
    elif batch != 1:
        raise ValueError(f"with `cu_seqlens` (packed documents) the batch size must be 1, got {batch}.")
    elif not isinstance(cu_seqlens, Tensor):
        raise ValueError(f"`cu_seqlens` must be a tensor, got {type(cu_seqlens).__name__}.")
    layout, blocks = QueryLayout.from_cu_seqlens(
        cu_seqlens, pattern.compress_block_size, pattern.compress_stride, num_tokens=batch * seq_len, device=q.device
    )
    return layout, blocks.count


def _flat(x: Tensor) -> Tensor:
    return x.reshape(-1, *x.shape[2:])


def _check_cmp(k_cmp: Tensor, num_blocks: int, batch: int) -> None:
    expected = num_blocks // batch
    if k_cmp.shape[1] != expected:
        raise ValueError(
            f"`k_cmp` holds {k_cmp.shape[1]} compressed blocks per row but the sequence has {expected} "
            "complete blocks (floor((T - l) / d) + 1 per document)."
        )


def compressed_attention(
    q: Tensor,
    k_cmp: Tensor,
    v_cmp: Tensor,
    block_size: int,
    stride: int,
    scale: float | None = None,
    cu_seqlens: Tensor | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Attention over compressed blocks. q [B, T, HQ, D], k_cmp/v_cmp [B, N_cmp, H, D].

    Block i covers tokens [i*d, i*d + l) and is visible to query t once complete (i*d + l - 1 <= t).
    Returns o [B, T, HQ, Dv] and lse [B, T, HQ] (fp32); where no block is visible o is 0 and lse -inf.
    With `cu_seqlens`, k_cmp concatenates each document's blocks in order.
    """
    _check_qkv(q, k_cmp=k_cmp, v_cmp=v_cmp)
    pattern = SparsePattern(compress_block_size=block_size, compress_stride=stride, select_block_size=stride)
    layout, num_blocks = _batch_layout(q, pattern, cu_seqlens)
    _check_cmp(k_cmp, num_blocks, q.shape[0])
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    backend = resolve_primitives(backend, q.device, "backend")
    o, lse = compressed_attention_varlen(q.reshape(-1, *q.shape[2:]), _flat(k_cmp), _flat(v_cmp), layout, pattern, scale, backend)
    return o.view(*q.shape[:3], -1), lse.view(*q.shape[:3])


def select_blocks(
    q: Tensor,
    k_cmp: Tensor,
    lse: Tensor,
    compress_block_size: int,
    compress_stride: int,
    select_block_size: int,
    num_selected_blocks: int,
    num_init_blocks: int = PAPER.num_init_blocks,
    num_local_blocks: int = PAPER.num_local_blocks,
    scale: float | None = None,
    cu_seqlens: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """Selection blocks per query and key head: Eq. 9 overlap mapping, Eq. 10 group sum, forced blocks, top-n.

    q [B, T, HQ, D], k_cmp [B, N_cmp, H, D], lse [B, T, HQ] from `compressed_attention`.
    Returns block_indices [B, T, H, n] int32: selection-block indices relative to the document, the
    forced blocks (initial, and the local ones ending at the block holding t) always included, ties
    broken toward the lower index, -1 for empty slots. Slot order is not semantic.
    """
    _check_qkv(q, k_cmp=k_cmp)
    pattern = SparsePattern(compress_block_size, compress_stride, select_block_size, num_selected_blocks, num_init_blocks, num_local_blocks)
    layout, num_blocks = _batch_layout(q, pattern, cu_seqlens)
    _check_cmp(k_cmp, num_blocks, q.shape[0])
    if lse.shape != q.shape[:3]:
        raise ValueError(f"`lse` must have shape {tuple(q.shape[:3])}, got {tuple(lse.shape)}.")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    backend = resolve_primitives(backend, q.device, "backend")
    indices = library.select_blocks(
        q.reshape(-1, *q.shape[2:]), _flat(k_cmp), _acc(lse.reshape(-1, q.shape[2])), layout, pattern, scale, backend=backend
    )
    return indices.view(q.shape[0], q.shape[1], k_cmp.shape[2], -1)


def selection_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_indices: Tensor,
    block_size: int,
    scale: float | None = None,
    cu_seqlens: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """Attention over selected raw blocks. q [B, T, HQ, D], k/v [B, T, H, D], block_indices [B, T, H, n].

    Query t attends to every key s <= t inside its selected blocks [j*l', (j+1)*l'); -1 slots are empty.
    The indices of one (query, head) must be distinct, as `select_blocks` returns them: a repeated index
    would count its keys twice.
    """
    _check_qkv(q, ('k', 'v'), k=k, v=v)
    if block_indices.dim() != 4 or block_indices.shape[:3] != (*q.shape[:2], k.shape[2]):
        raise ValueError(
            f"`block_indices` must have shape [B, T, H, n] = [{q.shape[0]}, {q.shape[1]}, {k.shape[2]}, n], "
            f"got {tuple(block_indices.shape)}."
        )
    if block_size <= 0:
        raise ValueError(f"`block_size` must be positive, got {block_size}.")
    pattern = SparsePattern(compress_block_size=block_size, compress_stride=block_size, select_block_size=block_size, num_selected_blocks=block_indices.shape[-1], num_init_blocks=0, num_local_blocks=0)
    layout, _ = _batch_layout(q, pattern, cu_seqlens)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    o = selection_attention_varlen(
        q.reshape(-1, *q.shape[2:]), _flat(k), _flat(v), block_indices.reshape(-1, *block_indices.shape[2:]), layout, block_size,
        scale, resolve_primitives(backend, q.device, "backend"),
    )
    return o.view(*q.shape[:3], -1)


def sliding_window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window_size: int,
    scale: float | None = None,
    cu_seqlens: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """Causal attention over the last `window_size` tokens (the query's own included) of its document."""
    _check_qkv(q, ('k', 'v'), k=k, v=v)
    if window_size <= 0:
        raise ValueError(f"`window_size` must be positive, got {window_size}.")
    pattern = SparsePattern(window_size=window_size)
    layout, _ = _batch_layout(q, pattern, cu_seqlens)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    backend = resolve_primitives(backend, q.device, "backend")
    o = sliding_window_attention_varlen(q.reshape(-1, *q.shape[2:]), _flat(k), _flat(v), layout, window_size, scale, backend)
    return o.view(*q.shape[:3], -1)


def nsa_attention(
    q: Tensor,
    k_cmp: Tensor,
    v_cmp: Tensor,
    k_slc: Tensor,
    v_slc: Tensor,
    k_win: Tensor,
    v_win: Tensor,
    gates: Tensor,
    compress_block_size: int = PAPER.compress_block_size,
    compress_stride: int = PAPER.compress_stride,
    select_block_size: int = PAPER.select_block_size,
    num_selected_blocks: int = PAPER.num_selected_blocks,
    num_init_blocks: int = PAPER.num_init_blocks,
    num_local_blocks: int = PAPER.num_local_blocks,
    window_size: int = PAPER.window_size,
    scale: float | None = None,
    cu_seqlens: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """Native Sparse Attention: the three branches mixed by their gates.

    q [B, T, HQ, D]; k_cmp/v_cmp [B, N_cmp, H, D] (already compressed by phi); k_slc/v_slc and k_win/v_win
    [B, T, H, D] (pass the same tensors for shared K/V); gates [B, T, HQ, 3] in (0, 1), order (cmp, slc, win).
    Returns o [B, T, HQ, Dv] = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win.
    """
    _check_qkv(q, ('k_slc', 'v_slc', 'k_win', 'v_win'), k_cmp=k_cmp, v_cmp=v_cmp, k_slc=k_slc, v_slc=v_slc, k_win=k_win, v_win=v_win)
    if gates.shape != (*q.shape[:3], 3):
        raise ValueError(f"`gates` must have shape {(*q.shape[:3], 3)}, got {tuple(gates.shape)}.")
    pattern = SparsePattern(compress_block_size, compress_stride, select_block_size, num_selected_blocks, num_init_blocks, num_local_blocks, window_size)
    layout, num_blocks = _batch_layout(q, pattern, cu_seqlens)
    _check_cmp(k_cmp, num_blocks, q.shape[0])
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    o = nsa_attention_varlen(
        q.reshape(-1, *q.shape[2:]), _flat(k_cmp), _flat(v_cmp), _flat(k_slc), _flat(v_slc), _flat(k_win), _flat(v_win),
        gates.reshape(-1, *gates.shape[2:]), layout, pattern, scale, backend := resolve_primitives(backend, q.device, "backend"),
        gate=backend_gate(backend),
    )
    return o.view(*q.shape[:3], -1)
