"""Model-level invariants of NSA_SPEC: incremental decoding == full forward, packing, padding, save/load."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, DynamicCache

from nsa_hf import NsaCache, NsaConfig, NsaForCausalLM, NsaModel
from nsa_hf.modeling_nsa import project
from nsa_hf.ops.layout import num_compressed_blocks

from .factories import make_model, tiny_config


def decode_in_chunks(model: NsaForCausalLM, input_ids: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    if sum(sizes) != input_ids.shape[1]:
        raise ValueError(f"chunk sizes {sizes} do not cover the {input_ids.shape[1]} tokens")
    cache = NsaCache(model.config)
    logits, start = [], 0
    with torch.no_grad():
        for size in sizes:
            chunk = input_ids[:, start : start + size]
            logits.append(model(chunk, past_key_values=cache, use_cache=True).logits)
            start += size
        assert cache.get_seq_length() == start
    return torch.cat(logits, dim=1)


def split(total: int, pattern: list[int]) -> list[int]:
    """Cut `total` tokens into chunks cycling through `pattern`."""
    sizes, i = [], 0
    while sum(sizes) < total:
        sizes.append(min(pattern[i % len(pattern)], total - sum(sizes)))
        i += 1
    return sizes


HEAD_SHAPES = [(6, 6), (4, 2), (6, 2), (8, 2), (6, 1)]  # G = 1, 2, 3, 4, 6
BLOCKS = [(32, 16, 64), (64, 64, 64)]


@pytest.mark.parametrize("heads,kv_heads", HEAD_SHAPES)
@pytest.mark.parametrize("blocks", BLOCKS)
def test_chunked_decoding_equals_full_forward(heads, kv_heads, blocks):
    l, d, lp = blocks
    config = tiny_config(
        num_attention_heads=heads, num_key_value_heads=kv_heads, compress_block_size=l, compress_stride=d,
        select_block_size=lp, num_selected_blocks=3, window_size=40,
    )
    model = make_model(config)
    torch.manual_seed(1)
    input_ids = torch.randint(0, config.vocab_size, (2, 3 * lp + 37))
    with torch.no_grad():
        full = model(input_ids, use_cache=False).logits
    # Prompt, then chunks of 1, 2, d - 1, d, l' + 3 tokens.
    sizes = [lp + 5] + split(input_ids.shape[1] - lp - 5, [1, 2, d - 1, d, lp + 3])
    torch.testing.assert_close(decode_in_chunks(model, input_ids, sizes), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("compression_type", ["mlp", "linear", "mean"])
@pytest.mark.parametrize("branch_kv", ["independent", "shared"])
def test_decoding_all_compressors_and_kv_modes(compression_type, branch_kv):
    config = tiny_config(compression_type=compression_type, branch_kv=branch_kv, gate_intermediate_size=8)
    model = make_model(config)
    input_ids = torch.randint(0, config.vocab_size, (2, 83))
    with torch.no_grad():
        full = model(input_ids, use_cache=False).logits
    for sizes in ([83], [1] * 83, [5, 1, 3, 4, 17, 19, 34]):
        torch.testing.assert_close(decode_in_chunks(model, input_ids, sizes), full, rtol=1e-5, atol=1e-5)


def test_sequences_shorter_than_a_block_are_finite():
    config = tiny_config(compress_block_size=32, compress_stride=16, select_block_size=32)
    model = make_model(config)
    input_ids = torch.randint(0, config.vocab_size, (2, 7))
    with torch.no_grad():
        logits = model(input_ids, use_cache=False).logits
        decoded = decode_in_chunks(model, input_ids, [3, 1, 3])
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(decoded, logits, rtol=1e-5, atol=1e-5)


def _packed(lengths: list[int], vocab: int):
    docs = [torch.randint(0, vocab, (1, n)) for n in lengths]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0] + lengths).cumsum(0)
    return docs, torch.cat(docs, dim=1), position_ids, cu


@pytest.mark.parametrize("signal", ["cu_seq_lens", "position_ids"])
def test_packed_documents_equal_each_document_alone(signal):
    config = tiny_config()
    model = make_model(config)
    docs, packed, position_ids, cu = _packed([5, 41, 70, 1, 23], config.vocab_size)
    kwargs = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu} if signal == "cu_seq_lens" else {"position_ids": position_ids}
    with torch.no_grad():
        logits = model(packed, **kwargs).logits  # the default use_cache must not break packing
        alone = torch.cat([model(doc, use_cache=False).logits for doc in docs], dim=1)
    torch.testing.assert_close(logits, alone, rtol=1e-5, atol=1e-5)


def test_left_padded_forward_equals_unpadded_rows():
    config = tiny_config()
    model = make_model(config)
    a, b = torch.randint(1, config.vocab_size, (1, 30)), torch.randint(1, config.vocab_size, (1, 50))
    batch = torch.zeros(2, 50, dtype=torch.long)
    mask = torch.zeros(2, 50, dtype=torch.long)
    batch[0, 20:], mask[0, 20:] = a, 1
    batch[1], mask[1] = b, 1
    with torch.no_grad():
        padded = model(batch, attention_mask=mask, use_cache=False).logits
        torch.testing.assert_close(padded[0, 20:], model(a).logits[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(padded[1], model(b).logits[0], rtol=1e-5, atol=1e-5)
        cached = model(batch, attention_mask=mask, use_cache=True).logits
    torch.testing.assert_close(cached[:, -30:], padded[:, -30:], rtol=1e-5, atol=1e-5)


def test_crop_then_redecode_equals_full_forward():
    config = tiny_config()
    model = make_model(config)
    prefix = torch.randint(0, config.vocab_size, (2, 60))
    draft, correction = torch.randint(0, config.vocab_size, (2, 9)), torch.randint(0, config.vocab_size, (2, 5))
    cache = NsaCache(config)
    with torch.no_grad():
        model(prefix, past_key_values=cache, use_cache=True)
        model(draft, past_key_values=cache, use_cache=True)
        cache.crop(-7)  # reject the last 7 draft tokens
        assert cache.get_seq_length() == 62
        cache.crop(0)  # a no-op
        redecoded = model(correction, past_key_values=cache, use_cache=True).logits
        full = model(torch.cat([prefix, draft[:, :2], correction], dim=1), use_cache=False).logits
    torch.testing.assert_close(redecoded, full[:, -5:], rtol=1e-5, atol=1e-5)


def test_crop_past_rollback_budget_raises():
    config = tiny_config()
    model = make_model(config)
    cache = NsaCache(config, max_rollback=2)
    with torch.no_grad():
        model(torch.randint(0, config.vocab_size, (1, 40)), past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="max_rollback"):
        cache.crop(-10)


def test_cache_batch_operations_match_reordered_inputs():
    config = tiny_config()
    model = make_model(config)
    prompt = torch.randint(0, config.vocab_size, (3, 45))
    step = torch.randint(0, config.vocab_size, (3, 2))
    order = torch.tensor([2, 0, 0])
    with torch.no_grad():
        cache = NsaCache(config)
        model(prompt, past_key_values=cache, use_cache=True)
        cache.reorder_cache(order)
        reordered = model(step, past_key_values=cache, use_cache=True).logits
        expected = model(torch.cat([prompt[order], step], 1), use_cache=False).logits[:, -2:]
        torch.testing.assert_close(reordered, expected, rtol=1e-5, atol=1e-5)

        cache = NsaCache(config)
        model(prompt, past_key_values=cache, use_cache=True)
        cache.batch_repeat_interleave(2)
        cache.batch_select_indices(torch.tensor([5, 0]))
        selected = model(step[:2], past_key_values=cache, use_cache=True).logits
        rows = torch.tensor([2, 0])
        expected = model(torch.cat([prompt[rows], step[:2]], 1), use_cache=False).logits[:, -2:]
        torch.testing.assert_close(selected, expected, rtol=1e-5, atol=1e-5)

        cache.reset()
        assert cache.get_seq_length() == 0
        again = model(prompt[:2], past_key_values=cache, use_cache=True).logits
        torch.testing.assert_close(again, model(prompt[:2], use_cache=False).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("branch_kv,gate_intermediate_size,attention_bias", [("independent", None, False), ("shared", 8, True)])
def test_stacked_projections_equal_module_forwards(branch_kv, gate_intermediate_size, attention_bias):
    """Plain nn.Linear projections of one input run as one GEMM; a hooked module (as LoRA or accelerate
    wrap them) runs its own forward. Both give the same logits and gradients."""
    config = tiny_config(branch_kv=branch_kv, gate_intermediate_size=gate_intermediate_size, attention_bias=attention_bias)
    model = make_model(config).train()
    input_ids = torch.randint(0, config.vocab_size, (2, 45))

    def logits_and_grads():
        model.zero_grad()
        logits = model(input_ids, use_cache=False).logits
        logits.square().mean().backward()
        return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    stacked = logits_and_grads()
    for layer in model.model.layers:  # one hooked projection per group turns stacking off
        layer.self_attn.q_proj.register_forward_hook(lambda *args: None)
        layer.mlp.up_proj.register_forward_hook(lambda *args: None)
    separate = logits_and_grads()
    torch.testing.assert_close(stacked, separate, rtol=1e-5, atol=1e-6)


def test_a_stacked_projection_adds_a_lone_bias_in_the_autocast_dtype():
    """Projections of which only some have a bias (the gate among q/k/v) run as one GEMM plus each bias: under
    autocast every output has the autocast dtype, as each module's own forward gives it."""
    torch.manual_seed(0)
    projections = (torch.nn.Linear(16, 8, bias=False), torch.nn.Linear(16, 4, bias=True))
    x = torch.randn(3, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stacked = project(x, projections)
        alone = tuple(p(x) for p in projections)
    assert [t.dtype for t in stacked] == [t.dtype for t in alone] == [torch.bfloat16] * 2
    for a, b in zip(stacked, alone):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


def test_save_load_round_trip_is_bit_identical(tmp_path):
    config = tiny_config(tie_word_embeddings=True)
    model = make_model(config)
    input_ids = torch.randint(0, config.vocab_size, (2, 50))
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, NsaForCausalLM)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, reloaded(input_ids).logits)


