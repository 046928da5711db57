"""NsaConfig validation: every rule raises a ValueError that names the field."""

from __future__ import annotations

import pytest

from nsa_hf import NsaConfig


@pytest.mark.parametrize(
    "fields, field_named",
    [
        (dict(compress_block_size=32, compress_stride=12), "compress_block_size"),  # l % d
        (dict(select_block_size=40, compress_stride=16), "select_block_size"),  # l' % d
        (dict(num_selected_blocks=2, num_init_blocks=1, num_local_blocks=2), "num_selected_blocks"),  # n >= init + local
        (dict(num_attention_heads=12, num_key_value_heads=5), "num_attention_heads"),  # heads % kv heads
        (dict(window_size=0), "window_size"),
        (dict(compress_block_size=-32), "compress_block_size"),
        (dict(num_selected_blocks=0), "num_selected_blocks"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(head_dim=-2), "head_dim"),
        (dict(head_dim=7), "head_dim"),
        (dict(num_init_blocks=-1), "num_init_blocks"),
        (dict(gate_intermediate_size=0), "gate_intermediate_size"),
        (dict(compression_type="attention"), "compression_type"),
        (dict(branch_kv="tied"), "branch_kv"),
        (dict(nsa_backend="magic"), "nsa_backend"),
    ],
)
def test_invalid_config_raises_value_error_naming_the_field(fields, field_named):
    with pytest.raises(ValueError, match=f"`{field_named}`"):
        NsaConfig(**fields)


def test_defaults_are_the_paper_settings():
    config = NsaConfig()
    assert (config.compress_block_size, config.compress_stride, config.select_block_size) == (32, 16, 64)
    assert (config.num_selected_blocks, config.window_size, config.branch_kv) == (16, 512, "independent")
    assert config.head_dim == config.hidden_size // config.num_attention_heads


def test_round_trip_keeps_nsa_fields(tmp_path):
    config = NsaConfig(compression_type="linear", branch_kv="shared", window_size=256, gate_intermediate_size=32)
    config.save_pretrained(tmp_path)
    loaded = NsaConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
