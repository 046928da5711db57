"""Pretrain an NSA model with `Trainer` on one GPU or several (accelerate: DDP or FSDP2), on the bundled corpus.

Runs with the same global batch (processes x --batch-size) see the same data in the same order,
so their loss curves can be compared step by step; each run writes them to --output-dir/losses.json.

    # one GPU, global batch 8
    accelerate launch --num_processes 1 examples/distributed_pretrain.py --batch-size 8 --output-dir runs/single
    # two GPUs, DistributedDataParallel, global batch 8
    accelerate launch --config_file examples/accelerate/ddp.yaml examples/distributed_pretrain.py \\
        --batch-size 4 --output-dir runs/ddp
    # two GPUs, FSDP2 (one shard group per decoder layer), global batch 8
    accelerate launch --config_file examples/accelerate/fsdp2.yaml examples/distributed_pretrain.py \\
        --batch-size 4 --output-dir runs/fsdp2
    # compare them
    python examples/distributed_pretrain.py --compare runs/single runs/ddp runs/fsdp2

On a CPU it runs too (one process, float32), at the tiny default size: `python examples/distributed_pretrain.py`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from nsa_hf import NsaConfig, NsaForCausalLM
from nsa_hf.data import load_demo_corpus
from nsa_hf.demo import add_nsa_backend_argument, add_threads_argument, build_tokenizer, set_threads


class LossAndTimeLog(TrainerCallback):
    """Collects the logged loss and the wall time of every optimizer step."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.step_ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.step_ends.append(time.perf_counter())

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


def chunked_corpus(seq_len: int, vocab_size: int) -> tuple[list[dict[str, torch.Tensor]], int]:
    """Fixed-length training sequences of the bundled corpus (no padding: every row has seq_len tokens)."""
    text = load_demo_corpus()
    tokenizer = build_tokenizer(text, vocab_size=vocab_size)
    ids = torch.tensor(tokenizer(text)["input_ids"])
    rows = ids[: ids.numel() // seq_len * seq_len].view(-1, seq_len)
    return [{"input_ids": row, "labels": row} for row in rows], len(tokenizer)


def train(args: argparse.Namespace) -> None:
    data, vocab_size = chunked_corpus(args.seq_len, args.vocab_size)
    torch.manual_seed(args.seed)
    config = NsaConfig(
        vocab_size=vocab_size, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers, num_attention_heads=args.num_heads, num_key_value_heads=args.num_kv_heads,
        head_dim=args.hidden_size // args.num_heads, max_position_embeddings=args.seq_len, window_size=args.window_size,
        compress_block_size=args.compress_block_size, compress_stride=args.compress_stride,
        select_block_size=args.select_block_size, num_selected_blocks=args.num_selected_blocks,
        nsa_backend=args.nsa_backend,
    )
    model = NsaForCausalLM(config)
    training_args = TrainingArguments(
        output_dir=str(args.output_dir), per_device_train_batch_size=args.batch_size, max_steps=args.max_steps,
        learning_rate=args.learning_rate, lr_scheduler_type="constant", logging_steps=1, seed=args.seed,
        data_seed=args.seed, bf16=torch.cuda.is_available(), save_strategy="no", report_to=[],
        dataloader_drop_last=True, disable_tqdm=False,
    )
    log = LossAndTimeLog()
    trainer = Trainer(model=model, args=training_args, train_dataset=data, callbacks=[log])
    trainer.train()
    if trainer.is_world_process_zero():
        state = trainer.accelerator.state
        steady = [b - a for a, b in zip(log.step_ends[3:], log.step_ends[4:])]  # steps 1-3 include kernel compiles
        global_batch = args.batch_size * state.num_processes
        record = {
            "processes": state.num_processes, "distributed_type": str(state.distributed_type),
            "per_device_batch": args.batch_size, "global_batch": global_batch, "seq_len": args.seq_len,
            "losses": log.losses, "median_step_s": statistics.median(steady) if steady else None,
            "tokens_per_s": global_batch * args.seq_len / statistics.median(steady) if steady else None,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        }
        args.output_dir.mkdir(parents=True, exist_ok=True)
        (args.output_dir / "losses.json").write_text(json.dumps(record, indent=1))
        print(json.dumps({k: v for k, v in record.items() if k != "losses"}))


def compare(run_dirs: list[Path]) -> dict:
    """Loss agreement of each run with the first (same global batch) and strong-scaling efficiency."""
    runs = [json.loads((d / "losses.json").read_text()) for d in run_dirs]
    base = runs[0]
    report = {"baseline": str(run_dirs[0]), "runs": []}
    for run_dir, run in zip(run_dirs[1:], runs[1:]):
        if run["global_batch"] != base["global_batch"]:
            raise ValueError(f"{run_dir}: global batch {run['global_batch']} differs from {base['global_batch']}")
        steps = min(len(run["losses"]), len(base["losses"]))
        diffs = [abs(a - b) for a, b in zip(run["losses"][:steps], base["losses"][:steps])]
        speedup = run["tokens_per_s"] / base["tokens_per_s"] if run["tokens_per_s"] and base["tokens_per_s"] else None
        report["runs"].append({
            "run": str(run_dir), "distributed_type": run["distributed_type"], "processes": run["processes"],
            "steps": steps, "max_abs_loss_diff": max(diffs), "final_loss": run["losses"][steps - 1],
            "baseline_final_loss": base["losses"][steps - 1], "tokens_per_s": run["tokens_per_s"],
            "baseline_tokens_per_s": base["tokens_per_s"], "speedup": speedup,
            "scaling_efficiency": speedup / (run["processes"] / base["processes"]) if speedup else None,
        })
    print(json.dumps(report, indent=1))
    return report


# Earlier spellings of some flags, still accepted; --help shows the names the example scripts share.
FLAG_ALIASES = {
    "--steps": "max_steps", "--per-device-batch": "batch_size", "--layers": "num_layers", "--heads": "num_heads",
    "--kv-heads": "num_kv_heads",
}


def build_parser() -> argparse.ArgumentParser:
    """The command line's flags (`parse_args` checks the values)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("runs/distributed"))
    parser.add_argument("--compare", type=Path, nargs="+", metavar="RUN_DIR",
                        help="compare the losses.json of finished runs (the first is the baseline) and exit")
    parser.add_argument("--batch-size", type=int, default=2,
                        help="sequences per device per step; global batch = processes x this (default: %(default)s)")
    parser.add_argument("--max-steps", type=int, default=20, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=1024, help="BPE vocabulary trained on the corpus")
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--intermediate-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--num-heads", type=int, default=4, help="query heads (default: %(default)s)")
    parser.add_argument("--num-kv-heads", type=int, default=2, help="key/value heads (default: %(default)s)")
    parser.add_argument("--window-size", type=int, default=128)
    parser.add_argument("--compress-block-size", type=int, default=32)
    parser.add_argument("--compress-stride", type=int, default=16)
    parser.add_argument("--select-block-size", type=int, default=64)
    parser.add_argument("--num-selected-blocks", type=int, default=4)
    add_nsa_backend_argument(parser)
    add_threads_argument(parser)
    for alias, dest in FLAG_ALIASES.items():
        parser.add_argument(alias, dest=dest, type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line; bad values exit with a usage error that names the flag."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.hidden_size % args.num_heads:
        parser.error(f"--hidden-size ({args.hidden_size}) must be a multiple of --num-heads ({args.num_heads})")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    set_threads(args.threads)
    if args.compare:
        compare(args.compare)
    else:
        train(args)


if __name__ == "__main__":
    main()
