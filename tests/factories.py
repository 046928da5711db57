"""Tiny NSA models shared by the tests."""

from __future__ import annotations

import torch

from nsa_hf import NsaConfig, NsaForCausalLM


def tiny_config(**overrides) -> NsaConfig:
    fields = dict(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        compress_block_size=8,
        compress_stride=4,
        select_block_size=16,
        num_selected_blocks=3,
        num_init_blocks=1,
        num_local_blocks=1,
        window_size=12,
        compress_intermediate_size=16,
    )
    fields.update(overrides)
    return NsaConfig(**fields)


def make_model(config: NsaConfig, seed: int = 0) -> NsaForCausalLM:
    torch.manual_seed(seed)
    model = NsaForCausalLM(config).eval()
    # Gate biases and weights away from the tiny init so every branch visibly contributes.
    with torch.no_grad():
        for layer in model.model.layers:
            for p in layer.self_attn.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return model
