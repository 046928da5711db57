# Generated from src/nsa_hf by `nsa-hf export-remote-code` (nsa_hf/remote_code.py); do not edit.
"""The NSA attention backends and the fused pointwise kernels: a small registry, resolved once per setting.

An attention backend is a set of kernels (interval attention, block attention, block selection, forward and
backward, and the gate mix) that the custom ops of `library` run when called with its name;
`composition.nsa_attention_varlen` composes them into NSA's function with this signature:
(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, layout, pattern, scale) -> o. Index building, the top-n
rule and the gates are shared code, so no backend can drift from the reference's math there.

Two backends ship: "reference" (pure PyTorch, any device) and "triton" (the GPU kernels). Others can be added
with `register_backend`, in the spirit of transformers' `AttentionInterface`; `NsaConfig(nsa_backend=name)`
then selects them. "auto" picks Triton on CUDA when it is installed, else the reference, and logs its choice
once. The fused pointwise kernels (RMSNorm, RoPE, SwiGLU, gate mix, cross entropy) have their own setting,
`NsaConfig.fused_kernels`. Each (setting, device type) is resolved once; later calls are one dict lookup.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Callable
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from .nsa_ops_library import (
    Kernels as library_Kernels,
    kernels_from_primitives as library_kernels_from_primitives,
    register_kernels as library_register_kernels,
)
from .nsa_ops_composition import REFERENCE, Primitives, nsa_attention_varlen
from .nsa_ops_layout import BranchRanges, QueryLayout, SparsePattern

logger = logging.getLogger(__name__)

__all__ = [
    "FUSED_KERNEL_CHOICES",
    "NsaBackend",
    "PointwiseKernels",
    "backend_gate",
    "backend_names",
    "register_backend",
    "resolve_backend",
    "resolve_pointwise",
    "resolve_primitives",
]

FUSED_KERNEL_CHOICES = ("auto", "triton", "none")


class NsaBackend(Protocol):
    def __call__(
        self, q: Tensor, k_cmp: Tensor, v_cmp: Tensor, k_slc: Tensor, v_slc: Tensor, k_win: Tensor, v_win: Tensor,
        gates: Tensor, layout: QueryLayout, pattern: SparsePattern, scale: float, ranges: BranchRanges | None = None,
    ) -> Tensor: ...


class PointwiseKernels(NamedTuple):
    rotary: Callable[[tuple[Tensor, ...], Tensor, Tensor], tuple[Tensor, ...]]  # (xs [..., H_x, D], cos, sin) -> RoPE(xs)
    silu_mul: Callable[[Tensor, int], Tensor]  # (gate_up [..., >= 2 * I], I) -> silu(gate) * up
    rms_norm: Callable[..., Tensor]  # (x [..., W], weight [W], eps, out_dtype=None) -> RMSNorm(x)
    cross_entropy: Callable[[Tensor, Tensor, int], Tensor]  # (logits [N, V], labels [N], ignore_index) -> losses [N]
    # A static cache layer's decoding token stored in one launch (`ops/triton/store.py::append_token`).
    append_token: Callable[..., tuple[Tensor, Tensor]]
    # The compressed entry of the block that token completes: phi, RoPE and the store (`store.py::store_compressed`).
    store_compressed: Callable[..., None]


# Looked up once, at import: a constant, so that torch.compile can trace a check of it.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON_INSTALLED


def _triton_backend() -> tuple[library_Kernels, Callable[..., Tensor]]:
    from .nsa_ops_triton import (
        KERNELS as triton_KERNELS,
        append_token as triton_append_token,
        apply_rotary as triton_apply_rotary,
        cross_entropy as triton_cross_entropy,
        gate_branches as triton_gate_branches,
        rms_norm as triton_rms_norm,
        silu_mul as triton_silu_mul,
        store_compressed as triton_store_compressed,
    )  # lazy: the package imports without Triton

    return triton_KERNELS, triton_gate_branches


def _from_primitives(factory: Callable[[], Primitives]) -> Callable[[], tuple[library_Kernels, Callable[..., Tensor]]]:
    def build() -> tuple[library_Kernels, Callable[..., Tensor]]:
        primitives = factory()
        return library_kernels_from_primitives(primitives.interval, primitives.block, primitives.select), primitives.gate

    return build


def _triton_pointwise() -> PointwiseKernels:
    from .nsa_ops_triton import (
        KERNELS as triton_KERNELS,
        append_token as triton_append_token,
        apply_rotary as triton_apply_rotary,
        cross_entropy as triton_cross_entropy,
        gate_branches as triton_gate_branches,
        rms_norm as triton_rms_norm,
        silu_mul as triton_silu_mul,
        store_compressed as triton_store_compressed,
    )

    return PointwiseKernels(
        triton_apply_rotary, triton_silu_mul, triton_rms_norm, triton_cross_entropy, triton_append_token,
        triton_store_compressed,
    )


def _require_triton(setting: str) -> None:
    if not triton_available():
        raise ValueError(f"`{setting}='triton'` needs the `triton` package (`pip install triton`).")


_Factory = Callable[[], tuple[library_Kernels, Callable[..., Tensor]]]
# name -> a factory of the backend's kernels and gate mix (called once, on first use) and a check that it can run.
_BACKENDS: dict[str, tuple[_Factory, Callable[[str], None]]] = {
    "reference": (_from_primitives(lambda: REFERENCE), lambda setting: None),
    "triton": (_triton_backend, _require_triton),
}


def register_backend(name: str, primitives: Callable[[], Primitives]) -> None:
    """Make `NsaConfig(nsa_backend=name)` run NSA on `primitives()` (called once, on first use).

    The primitives are differentiable functions that compute `composition.REFERENCE`'s; the custom ops run them
    without autograd and get their gradients by recomputation (`library.kernels_from_primitives`). The tests of
    `tests/test_triton.py` show how a backend is held to the reference. "auto" never picks a registered backend:
    name it.
    """
    if name == "auto" or name in _BACKENDS:
        raise ValueError(f"an NSA backend named {name!r} exists already.")
    _BACKENDS[name] = (_from_primitives(primitives), lambda setting: None)


def backend_names() -> tuple[str, ...]:
    """The values `NsaConfig.nsa_backend` accepts: "auto" and every registered backend."""
    return ("auto", *_BACKENDS)


def _auto(device_type: str) -> str:
    return "triton" if device_type == "cuda" and triton_available() else "reference"


# Plain dicts, not functools.cache: dynamo reads them without tracing a cache.
_RESOLVED_NAMES: dict[tuple[str, str], str] = {}
_GATES: dict[str, Callable[..., Tensor]] = {}
_RESOLVED_ATTENTION: dict[tuple[str, str], NsaBackend] = {}
_RESOLVED_POINTWISE: dict[tuple[str, str], PointwiseKernels | None] = {}


def resolve_primitives(name: str, device: torch.device, setting: str = "nsa_backend") -> str:
    """The registered backend that `name` runs on `device` ("auto": Triton on CUDA when installed), its kernels
    registered with the custom ops (`library`) on first use; `setting` is the argument errors name."""
    key = (name, device.type)
    if key not in _RESOLVED_NAMES:
        if name not in backend_names():
            raise ValueError(f"`{setting}` must be one of {backend_names()}, got {name!r}.")
        chosen = _auto(device.type) if name == "auto" else name
        factory, check = _BACKENDS[chosen]
        check(setting)
        if name == "auto":
            logger.info("%s='auto' runs the %r backend on %s.", setting, chosen, device.type)
        if chosen not in _GATES:
            kernels, _GATES[chosen] = factory()
            library_register_kernels(chosen, kernels)
        _RESOLVED_NAMES[key] = chosen
    return _RESOLVED_NAMES[key]


def backend_gate(chosen: str) -> Callable[..., Tensor]:
    """The gate mix of a resolved backend (`resolve_primitives`'s result)."""
    return _GATES[chosen]


def resolve_backend(name: str, device: torch.device) -> NsaBackend:
    """NSA attention for `name` on `device`: the composition over the backend's custom ops, which torch.compile
    traces (each primitive one op in its graph)."""
    key = (name, device.type)
    if key not in _RESOLVED_ATTENTION:
        chosen = resolve_primitives(name, device)
        _RESOLVED_ATTENTION[key] = functools.partial(nsa_attention_varlen, backend=chosen, gate=_GATES[chosen])
    return _RESOLVED_ATTENTION[key]


def prepare_backends(nsa_backend: str, fused_kernels: str) -> None:
    """Resolve both settings for every device type this machine has (CPU, and CUDA when present). A model does this
    when it is built, so that its first call under torch.compile only reads the resolved kernels: resolving imports
    modules and registers kernels with the custom ops, which dynamo cannot trace."""
    device_types = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    for device_type in device_types:
        resolve_backend(nsa_backend, torch.device(device_type))
        resolve_pointwise(fused_kernels, torch.device(device_type))


def resolve_pointwise(name: str, device: torch.device) -> PointwiseKernels | None:
    """The fused RMSNorm, RoPE, SwiGLU and cross-entropy kernels for `NsaConfig.fused_kernels` on `device`, or None
    for the model's PyTorch ops: with "none", with "auto" off CUDA, and under torch.compile (inductor fuses those
    ops itself)."""
    if torch.compiler.is_compiling():
        return None
    key = (name, device.type)
    if key not in _RESOLVED_POINTWISE:
        if name not in FUSED_KERNEL_CHOICES:
            raise ValueError(f"`fused_kernels` must be one of {FUSED_KERNEL_CHOICES}, got {name!r}.")
        use_triton = name == "triton" or (name == "auto" and _auto(device.type) == "triton")
        if use_triton:
            _require_triton("fused_kernels")
        _RESOLVED_POINTWISE[key] = _triton_pointwise() if use_triton else None
    return _RESOLVED_POINTWISE[key]
