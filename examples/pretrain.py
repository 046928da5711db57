#!/usr/bin/env python
"""Pretrain a Native Sparse Attention causal LM from local text files with `datasets` and the `Trainer`.

Steps: load .txt files with `load_dataset("text", ...)`, tokenize them with `Dataset.map(batched=True)`,
pack the tokens (padding-free documents with `DataCollatorWithFlattening`, or concatenate-and-chunk), train
an `NsaForCausalLM` from scratch with the `Trainer`, evaluate on held-out files and `save_pretrained` the
model and tokenizer. Without `--train-files` it trains on the Jane Austen corpus bundled with nsa-hf (the
first five novels; *Persuasion* is held out). The defaults build a ~1M-parameter model that trains in a
few minutes on 2 CPU cores; the flags scale it up to a real run on a GPU.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from datasets import DatasetDict, load_dataset
from transformers import (
    AutoTokenizer,
    DataCollatorWithFlattening,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

from nsa_hf import NsaConfig, NsaForCausalLM
from nsa_hf.data import load_demo_novels
from nsa_hf.demo import add_nsa_backend_argument, add_threads_argument, build_tokenizer, set_threads

EPILOG = """\
examples:
  # CPU smoke run (a few minutes on 2 cores): bundled corpus, ~1M-parameter model
  python examples/pretrain.py --output-dir nsa-tiny

  # GPU, real size: ~130M parameters with a 32k vocabulary, 8k-token pieces, Triton kernels, bf16
  python examples/pretrain.py --train-files data/train/*.txt --validation-files data/val/*.txt \\
      --tokenizer my-tokenizer --output-dir nsa-base --hidden-size 768 --num-layers 12 --num-heads 12 \\
      --num-kv-heads 2 --compress-block-size 32 --compress-stride 16 --select-block-size 64 \\
      --num-selected-blocks 16 --window-size 512 --seq-len 8192 --batch-size 4 \\
      --gradient-accumulation-steps 8 --max-steps 20000 --learning-rate 6e-4 --bf16 --nsa-backend triton
"""

def build_parser() -> argparse.ArgumentParser:
    """The command line's flags (`parse_args` checks the values)."""
    parser = argparse.ArgumentParser(
        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    data = parser.add_argument_group("data")
    data.add_argument("--train-files", nargs="+", help="training .txt files (default: the bundled Austen corpus)")
    data.add_argument(
        "--validation-files", nargs="+", help="held-out .txt files (default: none; Persuasion for the bundled corpus)"
    )
    data.add_argument(
        "--sample-by",
        choices=("document", "paragraph", "line"),
        default="document",
        help="what one document is, as in load_dataset('text', sample_by=...): a whole file, a blank-line "
        "separated paragraph, or a line (default: %(default)s)",
    )
    data.add_argument(
        "--packing",
        choices=("flatten", "concat"),
        default="flatten",
        help="'flatten': documents cut into pieces of at most --seq-len tokens, --batch-size pieces concatenated "
        "into one padding-free row by DataCollatorWithFlattening, NSA restarting at every piece; 'concat': all "
        "documents joined and cut into rows of exactly --seq-len tokens, attention crossing documents "
        "(default: %(default)s)",
    )
    data.add_argument("--tokenizer", help="tokenizer directory (default: train a byte-level BPE tokenizer)")
    data.add_argument(
        "--vocab-size", type=int, default=1024, help="vocabulary of the trained tokenizer (default: %(default)s)"
    )
    data.add_argument(
        "--tokenizer-chars",
        type=int,
        default=1_000_000,
        help="characters of training text the tokenizer is trained on (default: %(default)s)",
    )

    model = parser.add_argument_group("model")
    model.add_argument("--hidden-size", type=int, default=128, help="(default: %(default)s)")
    model.add_argument("--intermediate-size", type=int, help="MLP width (default: 3 x hidden size)")
    model.add_argument("--num-layers", type=int, default=2, help="(default: %(default)s)")
    model.add_argument("--num-heads", type=int, default=4, help="query heads (default: %(default)s)")
    model.add_argument("--num-kv-heads", type=int, default=2, help="key/value heads (default: %(default)s)")
    model.add_argument("--head-dim", type=int, help="(default: hidden size / heads)")
    model.add_argument(
        "--compress-block-size", type=int, default=16, help="l, tokens per compressed block (default: %(default)s)"
    )
    model.add_argument(
        "--compress-stride", type=int, default=8, help="d, stride between compressed blocks (default: %(default)s)"
    )
    model.add_argument(
        "--select-block-size", type=int, default=32, help="l', tokens per selection block (default: %(default)s)"
    )
    model.add_argument(
        "--num-selected-blocks", type=int, default=4, help="n, selection blocks per query (default: %(default)s)"
    )
    model.add_argument("--window-size", type=int, default=64, help="w, sliding window (default: %(default)s)")
    add_nsa_backend_argument(model)

    train = parser.add_argument_group("training")
    train.add_argument(
        "--output-dir", default="nsa-pretrained", help="receives the model and tokenizer (default: %(default)s)"
    )
    train.add_argument(
        "--seq-len", type=int, default=256, help="tokens per piece (flatten) or row (concat) (default: %(default)s)"
    )
    train.add_argument("--max-steps", type=int, default=120, help="optimizer steps (default: %(default)s)")
    train.add_argument(
        "--batch-size", type=int, default=8, help="pieces (flatten) or rows (concat) per step (default: %(default)s)"
    )
    train.add_argument("--gradient-accumulation-steps", type=int, default=1, help="(default: %(default)s)")
    train.add_argument(
        "--learning-rate", type=float, default=3e-3, help="peak of the warmup + cosine schedule (default: %(default)s)"
    )
    train.add_argument(
        "--max-eval-samples", type=int, default=64, help="held-out pieces to evaluate on (default: %(default)s)"
    )
    train.add_argument("--eval-steps", type=int, help="evaluate every N steps (default: only at the end)")
    train.add_argument("--save-steps", type=int, help="checkpoint every N steps (default: only the final save)")
    train.add_argument("--bf16", action="store_true", help="bf16 mixed precision")
    train.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute activations in backward (long sequences)"
    )
    train.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    add_threads_argument(train)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line; bad values exit with a usage error that names the flag."""
    parser = build_parser()
    args = parser.parse_args(argv)

    positive = ("vocab_size", "tokenizer_chars", "max_steps", "batch_size", "gradient_accumulation_steps")
    for name in positive + ("max_eval_samples", "eval_steps", "save_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.seq_len < 2:
        parser.error("--seq-len must be >= 2")
    for path in (args.train_files or []) + (args.validation_files or []):
        if not Path(path).is_file():
            parser.error(f"no such file: {path}")
    if args.validation_files and not args.train_files:
        parser.error("--validation-files needs --train-files")
    if args.hidden_size % args.num_heads and args.head_dim is None:
        parser.error(
            f"--hidden-size {args.hidden_size} is not a multiple of --num-heads {args.num_heads}; set --head-dim"
        )
    try:
        build_config(args, vocab_size=args.vocab_size)
    except ValueError as error:  # NsaConfig names the field and the rule it breaks
        parser.error(f"invalid model flags: {error}")
    return args


def write_bundled_corpus(directory: Path) -> tuple[list[str], list[str]]:
    """Write the bundled corpus (gzipped in the package) as one .txt file per novel.

    Returns:
        The training files (the first five novels) and the validation files (*Persuasion*).
    """
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, novel in enumerate(load_demo_novels()):
        path = directory / f"austen_{index}.txt"
        path.write_text(novel.strip() + "\n", encoding="utf-8")
        paths.append(str(path))
    return paths[:-1], paths[-1:]


def build_config(args: argparse.Namespace, vocab_size: int, **token_ids: int | None) -> NsaConfig:
    """The `NsaConfig` the size flags describe; `token_ids` are its bos/eos/pad_token_id."""
    return NsaConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size or 3 * args.hidden_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads,
        head_dim=args.head_dim,
        compress_block_size=args.compress_block_size,
        compress_stride=args.compress_stride,
        select_block_size=args.select_block_size,
        num_selected_blocks=args.num_selected_blocks,
        window_size=args.window_size,
        nsa_backend=args.nsa_backend,
        **token_ids,
    )


def tokenize_and_pack(raw: DatasetDict, tokenizer: PreTrainedTokenizerBase, seq_len: int, packing: str) -> DatasetDict:
    """Tokenize every document (EOS appended) and cut the token stream into training examples.

    `flatten`: each document becomes consecutive pieces of at most `seq_len` tokens, each piece its own
    example; `DataCollatorWithFlattening` later concatenates a batch of them into one row and tells the
    model where each piece starts. `concat`: all documents of a `map` batch are joined and cut into rows of
    exactly `seq_len` tokens (the tail that does not fill a row is dropped), with `labels` = `input_ids`.
    """
    eos = tokenizer.eos_token_id

    def tokenize(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [doc + [eos] for doc in ids if doc]}

    def split_documents(batch: dict[str, list[list[int]]]) -> dict[str, list[list[int]]]:
        pieces = [doc[i : i + seq_len] for doc in batch["input_ids"] for i in range(0, len(doc), seq_len)]
        return {"input_ids": [piece for piece in pieces if len(piece) > 1]}  # one token predicts nothing

    def concatenate(batch: dict[str, list[list[int]]]) -> dict[str, list[list[int]]]:
        stream = [token for doc in batch["input_ids"] for token in doc]
        rows = [stream[i : i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]
        return {"input_ids": rows, "labels": [list(row) for row in rows]}

    tokenized = raw.map(tokenize, batched=True, remove_columns=["text"], desc="tokenizing")
    pack = split_documents if packing == "flatten" else concatenate
    return tokenized.map(pack, batched=True, desc=f"packing ({packing})")


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the pretraining; returns the final evaluation metrics (empty without validation data)."""
    args = parse_args(argv)
    set_threads(args.threads)
    set_seed(args.seed)
    output_dir = Path(args.output_dir)
    train_files, validation_files = args.train_files, args.validation_files
    if train_files is None:
        train_files, validation_files = write_bundled_corpus(output_dir / "corpus")

    data_files = {"train": train_files} | ({"validation": validation_files} if validation_files else {})
    raw = load_dataset("text", data_files=data_files, sample_by=args.sample_by)

    if args.tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        text, size = [], 0
        for document in raw["train"]["text"]:
            text.append(document)
            size += len(document)
            if size >= args.tokenizer_chars:
                break
        tokenizer = build_tokenizer("\n\n".join(text)[: args.tokenizer_chars], vocab_size=args.vocab_size)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer {args.tokenizer} has no EOS token to separate documents.")

    packed = tokenize_and_pack(raw, tokenizer, args.seq_len, args.packing)
    train_set, eval_set = packed["train"], packed.get("validation")
    if len(train_set) == 0:
        raise ValueError(f"no training example of {args.seq_len} tokens: the training text is too short.")
    if eval_set is not None:
        eval_set = eval_set.select(range(min(args.max_eval_samples, len(eval_set))))

    token_ids = {f"{name}_token_id": getattr(tokenizer, f"{name}_token_id") for name in ("bos", "eos", "pad")}
    model = NsaForCausalLM(build_config(args, len(tokenizer), **token_ids))
    cfg = model.config
    print(
        f"NsaForCausalLM: {model.num_parameters():,} parameters; {len(train_set):,} training examples "
        f"(packing {args.packing}); NSA l={cfg.compress_block_size} d={cfg.compress_stride} "
        f"l'={cfg.select_block_size} n={cfg.num_selected_blocks} w={cfg.window_size}"
    )

    training_args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.max_steps // 10),
        weight_decay=0.01,
        max_grad_norm=1.0,
        bf16=args.bf16,
        # Passed only when asked for: transformers 5.17 knows this name, newer versions warn that it is an alias.
        **({"gradient_checkpointing": True} if args.gradient_checkpointing else {}),
        logging_steps=max(1, args.max_steps // 10),
        eval_strategy="steps" if args.eval_steps and eval_set is not None else "no",
        eval_steps=args.eval_steps,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps,
        report_to="none",
        seed=args.seed,
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    # Padding-free packing: one row per batch, `cu_seq_lens_q` marks where each piece starts, and the
    # first label of every piece is -100 so no token is predicted across a boundary.
    collator = (
        DataCollatorWithFlattening(return_flash_attn_kwargs=True)
        if args.packing == "flatten"
        else default_data_collator
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=collator,
        processing_class=tokenizer,
    )
    train_result = trainer.train()
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)

    metrics: dict[str, float] = {}
    if eval_set is not None:
        metrics = trainer.evaluate()
        metrics["perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))  # the cap avoids an overflow
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    trainer.save_model(str(output_dir))  # model, config and (as processing_class) the tokenizer
    print(f"saved to {output_dir}: load with AutoModelForCausalLM / AutoTokenizer.from_pretrained (import nsa_hf)")
    return metrics


if __name__ == "__main__":
    main()
