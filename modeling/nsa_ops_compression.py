# Generated from src/nsa_hf by `nsa-hf export-remote-code` (nsa_hf/remote_code.py); do not edit.
"""Cutting a sequence into NSA's compressed blocks (the input of phi) and the parameter-free phi (mean).

Block i of a document covers its tokens [i*d, i*d + l). The learnable phi ("mlp", "linear") lives in
the model (`NsaCompressor`); it maps the blocks returned here to one key or value per block.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .nsa_ops_layout import QueryLayout, cu_seqlens_from_batch

__all__ = ["PhiWeights", "block_tokens", "compress_blocks", "gather_blocks", "mean_compress", "take_blocks"]


class PhiWeights(NamedTuple):
    """One `NsaCompressor`'s phi: `kind` "mean" (no weights), "linear" (`out` [D, l * D], no bias) or "mlp"
    (`hidden` [I, l * D] and its bias, SiLU, `out` [D, I] and its bias)."""

    kind: str
    hidden: Tensor | None = None
    hidden_bias: Tensor | None = None
    out: Tensor | None = None
    out_bias: Tensor | None = None


def block_tokens(token_starts: Tensor, block_size: int, num_tokens: int) -> Tensor:
    """Token index [..., Nc, block_size] of the blocks starting at `token_starts` [..., Nc] in a store of
    `num_tokens`. Indices past the store are clamped: callers mask such blocks (incomplete ones) themselves."""
    offsets = torch.arange(block_size, device=token_starts.device)
    return (token_starts[..., None] + offsets).clamp(0, max(num_tokens - 1, 0))


def take_blocks(x: Tensor, tokens: Tensor) -> Tensor:
    """Blocks [..., Nc, l, H, D] of a flat store x [N, H, D] at `tokens` [..., Nc, l] (`block_tokens`): one
    gather into head-major storage [..., Nc, H, l, D], returned as a view, so a learned phi flattens each
    head's block with no further copy."""
    heads = torch.arange(x.shape[1], device=x.device)[:, None]
    return x[tokens[..., None, :], heads].transpose(-3, -2)


def gather_blocks(x: Tensor, token_starts: Tensor, block_size: int) -> Tensor:
    """Blocks [..., Nc, block_size, H, D] of a flat store x [N, H, D] starting at `token_starts` [..., Nc].

    Indices past the store are clamped: callers mask such blocks (incomplete ones) themselves.
    """
    return take_blocks(x, block_tokens(token_starts, block_size, x.shape[0]))


def compress_blocks(x: Tensor, block_size: int, stride: int, cu_seqlens: Tensor | None = None) -> Tensor:
    """Every complete block of x [B, T, H, D] as [B, N_cmp, l, H, D]; with `cu_seqlens` (B == 1) the
    blocks of each packed document, concatenated in order."""
    if x.dim() != 4:
        raise ValueError(f"`x` must have shape [B, T, H, D], got {tuple(x.shape)}.")
    batch, seq_len = x.shape[:2]
    if cu_seqlens is not None and batch != 1:
        raise ValueError(f"with `cu_seqlens` (packed documents) the batch size must be 1, got {batch}.")
    cu = cu_seqlens_from_batch(batch, seq_len) if cu_seqlens is None else cu_seqlens  # host bounds: no host sync
    _, blocks = QueryLayout.from_cu_seqlens(cu, block_size, stride, num_tokens=batch * seq_len, device=x.device)
    out = gather_blocks(x.reshape(-1, *x.shape[2:]), blocks.token_starts, block_size)
    return out.view(batch, -1, *out.shape[1:])


def mean_compress(x: Tensor, block_size: int, stride: int, cu_seqlens: Tensor | None = None) -> Tensor:
    """phi = mean pooling: [B, N_cmp, H, D]. With l = d = l' it is the compression other NSA libraries ship."""
    return compress_blocks(x, block_size, stride, cu_seqlens).mean(dim=2)
