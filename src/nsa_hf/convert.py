"""From a dense checkpoint to NSA: `convert_dense_to_nsa` for Llama, Mistral, Qwen2 and Qwen3 causal LMs.

What carries over: embeddings, norms, MLP, the q/k/v/o projections (with their biases), RoPE settings (llama3-style
scaling included), Qwen3's per-head q/k norms, tied embeddings and token ids. The selection branch reads the dense
K/V projections; the window and compression branches share them (`branch_kv="shared"`, the default here) or start
as copies of them (`"independent"`).

The new parts start so that the converted model computes what the dense one computes for every sequence no longer
than both the window and n x l' (there the window and the selection branch each see every earlier token, so each
equals dense attention), and so that nothing starts saturated:
- the gates' last layer is zero: every gate is sigmoid(0) = 1/2, the middle of the sigmoid (its largest
  gradient), and the selection and window halves add up to the dense output;
- phi of the compressed *values* has a zero last layer, so the compressed branch adds exactly 0 until training
  moves it (its gradient is not zero: it scales the attention-weighted hidden features of phi);
- phi of the compressed keys keeps its random initialization (the block scores need no particular start); its
  gradient is zero while the compressed values are, and follows them from the second optimizer step on
  (tests/test_convert.py trains all three).
Beyond that length the model is NSA: the window is cut, selection chooses n blocks. A dense model that itself
attends through a sliding window (Mistral's `sliding_window`) is matched up to that window too.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from .configuration_nsa import NsaConfig
from .modeling_nsa import NsaForCausalLM

__all__ = ["SUPPORTED_MODEL_TYPES", "convert_dense_to_nsa"]

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_COPIED_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps", "pad_token_id", "bos_token_id",
    "eos_token_id", "tie_word_embeddings", "mlp_bias",
)
# Dense settings that would change the function and that NSA does not implement.
_REFUSED = {
    "num_experts": "a mixture of experts",
    "num_local_experts": "a mixture of experts",
    "kv_lora_rank": "multi-latent attention",
    "use_sinks": "attention sinks",
}


def _dense_model(model_or_path: PreTrainedModel | str | os.PathLike, **load_kwargs: Any) -> PreTrainedModel:
    if isinstance(model_or_path, PreTrainedModel):
        return model_or_path
    if isinstance(model_or_path, str | os.PathLike):
        return AutoModelForCausalLM.from_pretrained(model_or_path, **load_kwargs)
    raise TypeError(f"`model_or_path` must be a transformers model or a folder, got {type(model_or_path).__name__}.")


def _check_convertible(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"cannot convert model type {model_type!r} to NSA: supported are {', '.join(SUPPORTED_MODEL_TYPES)} "
            "(causal LMs with grouped-query attention, RoPE and a SwiGLU MLP)."
        )
    for field, what in _REFUSED.items():
        if getattr(config, field, None):
            raise ValueError(f"cannot convert this {model_type} model to NSA: it uses {what} (`{field}`).")
    if getattr(config, "layer_types", None) and any(t != "full_attention" for t in config.layer_types):
        raise ValueError(
            f"cannot convert this {model_type} model to NSA: its layers mix attention types ({set(config.layer_types)}); "
            "NSA replaces full attention only."
        )


def _nsa_config(dense_config, nsa_fields: dict[str, Any]) -> NsaConfig:
    fields = {name: getattr(dense_config, name) for name in _COPIED_FIELDS if hasattr(dense_config, name)}
    fields["head_dim"] = getattr(dense_config, "head_dim", None) or dense_config.hidden_size // dense_config.num_attention_heads
    fields["rope_parameters"] = dict(getattr(dense_config, "rope_parameters", None) or {"rope_type": "default", "rope_theta": 10000.0})
    linear_bias = {
        "llama": getattr(dense_config, "attention_bias", False),
        "mistral": False,
        "qwen2": True,  # q, k and v carry biases; o_proj's starts at zero
        "qwen3": getattr(dense_config, "attention_bias", False),
    }[dense_config.model_type]
    fields.update(attention_bias=linear_bias, qk_norm=dense_config.model_type == "qwen3", branch_kv="shared")
    unknown = set(nsa_fields) - set(NsaConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown NsaConfig field(s) {sorted(unknown)}.")
    fixed = (set(_COPIED_FIELDS) | {"head_dim", "rope_parameters", "attention_bias", "qk_norm"}) & set(nsa_fields)
    if fixed:
        raise ValueError(f"{sorted(fixed)} come from the dense checkpoint and cannot be set when converting.")
    fields.update(nsa_fields)
    if fields.get("compression_type", "mlp") == "mean":
        raise ValueError(
            "`compression_type='mean'` cannot start as the dense model: the compressed branch would add the mean "
            "of each block's values; use 'mlp' or 'linear' (their last layer starts at zero)."
        )
    return NsaConfig(**fields)


def _copy(target: nn.Module, source: nn.Module) -> None:
    """Copy a Linear or RMSNorm's parameters; a bias the source lacks starts at zero."""
    with torch.no_grad():
        target.weight.copy_(source.weight)
        if getattr(target, "bias", None) is not None:
            bias = getattr(source, "bias", None)
            target.bias.copy_(bias) if bias is not None else target.bias.zero_()


