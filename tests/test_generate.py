"""generate() through NsaCache, in the spirit of transformers' own generation tests: every decoding mode a causal
LM supports, each checked against cache-free recomputation where the mode is deterministic, on whichever
transformers release is installed (5.17 passes the cache as `past_key_values`, 5.24 as `cache`).

`cache_implementation="static"` is `NsaStaticCache`'s (tests/test_static_cache.py). Modes that do not apply to NSA
models: `cache_implementation="offloaded"` / "quantized" (NSA keeps its
own compressed, selection and window state, so transformers' dense caches would compute another function:
refused with a clear error); contrastive search and DoLa (moved out of transformers into Hub `custom_generate`
repositories, which need the network); `output_attentions` (NSA computes no attention matrix: refused).
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
import transformers

from nsa_hf import NsaCache, NsaConfig, NsaForCausalLM
from nsa_hf.compat import CACHE_KWARG

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


def prompt_of(model: NsaForCausalLM, batch: int, length: int) -> torch.Tensor:
    return torch.randint(1, model.config.vocab_size, (batch, length))


def left_padded(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts [1, n_i] as one left-padded batch (pad id 0) and its attention mask."""
    width = max(p.shape[1] for p in prompts)
    batch = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for row, prompt in enumerate(prompts):
        batch[row, width - prompt.shape[1] :] = prompt
        mask[row, width - prompt.shape[1] :] = 1
    return batch, mask


def full_logits(model: NsaForCausalLM, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids, use_cache=False).logits


def greedy_without_cache(model: NsaForCausalLM, input_ids: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        next_token = full_logits(model, input_ids)[:, -1].argmax(-1, keepdim=True)
        input_ids = torch.cat([input_ids, next_token], dim=1)
    return input_ids


def returned_cache(output) -> NsaCache:
    return getattr(output, CACHE_KWARG)


def test_cache_name_follows_the_installed_transformers():
    renamed = tuple(int(p) for p in transformers.__version__.split(".")[:2]) >= (5, 24)
    assert CACHE_KWARG == ("cache" if renamed else "past_key_values")


def test_greedy_uses_nsa_cache_and_matches_recomputation(model):
    prompt = prompt_of(model, 2, 37)
    out = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True)
    cache = returned_cache(out)
    assert isinstance(cache, NsaCache)
    assert cache.get_seq_length() == 37 + NEW_TOKENS - 1
    assert torch.equal(out.sequences, greedy_without_cache(model, prompt, NEW_TOKENS))


def test_dict_output_scores_and_logits_equal_full_forward_logits(model):
    prompt = prompt_of(model, 2, 30)
    out = model.generate(
        prompt, max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True, output_scores=True,
        output_logits=True, output_hidden_states=True,
    )
    reference = full_logits(model, out.sequences)
    assert len(out.logits) == len(out.scores) == NEW_TOKENS
    for step, (logits, scores) in enumerate(zip(out.logits, out.scores)):
        expected = reference[:, prompt.shape[1] - 1 + step]
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)  # greedy: no logits processor
    # hidden states: one tuple per step, embeddings + every layer
    assert len(out.hidden_states) == NEW_TOKENS
    assert len(out.hidden_states[0]) == model.config.num_hidden_layers + 1


def test_sampling_is_seeded_and_matches_cache_free_sampling(model):
    prompt = prompt_of(model, 1, 29)
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=True, top_k=8, temperature=0.9, num_return_sequences=3)
    torch.manual_seed(7)
    cached = model.generate(prompt, **kwargs)
    torch.manual_seed(7)
    uncached = model.generate(prompt, use_cache=False, **kwargs)
    assert cached.shape == (3, 29 + NEW_TOKENS)
    assert torch.equal(cached, uncached)


