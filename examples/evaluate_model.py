#!/usr/bin/env python
"""Evaluate a Native Sparse Attention model: held-out perplexity and passkey retrieval with `evaluate`.

Perplexity: the mean next-token loss over fixed-length chunks of held-out text (by default *Persuasion*,
the novel `examples/pretrain.py` holds out of the bundled corpus), exponentiated.

Passkey retrieval: a random number is hidden at a given depth of filler text (held-out prose) in prompts
of given token lengths, the model is asked to repeat it and generates greedily; the local `evaluate`
metric `examples/metrics/passkey_retrieval` scores the answers, by context length and depth. Writes
`results.json` and a heatmap `passkey_retrieval.png` (accuracy by context length and depth) to
`--output-dir`. Without `--model-dir` a tiny random model is used: it scores ~0, which is fine for a
smoke run; the script is meant for trained models.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

import evaluate
import torch
from matplotlib.figure import Figure
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, set_seed

from nsa_hf.data import load_demo_corpus
from nsa_hf.demo import add_nsa_backend_argument, add_threads_argument, evaluate_loss, load_model, set_threads

METRIC_DIR = Path(__file__).resolve().parent / "metrics" / "passkey_retrieval"
PREFIX = (
    "There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the pass key.\n\n"
)
NEEDLE = "\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n"
QUESTION = "\n\nWhat is the pass key? The pass key is"

EPILOG = """\
examples:
  # CPU smoke run (about a minute on 2 cores): tiny random model, passkey prompts of 256-1024 tokens
  python examples/evaluate_model.py --output-dir nsa-eval

  # GPU, real size: a trained model, prompts from 4k to 64k tokens, Triton kernels in bf16
  python examples/evaluate_model.py --model-dir nsa-base --output-dir nsa-base-eval --bf16 \\
      --nsa-backend triton --ppl-seq-len 8192 --ppl-max-chunks 64 \\
      --context-lengths 4096 8192 16384 32768 65536 --depths 0 0.1 0.25 0.5 0.75 0.9 1 --samples 10
