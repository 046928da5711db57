#!/usr/bin/env python
"""Convert a dense Llama / Mistral / Qwen2 / Qwen3 checkpoint to NSA, then continue training it on long sequences.

1. `convert_dense_to_nsa` builds an NSA model that computes what the dense one computes up to the window (the
   script checks it on one sequence of that length and prints the largest logit difference);
2. `Trainer` continues training on documents longer than the window, packed padding-free into one row per step
   (`DataCollatorWithFlattening`): that is where the compressed and selection branches start to matter;
3. the result is saved with `save_pretrained` (plus the tokenizer), ready for `from_pretrained` or the Hub.

`--lora-r R` trains a LoRA adapter on the attention projections plus, in full, the parts conversion adds (phi
and the gates: they start untrained), instead of every weight. Without `--source` a tiny random Llama and a BPE
tokenizer trained on the bundled corpus stand in for the dense checkpoint, for a smoke run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorWithFlattening,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Trainer,
    TrainingArguments,
    set_seed,
)

from nsa_hf import convert_dense_to_nsa
from nsa_hf.data import load_demo_corpus
from nsa_hf.demo import add_nsa_backend_argument, add_threads_argument, build_tokenizer, set_threads

# What conversion adds, by module name: trained in full even with LoRA, since they start untrained.
NEW_MODULES = ["compress_key", "compress_value", "branch_gate"]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]

EPILOG = """\
examples:
  # CPU smoke run (a minute): a tiny random Llama stands in for the dense checkpoint
  python examples/convert_and_finetune.py --output-dir nsa-converted

  # GPU, real size: a local Llama 3.2 1B folder, continued at 8k with a 512 window, LoRA on attention
  python examples/convert_and_finetune.py --source Llama-3.2-1B --output-dir llama-1b-nsa --seq-len 8192 \\
      --window-size 512 --batch-size 4 --max-steps 2000 --lora-r 16 --bf16 --nsa-backend triton
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", help="folder of a dense causal LM and its tokenizer (default: a tiny random Llama)")
    parser.add_argument("--output-dir", default="nsa-converted", help="receives the NSA model (default: %(default)s)")
    nsa = parser.add_argument_group("NSA geometry of the converted model")
    nsa.add_argument("--window-size", type=int, default=64, help="sliding window w (default: %(default)s)")
    nsa.add_argument("--compress-block-size", type=int, default=16, help="compressed block l (default: %(default)s)")
    nsa.add_argument("--compress-stride", type=int, default=8, help="compressed stride d (default: %(default)s)")
    nsa.add_argument("--select-block-size", type=int, default=32, help="selection block l' (default: %(default)s)")
    nsa.add_argument("--num-selected-blocks", type=int, default=4, help="selected blocks n (default: %(default)s)")
    nsa.add_argument("--branch-kv", choices=["shared", "independent"], default="shared",
                     help="the window and compression branches share the dense K/V or start as copies (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=256,
                        help="tokens per training document, longer than the window (default: %(default)s)")
    parser.add_argument("--max-steps", type=int, default=20, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=4, help="documents packed into one row per step (default: %(default)s)")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="(default: %(default)s)")
    parser.add_argument("--lora-r", type=int, default=0, help="LoRA rank; 0 trains every weight (default: %(default)s)")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision")
    add_nsa_backend_argument(parser)
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    add_threads_argument(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("max_steps", "batch_size", "window_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.lora_r < 0:
        parser.error(f"--lora-r must be >= 0, got {args.lora_r}")
    if args.seq_len <= args.window_size:
        parser.error(f"--seq-len ({args.seq_len}) must exceed --window-size ({args.window_size}): shorter documents "
                     "never leave the window, so the new branches would learn nothing")
    if args.source and not (Path(args.source) / "config.json").is_file():
        parser.error(f"--source {args.source} holds no config.json (a save_pretrained folder expected)")
    return args


def tiny_dense_source(directory: Path) -> None:
    """A tiny random Llama and a BPE tokenizer trained on the bundled corpus, saved as a dense checkpoint."""
    tokenizer = build_tokenizer(load_demo_corpus()[:200_000], vocab_size=1024)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def documents(tokenizer, seq_len: int) -> list[dict[str, list[int]]]:
    """The bundled corpus cut into documents of `seq_len` tokens (DataCollatorWithFlattening packs them)."""
    ids = tokenizer(load_demo_corpus()[:400_000])["input_ids"]
    return [{"input_ids": ids[i : i + seq_len]} for i in range(0, len(ids) - seq_len + 1, seq_len)]


def with_lora(model: PreTrainedModel, rank: int) -> PreTrainedModel:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS,
                        modules_to_save=NEW_MODULES)
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    return model


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Convert, check, train and save; returns the conversion's largest logit difference and the training loss."""
    args = parse_args(argv)
    set_threads(args.threads)
    set_seed(args.seed)
    output_dir = Path(args.output_dir)
    source = args.source
    if source is None:
        source = str(output_dir / "dense-source")
        tiny_dense_source(Path(source))
    tokenizer = AutoTokenizer.from_pretrained(source)
    dense = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    model = convert_dense_to_nsa(
        dense, window_size=args.window_size, compress_block_size=args.compress_block_size,
        compress_stride=args.compress_stride, select_block_size=args.select_block_size,
        num_selected_blocks=args.num_selected_blocks, branch_kv=args.branch_kv, nsa_backend=args.nsa_backend,
    )
    # The same function up to the window: checked on one sequence of that length before any training.
    ids = torch.randint(0, len(tokenizer), (1, min(args.window_size, args.num_selected_blocks * args.select_block_size)))
    with torch.no_grad():
        difference = (model(ids).logits - dense(ids).logits).abs().max().item()
    print(f"converted: largest logit difference to the dense model up to the window {difference:.2e}")
    del dense

    trained = with_lora(model, args.lora_r) if args.lora_r else model.train()
    training_args = TrainingArguments(
        output_dir=str(output_dir), max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate, lr_scheduler_type="cosine", warmup_steps=max(1, args.max_steps // 10),
        bf16=args.bf16, logging_steps=max(1, args.max_steps // 10), save_strategy="no", report_to="none",
        seed=args.seed, dataloader_pin_memory=torch.cuda.is_available(),
    )
    trainer = Trainer(model=trained, args=training_args, train_dataset=documents(tokenizer, args.seq_len),
                      data_collator=DataCollatorWithFlattening(return_flash_attn_kwargs=True))
    train_loss = trainer.train().training_loss

    final = trained.merge_and_unload() if args.lora_r else trained
    final.save_pretrained(output_dir / "model")
    tokenizer.save_pretrained(output_dir / "model")
    print(f"NSA model saved to {output_dir / 'model'} (loss {train_loss:.3f})")
    return {"conversion_max_difference": difference, "train_loss": train_loss}


if __name__ == "__main__":
    main()
