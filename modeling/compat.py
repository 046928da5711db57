# Generated from src/nsa_hf by `nsa-hf export-remote-code` (nsa_hf/remote_code.py); do not edit.
"""What differs between the transformers releases nsa-hf supports (5.17 to the newest), detected once.

transformers 5.24 renamed the cache argument from `past_key_values` to `cache`: in model forwards, in
`prepare_inputs_for_generation`, in the model outputs and in the `model_kwargs` key that generate() reads
(the old name is deprecated until 5.40). NSA models accept both names on every release and return the cache
under the name the installed release uses, so neither end sees a deprecation warning.
"""

from __future__ import annotations

import dataclasses

from transformers.modeling_outputs import CausalLMOutputWithPast

__all__ = ["CACHE_KWARG", "cache_argument"]

# The name of the cache in model outputs and in generate()'s model_kwargs on the installed transformers.
CACHE_KWARG: str = (
    "cache" if "cache" in {field.name for field in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"
)


def cache_argument(cache, past_key_values):
    """The cache a forward was given, under either name; both at once is an error unless they are the same object."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("Pass the cache once, as `cache` or as `past_key_values` (the name before transformers 5.24).")
    return cache if cache is not None else past_key_values
