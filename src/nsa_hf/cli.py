"""Command-line interface: ``nsa-hf demo`` trains, saves, reloads and samples a tiny NSA model on CPU."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from . import __version__

__all__ = ["build_parser", "main"]

DEMO_DEFAULTS = {"steps": 120, "seq_len": 512, "seed": 0, "output_dir": "nsa-demo"}


def build_parser() -> argparse.ArgumentParser:
    """The ``nsa-hf`` argument parser with its subcommands."""
    from .demo import DEFAULT_PROMPT

    parser = argparse.ArgumentParser(
        prog="nsa-hf",
        description="Native Sparse Attention (arXiv 2502.11089) as a Hugging Face Transformers model.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="train a tiny NSA language model on Jane Austen (CPU, ~2-3 minutes), save, reload and generate",
        description=(
            "Train a byte-level BPE tokenizer and a ~1M-parameter NSA causal LM on the bundled Jane Austen "
            "corpus with the transformers Trainer, report the held-out loss before and after, save both with "
            "save_pretrained, reload them with AutoModelForCausalLM / AutoTokenizer (checking the logits are "
            "identical) and generate a continuation of a prompt. The defaults take about 2-3 minutes on 2 CPU cores."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    demo.add_argument(
        "--steps", type=int, default=DEMO_DEFAULTS["steps"], help="training steps (batches of 4 sequences)"
    )
    demo.add_argument(
        "--output-dir", default=DEMO_DEFAULTS["output_dir"], help="where the model and tokenizer are saved"
    )
    demo.add_argument(
        "--seq-len",
        type=int,
        default=DEMO_DEFAULTS["seq_len"],
        help="tokens per training sequence (keep it well above the 64-token sliding window)",
    )
    demo.add_argument(
        "--seed", type=int, default=DEMO_DEFAULTS["seed"], help="seed for initialization, data order, sampling"
    )
    demo.add_argument("--prompt", default=DEFAULT_PROMPT, help="text to continue after training")
    demo.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice, one per core); use 1 if other programs keep the cores busy",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nsa-hf`` console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        if args.steps < 1:
            parser.error("--steps must be >= 1")
        if args.seq_len < 2:
            parser.error("--seq-len must be >= 2")
        if args.threads is not None and args.threads < 1:
            parser.error("--threads must be >= 1")
        run_demo(
            args.output_dir,
            steps=args.steps,
            seq_len=args.seq_len,
            seed=args.seed,
            prompt=args.prompt,
            num_threads=args.threads,
        )
        return 0
    parser.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
