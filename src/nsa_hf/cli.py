"""Command-line interface: ``nsa-hf demo`` trains, saves, reloads and samples a tiny NSA model on CPU;
``nsa-hf export-remote-code`` writes the Hub's remote-code files; ``nsa-hf model-card`` renders a model card."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from . import __version__

__all__ = ["build_parser", "main"]

DEMO_DEFAULTS = {"max_steps": 120, "seq_len": 512, "seed": 0, "output_dir": "nsa-demo"}
REMOTE_CODE_DIR = "modeling"


def build_parser() -> argparse.ArgumentParser:
    """The ``nsa-hf`` argument parser with its subcommands."""
    from .demo import DEFAULT_PROMPT, add_threads_argument

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
        "--max-steps", type=int, default=DEMO_DEFAULTS["max_steps"], help="training steps (batches of 4 sequences)"
    )
    # The flag's earlier spelling, still accepted; --help shows the name the example scripts share.
    demo.add_argument("--steps", dest="max_steps", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
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
    add_threads_argument(demo)

    export = commands.add_parser(
        "export-remote-code",
        help="write the self-contained remote-code files (trust_remote_code=True) generated from this package",
        description=(
            "Write the configuration and modeling files that load NSA models with trust_remote_code=True where "
            "nsa-hf is not installed: the package's modules as flat sibling files with flat imports and guarded "
            "optional imports. save_pretrained writes them next to every saved model; this command regenerates "
            "the repository's modeling/ folder (run it after changing src/nsa_hf)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    export.add_argument("directory", nargs="?", default=REMOTE_CODE_DIR, metavar="DIR", help="output folder")

    card = commands.add_parser(
        "model-card",
        help="render the model card (README.md) of a saved NSA model",
        description=(
            "Render the Hub model card of a saved NSA model from its config.json (architecture and NSA settings, "
            "how to load it with and without nsa-hf, intended use, limitations) and optional training metadata."
        ),
    )
    card.add_argument("model_dir", metavar="MODEL_DIR", help="folder holding the model's config.json")
    card.add_argument("--repo-id", default=None, help="Hub repo id, used as the title and in the loading examples")
    card.add_argument("--dataset", default=None, help="training data, as the card should name it")
    card.add_argument("--tokens", type=int, default=None, help="training tokens seen")
    card.add_argument("--steps", type=int, default=None, help="optimizer steps")
    card.add_argument("--loss", type=float, default=None, help="final training loss")
    card.add_argument("--license", default="apache-2.0", help="license identifier of the weights")
    card.add_argument("--output", "-o", default=None, help="write the card to this file (default: print it)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nsa-hf`` console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        if args.max_steps < 1:
            parser.error("--max-steps must be >= 1")
        if args.seq_len < 2:
            parser.error("--seq-len must be >= 2")
        run_demo(
            args.output_dir,
            steps=args.max_steps,
            seq_len=args.seq_len,
            seed=args.seed,
            prompt=args.prompt,
            num_threads=args.threads,
        )
        return 0
    if args.command == "export-remote-code":
        from .remote_code import write_remote_code

        paths = write_remote_code(args.directory)
        print(f"wrote {len(paths)} remote-code files to {args.directory}")
        return 0
    if args.command == "model-card":
        from pathlib import Path

        from .configuration_nsa import NsaConfig
        from .model_card import TRAINING_FIELDS, render_model_card

        if not (Path(args.model_dir) / "config.json").is_file():
            parser.error(f"MODEL_DIR must hold a config.json: {args.model_dir}")
        training = {key: getattr(args, key) for key in TRAINING_FIELDS if getattr(args, key) is not None}
        text = render_model_card(
            NsaConfig.from_pretrained(args.model_dir), training=training, repo_id=args.repo_id, license=args.license
        )
        if args.output is None:
            print(text, end="")
        else:
            Path(args.output).write_text(text, encoding="utf-8")
        return 0
    parser.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
