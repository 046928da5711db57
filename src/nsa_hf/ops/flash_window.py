"""The sliding-window branch on varlen FlashAttention-2, for full passes that need gradients.

`flash_attn.flash_attn_varlen_func` when the flash-attn package is installed, else torch's built-in
`torch.nn.attention.varlen.varlen_attn` (FlashAttention-2 inside torch; its signature grew across
torch 2.11-2.13, so keywords are feature-detected). Measured on an H200 (benchmarks/results): FA2's
backward beats the Triton interval kernel, its forward does not, so the Triton backend uses FA2 only
when the window's gradient is needed, and the interval kernel otherwise (decoding, inference).
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
from itertools import pairwise

import torch
from torch import Tensor

from .layout import QueryLayout, host_to_device, memoized

logger = logging.getLogger(__name__)


@functools.cache
def _varlen_impl() -> tuple[str, object] | None:
    if importlib.util.find_spec("flash_attn") is not None:
        from flash_attn import flash_attn_varlen_func

        return "flash_attn", flash_attn_varlen_func
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return ("varlen_attn", varlen_attn) if "window_size" in inspect.signature(varlen_attn).parameters else None


@functools.cache
def _announce(name: str) -> None:
    logger.info("NSA sliding window runs on %s (varlen FlashAttention-2) when training.", name)


def applies(q: Tensor, layout: QueryLayout) -> bool:
    """A full pass (queries are the key store, windows start at document starts), on CUDA, with gradients."""
    return (
        q.is_cuda
        and torch.is_grad_enabled()
        and q.requires_grad
        and layout.run_length is None
        and layout.window_offsets is layout.key_offsets
        and _varlen_impl() is not None
    )


def _document_bounds(layout: QueryLayout) -> tuple[Tensor, int]:
    """int32 cu_seqlens of the documents, and the longest one's length: from the layout's host copy when it
    has one, else with a host sync."""
    if layout.documents is not None:
        documents = layout.documents
        bounds = torch.tensor(documents, dtype=torch.int32)
        return host_to_device(bounds, layout.positions.device), max(end - start for start, end in pairwise(documents))
    starts = torch.nonzero(layout.positions == 0).flatten()
    cu = torch.cat([starts, starts.new_tensor([layout.positions.numel()])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def window_attention(q: Tensor, k: Tensor, v: Tensor, layout: QueryLayout, window_size: int, scale: float) -> Tensor:
    """Causal attention over the last `window_size` tokens of each document (see `applies`)."""
    name, fn = _varlen_impl()
    _announce(name)
    cu, max_len = memoized(layout.memo, "flash_window", lambda: _document_bounds(layout))
    if name == "flash_attn":
        return fn(q, k, v, cu, cu, max_len, max_len, softmax_scale=scale, causal=True, window_size=(window_size - 1, 0))
    params = inspect.signature(fn).parameters
    kwargs = {"scale": scale, "window_size": (window_size - 1, 0)}
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:  # older signature: expand the key/value heads for the group
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return fn(q, k, v, cu, cu, max_len, max_len, **kwargs)
