# Generated from src/nsa_hf by `nsa-hf export-remote-code` (nsa_hf/remote_code.py); do not edit.
"""NSA model configuration: a Llama-style decoder whose attention is Native Sparse Attention."""

# No `from __future__ import annotations` here: @strict reads the real annotations to type-check fields.

import os

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from .nsa_ops_backends import FUSED_KERNEL_CHOICES, backend_names
from .nsa_ops_layout import PAPER, SparsePattern

COMPRESSION_TYPES = ("mlp", "linear", "mean")
BRANCH_KV_MODES = ("independent", "shared")
# The allowed values of each choice field; the attention backends are those registered when the value is set.
CHOICES = {
    "compression_type": lambda: COMPRESSION_TYPES,
    "branch_kv": lambda: BRANCH_KV_MODES,
    "nsa_backend": backend_names,
    "fused_kernels": lambda: FUSED_KERNEL_CHOICES,
}


def _check_choice(name: str, value) -> None:
    allowed = CHOICES[name]()
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {allowed}, got {value!r}.")


@strict
class NsaConfig(PreTrainedConfig):
    r"""
    Configuration of an [`NsaModel`]: Llama-style blocks (RMSNorm, RoPE, SwiGLU MLP) with Native Sparse
    Attention (Yuan et al., 2025, arXiv 2502.11089). Defaults are the 125M-class "seed" model.

    NSA fields (the paper's symbols in brackets):
        compress_block_size (`int`, defaults to 32): tokens per compressed block [l].
        compress_stride (`int`, defaults to 16): stride between compressed blocks [d]; `l % d == 0`.
        select_block_size (`int`, defaults to 64): tokens per selection block [l']; `l' % d == 0`.
        num_selected_blocks (`int`, defaults to 16): selected blocks per query, forced blocks included [n].
        num_init_blocks (`int`, defaults to 1): leading selection blocks always selected.
        num_local_blocks (`int`, defaults to 2): trailing blocks always selected (the block holding the
            query and the ones before it).
        window_size (`int`, defaults to 512): sliding window, the query's own token included [w].
        compression_type (`str`, defaults to `"mlp"`): phi, one of `"mlp"`, `"linear"`, `"mean"`.
        compress_intermediate_size (`int`, *optional*): hidden width of the `"mlp"` compressor;
            defaults to `4 * head_dim`.
        branch_kv (`str`, defaults to `"independent"`): `"independent"` K/V projections per branch (paper
            section 3.3.3) or one `"shared"` K/V for all branches (conversions from dense checkpoints).
        qk_norm (`bool`, defaults to `False`): an RMSNorm over each head's query and keys before RoPE, weights
            shared by the heads (Qwen3's q_norm / k_norm; every branch's keys go through the one k_norm).
        gate_intermediate_size (`int`, *optional*): hidden width of the gate MLP; `None` uses one linear
            layer from the hidden state to the 3 * num_attention_heads gate logits.
        nsa_backend (`str`, defaults to `"auto"`): the attention backend: `"reference"` (pure PyTorch, any device),
            `"triton"` (GPU kernels), `"auto"` (Triton on CUDA when available, else the reference), or the name of
            a backend added with `nsa_hf.ops.backends.register_backend`.
        fused_kernels (`str`, defaults to `"auto"`): the fused Triton kernels for RMSNorm, RoPE, SwiGLU, the gate
            mix, the cross-entropy loss and a static cache's decoding writes: `"triton"`, `"none"` (PyTorch ops) or
            `"auto"` (Triton on CUDA when available). Under torch.compile the PyTorch ops always run (inductor fuses
            them).
        cuda_graph_decoding (`bool`, defaults to `True`): on CUDA, generate() without `cache_implementation`
            decodes over an `NsaStaticCache` (kept between calls) and replays each step from a CUDA graph recorded
            from the eager model at the first steps (no torch.compile). `False`, or
            `generate(..., cache_implementation="dynamic")` for one call: a growing `NsaCache` and eager steps.
            Calls with `return_dict_in_generate=True` or `prefill_chunk_size` decode that way anyway, and so do
            models with hooks, adapters or quantized layers (logged once).

    Example:
    ```python
    >>> from nsa_hf import NsaConfig, NsaForCausalLM
    >>> config = NsaConfig(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    >>> model = NsaForCausalLM(config)
    ```
    """

    model_type = "nsa"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    vocab_size: int = 32000
    hidden_size: int = 768
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_key_value_heads: int | None = 2
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    initializer_range: int | float = 0.02
    rms_norm_eps: int | float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False

    compress_block_size: int = PAPER.compress_block_size
    compress_stride: int = PAPER.compress_stride
    select_block_size: int = PAPER.select_block_size
    num_selected_blocks: int = PAPER.num_selected_blocks
    num_init_blocks: int = PAPER.num_init_blocks
    num_local_blocks: int = PAPER.num_local_blocks
    window_size: int = PAPER.window_size
    compression_type: str = "mlp"
    compress_intermediate_size: int | None = None
    branch_kv: str = "independent"
    gate_intermediate_size: int | None = None
    nsa_backend: str = "auto"
    fused_kernels: str = "auto"
    cuda_graph_decoding: bool = True

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads > 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.compress_intermediate_size is None and self.head_dim is not None:
            self.compress_intermediate_size = 4 * self.head_dim
        if self.rope_parameters is None:
            self.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
        self.validate_architecture()  # plain ValueErrors that name the field, before strict's wrapping
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Check every NSA and attention rule; raises ValueError naming the field and the rule."""
        positive = (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "compress_intermediate_size",
        )
        for name in positive:
            value = getattr(self, name)
            if value is None or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value}.")
        if self.gate_intermediate_size is not None and self.gate_intermediate_size <= 0:
            raise ValueError(f"`gate_intermediate_size` must be positive or None, got {self.gate_intermediate_size}.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"`num_attention_heads` ({self.num_attention_heads}) must be a multiple of `num_key_value_heads` "
                f"({self.num_key_value_heads})."
            )
        # The NSA rules (l % d, l' % d, n >= init + local) live with the pattern every backend uses.
        SparsePattern(
            self.compress_block_size, self.compress_stride, self.select_block_size, self.num_selected_blocks,
            self.num_init_blocks, self.num_local_blocks, self.window_size,
        )
        for name in CHOICES:
            _check_choice(name, getattr(self, name))
        if self.head_dim % 2:
            raise ValueError(f"`head_dim` must be even for rotary embeddings, got {self.head_dim}.")

    def __setattr__(self, name, value):
        # Choice fields are checked on every assignment, so `from_pretrained(path, nsa_backend=...)` and
        # `config.nsa_backend = ...` fail at once, naming the field, not at the first forward or at save time.
        if name in CHOICES:
            _check_choice(name, value)
        super().__setattr__(name, value)


__all__ = ["NsaConfig"]
