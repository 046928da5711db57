# Generated from src/nsa_hf by `nsa-hf export-remote-code` (nsa_hf/remote_code.py); do not edit.
"""Triton kernels, a module per family: `interval` (compressed and window attention), `block` (selection
attention), `select` (fused block selection), forward and backward, `decode` (a decoding step's whole attention in
three launches), `store` (a static cache's decoding token and its compressed entry) and `pointwise` (RMSNorm, RoPE, SwiGLU,
the gate mix, cross entropy); `common` holds what they share.

Accumulation is fp32; inputs bf16, fp16 or fp32. Import is lazy (`nsa_hf.ops.backends`): the package imports
without Triton or CUDA, and CPU tests run these kernels under TRITON_INTERPRET=1.
"""

from .nsa_ops_library import Kernels
from .nsa_ops_triton_block import block_attention, block_backward, block_forward, block_residual_size
from .nsa_ops_triton_decode import decode_attention
from .nsa_ops_triton_interval import interval_attention, interval_backward, interval_forward
from .nsa_ops_triton_pointwise import apply_rotary, cross_entropy, gate_branches, rms_norm, silu_mul
from .nsa_ops_triton_select import select_blocks
from .nsa_ops_triton_store import append_token, store_compressed

# What the custom ops of `nsa_hf.ops.library` run for nsa_backend="triton".
KERNELS = Kernels(
    interval_forward, interval_backward, block_forward, block_backward, select_blocks, block_residual_size, decode_attention,
)

__all__ = [
    "KERNELS",
    "append_token",
    "apply_rotary",
    "block_attention",
    "cross_entropy",
    "decode_attention",
    "gate_branches",
    "interval_attention",
    "rms_norm",
    "select_blocks",
    "silu_mul",
    "store_compressed",
]
