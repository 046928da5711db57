"""Choosing the NSA attention backend named by `NsaConfig.nsa_backend`.

Every backend computes `reference.nsa_attention_varlen`'s function with its signature:
(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, layout, pattern, scale) -> o. A backend only
swaps the primitives (interval attention, block attention, block scoring); index building, the top-n
rule and the gates are shared code, so no backend can drift from the reference's math there.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Callable
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from .layout import QueryLayout, SparsePattern
from .reference import REFERENCE, Primitives, nsa_attention_varlen

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "reference", "triton")


class NsaBackend(Protocol):
    def __call__(
        self, q: Tensor, k_cmp: Tensor, v_cmp: Tensor, k_slc: Tensor, v_slc: Tensor, k_win: Tensor, v_win: Tensor,
        gates: Tensor, layout: QueryLayout, pattern: SparsePattern, scale: float,
    ) -> Tensor: ...


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _primitives(name: str) -> Primitives:
    if name == "reference":
        return REFERENCE
    from . import triton_kernels, triton_pointwise  # lazy: the package imports without Triton

    return Primitives(
        triton_kernels.interval_attention, triton_kernels.block_attention, triton_kernels.select_blocks,
        gate=triton_pointwise.gate_branches,
    )


@functools.cache
def _announce(requested: str, chosen: str, device_type: str) -> None:
    logger.info("nsa_backend=%r runs the %r backend on %s.", requested, chosen, device_type)


def _choose(name: str, device: torch.device) -> str:
    if name not in BACKENDS:
        raise ValueError(f"`nsa_backend` must be one of {BACKENDS}, got {name!r}.")
    if name == "triton" and not triton_available():
        raise ValueError(
            "`nsa_backend='triton'` needs the `triton` package (`pip install triton`; in an nsa-hf checkout, "
            "`pip install -e '.[triton]'`)."
        )
    if name != "auto":
        return name
    chosen = "triton" if device.type == "cuda" and triton_available() else "reference"
    if not torch.compiler.is_compiling():  # dynamo cannot trace logging inside functools.cache
        _announce(name, chosen, device.type)
    return chosen


def resolve_backend(name: str, device: torch.device) -> NsaBackend:
    """The backend for `name` on `device`. "auto" picks Triton on CUDA (when installed), else the reference."""
    return _compiled_around(_choose(name, device))


class PointwiseKernels(NamedTuple):
    rotary: Callable[[tuple[Tensor, ...], Tensor, Tensor], tuple[Tensor, ...]]  # (xs [..., H_x, D], cos, sin) -> RoPE(xs)
    silu_mul: Callable[[Tensor, int], Tensor]  # (gate_up [..., >= 2 * I], I) -> silu(gate) * up
    rms_norm: Callable[..., Tensor]  # (x [..., W], weight [W], eps, out_dtype=None) -> RMSNorm(x)
    cross_entropy: Callable[[Tensor, Tensor, int], Tensor]  # (logits [N, V], labels [N], ignore_index) -> losses [N]


def resolve_pointwise(name: str, device: torch.device) -> PointwiseKernels | None:
    """The fused RMSNorm, RoPE, SwiGLU and cross-entropy kernels when `name` picks the Triton backend on `device`, or None for the
    model's PyTorch ops: with the reference backend, and under torch.compile (inductor fuses those ops)."""
    if torch.compiler.is_compiling() or _choose(name, device) != "triton":
        return None
    from . import triton_pointwise  # lazy, like the attention kernels

    return PointwiseKernels(
        triton_pointwise.apply_rotary, triton_pointwise.silu_mul, triton_pointwise.rms_norm, triton_pointwise.cross_entropy
    )


_BUILT: dict[str, NsaBackend] = {}  # a plain dict, not functools.cache: dynamo reads it without tracing a cache


def _compiled_around(name: str) -> NsaBackend:
    """The backend as one opaque call to torch.compile: its index building is data dependent and its
    Triton kernels launch from custom autograd Functions, so dynamo compiles the model around it."""
    if name not in _BUILT:
        _BUILT[name] = torch.compiler.disable(functools.partial(nsa_attention_varlen, primitives=_primitives(name)))
    return _BUILT[name]
