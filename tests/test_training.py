"""Training workflows, each checked against an independent computation: packed batches from
`DataCollatorWithFlattening`, right-padded batches, the `Trainer`, PEFT/LoRA, activation checkpointing and
`torch.compile`.

Packed and padded batches are compared with the documents run one by one: the loss of a batch is the mean over
its predicted tokens, so the reference is each document's mean loss weighted by its number of predicted tokens
(a document of n tokens predicts n - 1), and the gradients of that weighted sum must match too.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import Tensor
from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments

from nsa_hf import NsaCache, NsaForCausalLM

from .factories import make_model, tiny_config

# transformers renamed gradient checkpointing to activation checkpointing after 5.17 (the old names stay as
# deprecated aliases): the tests use the installed release's names.
RENAMED_CHECKPOINTING = hasattr(NsaForCausalLM, "activation_checkpointing_enable")
CHECKPOINTING_ARGUMENT = "activation_checkpointing" if RENAMED_CHECKPOINTING else "gradient_checkpointing"

# tiny_config has l = 8, d = 4, l' = 16, w = 12: documents shorter than a compressed block (5, 1), one of a
# single token (it predicts nothing), and ones spanning several selection blocks and windows (41, 70).
DOC_LENGTHS = [5, 41, 70, 1, 23]

# Every nn.Linear of an NSA block (independent K/V, "mlp" phi, one-layer gates): see README "Module names".
# PEFT matches these against the end of each module path, hence "compress_key.fc1" rather than "fc1".
LORA_TARGETS = [
    "q_proj", "k_proj", "v_proj", "o_proj", "compress_k_proj", "compress_v_proj", "window_k_proj", "window_v_proj",
    "compress_key.fc1", "compress_key.fc2", "compress_value.fc1", "compress_value.fc2", "branch_gate.proj",
    "gate_proj", "up_proj", "down_proj",
]


def random_docs(lengths: list[int], vocab_size: int, seed: int) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab_size, (n,), generator=generator) for n in lengths]


def loss_and_grads(model: torch.nn.Module, **batch) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss of one forward pass and the gradient of every trainable parameter (all must receive one)."""
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    missing = [name for name, g in grads.items() if g is None]
    assert not missing, f"parameters without a gradient: {missing}"
    return loss.detach(), {name: g.clone() for name, g in grads.items()}


