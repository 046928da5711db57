"""Bad input fails early with an error that names the argument (not a reshape error deep inside attention)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from nsa_hf import NsaCache, NsaForCausalLM
from nsa_hf.compat import CACHE_KWARG

from .factories import make_model, tiny_config


@pytest.fixture(scope="module")
def model() -> NsaForCausalLM:
    return make_model(tiny_config())


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("saved")
    model.save_pretrained(path)
    return str(path)


def test_invalid_backend_fails_at_load_time(saved):
    with pytest.raises(ValueError, match="`nsa_backend` must be one of"):
        AutoModelForCausalLM.from_pretrained(saved, nsa_backend="cuda")
    assert AutoModelForCausalLM.from_pretrained(saved, nsa_backend="reference").config.nsa_backend == "reference"


@pytest.mark.parametrize("field, value", [("nsa_backend", "cuda"), ("compression_type", "max"), ("branch_kv", "tied")])
def test_choice_fields_are_checked_on_assignment(field, value):
    config = tiny_config()
    with pytest.raises(ValueError, match=f"`{field}` must be one of"):
        setattr(config, field, value)


@pytest.mark.parametrize(
    "input_ids, message",
    [
        (torch.zeros(1, 0, dtype=torch.long), "`input_ids` is empty"),
        (torch.zeros(0, 4, dtype=torch.long), "`input_ids` is empty"),
        (torch.ones(5, dtype=torch.long), r"`input_ids` must be 2-D .* \(add a batch dimension"),
        (torch.ones(1, 2, 5, dtype=torch.long), "`input_ids` must be 2-D"),
    ],
)
def test_malformed_input_ids_are_named(model, input_ids, message):
    with pytest.raises(ValueError, match=message):
        model(input_ids)


def test_malformed_inputs_embeds_are_named(model):
    with pytest.raises(ValueError, match="`inputs_embeds` must be 3-D"):
        model(inputs_embeds=torch.randn(5, model.config.hidden_size))
    with pytest.raises(ValueError, match="`inputs_embeds` is empty"):
        model(inputs_embeds=torch.randn(1, 0, model.config.hidden_size))


def test_mask_longer_than_the_input_is_named_with_a_fresh_cache(model):
    ids = torch.randint(1, model.config.vocab_size, (1, 5))
    with pytest.raises(ValueError, match=r"`attention_mask` must have shape \(1, 5\), got \(1, 8\)"):
        model(ids, attention_mask=torch.ones(1, 8, dtype=torch.long), past_key_values=NsaCache(model.config))


def test_mask_must_cover_cached_and_new_tokens(model):
    ids = torch.randint(1, model.config.vocab_size, (2, 9))
    cache = NsaCache(model.config)
    with torch.no_grad():
        model(ids, attention_mask=torch.ones(2, 9, dtype=torch.long), past_key_values=cache, use_cache=True)
        with pytest.raises(ValueError, match=r"shape \(2, 10\) \(the cache holds 9 tokens, plus 1 new\)"):
            model(ids[:, :1], attention_mask=torch.ones(2, 1, dtype=torch.long), past_key_values=cache, use_cache=True)
        # the right width goes through
        model(ids[:, :1], attention_mask=torch.ones(2, 10, dtype=torch.long), past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == 10


def test_mask_of_another_width_without_cache_is_named(model):
    ids = torch.randint(1, model.config.vocab_size, (1, 6))
    with pytest.raises(ValueError, match="`attention_mask` must have shape"):
        model(ids, attention_mask=torch.ones(1, 4, dtype=torch.long), use_cache=False)
    with pytest.raises(ValueError, match="2-D `attention_mask`"):
        model(ids, attention_mask=torch.ones(1, 1, 6, 6), use_cache=False)


def test_output_attentions_is_refused_from_the_argument_and_the_config(model):
    ids = torch.randint(1, model.config.vocab_size, (1, 6))
    with pytest.raises(ValueError, match="`output_attentions=True` is not supported: NSA computes no attention matrix"):
        model(ids, output_attentions=True)
    config = tiny_config(output_attentions=True)
    with pytest.raises(ValueError, match="output_attentions"):
        NsaForCausalLM(config)(ids)


def test_a_cache_with_use_cache_false_is_refused(model):
    ids = torch.randint(1, model.config.vocab_size, (1, 6))
    with pytest.raises(ValueError, match="`use_cache=False` was passed together with a cache"):
        model(ids, use_cache=False, past_key_values=NsaCache(model.config))
    with pytest.raises(ValueError, match="`use_cache=False` was passed together with a cache"):
        model.generate(ids, max_new_tokens=2, use_cache=False, **{CACHE_KWARG: NsaCache(model.config)})