def test_auto_classes_resolve():
    fields = {k: v for k, v in tiny_config().to_dict().items() if k != "model_type"}
    config = AutoConfig.for_model("nsa", **fields)
    assert isinstance(config, NsaConfig)
    assert type(AutoModel.from_config(config)) is NsaModel
    assert type(AutoModelForCausalLM.from_config(config)) is NsaForCausalLM


def test_cache_memory_at_32k_is_close_to_a_dense_kv_cache():
    """The NSA cache adds the window buffer, compressed K/V and rollback slack on top of the raw history."""
    config = NsaConfig(num_hidden_layers=1)  # the seed model's attention: H=2, D=64, l=32, d=16, w=512
    cache = NsaCache(config)
    heads, dim, length = config.num_key_value_heads, config.head_dim, 32768
    kv = [torch.randn(1, length, heads, dim, dtype=torch.bfloat16) for _ in range(6)]
    layer = cache.layers[0]
    for step in (kv, *[[t[:, :1] for t in kv]] * 3):  # a prefill, then three decoding steps, as generate() stores them
        geometry = cache.step_geometry(step[0].shape[1])
        layer.append(*step)
        if geometry.num_new_blocks:  # one entry per completed block (its values do not matter here)
            slots = torch.arange(num_compressed_blocks(layer.seq_len, 32, 16))[None, -geometry.num_new_blocks :]
            entries = torch.zeros(1, slots.shape[1], heads, dim, dtype=torch.bfloat16)
            layer.write_compressed(slots, entries, entries, geometry.capacity)
    dense = DynamicCache(config=config)
    dense.update(*(t.transpose(1, 2) for t in kv[:2]), layer_idx=0)
    dense_bytes = sum(t.numel() * t.element_size() for t in (dense.layers[0].keys, dense.layers[0].values))
    ratio = cache.nbytes() / dense_bytes
    print(f"NsaCache / dense KV cache at 32k tokens: {ratio:.3f}")
    assert ratio > 1.0 and ratio <= 1.15