def _zero_last_layer(module: nn.Module) -> None:
    """The output layer of phi ("mlp": fc2, "linear": proj) or of the gate (fc2, or its one proj) to zero."""
    last = module.fc2 if hasattr(module, "fc2") else module.proj
    with torch.no_grad():
        last.weight.zero_()
        if last.bias is not None:
            last.bias.zero_()


def _build_like(config: NsaConfig, reference: torch.Tensor) -> NsaForCausalLM:
    """An NsaForCausalLM built directly in the dense model's dtype and on its device (transformers' `_from_config`),
    with no float32 copy on the CPU first (four times a bf16 checkpoint's size)."""
    with torch.device(reference.device):
        return NsaForCausalLM._from_config(config, dtype=reference.dtype)


def convert_dense_to_nsa(
    model_or_path: PreTrainedModel | str | os.PathLike, load_kwargs: dict[str, Any] | None = None, **nsa_fields: Any
) -> NsaForCausalLM:
    """An `NsaForCausalLM` that starts as the given dense causal LM (a model, or a folder `from_pretrained` loads).

    Args:
        model_or_path: a LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM or Qwen3ForCausalLM, or its folder.
        load_kwargs: passed to `AutoModelForCausalLM.from_pretrained` when a folder is given (e.g. `torch_dtype`).
        **nsa_fields: NsaConfig fields to set (`window_size`, `compress_block_size`, `branch_kv`, ...).

    See the module docstring for what carries over, how the new parts start, and what equals the dense model.
    """
    dense = _dense_model(model_or_path, **(load_kwargs or {}))
    _check_convertible(dense.config)
    config = _nsa_config(dense.config, nsa_fields)
    model = _build_like(config, next(dense.parameters()))
    dense_body, body = dense.model, model.model
    _copy(body.embed_tokens, dense_body.embed_tokens)
    _copy(body.norm, dense_body.norm)
    if not config.tie_word_embeddings:
        _copy(model.lm_head, dense.lm_head)
    for dense_layer, layer in zip(dense_body.layers, body.layers, strict=True):
        _copy(layer.input_layernorm, dense_layer.input_layernorm)
        _copy(layer.post_attention_layernorm, dense_layer.post_attention_layernorm)
        for name in ("gate_proj", "up_proj", "down_proj"):
            _copy(getattr(layer.mlp, name), getattr(dense_layer.mlp, name))
        attention, dense_attention = layer.self_attn, dense_layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            _copy(getattr(attention, name), getattr(dense_attention, name))
        if config.qk_norm:
            _copy(attention.q_norm, dense_attention.q_norm)
            _copy(attention.k_norm, dense_attention.k_norm)
        if attention.independent_kv:  # the other branches start as copies of the dense K/V
            for prefix in ("window", "compress"):
                _copy(getattr(attention, f"{prefix}_k_proj"), dense_attention.k_proj)
                _copy(getattr(attention, f"{prefix}_v_proj"), dense_attention.v_proj)
        _zero_last_layer(attention.compress_value)
        _zero_last_layer(attention.branch_gate)
    model.generation_config = copy.deepcopy(dense.generation_config)  # eos lists, sampling defaults, chat stops
    model.config.architectures = ["NsaForCausalLM"]
    return model.train(dense.training)
