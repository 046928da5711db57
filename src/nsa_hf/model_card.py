"""Model cards (the README.md of a Hub repo) for NSA checkpoints, filled in from the config.

The template is package data, `nsa_hf/model_card_template.md` (`string.Template` placeholders);
`model_cards/TEMPLATE.md` at the repository root is a copy of it for readers of the repository.

This module imports no other module of the package: `NsaConfig.save_pretrained` and `push_to_hub` import
`hub`, which imports this one, so an import of the config or model classes here would close a cycle. It names
the model type as a string and reaches the model class through transformers' Auto registry, which
`import nsa_hf` fills before any of its modules runs.
"""

from __future__ import annotations

import copy
import string
from importlib.resources import files

import torch
from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, PreTrainedConfig

__all__ = ["TEMPLATE_NAME", "TRAINING_FIELDS", "model_card_template", "render_model_card"]

MODEL_TYPE = "nsa"  # NsaConfig.model_type, the configs the template describes
TEMPLATE_NAME = "model_card_template.md"
# Training metadata a card can state: field -> (label, accepted types, format).
TRAINING_FIELDS = {
    "dataset": ("dataset", (str,), "{}"),
    "tokens": ("tokens seen", (int,), "{:,}"),
    "steps": ("optimizer steps", (int,), "{:,}"),
    "loss": ("final training loss", (int, float), "{:.4f}"),
    "base_model": ("converted from (dense checkpoint)", (str,), "{}"),
}


def model_card_template() -> str:
    """The model card template, with `${name}` placeholders."""
    return files(__package__).joinpath(TEMPLATE_NAME).read_text(encoding="utf-8")


def _count_parameters(config: PreTrainedConfig) -> int:
    """Parameters of the causal LM registered for the config's class (`NsaForCausalLM`), tied weights once."""
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    with torch.device("meta"):  # shapes only: no memory, no initialization cost
        model = model_class(copy.deepcopy(config))
    return model.num_parameters()


def _format_count(count: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count:,} ({count / scale:.1f}{suffix})"
    return f"{count:,}"


def _training_table(training: dict | None) -> str:
    if not training:
        return "No training details were recorded for this checkpoint."
    unknown = sorted(set(training) - set(TRAINING_FIELDS))
    if unknown:
        raise ValueError(f"`training` takes the keys {sorted(TRAINING_FIELDS)}, got unknown keys {unknown}.")
    rows = ["| | |", "|---|---|"]
    for key, (label, types, spec) in TRAINING_FIELDS.items():
        if key not in training:
            continue
        value = training[key]
        if not isinstance(value, types) or isinstance(value, bool):
            names = " or ".join(t.__name__ for t in types)
            raise ValueError(f"`training['{key}']` must be {names}, got {value!r}.")
        rows.append(f"| {label} | {spec.format(value)} |")
    return "\n".join(rows)


def render_model_card(
    config: PreTrainedConfig, training: dict | None = None, repo_id: str | None = None, *, license: str = "apache-2.0"
) -> str:
    """
    The model card (Markdown with YAML front matter) of an NSA causal LM with this config.

    Args:
        config (`NsaConfig`): the model's configuration; the architecture and NSA tables, and the parameter
            count (of `NsaForCausalLM`, tied weights counted once), come from it.
        training (`dict`, *optional*): training metadata, any of `dataset` (str), `tokens` (int), `steps`
            (int), `loss` (float, the final training loss), `base_model` (str: the dense checkpoint it was
            converted from, `nsa-hf convert`).
        repo_id (`str`, *optional*): the Hub repo, used as the title and in the loading examples.
        license (`str`, defaults to `"apache-2.0"`): the license identifier of the weights, for the Hub.
    """
    if getattr(config, "model_type", None) != MODEL_TYPE:
        raise ValueError(f"`config` must be an NSA config (model_type 'nsa'), got {type(config).__name__}.")
    # The architecture and NSA placeholders are config fields, by name.
    return string.Template(model_card_template()).substitute(
        config.to_dict(),
        title=repo_id.split("/")[-1] if repo_id else "NSA language model",
        repo_id=repo_id or "path/to/model",
        license=license,
        parameters=_format_count(_count_parameters(config)),
        training=_training_table(training),
    )