def loss_and_grads_one_by_one(model: NsaForCausalLM, docs: list[Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """Token-weighted loss of the documents run alone (no packing, no padding), and its gradients."""
    model.zero_grad(set_to_none=True)
    num_predicted = sum(len(doc) - 1 for doc in docs)
    total = torch.zeros(())
    for doc in docs:
        if len(doc) < 2:  # nothing to predict; its mean loss would be NaN
            continue
        loss = model(doc[None], labels=doc[None], use_cache=False).loss * ((len(doc) - 1) / num_predicted)
        loss.backward()
        total += loss.detach()
    return total, {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_grads_close(actual: dict[str, Tensor], expected: dict[str, Tensor], atol: float = 1e-5) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=1e-4, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.fixture(scope="module")
def packing_case() -> tuple[NsaForCausalLM, list[Tensor], Tensor, dict[str, Tensor]]:
    """A model in train mode, the documents, and the one-by-one reference (computed once for all collators)."""
    model = make_model(tiny_config()).train()
    docs = random_docs(DOC_LENGTHS, model.config.vocab_size, seed=1)
    return (model, docs, *loss_and_grads_one_by_one(model, docs))


@pytest.mark.parametrize(
    "collator_kwargs",
    [
        {},  # position_ids restarting at 0
        {"return_flash_attn_kwargs": True},  # + cu_seq_lens_q/k, max_length_q/k
        {"return_flash_attn_kwargs": True, "return_position_ids": False},  # cu_seq_lens only
        {"return_seq_idx": True, "return_position_ids": False},  # seq_idx only
    ],
    ids=["position_ids", "flash_attn_kwargs", "cu_seq_lens_only", "seq_idx_only"],
)
def test_flattened_batch_matches_documents_one_by_one(packing_case, collator_kwargs):
    model, docs, expected_loss, expected_grads = packing_case
    # The collator sets the label of every document's first token to -100, so no token predicts across a
    # boundary; the shift inside the loss then drops each document's first label, as for a document alone.
    batch = DataCollatorWithFlattening(**collator_kwargs)([{"input_ids": doc.tolist()} for doc in docs])
    assert batch["input_ids"].shape == (1, sum(DOC_LENGTHS))
    loss, grads = loss_and_grads(model, **batch)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads, expected_grads)

    # Control: without its boundary signal the row is one long document and the loss changes.
    with torch.no_grad():
        unpacked = model(batch["input_ids"], labels=batch["labels"], use_cache=False).loss
    assert not torch.allclose(unpacked, expected_loss, rtol=1e-4, atol=1e-4)


def test_packed_rows_in_a_batch_match_documents_one_by_one(packing_case):
    """Several packed rows ([B > 1, T], position_ids restarting inside each row): every row start and every
    restart is a document boundary."""
    model, _, _, _ = packing_case
    row_docs = [[5, 41, 24], [70], [1, 30, 39]]
    docs = random_docs([n for row in row_docs for n in row], model.config.vocab_size, seed=3)
    rows, position_ids, labels, used = [], [], [], 0
    for lengths in row_docs:
        row = docs[used : used + len(lengths)]
        used += len(lengths)
        rows.append(torch.cat(row))
        position_ids.append(torch.cat([torch.arange(len(doc)) for doc in row]))
        labels.append(torch.cat([torch.cat([torch.tensor([-100]), doc[1:]]) for doc in row]))
    batch = dict(input_ids=torch.stack(rows), position_ids=torch.stack(position_ids), labels=torch.stack(labels))
    loss, grads = loss_and_grads(model, **batch, use_cache=False)
    expected_loss, expected_grads = loss_and_grads_one_by_one(model, docs)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads, expected_grads)


def test_activation_checkpointing_with_a_cache_is_refused_by_name():
    model = make_model(tiny_config()).train()
    model.gradient_checkpointing_enable()
    ids = torch.randint(0, model.config.vocab_size, (1, 20))
    with pytest.raises(ValueError, match="past_key_values"):
        model(ids, labels=ids, past_key_values=NsaCache(model.config))


def test_right_padded_batch_matches_rows_one_by_one():
    model = make_model(tiny_config()).train()
    lengths = [50, 7, 33, 1]
    rows = random_docs(lengths, model.config.vocab_size, seed=2)
    input_ids = torch.zeros(len(rows), max(lengths), dtype=torch.long)  # pad id 0
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)], attention_mask[i, : len(row)], labels[i, : len(row)] = row, 1, row

    loss, grads = loss_and_grads(model, input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    expected_loss, expected_grads = loss_and_grads_one_by_one(model, rows)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads, expected_grads)
    with torch.no_grad():  # the real tokens' logits, too: padding after a row never reaches it
        padded = model(input_ids, attention_mask=attention_mask, use_cache=False).logits
        for i, row in enumerate(rows):
            alone = model(row[None], use_cache=False).logits[0]
            torch.testing.assert_close(padded[i, : len(row)], alone, rtol=1e-5, atol=1e-5)


def count_calls(module: torch.nn.Module) -> list[int]:
    """A counter of `module`'s forward calls: activation checkpointing runs each layer twice per step."""
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def train_packed_with_trainer(tmp_path, model: NsaForCausalLM, **training_args) -> Trainer:
    docs = random_docs([9, 40, 3, 27, 66, 14, 5, 31, 18], model.config.vocab_size, seed=3)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=3,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        **training_args,
    )
    dataset = [{"input_ids": doc.tolist()} for doc in docs]
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=DataCollatorWithFlattening())
    trainer.train()
    return trainer


def test_trainer_on_packed_batches_trains_and_activation_checkpointing_changes_nothing(tmp_path):
    config = tiny_config()
    initial = {name: p.detach().clone() for name, p in make_model(config).named_parameters()}
    results = {}
    for checkpointing in (False, True):
        model = make_model(config)
        calls = count_calls(model.model.layers[0].self_attn)
        trainer = train_packed_with_trainer(
            tmp_path / str(checkpointing), model, **{CHECKPOINTING_ARGUMENT: checkpointing}
        )
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
        assert trainer.state.global_step == 3
        assert model.model.layers[0].gradient_checkpointing is checkpointing
        assert calls[0] == (6 if checkpointing else 3)  # checkpointing recomputes every layer in backward
        results[checkpointing] = {name: p.detach().clone() for name, p in model.named_parameters()}
    changed = [name for name in initial if not torch.equal(results[False][name], initial[name])]
    assert len(changed) == len(initial), f"parameters the Trainer did not update: {set(initial) - set(changed)}"
    for name in initial:  # same data order, same gradients, so the same weights after three AdamW steps
        torch.testing.assert_close(results[True][name], results[False][name], rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def checkpointing_case() -> tuple[dict[str, Tensor], Tensor, dict[str, Tensor]]:
    """A packed batch and its loss and gradients without activation checkpointing."""
    config = tiny_config()
    docs = random_docs(DOC_LENGTHS, config.vocab_size, seed=4)
    batch = DataCollatorWithFlattening()([{"input_ids": doc.tolist()} for doc in docs])
    return (batch, *loss_and_grads(make_model(config).train(), **batch))


@pytest.mark.parametrize(
    "enable,kwargs",
    [
        ("activation_checkpointing_enable", None),  # transformers' default: use_reentrant=False
        ("activation_checkpointing_enable", {"use_reentrant": True}),
        ("gradient_checkpointing_enable", {"use_reentrant": False}),  # the deprecated alias
    ],
)
def test_activation_checkpointing_gives_the_same_gradients(checkpointing_case, enable, kwargs):
    if not RENAMED_CHECKPOINTING and enable == "activation_checkpointing_enable":
        pytest.skip("this transformers has no `activation_checkpointing_enable` (added after 5.17)")
    batch, expected_loss, expected_grads = checkpointing_case
    model = make_model(tiny_config()).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # gradient_checkpointing_enable is deprecated
        getattr(model, enable)(kwargs)
    calls = count_calls(model.model.layers[1].self_attn)
    loss, grads = loss_and_grads(model, **batch)
    assert calls[0] == 2  # forward, then the recomputation in backward
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=1e-6)
    assert_grads_close(grads, expected_grads, atol=1e-6)