def test_beam_search_reorders_the_cache_correctly(model):
    prompt = prompt_of(model, 2, 33)
    kwargs = dict(max_new_tokens=NEW_TOKENS, num_beams=4, num_return_sequences=2, do_sample=False)
    cached = model.generate(prompt, **kwargs)
    uncached = model.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_beam_sampling_matches_cache_free_beam_sampling(model):
    prompt = prompt_of(model, 2, 26)
    kwargs = dict(max_new_tokens=NEW_TOKENS, num_beams=3, do_sample=True, top_k=10, num_return_sequences=2)
    torch.manual_seed(11)
    cached = model.generate(prompt, **kwargs)
    torch.manual_seed(11)
    uncached = model.generate(prompt, use_cache=False, **kwargs)
    assert cached.shape == (4, 26 + NEW_TOKENS)
    assert torch.equal(cached, uncached)


def test_assisted_decoding_with_an_nsa_draft_equals_greedy(model, draft):
    prompt = prompt_of(model, 1, 41)
    greedy = model.generate(prompt, max_new_tokens=20, do_sample=False)
    assisted = model.generate(prompt, max_new_tokens=20, do_sample=False, assistant_model=draft)
    assert torch.equal(assisted, greedy)
    assert torch.equal(greedy, greedy_without_cache(model, prompt, 20))


def test_prompt_lookup_decoding_equals_greedy(model):
    # A repetitive prompt, so the n-gram lookup proposes candidates (and rejected ones crop the cache).
    pattern = prompt_of(model, 1, 9)
    prompt = pattern.repeat(1, 5)
    greedy = greedy_without_cache(model, prompt, 20)
    lookup = model.generate(prompt, max_new_tokens=20, do_sample=False, prompt_lookup_num_tokens=4)
    assert torch.equal(lookup, greedy)


def test_generation_continues_from_a_returned_cache(model):
    prompt = prompt_of(model, 2, 23)
    first = model.generate(prompt, max_new_tokens=7, do_sample=False, return_dict_in_generate=True)
    cache = returned_cache(first)
    assert cache.get_seq_length() == 23 + 7 - 1
    continued = model.generate(first.sequences, max_new_tokens=9, do_sample=False, **{CACHE_KWARG: cache})
    assert cache.get_seq_length() == 23 + 16 - 1
    assert torch.equal(continued, greedy_without_cache(model, prompt, 16))


def test_generate_with_a_user_cache_continues_it(model):
    prompt = prompt_of(model, 1, 30)
    cache = NsaCache(model.config)
    first = model.generate(prompt, max_new_tokens=5, do_sample=False, **{CACHE_KWARG: cache})
    assert cache.get_seq_length() == 34
    assert torch.equal(first, greedy_without_cache(model, prompt, 5))
    assert isinstance(model.config, NsaConfig)


