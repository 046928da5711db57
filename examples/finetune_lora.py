#!/usr/bin/env python
"""LoRA fine-tuning of a saved Native Sparse Attention model with PEFT.

Loads an NSA model saved with `save_pretrained` (for instance by `examples/pretrain.py`), wraps it with a
LoRA adapter (`peft.get_peft_model`), trains the adapter on local text with the `Trainer` (documents packed
padding-free by `DataCollatorWithFlattening`), saves the adapter, then reloads base + adapter from disk and
folds the adapter into the base weights with `merge_and_unload`, checking the merged model computes what the
adapter model computes. Without `--model-dir` a tiny random model is built and saved first, for a smoke run.

LoRA target modules of an NSA model (see "Module names" in the nsa-hf README):
  attention     q_proj, k_proj, v_proj, o_proj (selection branch, or the shared K/V with branch_kv="shared")
                compress_k_proj, compress_v_proj, window_k_proj, window_v_proj (branch_kv="independent")
  compression   compress_key.fc1/fc2, compress_value.fc1/fc2 (phi MLP; .proj for compression_type="linear")
  gates         branch_gate.proj (or branch_gate.fc1/fc2)
  MLP           gate_proj, up_proj, down_proj
PEFT matches a name against the end of each module's path, so "fc1" would pick both phi MLPs.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch
from datasets import Dataset, load_dataset
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorWithFlattening,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
    set_seed,
)

import nsa_hf  # noqa: F401  (registers the "nsa" model type with the Auto classes)
from nsa_hf.data import demo_corpus_path, load_demo_corpus
from nsa_hf.demo import add_nsa_backend_argument, add_threads_argument, build_model, build_tokenizer, set_threads

# The attention projections of every branch (independent K/V); the MLP and phi stay frozen.
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
DEFAULT_TARGETS += ["compress_k_proj", "compress_v_proj", "window_k_proj", "window_v_proj"]

EPILOG = """\
examples:
  # CPU smoke run (under a minute): a tiny random base model, the bundled Austen corpus
  python examples/finetune_lora.py --output-dir nsa-lora

  # GPU, real size: adapt a pretrained model (examples/pretrain.py's output) to your text
  python examples/finetune_lora.py --model-dir nsa-base --train-file my_text.txt --output-dir nsa-base-lora \\
      --seq-len 8192 --batch-size 4 --max-steps 2000 --lora-r 16 --lora-alpha 32 --bf16 --nsa-backend triton \\
      --target-modules q_proj k_proj v_proj o_proj compress_k_proj compress_v_proj window_k_proj \\
      window_v_proj gate_proj up_proj down_proj