def test_bad_inputs_raise_clear_errors():
    config = tiny_config()
    model = make_model(config)
    ids = torch.randint(0, config.vocab_size, (2, 20))
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(2, 1, 20, 20))
    holes = torch.ones(2, 20, dtype=torch.long)
    holes[0, 5] = 0
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=holes)
    with pytest.raises(TypeError, match="NsaCache"):
        model(ids, past_key_values=DynamicCache(config=config), use_cache=True)
    with pytest.raises(ValueError, match="cu_seqlens.*must end at the number of tokens"):
        model(ids, use_cache=False, cu_seq_lens_q=torch.tensor([0, 20, 30]))
    with pytest.raises(ValueError, match="nsa_backend"):
        tiny_config(nsa_backend="cuda-magic")
    with pytest.raises(ValueError, match="nsa_backend"):  # assignment is checked too (from_pretrained's kwargs)
        model.config.nsa_backend = "cuda-magic"
    assert model.config.nsa_backend == "auto"


def test_a_prefill_leaves_each_layer_only_the_window_and_compression_tail():
    """Each layer drops the prefill's window and compression buffers once it has read them (memory: not every
    layer of a long prefill holds them at once), keeping the last w - 1 and l - 1 tokens plus the rollback."""
    config = tiny_config()
    model = make_model(config)
    cache = NsaCache(config, max_rollback=2)
    with torch.no_grad():
        model(torch.randint(0, config.vocab_size, (2, 90)), past_key_values=cache, use_cache=True)
    for layer in cache.layers:
        assert layer.seq_len == 90 and layer.keys.shape[1] >= 90  # selection reads the whole history
        assert layer.window_keys.shape[1] == layer.window_values.shape[1] == config.window_size - 1 + 2
        assert layer.raw_cmp_keys.shape[1] == layer.raw_cmp_values.shape[1] == config.compress_block_size - 1 + 2


