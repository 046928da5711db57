# Generated from src/nsa_hf by `nsa-hf export-remote-code` (nsa_hf/remote_code.py); do not edit.
"""NSA decoder model for transformers: Llama-style blocks whose attention is Native Sparse Attention.

Structure follows transformers' modeling_llama.py. Differences that matter:
- attention is `NsaAttention`: three branches (compressed, selected, sliding window) mixed by gates;
- the cache is `NsaCache`, built by the model (generate() never substitutes a DynamicCache), or `NsaStaticCache`
  (fixed shapes, for compiled decoding: cache_implementation="static");
- RoPE positions are the positions inside each document, derived from the sequence layout (packed
  `cu_seq_lens_q`, `position_ids` restarting at 0, or left padding in `attention_mask`), so blocks,
  windows and rotary phases all restart with the document.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from transformers import CompileConfig, GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.utils import logging

from .cache_nsa import NsaCache, NsaCacheLayer, StepGeometry, sparse_pattern
from .cache_static import DEFAULT_ROLLBACK, NsaStaticCache, NsaStaticCacheLayer
from .compat import CACHE_KWARG, cache_argument
from .configuration_nsa import NsaConfig
from .decode_graphs import DecodeGraphs, kept_stack, why_not_graphable
from .nsa_ops_backends import NsaBackend, PointwiseKernels, prepare_backends, resolve_backend, resolve_pointwise
from .nsa_ops_compression import PhiWeights, block_tokens, take_blocks
from .nsa_ops_layout import BranchRanges, QueryLayout, branch_ranges, num_compressed_blocks, seq_idx_starts
from .nsa_ops_library import document_layout

logger = logging.get_logger(__name__)

__all__ = ["NsaForCausalLM", "NsaModel", "NsaPreTrainedModel"]


class NsaRMSNorm(nn.Module):
    def __init__(self, config: NsaConfig, width: int | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width or config.hidden_size))
        self.variance_epsilon = config.rms_norm_eps

    def forward(self, hidden_states: Tensor, fused: PointwiseKernels | None = None) -> Tensor:
        """`fused`: the fused kernels the model resolved for this pass (`NsaConfig.fused_kernels`), or PyTorch ops."""
        # Under autocast the output is in the autocast dtype: its consumers (projections, lm_head) would cast it
        # anyway, and the fused kernel then writes it once instead of an fp32 copy that a cast reads again.
        device_type = hidden_states.device.type
        out_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        if fused is not None:
            return fused.rms_norm(hidden_states, self.weight, self.variance_epsilon, out_dtype)
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        out = self.weight * hidden_states.to(input_dtype)
        return out if out_dtype is None else out.to(out_dtype)


class NsaRotaryEmbedding(nn.Module):
    inv_freq: Tensor

    def __init__(self, config: NsaConfig):
        super().__init__()
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.config = config
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        rope_init_fn = self.compute_default_rope_parameters
        if self.rope_type != "default":
            rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = rope_init_fn(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: NsaConfig, *args, **kwargs) -> tuple[Tensor, float]:
        base = config.rope_parameters["rope_theta"]
        dim = config.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [..., H, D] by cos/sin [..., D] (one phase per token, shared by its heads)."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return x * cos + rotate_half(x) * sin


def rotate_all(xs: tuple[Tensor, ...], cos: Tensor, sin: Tensor, fused: PointwiseKernels | None) -> tuple[Tensor, ...]:
    """RoPE on tensors of the same tokens: one fused launch for all of them, or PyTorch ops per tensor."""
    if fused is not None:
        return fused.rotary(xs, cos, sin)
    return tuple(apply_rotary(x, cos, sin) for x in xs)


def _plain_module(module: nn.Module, kind: type[nn.Module]) -> bool:
    """A `kind` module that runs its own forward: not a subclass (quantized, PEFT), not hooked, not patched."""
    return (
        type(module) is kind
        and not module._forward_hooks
        and not module._forward_pre_hooks
        and "forward" not in module.__dict__
    )


def _plain_linear(module: nn.Module) -> bool:
    """An nn.Linear that runs its own forward (`_plain_module`)."""
    return _plain_module(module, nn.Linear)


# The dtypes a fused kernel computes in (bf16/fp16 operands, fp32 accumulation; fp32 operands exactly).
_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _plain_weight(weight: Tensor) -> bool:
    """A weight a fused kernel can read in place of its layer: a plain tensor or Parameter (not a tensor subclass,
    whose own ops a kernel would skip: a quantized or distributed tensor) of a dtype the kernels compute in."""
    return type(weight) in (Tensor, nn.Parameter) and weight.dtype in _KERNEL_DTYPES


def _zeros(shape: tuple[int, ...], like: Tensor) -> Tensor:
    """A shared read-only zero tensor (padding rows and missing biases of stacked weights): built once per
    shape, dtype and device, not queued as a fill kernel in every layer of every step."""
    if torch.compiler.is_compiling():  # dynamo would guard on the dict: inductor folds the zeros anyway
        return like.new_zeros(shape)
    key = (shape, like.dtype, like.device)
    if key not in _ZEROS:
        with torch.inference_mode(False):  # a normal tensor even when first built under inference mode
            _ZEROS[key] = torch.zeros(shape, dtype=like.dtype, device=like.device)
    return _ZEROS[key]


_ZEROS: dict[tuple, Tensor] = {}


# Inputs of at most this many rows (decoding steps) are memory-bound GEMMs that read each weight once, stacked or not.
_FEW_ROWS = 64
# Stacked weight bytes per GEMM saved, above which a compiled or recorded decoding step runs separate GEMMs: inside a
# CUDA graph one more small GEMM costs about what copying 2 MiB of weights (read and write) does on the H200
# (the seed model's stacked copies against its GEMMs in benchmarks/results/issue15/session9/README.md; 2 MiB as set
# in session10/).
_COPY_BYTES_PER_LAUNCH = 2 << 20


def _few_rows(hidden_states: Tensor) -> bool:
    return hidden_states.numel() <= _FEW_ROWS * hidden_states.shape[-1]


def _stacks(hidden_states: Tensor, weights: list[Tensor]) -> bool:
    """Whether projections of this input run as one GEMM over stacked `weights`. Always when eager: the host's time
    counts there, and one GEMM queues less than several. A decoding step that is compiled or recorded as a CUDA
    graph (only the GPU's time counts) copies every stacked weight per step, twice its bytes: it stacks only while
    that copy costs less than the GEMM launches it saves (the seed model's attention projections, not its MLP
    nor a 1B model's projections), unless the weights are stacked once for all steps (`kept_stack`)."""
    graph = torch.compiler.is_compiling() or (hidden_states.is_cuda and torch.cuda.is_current_stream_capturing())
    if not graph or not _few_rows(hidden_states):
        return True
    return sum(w.numel() * w.element_size() for w in weights) < (len(weights) - 1) * _COPY_BYTES_PER_LAUNCH


def stacked_projection(
    hidden_states: Tensor, projections: tuple[nn.Module, ...], with_bias: bool = True, keep: bool = False
) -> Tensor | None:
    """The outputs of projections of the same input side by side, from one GEMM over their stacked weights
    (under autocast the input is cast once and its gradient comes back as one tensor, not one per
    projection), possibly followed by zero padding columns; None unless all are plain nn.Linear (LoRA,
    quantized and hooked modules keep their own forward) and `_stacks` the input. `with_bias=False` leaves the
    biases to the caller. `keep`: in a decoding step that `DecodeGraphs` runs or records, read the stacked weights
    it keeps (`kept_stack`) rather than stacking them in every step."""
    if not all(_plain_linear(p) for p in projections):
        return None
    weights = [p.weight for p in projections]
    sizes = [p.out_features for p in projections]
    # Zero rows up to a multiple of 8 outputs keep the output rows 16-byte aligned in bf16: otherwise cuBLAS
    # falls back to unaligned kernels (as it did for the seed model's 1572 outputs on the H200).
    padding = -sum(sizes) % 8
    weight = weights[0]
    weights += [_zeros((padding, weight.shape[1]), weight)] if padding else []
    kept = kept_stack(weights) if keep and _few_rows(hidden_states) else None
    if kept is None and not _stacks(hidden_states, weights[: len(projections)]):
        return None
    bias = None
    if with_bias and any(p.bias is not None for p in projections):
        biases = [_zeros((p.out_features,), weight) if p.bias is None else p.bias for p in projections]
        bias = torch.cat(biases + ([_zeros((padding,), weight)] if padding else []))
    return F.linear(hidden_states, torch.cat(weights) if kept is None else kept, bias)


def project(hidden_states: Tensor, projections: tuple[nn.Module, ...], keep: bool = False) -> tuple[Tensor, ...]:
    """Every projection of the same input: one stacked GEMM where `stacked_projection` allows (`keep` as there),
    split. When only some projections have a bias (NSA's gate among bias-free q/k/v), the GEMM runs without one and
    each bias is added to its own output: a stacked bias would be copied into the whole output before the GEMM, and
    its gradient summed over every column."""
    with_bias = all(getattr(p, "bias", None) is not None for p in projections)
    stacked = stacked_projection(hidden_states, projections, with_bias, keep) if len(projections) > 1 else None
    if stacked is None:
        return tuple(p(hidden_states) for p in projections)
    sizes = [p.out_features for p in projections]
    outputs = stacked.split(sizes + [stacked.shape[-1] - sum(sizes)], dim=-1)[: len(projections)]
    if with_bias:
        return outputs
    # The bias in the output's dtype, as F.linear adds it under autocast.
    return tuple(out if p.bias is None else out + p.bias.to(out.dtype) for out, p in zip(outputs, projections, strict=True))


class NsaMLP(nn.Module):
    def __init__(self, config: NsaConfig):
        super().__init__()
        self.config = config
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: Tensor, fused: PointwiseKernels | None = None) -> Tensor:
        """`fused`: the fused kernels the model resolved for this pass (`NsaConfig.fused_kernels`), or PyTorch ops
        (always under torch.compile, which fuses them)."""
        fused = fused if self.config.hidden_act in ("silu", "swish") else None
        if fused is not None and (gate_up := stacked_projection(x, (self.gate_proj, self.up_proj))) is not None:
            return self.down_proj(fused.silu_mul(gate_up, self.gate_proj.out_features))
        gate, up = project(x, (self.gate_proj, self.up_proj))
        return self.down_proj(self.act_fn(gate) * up)


class NsaCompressor(nn.Module):
    """phi: maps one block of l tokens [..., l, H, D] to a compressed token [..., H, D], per head.

    "mean" pools; "linear" and "mlp" flatten the block so every intra-block position has its own
    weights (this subsumes the paper's intra-block position encoding). Weights are shared by heads.
    """

    def __init__(self, config: NsaConfig):
        super().__init__()
        self.compression_type = config.compression_type
        block_features = config.compress_block_size * config.head_dim
        if self.compression_type == "linear":
            self.proj = nn.Linear(block_features, config.head_dim, bias=False)
        elif self.compression_type == "mlp":
            self.fc1 = nn.Linear(block_features, config.compress_intermediate_size, bias=True)
            self.act_fn = nn.SiLU()
            self.fc2 = nn.Linear(config.compress_intermediate_size, config.head_dim, bias=True)

    def fused_weights(self) -> PhiWeights | None:
        """phi's weights for the fused decoding kernel (`store_compressed`), which computes `forward` from them
        alone, or None when that would skip something this module's forward does; the decoding step then runs the
        forward (`NsaAttention._store_step`). None when the compressor or one of its layers runs a forward of its
        own (a subclass of the compressor overriding `forward`; forward hooks or pre-hooks; a patched forward;
        layers other than exactly nn.Linear and, in the MLP, nn.SiLU: LoRA, quantized layers, another activation),
        or when a weight or bias is not a plain tensor of bf16, fp16 or fp32 (a tensor subclass, a quantized or
        fp64 weight)."""
        if type(self).forward is not NsaCompressor.forward:
            return None
        if self._forward_hooks or self._forward_pre_hooks or "forward" in self.__dict__:
            return None
        if self.compression_type == "mean":
            return PhiWeights("mean")
        if self.compression_type == "linear":
            layers = (self.proj,)
            phi = PhiWeights("linear", out=self.proj.weight)
        else:
            layers = (self.fc1, self.fc2)
            phi = PhiWeights("mlp", self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)
            if not _plain_module(self.act_fn, nn.SiLU):
                return None
        if not all(_plain_linear(layer) for layer in layers):
            return None
        if not all(_plain_weight(weight) for weight in phi[1:] if weight is not None):
            return None
        return phi

    def forward(self, blocks: Tensor) -> Tensor:
        if self.compression_type == "mean":
            return blocks.mean(dim=-3)
        flat = blocks.movedim(-3, -2).flatten(-2)  # [..., H, l * D]
        if self.compression_type == "linear":
            return self.proj(flat)
        return self.fc2(self.act_fn(self.fc1(flat)))


class NsaBranchGate(nn.Module):
    """g_t^c = sigmoid(MLP_c(x_t)) for every query head and branch c in (cmp, slc, win)."""

    def __init__(self, config: NsaConfig):
        super().__init__()
        out_features = 3 * config.num_attention_heads
        if config.gate_intermediate_size is None:
            self.proj = nn.Linear(config.hidden_size, out_features, bias=True)
        else:
            self.fc1 = nn.Linear(config.hidden_size, config.gate_intermediate_size, bias=True)
            self.act_fn = nn.SiLU()
            self.fc2 = nn.Linear(config.gate_intermediate_size, out_features, bias=True)

    @property
    def input_projection(self) -> nn.Linear:
        """The layer applied to the hidden states (the attention stacks it with its own projections)."""
        return self.proj if hasattr(self, "proj") else self.fc1

    def from_projection(self, projected: Tensor) -> Tensor:
        """Gates [B, T, HQ, 3] from `input_projection`'s output."""
        logits = projected if hasattr(self, "proj") else self.fc2(self.act_fn(projected))
        return torch.sigmoid(logits).unflatten(-1, (-1, 3))

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.from_projection(self.input_projection(hidden_states))


@dataclass
class NsaForwardPlan:
    """What every layer of one forward pass shares, built once by `NsaModel._plan`: token RoPE, where each query
    reads, and the compressed blocks to form (for a full pass, every block of the sequence; for a cached step,
    the blocks its new tokens complete, gathered from each layer's compression buffer)."""

    cos: Tensor  # [B, T, D] at each token's position in its document
    sin: Tensor
    attention: NsaBackend  # the attention backend of `NsaConfig.nsa_backend` on this device, resolved once per pass
    pointwise: PointwiseKernels | None  # the fused kernels of `NsaConfig.fused_kernels`, or None for PyTorch ops
    layout: QueryLayout  # full pass: over the B * T tokens; cached step: its queries over the cache's stores
    ranges: BranchRanges  # each branch's key ranges for the layout's queries
    block_tokens: Tensor | None  # flat index of each block's tokens [..., l] in the sequence / compression buffer
    block_cos: Tensor | None  # RoPE at each block's last token [..., D]
    block_sin: Tensor | None
    block_slots: Tensor | None = None  # cached step: [B, m] compressed slot (block index) of each new block
    geometry: StepGeometry | None = None  # cached step: every layer's store sizes after it
    stored_blocks: StoredBlocks | None = None  # static cache: the compressed entries the layers write
    prompt_starts: Tensor | None = None  # static cache's prompt: where each row's document starts [B]
    cache_positions: Tensor | None = None  # static cache: the step's tokens' index in every row [T]


@dataclass
class StoredBlocks:
    """The compressed entries a step writes into a static cache: per row, m blocks read from a flat store of
    un-rotated K/V (the prompt when prefilling, the raw ring when decoding), their RoPE and their slots."""

    tokens: Tensor  # [B, m, l] flat token index of each block
    cos: Tensor  # [B, m, D]
    sin: Tensor
    slots: Tensor  # [B, m]: the block's index in its document, or the scratch slot
    from_ring: bool  # read from the layer's raw ring (decoding) rather than from the step's own K/V (prefill)


class NsaAttention(nn.Module):
    """Native Sparse Attention with per-branch K/V (or shared K/V), learned compression and gates."""

    def __init__(self, config: NsaConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.pattern = sparse_pattern(config)
        self.independent_kv = config.branch_kv == "independent"
        kv_features = self.num_kv_heads * self.head_dim
        bias = config.attention_bias

        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_features, bias=bias)  # selection (or shared) keys
        self.v_proj = nn.Linear(config.hidden_size, kv_features, bias=bias)
        if self.independent_kv:
            self.compress_k_proj = nn.Linear(config.hidden_size, kv_features, bias=bias)
            self.compress_v_proj = nn.Linear(config.hidden_size, kv_features, bias=bias)
            self.window_k_proj = nn.Linear(config.hidden_size, kv_features, bias=bias)
            self.window_v_proj = nn.Linear(config.hidden_size, kv_features, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        if config.qk_norm:
            self.q_norm = NsaRMSNorm(config, self.head_dim)
            self.k_norm = NsaRMSNorm(config, self.head_dim)
        self.compress_key = NsaCompressor(config)
        self.compress_value = NsaCompressor(config)
        self.branch_gate = NsaBranchGate(config)

    def _input_projections(self) -> tuple[nn.Module, ...]:
        """Every projection of the layer's input, in the order `forward` unpacks them."""
        branch_kv = (self.window_k_proj, self.window_v_proj, self.compress_k_proj, self.compress_v_proj) if self.independent_kv else ()
        return (self.q_proj, self.k_proj, self.v_proj, *branch_kv, self.branch_gate.input_projection)

    def _compress(self, k_raw: Tensor, v_raw: Tensor, plan: NsaForwardPlan) -> tuple[Tensor, Tensor]:
        """The compressed keys and values of the plan's blocks, read from flat un-rotated stores [N, H, D]: phi,
        then RoPE on the compressed key at its block's last token. One rule for full passes and cached steps."""
        k_blocks, v_blocks = take_blocks(k_raw, plan.block_tokens), take_blocks(v_raw, plan.block_tokens)
        (k_cmp,) = rotate_all((self.compress_key(k_blocks),), plan.block_cos, plan.block_sin, plan.pointwise)
        return k_cmp, self.compress_value(v_blocks)

    def _store_step(self, layer: NsaStaticCacheLayer, stored: StoredBlocks, new_kv: tuple[Tensor | None, ...],
                    positions: Tensor, pointwise: PointwiseKernels | None) -> None:
        """Store a step in a static cache: its K/V `new_kv` (k_slc, v_slc, k_win, v_win, k_raw, v_raw), then the
        compressed entries it writes, phi and RoPE as in `_compress` over the prompt's own raw K/V (prefill) or the
        layer's raw ring (decoding). A decoding step of one token per row with the fused kernels stores and reads
        its block back in one launch, and its compressed entry in one more (two for the MLP phi). Neither kernel
        has a backward: under grad mode the step takes the PyTorch ops, whose in-place writes autograd records."""
        if pointwise is not None and stored.from_ring and positions.shape[0] == 1 and not torch.is_grad_enabled():
            k_blocks, v_blocks = layer.append_token(*new_kv, positions, pointwise.append_token)
            # phi, RoPE and the store in 1-2 launches, from phi's weights alone: not when a compressor runs its own
            # forward (hooks, LoRA, quantized weights: `fused_weights` is None), which then runs below, its
            # entry written by the PyTorch scatter.
            phis = self.compress_key.fused_weights(), self.compress_value.fused_weights()
            if all(p is not None for p in phis):
                layer.store_compressed(stored.slots, k_blocks, v_blocks, *phis, stored.cos, stored.sin,
                                       pointwise.store_compressed)
                return
        else:
            layer.append(*new_kv, positions)
            k_raw, v_raw = new_kv[4:]
            source = (layer.raw_cmp_keys, layer.raw_cmp_values) if stored.from_ring else (k_raw, v_raw)
            k_blocks, v_blocks = (take_blocks(t.flatten(0, 1), stored.tokens) for t in source)
        (k_new,) = rotate_all((self.compress_key(k_blocks),), stored.cos, stored.sin, pointwise)
        layer.write_compressed(stored.slots, k_new, self.compress_value(v_blocks))

    def forward(
        self,
        hidden_states: Tensor,
        plan: NsaForwardPlan,
        cache: NsaCache | NsaStaticCache | None = None,
        **kwargs,
    ) -> tuple[Tensor, None]:
        batch, seq_len, _ = hidden_states.shape
        cos, sin = plan.cos, plan.sin
        *heads, gate_projection = project(hidden_states, self._input_projections(), keep=True)
        q, k_proj, v_slc, *branch_kv = (h.unflatten(-1, (-1, self.head_dim)) for h in heads)
        fused = plan.pointwise
        if self.config.qk_norm:  # per head, before RoPE and compression (Qwen3)
            q, k_proj = self.q_norm(q, fused), self.k_norm(k_proj, fused)
            if self.independent_kv:
                branch_kv[0], branch_kv[2] = self.k_norm(branch_kv[0], fused), self.k_norm(branch_kv[2], fused)
        if self.independent_kv:
            k_win, v_win, k_raw, v_raw = branch_kv
            q, k_slc, k_win = rotate_all((q, k_proj, k_win), cos, sin, fused)
        else:  # one K/V for all branches; compression reads the keys before RoPE
            q, k_slc = rotate_all((q, k_proj), cos, sin, fused)
            k_raw, v_raw, k_win, v_win = k_proj, v_slc, k_slc, v_slc
        gates = self.branch_gate.from_projection(gate_projection)

        separate = self.independent_kv
        if isinstance(cache, NsaStaticCache):  # store in place; a decoding step then reads the stores
            static: NsaStaticCacheLayer = cache.layers[self.layer_idx]
            new_kv = (k_slc, v_slc, k_win if separate else None, v_win if separate else None, k_raw, v_raw)
            self._store_step(static, plan.stored_blocks, new_kv, plan.cache_positions, plan.pointwise)
        if isinstance(cache, NsaStaticCache) and plan.block_tokens is None:
            k_cmp, v_cmp = static.cmp_keys.flatten(0, 1), static.cmp_values.flatten(0, 1)
            k_slc, v_slc = static.keys.flatten(0, 1), static.values.flatten(0, 1)
            window = (static.window_keys, static.window_values) if separate else (static.keys, static.values)
            k_win, v_win = (t.flatten(0, 1) for t in window)
        elif isinstance(cache, NsaCache):  # store the step, compress the blocks it completes, read the stores
            layer: NsaCacheLayer = cache.layers[self.layer_idx]
            layer.append(k_slc, v_slc, k_win if separate else None, v_win if separate else None, k_raw, v_raw)
            if plan.block_slots is not None:
                k_new, v_new = self._compress(*layer.compression_buffer(), plan)
                layer.write_compressed(plan.block_slots, k_new, v_new, plan.geometry.capacity)
            stores = layer.stores()
            k_cmp, v_cmp = stores.k_cmp, stores.v_cmp
            k_slc, v_slc, k_win, v_win = stores.k_slc, stores.v_slc, stores.k_win, stores.v_win
        else:  # a full pass (also a static cache's prompt): attention over the step's own K/V
            # Values are slices of the stacked projection: one copy each here, not one in every kernel wrapper
            # (a cache copies them into its stores instead).
            if separate:
                v_slc, v_win = v_slc.contiguous(), v_win.contiguous()
            else:
                v_slc = v_win = v_raw = v_slc.contiguous()
            k_slc, v_slc, k_win, v_win = (t.flatten(0, 1) for t in (k_slc, v_slc, k_win, v_win))
            k_cmp, v_cmp = self._compress(k_raw.flatten(0, 1), v_raw.flatten(0, 1), plan)

        inputs = (q.flatten(0, 1), k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates.flatten(0, 1))
        if torch.is_autocast_enabled(q.device.type):
            # Like SDPA, attention runs in the autocast dtype (the FlashAttention window and the Triton kernels
            # need it); projections and RoPE already give it, so this only catches what does not.
            dtype = torch.get_autocast_dtype(q.device.type)
            inputs = tuple(t.to(dtype) for t in inputs)
        out = plan.attention(*inputs, plan.layout, self.pattern, self.scaling, ranges=plan.ranges)
        return self.o_proj(out.reshape(batch, seq_len, -1)), None


class NsaDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: NsaConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = NsaAttention(config, layer_idx)
        self.mlp = NsaMLP(config)
        self.input_layernorm = NsaRMSNorm(config)
        self.post_attention_layernorm = NsaRMSNorm(config)

    def forward(
        self,
        hidden_states: Tensor,
        plan: NsaForwardPlan,
        cache: NsaCache | NsaStaticCache | None = None,
        **kwargs,
    ) -> Tensor:
        residual = hidden_states
        hidden_states, _ = self.self_attn(self.input_layernorm(hidden_states, plan.pointwise), plan, cache)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states, plan.pointwise), plan.pointwise)
        return residual + hidden_states