def test_generate_from_inputs_embeds_equals_generate_from_ids(model):
    prompt = prompt_of(model, 2, 27)
    embeds = model.get_input_embeddings()(prompt)
    expected = greedy_without_cache(model, prompt, NEW_TOKENS)
    from_embeds = model.generate(inputs_embeds=embeds, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(from_embeds, expected[:, prompt.shape[1] :])  # only the new tokens, as for any decoder
    both = model.generate(prompt, inputs_embeds=embeds, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(both, expected)


@pytest.mark.parametrize("keep", [1, 5, "indices"])
def test_logits_to_keep_slices_the_full_logits(model, keep):
    ids = prompt_of(model, 2, 31)
    reference = full_logits(model, ids)
    if keep == "indices":
        keep, expected = torch.tensor([0, 7, 30]), reference[:, [0, 7, 30]]
    else:
        expected = reference[:, -keep:]
    with torch.no_grad():
        logits = model(ids, use_cache=False, logits_to_keep=keep).logits
    torch.testing.assert_close(logits, expected, atol=1e-6, rtol=1e-6)


def test_left_padded_batch_rows_equal_prompts_alone(model):
    prompts = [prompt_of(model, 1, n) for n in (13, 40, 27)]
    batch, mask = left_padded(prompts)
    width = batch.shape[1]
    out = model.generate(batch, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    for row, prompt in enumerate(prompts):
        alone = greedy_without_cache(model, prompt, NEW_TOKENS)
        assert torch.equal(out[row, width:], alone[0, prompt.shape[1] :])


def test_left_padded_rows_decode_the_logits_of_each_row_alone(model):
    """Logits, not only tokens: rows whose documents start at every offset modulo the compression stride end their
    compressed blocks at different steps, and each row's decoding equals its cache-free forward alone."""
    stride = model.config.compress_stride
    prompts = [prompt_of(model, 1, 21 + pad) for pad in range(stride)]
    batch, mask = left_padded(prompts)
    width = batch.shape[1]
    out = model.generate(batch, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                         return_dict_in_generate=True, output_logits=True)
    for row, prompt in enumerate(prompts):
        alone = full_logits(model, torch.cat([prompt[0], out.sequences[row, width:]])[None])
        for step, logits in enumerate(out.logits):
            torch.testing.assert_close(logits[row], alone[0, prompt.shape[1] - 1 + step], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("implementation", ["offloaded", "quantized"])
def test_dense_cache_implementations_are_refused(model, implementation):
    prompt = prompt_of(model, 1, 5)
    with pytest.raises(ValueError, match="NsaCache"):
        model.generate(prompt, max_new_tokens=2, cache_implementation=implementation)


def test_output_attentions_is_refused_with_a_reason(model):
    prompt = prompt_of(model, 1, 5)
    with pytest.raises(ValueError, match="output_attentions"):
        model.generate(prompt, max_new_tokens=2, output_attentions=True, return_dict_in_generate=True)


def test_a_cache_passed_under_both_names_is_refused(model):
    ids = prompt_of(model, 1, 5)
    with pytest.raises(ValueError, match="`cache` or as `past_key_values`"):
        model(ids, cache=NsaCache(model.config), past_key_values=NsaCache(model.config))


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_forward_accepts_either_cache_name(model, name):
    ids = prompt_of(model, 1, 21)
    cache = NsaCache(model.config)
    with torch.no_grad():
        prefix = model(ids[:, :15], use_cache=True, **{name: cache}).logits
        rest = model(ids[:, 15:], use_cache=True, **{name: cache}).logits
    assert cache.get_seq_length() == 21
    torch.testing.assert_close(torch.cat([prefix, rest], 1), full_logits(model, ids), atol=1e-5, rtol=1e-5)


def test_generate_and_forward_emit_no_deprecation_warning(model, draft):
    """No deprecation of the cache's name (a FutureWarning or a log record) on the installed transformers."""
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    library_logger = logging.getLogger("transformers")
    library_logger.addHandler(handler)
    logging.Logger.warning_once.cache_clear()  # messages already shown once in this process must show again
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            prompt = prompt_of(model, 1, 19)
            out = model.generate(prompt, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
            returned_cache(out)
            model.generate(prompt, max_new_tokens=4, do_sample=False, num_beams=2)
            model.generate(prompt, max_new_tokens=4, do_sample=False, assistant_model=draft)
            with torch.no_grad():
                model(prompt, use_cache=True)
    finally:
        library_logger.removeHandler(handler)
    messages = records + [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    about_cache = [m for m in messages if "deprecat" in m.lower() and ("past_key_values" in m or "`cache`" in m)]
    assert not about_cache, about_cache


def greedy_from_chunks(model: NsaForCausalLM, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits of a prefill then token-by-token steps through one cache (a manual decoding loop)."""
    cache = NsaCache(model.config)
    with torch.no_grad():
        steps = [model(ids[:, :prefill], use_cache=True, **{CACHE_KWARG: cache}).logits]
        steps += [model(ids[:, t : t + 1], use_cache=True, **{CACHE_KWARG: cache}).logits for t in range(prefill, ids.shape[1])]
    return torch.cat(steps, 1)


def test_manual_decoding_loop_with_the_returned_name_equals_full_forward(model):
    ids = prompt_of(model, 2, 45)
    torch.testing.assert_close(greedy_from_chunks(model, ids, 17), full_logits(model, ids), atol=1e-5, rtol=1e-5)