"""


def build_parser() -> argparse.ArgumentParser:
    """The command line's flags (`parse_args` checks the values)."""
    parser = argparse.ArgumentParser(
        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-dir", help="saved NSA model + tokenizer (default: build a tiny random one)")
    parser.add_argument(
        "--train-file",
        help="training .txt file, one document per blank-line separated paragraph (default: paragraphs of the "
        "bundled Austen corpus)",
    )
    parser.add_argument(
        "--output-dir", default="nsa-lora", help="receives adapter/, merged/ and base-model/ (default: %(default)s)"
    )
    parser.add_argument(
        "--target-modules",
        nargs="+",
        default=DEFAULT_TARGETS,
        help=f"module names LoRA wraps (see above), or 'all-linear' (default: {' '.join(DEFAULT_TARGETS)})",
    )
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank (default: %(default)s)")
    parser.add_argument("--lora-alpha", type=int, default=16, help="LoRA scale = alpha / r (default: %(default)s)")
    parser.add_argument("--lora-dropout", type=float, default=0.05, help="(default: %(default)s)")
    parser.add_argument(
        "--seq-len", type=int, default=256, help="documents are truncated to this many tokens (default: %(default)s)"
    )
    parser.add_argument(
        "--max-train-samples", type=int, default=2000, help="documents to train on at most (default: %(default)s)"
    )
    parser.add_argument("--max-steps", type=int, default=30, help="optimizer steps (default: %(default)s)")
    parser.add_argument(
        "--batch-size", type=int, default=8, help="documents packed into one row per step (default: %(default)s)"
    )
    parser.add_argument("--learning-rate", type=float, default=2e-3, help="(default: %(default)s)")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision")
    add_nsa_backend_argument(parser)
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    add_threads_argument(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line; bad values exit with a usage error that names the flag."""
    parser = build_parser()
    args = parser.parse_args(argv)

    for name in ("lora_r", "lora_alpha", "max_train_samples", "max_steps", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.seq_len < 2:
        parser.error("--seq-len must be >= 2")
    if not 0 <= args.lora_dropout < 1:
        parser.error(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")
    if args.model_dir and not (Path(args.model_dir) / "config.json").is_file():
        parser.error(f"--model-dir {args.model_dir} holds no config.json (save_pretrained output expected)")
    if args.train_file and not Path(args.train_file).is_file():
        parser.error(f"no such file: {args.train_file}")
    return args


def build_tiny_base(directory: Path, seq_len: int) -> None:
    """Save a tiny random NSA model and a BPE tokenizer trained on the bundled corpus to `directory`.

    A saved base, not an in-memory one, so that the adapter records a path it can be reloaded onto.
    """
    tokenizer = build_tokenizer(load_demo_corpus()[:200_000], vocab_size=1024)
    build_model(tokenizer, seq_len).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def load_documents(train_file: str | None, max_samples: int) -> Dataset:
    """Paragraphs of `train_file` (or of the bundled corpus) as a `text` dataset."""
    if train_file:
        dataset = load_dataset("text", data_files=train_file, sample_by="paragraph")["train"]
    else:  # read from its file, as --train-file is: hashing an in-memory table failed on Python 3.12 (dill, pyarrow)
        dataset = load_dataset("text", data_files=str(demo_corpus_path()), sample_by="paragraph")["train"]
        dataset = dataset.filter(lambda example: len(example["text"].strip()) > 200)
    # A seeded sample by index (`select` hashes plain indices; `shuffle` would hash a numpy Generator).
    return dataset.select(random.Random(0).sample(range(len(dataset)), min(max_samples, len(dataset))))


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train, save and merge the adapter; returns the training loss and the merge check's max difference."""
    args = parse_args(argv)
    set_threads(args.threads)
    set_seed(args.seed)
    output_dir = Path(args.output_dir)
    base_dir = args.model_dir
    if base_dir is None:
        base_dir = str(output_dir / "base-model")
        build_tiny_base(Path(base_dir), args.seq_len)

    tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(base_dir)
    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(base_dir, nsa_backend=args.nsa_backend)
    lora = LoraConfig(
        task_type="CAUSAL_LM",
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=args.target_modules[0] if args.target_modules == ["all-linear"] else args.target_modules,
    )
    model = get_peft_model(model, lora)
    model.print_trainable_parameters()

    documents = load_documents(args.train_file, args.max_train_samples)
    train_set = documents.map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=args.seq_len),
        batched=True,
        remove_columns=documents.column_names,
        desc="tokenizing",
    ).filter(lambda example: len(example["input_ids"]) > 1)

    training_args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.max_steps // 10),
        bf16=args.bf16,
        logging_steps=max(1, args.max_steps // 10),
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_set,
        # One padding-free row per step; NSA restarts its blocks and window at every document.
        data_collator=DataCollatorWithFlattening(return_flash_attn_kwargs=True),
    )
    train_loss = trainer.train().training_loss

    adapter_dir = output_dir / "adapter"
    model.save_pretrained(adapter_dir)  # only the LoRA weights and adapter_config.json (base path recorded)
    tokenizer.save_pretrained(adapter_dir)
    print(f"adapter saved to {adapter_dir}: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), dir)")

    # The deployable artifact: the adapter folded into the base weights, a plain NsaForCausalLM again.
    merged_dir = output_dir / "merged"
    merged = model.merge_and_unload()
    merged.save_pretrained(merged_dir)
    tokenizer.save_pretrained(merged_dir)
    print(f"merged model saved to {merged_dir}: AutoModelForCausalLM.from_pretrained (import nsa_hf)")

    # merge_and_unload mutated `model` in place; check a fresh base + saved adapter against it instead.
    probe = tokenizer(documents[0]["text"], return_tensors="pt")["input_ids"][:, : args.seq_len].to(merged.device)
    merged.eval()
    base = AutoModelForCausalLM.from_pretrained(base_dir).to(merged.device)
    reloaded = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        max_diff = (reloaded(input_ids=probe).logits - merged(input_ids=probe).logits).abs().max().item()
    print(f"max |logit difference| between base + adapter and the merged model: {max_diff:.2e}")
    return {"train_loss": train_loss, "merge_max_abs_diff": max_diff}


if __name__ == "__main__":
    main()
