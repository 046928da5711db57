"""`convert_dense_to_nsa` and `nsa-hf convert`: a converted model computes what its dense source computes on every
sequence no longer than both the window and n x l' (tiny random models of each family, float32, 1e-4 of the logit
scale), stays finite beyond, starts unsaturated and trains its new branches."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from nsa_hf import NsaForCausalLM
from nsa_hf.cli import main
from nsa_hf.convert import convert_dense_to_nsa

COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)
# n x l' = 4 x 8 = 32 = w: sequences up to 32 tokens equal the dense model.
NSA = dict(compress_block_size=8, compress_stride=4, select_block_size=8, num_selected_blocks=4, num_init_blocks=1,
           num_local_blocks=1, window_size=32, nsa_backend="reference")
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
FAMILIES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**COMMON)),
    "llama3-rope": lambda: LlamaForCausalLM(LlamaConfig(**COMMON, rope_parameters=LLAMA3_ROPE)),
    "llama-bias": lambda: LlamaForCausalLM(LlamaConfig(**COMMON, attention_bias=True, tie_word_embeddings=True)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**COMMON)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**COMMON)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**COMMON, head_dim=16)),
}


def _dense(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = FAMILIES[family]()
    with torch.no_grad():  # norms and biases away from their 1 / 0 defaults, so a lost one shows
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(mean=0.5, std=0.2)
    return model.eval()


def _assert_same_function(dense, nsa, length: int = 32) -> None:
    ids = torch.randint(0, 97, (2, length))
    with torch.no_grad():
        expected, got = dense(ids).logits, nsa(ids, use_cache=False).logits
    assert ((got - expected).abs().max() / expected.abs().max()) < 1e-4


@pytest.mark.parametrize("branch_kv", ["shared", "independent"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_converted_model_computes_the_dense_function_up_to_the_window(family, branch_kv):
    dense = _dense(family)
    nsa = convert_dense_to_nsa(dense, branch_kv=branch_kv, **NSA)
    assert isinstance(nsa, NsaForCausalLM) and not nsa.training
    for length in (1, 9, 32):
        _assert_same_function(dense, nsa, length)
    with torch.no_grad():  # beyond the window the model is NSA: finite, and no longer the dense function
        ids = torch.randint(0, 97, (1, 120))
        longer, expected = nsa(ids, use_cache=False).logits, dense(ids).logits
    assert torch.isfinite(longer).all()
    assert (longer - expected).abs().max() / expected.abs().max() > 1e-4


def test_the_cli_converts_a_saved_folder(tmp_path, capsys):
    dense = _dense("qwen3")
    dense.generation_config.eos_token_id = [2, 5]  # a list only generation_config.json holds (chat models' stops)
    dense.save_pretrained(tmp_path / "dense")
    fields = [f"--{k}" if i % 2 == 0 else v for k, v in NSA.items() for i, v in enumerate((k, str(v)))]
    assert main(["convert", str(tmp_path / "dense"), str(tmp_path / "nsa"), *fields, "--branch_kv=independent"]) == 0
    assert "converted" in capsys.readouterr().out
    nsa = NsaForCausalLM.from_pretrained(tmp_path / "nsa").eval()
    assert nsa.config.branch_kv == "independent" and nsa.config.window_size == 32
    assert nsa.generation_config.eos_token_id == [2, 5]
    assert (tmp_path / "nsa" / "model.safetensors").is_file()
    assert str(tmp_path / "dense") in (tmp_path / "nsa" / "README.md").read_text()
    _assert_same_function(dense, nsa)


def test_what_cannot_be_converted_is_refused_by_name():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="'gpt2'"):
        convert_dense_to_nsa(gpt2)
    mixtral = MixtralForCausalLM(MixtralConfig(**COMMON, num_local_experts=2, num_experts_per_tok=1))
    with pytest.raises(ValueError, match="'mixtral'"):  # a mixture of experts
        convert_dense_to_nsa(mixtral)
    sliding = Qwen2ForCausalLM(Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=16, max_window_layers=1))
    with pytest.raises(ValueError, match="mix attention types"):
        convert_dense_to_nsa(sliding)
    dense = _dense("llama")
    with pytest.raises(ValueError, match="compression_type='mean'"):
        convert_dense_to_nsa(dense, compression_type="mean")
    with pytest.raises(ValueError, match="unknown NsaConfig field"):
        convert_dense_to_nsa(dense, windw_size=32)
    with pytest.raises(ValueError, match="come from the dense checkpoint"):
        convert_dense_to_nsa(dense, num_hidden_layers=1)
    with pytest.raises(TypeError, match="model_or_path"):
        convert_dense_to_nsa(42)


def test_a_converted_model_trains_its_new_branches_beyond_the_window():
    """No gate starts saturated (all at sigmoid(0) = 1/2, the steepest point); a few AdamW steps at length > w move
    the gates, the compressed values' phi, and then the compressed keys' phi (whose gradient is zero while the
    compressed values are: it follows them from the second step on)."""
    nsa = convert_dense_to_nsa(_dense("llama"), **NSA).train()
    attention = nsa.model.layers[0].self_attn
    ids = torch.randint(0, 97, (2, 96))
    with torch.no_grad():
        gates = attention.branch_gate(torch.randn(2, 5, 64))
    torch.testing.assert_close(gates, torch.full_like(gates, 0.5))
    watched = {
        "gate": attention.branch_gate.proj.weight,
        "compress_value": attention.compress_value.fc2.weight,
        "compress_key": attention.compress_key.fc1.weight,
    }
    before = {name: p.detach().clone() for name, p in watched.items()}
    optimizer = torch.optim.AdamW(nsa.parameters(), lr=1e-3, weight_decay=0.0)
    key_grads = []
    for _ in range(5):
        nsa(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        key_grads.append(watched["compress_key"].grad.abs().max().item())
        optimizer.step()
        optimizer.zero_grad()
    assert key_grads[0] == 0 and 0 < key_grads[1] < key_grads[-1]  # zero at first, then growing with the values
    for name, p in watched.items():
        assert (p - before[name]).abs().max() > (1e-4 if name == "compress_key" else 1e-3), name


def test_a_bf16_checkpoint_converts_in_bf16_without_a_float32_copy(monkeypatch):
    """The NSA model is built in the dense model's dtype (no float32 temporary of four times the checkpoint), and
    computes what the dense one computes up to the window within bf16 rounding."""
    dense = _dense("llama").to(torch.bfloat16)
    built = []
    original = NsaForCausalLM.__init__

    def spy(self, config):
        built.append(torch.get_default_dtype())
        original(self, config)

    monkeypatch.setattr(NsaForCausalLM, "__init__", spy)
    nsa = convert_dense_to_nsa(dense, **NSA)
    assert built == [torch.bfloat16] and torch.get_default_dtype() == torch.float32
    assert {p.dtype for p in nsa.parameters()} == {torch.bfloat16}
    assert nsa.model.rotary_emb.inv_freq.dtype == torch.float32  # RoPE frequencies stay exact
    ids = torch.randint(0, 97, (1, 32))
    with torch.no_grad():
        expected, got = dense(ids).logits.float(), nsa(ids, use_cache=False).logits.float()
    assert (got - expected).abs().max() / expected.abs().max() < 2e-2