def test_gradients_flow_through_cached_steps_as_through_one_pass():
    """A forward in two cached steps under autograd (the history is written in place only without grad): its
    logits and parameter gradients equal one cache-free pass over the whole sequence."""
    model = make_model(tiny_config()).train()
    ids = torch.randint(0, 97, (2, 40))
    params = [p for p in model.parameters() if p.requires_grad]
    full = model(ids, use_cache=False).logits
    expected = torch.autograd.grad(full.square().sum(), params, allow_unused=True)
    cache = NsaCache(model.config)
    stepped = torch.cat([model(ids[:, :30], past_key_values=cache, use_cache=True).logits,
                         model(ids[:, 30:], past_key_values=cache, use_cache=True).logits], 1)
    torch.testing.assert_close(stepped, full, rtol=1e-4, atol=1e-5)
    got = torch.autograd.grad(stepped.square().sum(), params, allow_unused=True)
    for g, e in zip(got, expected, strict=True):
        if e is not None:
            torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-4)


def test_decoding_steps_write_the_history_in_place():
    """Without autograd a step writes its K/V into the history's room: the buffer (and its address) stays until the
    room is used up, instead of a copy of the whole history per layer and token."""
    model = make_model(tiny_config()).eval()
    cache = NsaCache(model.config)
    with torch.no_grad():
        token = model(torch.randint(0, 97, (1, 30)), past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        layer = cache.layers[0]
        address, capacity = layer.keys.data_ptr(), layer.keys.shape[1]
        assert capacity > 30
        for _ in range(capacity - 30):
            token = model(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        assert layer.keys.data_ptr() == address and layer.seq_len == capacity
        model(token, past_key_values=cache, use_cache=True)  # one more: the history grows, with room again
    assert layer.keys.shape[1] > capacity and layer.seq_len == capacity + 1