"""


def build_parser() -> argparse.ArgumentParser:
    """The command line's flags (`parse_args` checks the values)."""
    parser = argparse.ArgumentParser(
        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-dir", help="saved NSA model + tokenizer (default: a tiny random model)")
    parser.add_argument(
        "--eval-file", help="held-out .txt for perplexity and passkey filler (default: Persuasion, bundled)"
    )
    parser.add_argument(
        "--output-dir", default="nsa-eval", help="receives results.json and the plot (default: %(default)s)"
    )
    parser.add_argument(
        "--ppl-seq-len", type=int, default=512, help="tokens per perplexity chunk (default: %(default)s)"
    )
    parser.add_argument(
        "--ppl-max-chunks", type=int, default=16, help="perplexity chunks to evaluate at most (default: %(default)s)"
    )
    parser.add_argument(
        "--context-lengths",
        type=int,
        nargs="+",
        default=[256, 512, 1024],
        help="passkey prompt lengths in tokens (default: %(default)s)",
    )
    parser.add_argument(
        "--depths",
        type=float,
        nargs="+",
        default=[0.0, 0.25, 0.5, 0.75, 1.0],
        help="passkey positions in the filler, 0 = start, 1 = end (default: %(default)s)",
    )
    parser.add_argument(
        "--samples", type=int, default=4, help="prompts per (context length, depth) cell (default: %(default)s)"
    )
    parser.add_argument("--passkey-digits", type=int, default=5, help="(default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per forward pass (default: %(default)s)")
    parser.add_argument("--bf16", action="store_true", help="load the weights in bf16")
    add_nsa_backend_argument(parser)
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    add_threads_argument(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line; bad values exit with a usage error that names the flag."""
    parser = build_parser()
    args = parser.parse_args(argv)

    for name in ("ppl_max_chunks", "samples", "passkey_digits", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.ppl_seq_len < 2:
        parser.error("--ppl-seq-len must be >= 2")
    if any(n < 1 for n in args.context_lengths):
        parser.error(f"--context-lengths must be positive, got {args.context_lengths}")
    if any(not 0.0 <= d <= 1.0 for d in args.depths):
        parser.error(f"--depths must lie in [0, 1], got {args.depths}")
    if args.model_dir and not (Path(args.model_dir) / "config.json").is_file():
        parser.error(f"--model-dir {args.model_dir} holds no config.json (save_pretrained output expected)")
    if args.eval_file and not Path(args.eval_file).is_file():
        parser.error(f"no such file: {args.eval_file}")
    args.context_lengths = sorted(set(args.context_lengths))
    args.depths = sorted(set(args.depths))
    return args


def perplexity(model: PreTrainedModel, ids: torch.Tensor, seq_len: int, max_chunks: int, batch_size: int) -> dict:
    """Loss (nats/token) and perplexity over up to `max_chunks` non-overlapping chunks of `seq_len` tokens."""
    num_chunks = min(max_chunks, ids.numel() // seq_len)
    if num_chunks == 0:
        raise ValueError(f"the held-out text has {ids.numel()} tokens, fewer than --ppl-seq-len {seq_len}.")
    chunks = ids[: num_chunks * seq_len].view(num_chunks, seq_len)
    total = 0.0
    for start in tqdm(range(0, num_chunks, batch_size), desc="perplexity"):
        batch = chunks[start : start + batch_size]
        total += evaluate_loss(model, batch, batch_size) * batch.shape[0]  # equal-length chunks: plain mean
    loss = total / num_chunks
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": num_chunks * seq_len}


def passkey_prompt(
    tokenizer: PreTrainedTokenizerBase, filler: list[int], key: str, length: int, depth: float
) -> list[int]:
    """Token ids of one passkey prompt of exactly `length` tokens: prefix, filler with the needle, question."""

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    prefix, needle, question = encode(PREFIX), encode(NEEDLE.format(key=key)), encode(QUESTION)
    filler_len = length - len(prefix) - len(needle) - len(question)
    if filler_len < 0:
        raise ValueError(
            f"context length {length} is too short: the instructions, passkey and question alone take "
            f"{length - filler_len} tokens."
        )
    at = round(depth * filler_len)
    return prefix + filler[:at] + needle + filler[at:filler_len] + question


def passkey_samples(tokenizer: PreTrainedTokenizerBase, haystack: list[int], args: argparse.Namespace) -> list[dict]:
    """`--samples` prompts with a random passkey per (context length, depth) cell, grouped by context length."""
    rng = random.Random(args.seed)
    haystack = haystack * (1 + max(args.context_lengths) // len(haystack))  # a short held-out text is repeated
    samples = []
    for length in args.context_lengths:
        for depth in args.depths:
            for _ in range(args.samples):
                key = str(rng.randrange(10 ** (args.passkey_digits - 1), 10**args.passkey_digits))
                offset = rng.randrange(len(haystack) - length + 1)
                ids = passkey_prompt(tokenizer, haystack[offset : offset + length], key, length, depth)
                samples.append({"context_length": length, "depth": depth, "passkey": key, "input_ids": ids})
    return samples


@torch.no_grad()
def run_passkey(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, samples: list[dict], args: argparse.Namespace
) -> tuple[dict, list[dict]]:
    """Generate greedy answers to the passkey prompts; returns the metric's result and the samples."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with tqdm(total=len(samples), desc="passkey retrieval") as bar:
        for length in args.context_lengths:
            # Every prompt of one context length has exactly that many tokens: batches need no padding.
            group = [s for s in samples if s["context_length"] == length]
            for start in range(0, len(group), args.batch_size):
                batch = group[start : start + args.batch_size]
                input_ids = torch.tensor([s["input_ids"] for s in batch], device=model.device)
                out = model.generate(
                    input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    max_new_tokens=args.passkey_digits + 2,  # a token holds at least one digit; one for the space
                    do_sample=False,
                    pad_token_id=pad_id,
                )
                for sample, row in zip(batch, out[:, length:]):
                    sample["prediction"] = tokenizer.decode(row, skip_special_tokens=True)
                bar.update(len(batch))

    metric = evaluate.load(str(METRIC_DIR))
    result = metric.compute(
        predictions=[s["prediction"] for s in samples],
        references=[s["passkey"] for s in samples],
        context_lengths=[s["context_length"] for s in samples],
        depths=[s["depth"] for s in samples],
    )
    records = [{k: v for k, v in s.items() if k != "input_ids"} for s in samples]
    return result, records


def plot_heatmap(result: dict, context_lengths: list[int], depths: list[float], title: str, path: Path) -> None:
    """Accuracy by context length (x) and depth (y) as an annotated heatmap."""
    accuracy = {(c["context_length"], c["depth"]): c["accuracy"] for c in result["by_context_length_and_depth"]}
    grid = [[accuracy[(n, d)] for n in context_lengths] for d in depths]
    figure = Figure(figsize=(1.2 * len(context_lengths) + 3, 0.5 * len(depths) + 2), layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            color = "white" if value < 0.25 or value > 0.85 else "black"  # readable on the dark ends of the map
            axes.text(j, i, f"{value:.0%}", ha="center", va="center", fontsize=9, color=color)
    axes.set_xticks(range(len(context_lengths)), [f"{n:,}" for n in context_lengths])
    axes.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    axes.set_xlabel("context length (tokens)")
    axes.set_ylabel("passkey depth")
    axes.set_title(title)
    figure.colorbar(image, ax=axes, label="retrieval accuracy")
    figure.savefig(path, dpi=150)


def main(argv: list[str] | None = None) -> dict:
    """Run both evaluations; returns what is written to results.json."""
    args = parse_args(argv)
    set_threads(args.threads)
    set_seed(args.seed)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(args.model_dir, args.nsa_backend, args.bf16)
    if args.eval_file:
        text = Path(args.eval_file).read_text(encoding="utf-8")
    else:
        text = load_demo_corpus().rsplit("\n\n\n\n", 1)[-1]  # Persuasion, held out by examples/pretrain.py
    # ~4 characters per token in English: tokenize only as much as the two evaluations can use.
    needed = max(args.ppl_seq_len * args.ppl_max_chunks, 2 * max(args.context_lengths))
    ids = tokenizer(text[: 8 * needed], add_special_tokens=False)["input_ids"]
    try:  # before any model work: a context length too short for the prompt is a usage error
        samples = passkey_samples(tokenizer, ids, args)
    except ValueError as error:
        raise SystemExit(f"evaluate_model.py: error: {error}") from None

    ppl = perplexity(model, torch.tensor(ids), args.ppl_seq_len, args.ppl_max_chunks, args.batch_size)
    print(f"held-out loss {ppl['loss']:.3f} nats/token, perplexity {ppl['perplexity']:.2f} ({ppl['tokens']:,} tokens)")
    passkey, samples = run_passkey(model, tokenizer, samples, args)
    print(f"passkey retrieval accuracy {passkey['accuracy']:.1%} over {passkey['num_samples']} prompts")

    name = Path(args.model_dir).name if args.model_dir else "tiny random model"
    plot_path = output_dir / "passkey_retrieval.png"
    plot_heatmap(
        passkey, args.context_lengths, args.depths, f"{name}: passkey retrieval ({passkey['accuracy']:.0%})", plot_path
    )
    results = {
        "model": args.model_dir or "tiny random model",
        "perplexity": ppl,
        "passkey_retrieval": passkey,
        "samples": samples,
    }
    (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {output_dir / 'results.json'} and {plot_path}")
    return results


if __name__ == "__main__":
    main()
