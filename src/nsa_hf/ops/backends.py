"""Choosing the NSA attention backend named by `NsaConfig.nsa_backend`.

Every backend computes `nsa_attention_varlen`'s function with its signature:
(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, layout, pattern, scale) -> o.
"""

from __future__ import annotations

import logging
from typing import Protocol

import torch
from torch import Tensor

from .layout import QueryLayout, SparsePattern
from .reference import nsa_attention_varlen

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "reference")


class NsaBackend(Protocol):
    def __call__(
        self, q: Tensor, k_cmp: Tensor, v_cmp: Tensor, k_slc: Tensor, v_slc: Tensor, k_win: Tensor, v_win: Tensor,
        gates: Tensor, layout: QueryLayout, pattern: SparsePattern, scale: float,
    ) -> Tensor: ...


_REGISTRY: dict[str, NsaBackend] = {"reference": nsa_attention_varlen}
_announced: set[tuple[str, str]] = set()


def resolve_backend(name: str, device: torch.device) -> NsaBackend:
    """The backend for `name` on `device`; "auto" picks the fastest exact backend and says so once."""
    if name not in BACKENDS:
        raise ValueError(f"`nsa_backend` must be one of {BACKENDS}, got {name!r}.")
    chosen = "reference" if name == "auto" else name
    if name == "auto" and (device.type, chosen) not in _announced:
        _announced.add((device.type, chosen))
        logger.info("nsa_backend='auto' uses the %r backend on %s.", chosen, device.type)
    return _REGISTRY[chosen]