class NsaPreTrainedModel(PreTrainedModel):
    config_class = NsaConfig
    config: NsaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["NsaDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    # The dense kernels do not compute NSA: attention always goes through the NSA backend of the config.
    _supports_flash_attn = False
    _supports_sdpa = False
    _supports_flex_attn = False
    _supports_attention_backend = False
    _can_compile_fullgraph = True  # the attention is custom ops; a static cache's decoding step has fixed shapes

    def _default_compile_config(self) -> CompileConfig:
        """generate() compiles the decoding step over a static cache as one graph (fullgraph=True: a break would be a
        bug, not a slow path), with transformers' other defaults (CUDA graphs through "reduce-overhead")."""
        config = super()._default_compile_config()
        config.fullgraph = True
        return config


def _rope_dtype(cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Under autocast, RoPE runs in the autocast dtype, as in a model loaded in that dtype: fp32 cos/sin
    would promote q and every key to fp32, and attention takes them in the autocast dtype anyway."""
    if not torch.is_autocast_enabled(cos.device.type):
        return cos, sin
    dtype = torch.get_autocast_dtype(cos.device.type)
    return cos.to(dtype), sin.to(dtype)


_HOLES_MESSAGE = "`attention_mask` may pad on the left or the right, but not between real tokens."


def _padding_and_holes(attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per row, the number of leading padding tokens; and whether any row has holes inside its document (a bool
    tensor: checking it needs the host)."""
    mask = attention_mask.bool()
    starts = (mask.long().cumsum(-1) == 0).sum(-1)
    ends = mask.shape[1] - mask.flip(-1).long().cumsum(-1).eq(0).sum(-1)  # one past the last real token
    return starts, (mask.sum(-1) != (ends - starts).clamp(min=0)).any()


def _leading_padding(attention_mask: Tensor) -> Tensor:
    """Per row, the number of leading padding tokens; rejects masks with holes inside the document."""
    starts, holes = _padding_and_holes(attention_mask)
    if bool(holes):
        raise ValueError(_HOLES_MESSAGE)
    return starts


def _check_inputs(input_ids: Tensor | None, inputs_embeds: Tensor | None, output_attentions: bool) -> None:
    """Reject what the model cannot run with an error that names the argument, before any work."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("You must specify exactly one of `input_ids` or `inputs_embeds`.")
    if input_ids is not None and input_ids.dim() != 2:
        raise ValueError(
            f"`input_ids` must be 2-D [batch, sequence], got shape {tuple(input_ids.shape)}"
            + (" (add a batch dimension: `input_ids[None]`)." if input_ids.dim() == 1 else ".")
        )
    if inputs_embeds is not None and inputs_embeds.dim() != 3:
        raise ValueError(f"`inputs_embeds` must be 3-D [batch, sequence, hidden], got shape {tuple(inputs_embeds.shape)}.")
    tokens = input_ids if input_ids is not None else inputs_embeds
    if tokens.shape[0] == 0 or tokens.shape[1] == 0:
        name = "input_ids" if input_ids is not None else "inputs_embeds"
        raise ValueError(f"`{name}` is empty (shape {tuple(tokens.shape)}): give at least one token per row.")
    if output_attentions:
        raise ValueError(
            "`output_attentions=True` is not supported: NSA computes no attention matrix (its selected blocks and window "
            "are read sparsely, and a dense [T, T] map is exactly what it avoids). Use output_hidden_states instead."
        )


def _check_attention_mask(attention_mask: Tensor, input_shape: torch.Size, past: int) -> None:
    """A 2-D mask covers the cached tokens and the new ones: [B, past + T] (shape only, no host sync)."""
    batch, seq_len = input_shape
    if attention_mask.dim() != 2:
        raise ValueError(f"NSA models take a 2-D `attention_mask` [B, S], got shape {tuple(attention_mask.shape)}.")
    if tuple(attention_mask.shape) != (batch, past + seq_len):
        cached = f" (the cache holds {past} tokens, plus {seq_len} new)" if past else ""
        raise ValueError(
            f"`attention_mask` must have shape {(batch, past + seq_len)}{cached}, got {tuple(attention_mask.shape)}."
        )


def _document_starts(position_ids: Tensor | None, batch: int, seq_idx: Tensor | None = None) -> Tensor | None:
    """Where packed documents start in the [B, T] rows: wherever `position_ids` restart at 0 inside a row
    (DataCollatorWithFlattening) or, without such position_ids, wherever `seq_idx` (each token's document index,
    `return_seq_idx=True`) changes; each row starts one too. None when no row is packed; under torch.compile, which
    cannot branch on tensor values without a host sync, the starts whenever position_ids or seq_idx come."""
    compiling = torch.compiler.is_compiling()
    if position_ids is not None and position_ids.shape[-1] > 1:
        starts = position_ids.expand(batch, -1) == 0
        if compiling or bool(starts[:, 1:].any()):
            return starts
    if seq_idx is not None and seq_idx.shape[-1] > 1:
        # Without position_ids (`return_position_ids=False`) seq_idx is the only sign of packing: ignoring it
        # would let every document attend to the ones before it.
        starts = seq_idx_starts(seq_idx.expand(batch, -1))
        if compiling or bool(starts.any()):
            return starts
    return None


class NsaModel(NsaPreTrainedModel):
    def __init__(self, config: NsaConfig):
        # Again here: `from_pretrained(..., field=value)` and attribute assignment set fields after the
        # config's own check, and an unknown `branch_kv` would otherwise build a shared-K/V model silently.
        config.validate_architecture()
        super().__init__(config)
        # Resolved now, not on the first call: a first call under torch.compile(fullgraph=True) cannot trace it.
        prepare_backends(config.nsa_backend, config.fused_kernels)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([NsaDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = NsaRMSNorm(config)
        self.rotary_emb = NsaRotaryEmbedding(config=config)
        self.pattern = sparse_pattern(config)  # as each NsaAttention keeps it: the plans' branch ranges use it
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def _plan(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None,
        cache: NsaCache | NsaStaticCache | None,
        cu_seqlens: Tensor | None,
        doc_starts: Tensor | None,
        attention: NsaBackend,
        pointwise: PointwiseKernels | None,
    ) -> NsaForwardPlan:
        batch, seq_len = hidden_states.shape[:2]
        device = hidden_states.device
        kernels = dict(attention=attention, pointwise=pointwise)
        if isinstance(cache, NsaStaticCache):
            if cache.prefilled:
                return self._static_step_plan(hidden_states, cache, kernels)
            return self._static_prompt_plan(hidden_states, attention_mask, cache, attention, pointwise)
        if cache is not None:
            return self._step_plan(hidden_states, attention_mask, cache, kernels)

        l, d, num_tokens = self.config.compress_block_size, self.config.compress_stride, batch * seq_len
        if cu_seqlens is None and doc_starts is None and attention_mask is None:
            layout, blocks = QueryLayout.for_batch(batch, seq_len, l, d, device)
        elif cu_seqlens is not None:  # from_cu_seqlens checks they end at the B * T tokens
            layout, blocks = document_layout(num_tokens, l, d, device, cu_seqlens=cu_seqlens)
        elif doc_starts is not None:
            layout, blocks = document_layout(num_tokens, l, d, device, doc_starts=doc_starts)
        else:  # left padding: each row is a padding document, then its real one
            padding, holes = _padding_and_holes(attention_mask.to(device))
            starts = torch.arange(seq_len, device=device) == padding[:, None]  # rows start their padding anyway
            layout, blocks = document_layout(
                num_tokens, l, d, device, doc_starts=starts, invalid=holes, invalid_message=_HOLES_MESSAGE
            )
        cos, sin = _rope_dtype(*self.rotary_emb(hidden_states, layout.positions.view(batch, seq_len)))
        block_cos, block_sin = _rope_dtype(*self.rotary_emb(hidden_states, blocks.positions[None]))
        return NsaForwardPlan(
            cos, sin, **kernels, layout=layout, ranges=branch_ranges(layout, self.pattern),
            block_tokens=block_tokens(blocks.token_starts, l, num_tokens), block_cos=block_cos[0], block_sin=block_sin[0],
        )

    def _step_plan(self, hidden_states: Tensor, attention_mask: Tensor | None, cache: NsaCache, kernels: dict) -> NsaForwardPlan:
        """A cached step's plan, once for every layer: where its queries read in the stores after the step, and the
        compressed blocks its tokens complete (slots, tokens in the compression buffer, RoPE at their last token)."""
        batch, num_new = hidden_states.shape[:2]
        device = hidden_states.device
        l, d = self.config.compress_block_size, self.config.compress_stride
        past = cache.get_seq_length()
        if past == 0 or cache.doc_starts is None:  # the first step: documents start after the left padding
            cache.set_doc_starts(
                _leading_padding(attention_mask).to(device)
                if attention_mask is not None
                else torch.zeros(batch, dtype=torch.long, device=device)
            )
        starts = cache.doc_starts
        geometry = cache.step_geometry(num_new)
        positions = (past + torch.arange(num_new, device=device))[None, :] - starts[:, None]
        cos, sin = _rope_dtype(*self.rotary_emb(hidden_states, positions.clamp(min=0)))

        rows = torch.arange(batch, device=device)
        key_offsets = rows * geometry.history_capacity + starts
        window_offsets = rows * geometry.window_stride + starts - (geometry.seq_len - geometry.window_len)
        layout = QueryLayout(
            positions=positions.flatten(),
            key_offsets=key_offsets.repeat_interleave(num_new),
            cmp_offsets=(rows * geometry.capacity).repeat_interleave(num_new),
            window_offsets=window_offsets.repeat_interleave(num_new),
            run_length=num_new,
        )
        plan = NsaForwardPlan(
            cos, sin, **kernels, layout=layout, ranges=branch_ranges(layout, self.pattern),
            block_tokens=None, block_cos=None, block_sin=None, geometry=geometry,
        )
        if geometry.num_new_blocks:
            # Slot = block index in the row's document; slots past a row's completed count get a meaningless
            # block, masked by the layout and overwritten when that block completes.
            done_before = num_compressed_blocks(past - starts, l, d)  # [B]
            slots = done_before[:, None] + torch.arange(geometry.num_new_blocks, device=device)
            # Each block's first token in the flat compression buffer [B * L], whose last token is seq_len - 1.
            buffer_len = geometry.buffer_len
            offset = starts[:, None] + slots * d - (geometry.seq_len - buffer_len)
            first = rows[:, None] * buffer_len + offset.clamp(0, max(buffer_len - l, 0))
            block_cos, block_sin = _rope_dtype(*self.rotary_emb(hidden_states, slots * d + l - 1))
            plan.block_tokens = block_tokens(first, l, batch * buffer_len)
            plan.block_cos, plan.block_sin, plan.block_slots = block_cos, block_sin, slots
        return plan

    def _static_prompt_plan(
        self, hidden_states: Tensor, attention_mask: Tensor | None, cache: NsaStaticCache, attention: NsaBackend,
        pointwise: PointwiseKernels | None,
    ) -> NsaForwardPlan:
        """A static cache's prompt: a full pass (left padding as documents), whose K/V and every block of each row
        the layers then store (`stored_blocks`)."""
        batch, seq_len = hidden_states.shape[:2]
        device = hidden_states.device
        if seq_len > cache.max_cache_len:
            raise ValueError(f"the prompt has {seq_len} tokens but the static cache holds {cache.max_cache_len} (`max_cache_len`).")
        plan = self._plan(hidden_states, attention_mask, None, None, None, attention, pointwise)
        starts = _leading_padding(attention_mask.to(device)) if attention_mask is not None else torch.zeros(batch, dtype=torch.long, device=device)
        plan.prompt_starts = starts  # the cache takes them once every layer has stored the prompt
        plan.cache_positions = torch.arange(seq_len, device=device)  # a prompt fills an empty cache
        l, d = self.config.compress_block_size, self.config.compress_stride
        count = max(num_compressed_blocks(seq_len, l, d), 1)  # a prompt shorter than a block still writes one slot
        slots = torch.arange(count, device=device).expand(batch, -1)
        first = (torch.arange(batch, device=device) * seq_len + starts)[:, None] + slots * d
        cos, sin = _rope_dtype(*self.rotary_emb(hidden_states, slots * d + l - 1))
        plan.stored_blocks = StoredBlocks(block_tokens(first, l, batch * seq_len), cos, sin, slots, from_ring=False)
        return plan

    def _static_step_plan(self, hidden_states: Tensor, cache: NsaStaticCache, kernels: dict) -> NsaForwardPlan:
        """A step over a static cache after its prompt: T new tokens per row (1 when decoding, more when verifying
        drafts), every size fixed by T, positions from the cache's device counter (no host sync: the traced graph
        is the same at every position)."""
        batch, num_new = hidden_states.shape[:2]
        layer = cache.layers[0]
        if num_new > layer.max_rollback + 1:
            raise ValueError(
                f"a step after the prompt may hold at most max_rollback + 1 = {layer.max_rollback + 1} tokens per row "
                f"with this static cache, got {num_new} (`NsaStaticCache(max_rollback=...)`)."
            )
        device = hidden_states.device
        l, d = self.config.compress_block_size, self.config.compress_stride
        tokens = layer.cumulative_length + torch.arange(num_new, device=device)  # the new tokens' index in every row
        newest = tokens[-1]
        starts = cache.doc_starts
        positions = tokens[None, :] - starts[:, None]  # [B, T]
        cos, sin = _rope_dtype(*self.rotary_emb(hidden_states, positions))
        rows = torch.arange(batch, device=device)
        key_offsets = rows * layer.max_cache_len + starts
        window_offsets = key_offsets  # a shared window reads the selection history
        if layer.separate_window:  # after the step, token a sits at ring slot (newest mod R) + R - (newest - a)
            ring = layer.window_ring
            window_offsets = rows * 2 * ring + newest % ring + ring - newest + starts
        layout = QueryLayout(
            positions=positions.flatten(),
            key_offsets=key_offsets.repeat_interleave(num_new),
            cmp_offsets=(rows * (layer.num_blocks + 1)).repeat_interleave(num_new),
            window_offsets=window_offsets.repeat_interleave(num_new),
            run_length=num_new,
        )
        # Per new token, the block it completes, if any (else the scratch slot): its l raw tokens end at the token,
        # in the raw ring laid out as the window's; its compressed key's RoPE is the token's own (cos, sin).
        done = positions + 1 - l
        complete = (done >= 0) & (done % d == 0)
        slots = torch.where(complete, done.div(d, rounding_mode="floor"), layer.num_blocks)
        raw = layer.raw_ring
        first = (rows * 2 * raw)[:, None] + (newest % raw + raw - newest) + tokens[None, :] - l + 1
        return NsaForwardPlan(
            cos, sin, **kernels, layout=layout, ranges=branch_ranges(layout, self.pattern), block_tokens=None,
            block_cos=None, block_sin=None,
            stored_blocks=StoredBlocks(block_tokens(first, l, batch * 2 * raw), cos, sin, slots, from_ring=True),
            cache_positions=tokens,
        )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: NsaCache | NsaStaticCache | None = None,
        inputs_embeds: Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cu_seq_lens_q: Tensor | None = None,
        seq_idx: Tensor | None = None,
        past_key_values: NsaCache | NsaStaticCache | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        """Args as in `LlamaModel.forward`. The cache comes as `cache` (transformers >= 5.24) or `past_key_values`
        (the name before); the output holds it under the installed release's name. `position_ids` only signal
        packed documents (restarts at 0); RoPE positions always come from the document layout. `cu_seq_lens_q`
        (from `DataCollatorWithFlattening(return_flash_attn_kwargs=True)`) or `seq_idx` (`return_seq_idx=True`)
        packs documents in one row. `output_attentions=True` is refused: NSA computes no attention matrix."""
        cache = cache_argument(cache, past_key_values)
        _check_inputs(input_ids, inputs_embeds, output_attentions if output_attentions is not None else self.config.output_attentions)
        output_hidden_states = output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if cache is not None and not isinstance(cache, NsaCache | NsaStaticCache):
            raise TypeError(f"NSA models need an `NsaCache` or `NsaStaticCache`, got {type(cache).__name__}.")
        if use_cache is False and cache is not None:
            # generate(use_cache=False, cache=...) would feed the whole sequence every step into a cache that already
            # holds it, and decode from a history with every token repeated.
            raise ValueError("`use_cache=False` was passed together with a cache: drop the cache, or pass use_cache=True.")
        doc_starts = None
        if cu_seq_lens_q is None and attention_mask is None and cache is None:
            doc_starts = _document_starts(position_ids, inputs_embeds.shape[0], seq_idx)
        packed = cu_seq_lens_q is not None or doc_starts is not None
        if packed and (use_cache or cache is not None):
            raise ValueError("packed sequences (`cu_seq_lens_q` or restarting `position_ids`) cannot use a cache.")
        if use_cache is None:  # a cache only pays off when decoding: not in training, not for packed rows
            use_cache = self.config.use_cache and not self.training and not packed
        if self.gradient_checkpointing and self.training and use_cache:
            use_cache = False
        if self.gradient_checkpointing and self.training and cache is not None and torch.is_grad_enabled():
            raise ValueError(
                "activation checkpointing recomputes every layer in the backward pass, which would write the cache "
                "(`cache` / `past_key_values`) a second time: train without a cache (use_cache=False) or without "
                "checkpointing."
            )
        if use_cache and cache is None:
            cache = NsaCache(self.config)
        cache = cache if use_cache or cache is not None else None
        # A static cache's decoding steps read the document starts it stored; its length is a device counter.
        if attention_mask is not None and not (isinstance(cache, NsaStaticCache) and cache.prefilled):
            _check_attention_mask(attention_mask, inputs_embeds.shape[:2], cache.get_seq_length() if cache is not None else 0)

        hidden_states = inputs_embeds
        # The kernels of this pass, looked up once for every layer (resolved once per setting and device type).
        attention = resolve_backend(self.config.nsa_backend, hidden_states.device)
        pointwise = resolve_pointwise(self.config.fused_kernels, hidden_states.device)
        plan = self._plan(hidden_states, attention_mask, cache, cu_seq_lens_q, doc_starts, attention, pointwise)
        all_hidden_states = () if output_hidden_states else None
        for decoder_layer in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states = decoder_layer(hidden_states, plan, cache)
        if plan.prompt_starts is not None:  # a static cache is prefilled once every layer holds the prompt
            cache.set_doc_starts(plan.prompt_starts)
        hidden_states = self.norm(hidden_states, pointwise)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        output = BaseModelOutputWithPast(
            last_hidden_state=hidden_states, hidden_states=all_hidden_states, **{CACHE_KWARG: cache if use_cache else None}
        )
        return output if return_dict else output.to_tuple()


def fused_causal_lm_loss(
    cross_entropy: Callable[[Tensor, Tensor, int], Tensor], logits: Tensor, labels: Tensor, vocab_size: int,
    num_items_in_batch: Tensor | int | None = None, ignore_index: int = -100, shift_labels: Tensor | None = None,
    **kwargs,
) -> Tensor:
    """transformers' `ForCausalLMLoss` (same shift, ignore_index and `num_items_in_batch` reduction) with a fused
    per-token cross entropy, which reads the logits in their dtype instead of copying them to fp32 first
    (at 32k tokens x a 32k vocabulary, two 4 GiB fp32 tensors and their traffic saved)."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    shift_labels = shift_labels.reshape(-1).to(logits.device)
    losses = cross_entropy(logits.reshape(-1, vocab_size), shift_labels, ignore_index)
    if num_items_in_batch is None:  # "mean" over the labelled tokens, as F.cross_entropy
        return losses.sum() / (shift_labels != ignore_index).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(losses.device)
    return losses.sum() / num_items_in_batch


class NsaForCausalLM(NsaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: NsaConfig):
        super().__init__(config)
        self.model = NsaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._kept_static_cache: NsaStaticCache | None = None  # see `_static_cache_for`
        self._decode_graphs: DecodeGraphs | None = None  # the kept cache's recorded decoding steps
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    def create_masks_for_generate(
        self, attention_mask: Tensor | None = None, cache: Cache | None = None, **kwargs
    ) -> Tensor | None:
        """generate() asks compileable caches for a 4-D mask; NSA takes the 2-D one for the prompt (left padding), and
        a static cache's decoding steps need none (the cache keeps where each row's document starts): a mask that
        grew every step would make torch.compile trace the step again."""
        cache = cache_argument(cache, kwargs.get("past_key_values"))  # transformers < 5.24 passes the old name
        if isinstance(cache, NsaStaticCache) and cache.prefilled:
            return None
        return attention_mask

    def _prepare_cache_for_generation(
        self, generation_config: GenerationConfig, model_kwargs: dict, generation_mode, batch_size: int,
        max_cache_length: int,
    ) -> None:
        """generate() decodes through an `NsaCache`, or an `NsaStaticCache` for cache_implementation="static" (holding
        at least the tokens this call needs: prompt, embeddings and new tokens; kept between calls, see
        `_static_cache_for`), put in `model_kwargs` under the key the
        installed transformers reads (`cache` from 5.24, `past_key_values` before); a DynamicCache would drop the
        NSA state. A static cache the user passes must hold what this call needs."""
        if self._decode_graphs is not None:  # enabled again below for a call on the default path
            self._decode_graphs.enabled = False
        given = model_kwargs.get(CACHE_KWARG)
        needed = max(max_cache_length, getattr(generation_config, "max_cache_len", None) or 0)
        if isinstance(given, NsaStaticCache) and given.max_cache_len < needed:
            raise ValueError(
                f"the static cache holds {given.max_cache_len} tokens (`max_cache_len`) but this generate() needs "
                f"{needed} (prompt + max_new_tokens)."
            )
        if given is not None or generation_config.use_cache is False:
            return super()._prepare_cache_for_generation(
                generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
            )
        implementation = generation_config.cache_implementation
        graphs = implementation is None and self._decodes_with_graphs(generation_config)
        if graphs:
            implementation = "static"
            generation_config.disable_compile = True  # the recorded eager step replaces torch.compile's graphs
        if implementation not in (None, "dynamic", "static"):
            raise ValueError(
                f"NSA models decode with their own `NsaCache` (None or 'dynamic') or `NsaStaticCache` ('static'); "
                f"cache_implementation={implementation!r} is not supported."
            )
        if implementation == "static" and getattr(generation_config, "prefill_chunk_size", None):
            raise ValueError(
                "`prefill_chunk_size` cannot be used with cache_implementation='static': a static NsaCache takes "
                "the prompt in one pass (use the default cache to prefill in chunks)."
            )
        if implementation == "static":
            rows = batch_size * max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1)
            # Room for a verification step's drafts past the last kept token (assisted decoding), as many as
            # the cache can roll back.
            cache = self._static_cache_for(
                rows, needed + DEFAULT_ROLLBACK, keep=not generation_config.return_dict_in_generate, for_graphs=graphs
            )
            model_kwargs[CACHE_KWARG] = cache
            if graphs:
                if self._decode_graphs is None:  # `_static_cache_for` drops the graphs with the cache they belong to
                    self._decode_graphs = DecodeGraphs(cache)
                self._decode_graphs.refresh(self)
                self._decode_graphs.enabled = True
        else:
            model_kwargs[CACHE_KWARG] = NsaCache(self.config)

    def _decodes_with_graphs(self, generation_config: GenerationConfig) -> bool:
        """Whether generate() without `cache_implementation` decodes over a kept static cache by replaying recorded
        CUDA graphs of the eager step (`NsaConfig.cuda_graph_decoding`, `decode_graphs.py`): on CUDA, for a model
        whose forward a replay reproduces, and for calls that do not hand their cache back to the caller
        (`return_dict_in_generate`: the growing `NsaCache` can be continued past any length) nor prefill in chunks."""
        if not self.config.cuda_graph_decoding or self.device.type != "cuda":
            return False
        if generation_config.return_dict_in_generate:
            reason = "the call returns its cache (return_dict_in_generate=True), which is then the growing NsaCache"
        elif getattr(generation_config, "prefill_chunk_size", None):
            reason = "the prompt is prefilled in chunks (prefill_chunk_size), which the static cache cannot take"
        else:
            reason = why_not_graphable(self)
        if reason is not None:
            logger.warning_once(f"generate() decodes without CUDA graphs (`cuda_graph_decoding`): {reason}.")
        return reason is None

    def _static_cache_for(self, rows: int, max_cache_len: int, keep: bool, for_graphs: bool = False) -> NsaStaticCache:
        """With `keep`, the static cache of the previous static generate() call, reset, when it can hold this one (same
        rows, dtype and device, at least as long), else a new one kept for the next call: reused buffers keep their
        addresses, so the compiled decoding step's CUDA graphs replay instead of being recorded again at every call
        (transformers' own StaticCache is new at each call). Without `keep` (a call that returns its cache to the
        caller, `return_dict_in_generate=True`), a new cache that no later call touches. One generate() at a time
        per model: calls from several threads at once would share the kept buffers. A new cache for a compiled step is
        as long as the last one at least (the step then meets shapes it has seen, as transformers does); recorded
        graphs belong to their cache, so a new cache `for_graphs` is only as long as the call needs, and a new kept
        cache drops the graphs recorded over the old one."""
        kept = self._kept_static_cache
        if keep and kept is not None and kept.can_hold(rows, max_cache_len, self._cache_dtype(), self.device):
            kept.reset()
            return kept
        longest = kept.max_cache_len if kept is not None and not for_graphs else 0
        cache = NsaStaticCache(self.config, max_cache_len=max(max_cache_len, longest))
        if keep:
            self._kept_static_cache = cache
            self._decode_graphs = None
        return cache

    def _cache_dtype(self) -> torch.dtype:
        """The dtype a cache filled now stores: the autocast dtype under autocast (the projections give it), else the
        model's."""
        device_type = self.device.type
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else self.dtype

    def release_static_cache(self) -> None:
        """Drop the static cache that generate() keeps between calls (cache_implementation="static", and the default
        path on CUDA), and the CUDA graphs recorded over it with the stacked attention weights they read."""
        self._kept_static_cache = None
        self._decode_graphs = None

    def _apply(self, fn, recurse: bool = True):
        # .to(), .cuda(), .half(), ...: a kept cache on the old device or dtype could never be reused.
        self.release_static_cache()
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        # Copies and pickles carry no decoding buffers nor graphs.
        return {**super().__getstate__(), "_kept_static_cache": None, "_decode_graphs": None}

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: NsaCache | NsaStaticCache | None = None,
        inputs_embeds: Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | Tensor = 0,
        past_key_values: NsaCache | NsaStaticCache | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """Args as in `LlamaForCausalLM.forward`; the cache as `cache` or `past_key_values` (see `NsaModel.forward`)."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        cache = cache_argument(cache, past_key_values)
        plain_step = (
            input_ids is not None and inputs_embeds is None and labels is None and use_cache is not False
            and not output_hidden_states and isinstance(logits_to_keep, int)
        )
        if plain_step and self._replays_step(cache, input_ids):
            logits = self._decode_graphs.step(functools.partial(self._step_logits, cache), input_ids)
            output = CausalLMOutputWithPast(logits=logits, **{CACHE_KWARG: cache})
            return output if return_dict else output.to_tuple()
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
            cu_seq_lens_q=kwargs.get("cu_seq_lens_q"),
            seq_idx=kwargs.get("seq_idx"),
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])
        loss = None
        if labels is not None:
            loss_function = self.loss_function
            fused = resolve_pointwise(self.config.fused_kernels, logits.device)
            if fused is not None and loss_function is ForCausalLMLoss:  # a user's own loss function stays
                loss_function = functools.partial(fused_causal_lm_loss, fused.cross_entropy)
            loss = loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        output = CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, **{CACHE_KWARG: getattr(outputs, CACHE_KWARG)}
        )
        return output if return_dict else output.to_tuple()

    def _replays_step(self, cache: Cache | None, input_ids: Tensor) -> bool:
        """Whether this forward is a step of generate()'s default path on CUDA, which `DecodeGraphs` replays: one
        token per row over the prefilled cache of the graphs, without gradients, outside torch.compile."""
        graphs = self._decode_graphs
        return (
            graphs is not None and graphs.enabled and cache is graphs.cache and cache.prefilled
            and input_ids.shape[1] == 1 and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        )

    def _step_logits(self, cache: NsaStaticCache, input_ids: Tensor) -> Tensor:
        """A decoding step's logits [B, 1, V] over a prefilled static cache (what `DecodeGraphs` records)."""
        hidden_states = self.model(input_ids=input_ids, cache=cache, use_cache=True, return_dict=True).last_hidden_state
        return self.lm_head(hidden_states)
