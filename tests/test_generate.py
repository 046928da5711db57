"""generate() through NsaCache: every decoding mode agrees with cache-free recomputation."""

from __future__ import annotations

import pytest
import torch

from nsa_hf import NsaCache, NsaConfig, NsaForCausalLM

from .factories import make_model, tiny_config

NEW_TOKENS = 12


@pytest.fixture(scope="module")
def model() -> NsaForCausalLM:
    return make_model(tiny_config(pad_token_id=0, eos_token_id=None))


@pytest.fixture(scope="module")
def draft() -> NsaForCausalLM:
    config = tiny_config(
        pad_token_id=0, eos_token_id=None, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1
    )
    return make_model(config, seed=3)


def greedy_without_cache(model: NsaForCausalLM, input_ids: torch.Tensor, steps: int) -> torch.Tensor:
    with torch.no_grad():
        for _ in range(steps):
            next_token = model(input_ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            input_ids = torch.cat([input_ids, next_token], dim=1)
    return input_ids


def test_greedy_uses_nsa_cache_and_matches_recomputation(model):
    prompt = torch.randint(1, model.config.vocab_size, (2, 37))
    out = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True)
    assert isinstance(out.past_key_values, NsaCache)
    assert out.past_key_values.get_seq_length() == 37 + NEW_TOKENS - 1
    assert torch.equal(out.sequences, greedy_without_cache(model, prompt, NEW_TOKENS))


def test_sampling_is_seeded_and_matches_cache_free_sampling(model):
    prompt = torch.randint(1, model.config.vocab_size, (1, 29))
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=True, top_k=8, temperature=0.9, num_return_sequences=3)
    torch.manual_seed(7)
    cached = model.generate(prompt, **kwargs)
    torch.manual_seed(7)
    uncached = model.generate(prompt, use_cache=False, **kwargs)
    assert cached.shape == (3, 29 + NEW_TOKENS)
    assert torch.equal(cached, uncached)


def test_beam_search_reorders_the_cache_correctly(model):
    prompt = torch.randint(1, model.config.vocab_size, (2, 33))
    kwargs = dict(max_new_tokens=NEW_TOKENS, num_beams=4, num_return_sequences=2, do_sample=False)
    cached = model.generate(prompt, **kwargs)
    uncached = model.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_assisted_decoding_with_an_nsa_draft_equals_greedy(model, draft):
    prompt = torch.randint(1, model.config.vocab_size, (1, 41))
    greedy = model.generate(prompt, max_new_tokens=20, do_sample=False)
    assisted = model.generate(prompt, max_new_tokens=20, do_sample=False, assistant_model=draft)
    assert torch.equal(assisted, greedy)


def test_left_padded_batch_rows_equal_prompts_alone(model):
    prompts = [torch.randint(1, model.config.vocab_size, (1, n)) for n in (13, 40, 27)]
    width = max(p.shape[1] for p in prompts)
    batch = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for row, prompt in enumerate(prompts):
        batch[row, width - prompt.shape[1] :] = prompt
        mask[row, width - prompt.shape[1] :] = 1
    out = model.generate(batch, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
        assert torch.equal(out[row, width:], alone[0, prompt.shape[1] :])


def test_unsupported_cache_implementation_is_rejected(model):
    prompt = torch.randint(1, model.config.vocab_size, (1, 5))
    with pytest.raises(ValueError, match="NsaCache"):
        model.generate(prompt, max_new_tokens=2, cache_implementation="static")


def test_generate_with_a_user_cache_continues_it(model):
    prompt = torch.randint(1, model.config.vocab_size, (1, 30))
    cache = NsaCache(model.config)
    first = model.generate(prompt, max_new_tokens=5, do_sample=False, past_key_values=cache)
    assert cache.get_seq_length() == 34
    assert torch.equal(first, greedy_without_cache(model, prompt, 5))
    assert isinstance(model.config, NsaConfig)
