"""Hub plumbing: what `NsaConfig.save_pretrained` and `NsaPreTrainedModel.push_to_hub` add to transformers'.

The classes keep thin methods that import this module when called; it imports no model code (the config or
model comes in as an argument), so the package's import graph stays one-way: the model modules -> hub ->
model_card and remote_code. The Hub copies of the model files leave those methods out (see `remote_code`):
transformers saves and pushes remote-code classes itself.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

from huggingface_hub import ModelCard
from huggingface_hub.errors import EntryNotFoundError
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.utils.hub import hf_api

from .model_card import render_model_card
from .remote_code import AUTO_MAP, write_remote_code

__all__ = ["push_to_hub", "save_config"]


def save_config(
    config: PreTrainedConfig, save_directory: str | os.PathLike, save: Callable[..., None], **kwargs
) -> None:
    """
    `NsaConfig.save_pretrained`: adds `auto_map` to the config, saves it with `save` (the base class's
    `save_pretrained`, bound to `config`, called with `save_directory` and `kwargs`), then writes the
    remote-code files next to config.json, so the folder also loads where nsa-hf is not installed.
    """
    config.auto_map = {**(getattr(config, "auto_map", None) or {}), **AUTO_MAP}
    save(save_directory, **kwargs)
    write_remote_code(save_directory)


def _model_card(model: PreTrainedModel, repo_id: str, token: bool | str | None, training: dict | None) -> ModelCard:
    """The repo's existing card, kept as transformers keeps it, or else the NSA card of `model`."""
    try:
        return ModelCard.load(repo_id, token=token)
    except EntryNotFoundError:
        return ModelCard(render_model_card(model.config, training=training, repo_id=repo_id))


def push_to_hub(
    model: PreTrainedModel,
    repo_id: str,
    *,
    training: dict | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str | None = "50GB",
    tags: list[str] | str | None = None,
) -> str:
    """
    `NsaPreTrainedModel.push_to_hub`: creates the repo if needed and commits what `model.save_pretrained`
    writes plus README.md (the repo's card, or the NSA card when it has none), with the model's tags and
    `tags` added to the card. Returns the commit's `CommitInfo` (a `str`, the commit URL).
    """
    tags = [*(model.model_tags or []), *([tags] if isinstance(tags, str) else tags or [])]
    repo_id = hf_api().create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    card = _model_card(model, repo_id, token, training)
    card.data.tags = list(dict.fromkeys([*(card.data.tags or []), *tags]))
    with tempfile.TemporaryDirectory() as tmp_dir:
        model.save_pretrained(tmp_dir, max_shard_size=max_shard_size)
        card.save(os.path.join(tmp_dir, "README.md"))
        return model._upload_modified_files(
            tmp_dir,
            repo_id,
            files_timestamps={},
            commit_message=commit_message,
            token=token,
            create_pr=create_pr,
            revision=revision,
            commit_description=commit_description,
        )
