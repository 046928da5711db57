"""Command-line interface: ``nsa-hf demo`` trains, saves, reloads and samples a tiny NSA model on CPU;
``nsa-hf export-remote-code`` writes the Hub's remote-code files; ``nsa-hf model-card`` renders a model card;
``nsa-hf convert`` turns a dense Llama, Mistral, Qwen2 or Qwen3 checkpoint into an NSA one."""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

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
    card.add_argument("--base-model", default=None, help="the dense checkpoint it was converted from")
    card.add_argument("--license", default="apache-2.0", help="license identifier of the weights")
    card.add_argument("--output", "-o", default=None, help="write the card to this file (default: print it)")
    convert = commands.add_parser(
        "convert",
        help="convert a dense Llama/Mistral/Qwen2/Qwen3 checkpoint to NSA",
        description=(
            "Convert the dense causal LM in SRC (a folder from save_pretrained) into an NSA model saved in DST "
            "(safetensors, config with auto_map, remote code, tokenizer files, a model card naming SRC). NsaConfig "
            "fields follow as --field value pairs, e.g. --window_size 512 --branch_kv independent. The converted "
            "model computes what the dense one does on sequences no longer than the window and n x l'."
        ),
    )
    convert.add_argument("source", metavar="SRC", help="folder of the dense checkpoint")
    convert.add_argument("destination", metavar="DST", help="folder to write the NSA checkpoint to")
    return parser


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


def _field_values(parser: argparse.ArgumentParser, extra: list[str]) -> dict:
    """`--field value` or `--field=value` after SRC and DST into NsaConfig fields; values read as JSON (numbers,
    true/false), else as strings."""
    words = [part for word in extra for part in (word.split("=", 1) if word.startswith("--") else [word])]
    if len(words) % 2 or not all(key.startswith("--") for key in words[::2]):
        parser.error(f"NsaConfig fields come after SRC DST as --field value pairs, got {' '.join(extra)}")
    fields = {}
    for key, raw in zip(words[::2], words[1::2], strict=True):
        try:
            fields[key[2:].replace("-", "_")] = json.loads(raw)
        except json.JSONDecodeError:
            fields[key[2:].replace("-", "_")] = raw
    return fields


def _convert(parser: argparse.ArgumentParser, source: str, destination: str, fields: dict) -> None:
    from .convert import convert_dense_to_nsa
    from .model_card import render_model_card

    if not (Path(source) / "config.json").is_file():
        parser.error(f"SRC must hold a config.json: {source}")
    model = convert_dense_to_nsa(source, load_kwargs={"dtype": "auto"}, **fields)
    model.save_pretrained(destination)
    for name in _TOKENIZER_FILES:
        if (Path(source) / name).is_file():
            shutil.copy(Path(source) / name, Path(destination) / name)
    card = render_model_card(model.config, training={"base_model": str(source)})
    (Path(destination) / "README.md").write_text(card, encoding="utf-8")
    print(f"converted {source} ({model.config.num_hidden_layers} layers) to NSA in {destination}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nsa-hf`` console script; returns the process exit code."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "convert":
        _convert(parser, args.source, args.destination, _field_values(parser, extra))
        return 0
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
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