def lora_modules(model: torch.nn.Module) -> set[str]:
    """Paths of the modules PEFT wrapped, relative to the base model."""
    return {
        name.removeprefix("base_model.model.") for name, module in model.named_modules() if hasattr(module, "lora_A")
    }


def test_lora_trains_only_adapters_and_round_trips(tmp_path):
    config = tiny_config()
    lora_config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS)
    model = get_peft_model(make_model(config), lora_config)
    expected = {f"model.layers.{i}.{suffix}" for i in range(config.num_hidden_layers) for suffix in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "self_attn.compress_k_proj",
        "self_attn.compress_v_proj", "self_attn.window_k_proj", "self_attn.window_v_proj",
        "self_attn.compress_key.fc1", "self_attn.compress_key.fc2", "self_attn.compress_value.fc1",
        "self_attn.compress_value.fc2", "self_attn.branch_gate.proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    )}
    assert lora_modules(model) == expected
    # The explicit list is every linear layer of the blocks: the same set as PEFT's "all-linear".
    assert lora_modules(get_peft_model(make_model(config), LoraConfig(target_modules="all-linear"))) == expected

    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    assert {name for name, p in model.named_parameters() if p.requires_grad} == {n for n in before if "lora_" in n}
    docs = random_docs(DOC_LENGTHS, config.vocab_size, seed=5)
    batch = DataCollatorWithFlattening()([{"input_ids": doc.tolist()} for doc in docs])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):  # lora_B starts at 0, so lora_A only receives gradients from the second step on
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert not torch.equal(p, before[name]), f"adapter weight {name} did not train"
        else:
            assert torch.equal(p, before[name]), f"base weight {name} changed"

    model.eval()
    input_ids = torch.randint(0, config.vocab_size, (2, 45), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        adapted = model(input_ids).logits
        with model.disable_adapter():
            assert not torch.allclose(model(input_ids).logits, adapted, atol=1e-3)  # the adapter matters

    model.save_pretrained(tmp_path)
    fresh_base = make_model(config)  # same seed: the weights the adapter was trained on
    reloaded = PeftModel.from_pretrained(fresh_base, tmp_path).eval()
    assert lora_modules(reloaded) == expected
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids).logits, adapted, rtol=0, atol=0)
        merged = reloaded.merge_and_unload()
        assert type(merged) is NsaForCausalLM and not lora_modules(merged)
        torch.testing.assert_close(merged(input_ids).logits, adapted, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # inductor compiles C++ with gcc: 30-50 s on 2 cores with a cold cache
def test_torch_compile_training_step_matches_eager():
    # One layer keeps inductor's CPU compile (gcc, ~3 s per graph) short. The packed layout and the NSA primitives
    # are custom ops in the graph (`nsa_hf.ops.library`); dynamo compiles everything around them.
    config = tiny_config(num_hidden_layers=1)
    model = make_model(config).train()
    docs = random_docs([5, 41, 30, 1, 23], config.vocab_size, seed=7)
    batch = DataCollatorWithFlattening()([{"input_ids": doc.tolist()} for doc in docs])
    expected_loss, expected_grads = loss_and_grads(model, **batch)

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        compiled = torch.compile(model)
        loss, grads = loss_and_grads(compiled, **batch)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert graphs > 0  # dynamo did compile (and did not fall back to eager everywhere)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-5)
    assert_grads_close({name.removeprefix("_orig_mod."): g for name, g in grads.items()}, expected_grads)
