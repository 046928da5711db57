#!/usr/bin/env python
"""Long-context generation with a Native Sparse Attention model: prefill and decode times, cache memory.

Builds a prompt of `--context-length` tokens (the bundled Austen corpus, or `--text-file`, repeated as
needed), runs `model.generate()` (which decodes through an `NsaCache` it creates itself) and reports the
prefill time, the time per decoded token, the memory of the `NsaCache` against what a dense KV cache of the
same model would take, and how many keys a query reads with NSA against dense attention. Without
`--model-dir` a tiny random model is used: its text is noise, its timings and memory are real.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, set_seed
from transformers.generation.streamers import BaseStreamer

from nsa_hf import NsaCache, NsaConfig
from nsa_hf.compat import CACHE_KWARG
from nsa_hf.data import load_demo_corpus
from nsa_hf.demo import add_nsa_backend_argument, add_threads_argument, load_model, set_threads

EPILOG = """\
examples:
  # CPU smoke run (about a minute on 2 cores): tiny random model, 2k-token prompt
  python examples/generate_long.py

  # GPU, real size: a trained model, 128k-token prompt, Triton kernels in bf16
  python examples/generate_long.py --model-dir nsa-base --context-length 131072 --max-new-tokens 256 \\
      --bf16 --nsa-backend triton --output-json generate_long.json
"""


def build_parser() -> argparse.ArgumentParser:
    """The command line's flags (`parse_args` checks the values)."""
    parser = argparse.ArgumentParser(
        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-dir", help="saved NSA model + tokenizer (default: a tiny random model)")
    parser.add_argument(
        "--text-file", help="prompt text, repeated up to the context length (default: the bundled corpus)"
    )
    parser.add_argument("--context-length", type=int, default=2048, help="prompt tokens (default: %(default)s)")
    parser.add_argument(
        "--max-new-tokens", type=int, default=32, help="tokens to decode, EOS suppressed (default: %(default)s)"
    )
    parser.add_argument("--bf16", action="store_true", help="load the weights in bf16")
    add_nsa_backend_argument(parser)
    parser.add_argument(
        "--warmup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run a short generate() first so one-time costs (Triton compilation, allocations) stay out of the "
        "timings (default: %(default)s)",
    )
    parser.add_argument("--output-json", help="also write the report to this JSON file")
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    add_threads_argument(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line; bad values exit with a usage error that names the flag."""
    parser = build_parser()
    args = parser.parse_args(argv)

    for name in ("context_length", "max_new_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.model_dir and not (Path(args.model_dir) / "config.json").is_file():
        parser.error(f"--model-dir {args.model_dir} holds no config.json (save_pretrained output expected)")
    if args.text_file and not Path(args.text_file).is_file():
        parser.error(f"no such file: {args.text_file}")
    return args


class TimingStreamer(BaseStreamer):
    """Records when `generate()` hands over each token, and shows a progress bar.

    `generate()` calls `put` once with the prompt before the prefill, then once per generated token, so the
    first interval is the prefill (plus the first token's sampling) and the following ones are decode steps.
    """

    def __init__(self, max_new_tokens: int):
        self.times: list[float] = []
        self.bar = tqdm(total=max_new_tokens, desc="decoding", unit="tok")

    def put(self, value: torch.Tensor) -> None:
        if value.is_cuda:  # the kernels run asynchronously; wait for them so the clock means something
            torch.cuda.synchronize(value.device)
        self.times.append(time.perf_counter())
        if len(self.times) > 1:
            self.bar.update(1)

    def end(self) -> None:
        self.bar.close()


def long_prompt(tokenizer: PreTrainedTokenizerBase, text: str, length: int) -> torch.Tensor:
    """`length` token ids of `text`, repeated as many times as needed; shape [1, length]."""
    # About 4 characters per token for English BPE; tokenize a generous slice only, not a whole book.
    ids = tokenizer(text[: 8 * length], add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("the prompt text tokenizes to nothing.")
    repeats = -(-length // len(ids))
    return torch.tensor((ids * repeats)[:length]).unsqueeze(0)


def dense_kv_bytes(config: NsaConfig, tokens: int, element_size: int) -> int:
    """Bytes of one K and one V per layer per token, as a dense-attention model of the same shape keeps."""
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * tokens * element_size


def keys_read(config: NsaConfig, position: int) -> int:
    """Keys one query at `position` reads with NSA (compressed blocks + selected blocks + window), at most dense."""
    compressed = max(0, (position + 1 - config.compress_block_size) // config.compress_stride + 1)
    selected = config.num_selected_blocks * config.select_block_size
    return min(position + 1, compressed + selected + config.window_size)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Generate from a long prompt; returns the report (times in seconds, memory in bytes)."""
    args = parse_args(argv)
    set_threads(args.threads)
    set_seed(args.seed)
    model, tokenizer = load_model(args.model_dir, args.nsa_backend, args.bf16)
    text = Path(args.text_file).read_text(encoding="utf-8") if args.text_file else load_demo_corpus()
    input_ids = long_prompt(tokenizer, text, args.context_length).to(model.device)
    generate_kwargs = {
        "do_sample": False,
        "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        "return_dict_in_generate": True,
    }

    if args.warmup:
        with torch.no_grad():
            model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=2, **generate_kwargs)
    streamer = TimingStreamer(args.max_new_tokens)
    with torch.no_grad():
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=args.max_new_tokens,
            min_new_tokens=args.max_new_tokens,  # suppress EOS: the run decodes exactly as many tokens as asked
            streamer=streamer,
            **generate_kwargs,
        )
    cache = getattr(out, CACHE_KWARG)  # `cache` from transformers 5.24, `past_key_values` before
    if not isinstance(cache, NsaCache):
        raise TypeError(f"generate() decoded through a {type(cache).__name__}, not an NsaCache.")

    steps = [b - a for a, b in zip(streamer.times[1:], streamer.times[2:])]
    total_tokens = cache.get_seq_length()
    element_size = next(model.parameters()).element_size()
    config = model.config
    report = {
        "context_length": args.context_length,
        "new_tokens": out.sequences.shape[1] - args.context_length,
        "prefill_seconds": streamer.times[1] - streamer.times[0],
        "prefill_tokens_per_second": args.context_length / (streamer.times[1] - streamer.times[0]),
        "decode_seconds_per_token_mean": statistics.fmean(steps) if steps else float("nan"),
        "decode_seconds_per_token_median": statistics.median(steps) if steps else float("nan"),
        "nsa_cache_bytes": cache.nbytes(),
        "dense_kv_cache_bytes": dense_kv_bytes(config, total_tokens, element_size),
        "nsa_keys_per_query": keys_read(config, total_tokens - 1),
        "dense_keys_per_query": total_tokens,
    }
    report["cache_ratio"] = report["nsa_cache_bytes"] / report["dense_kv_cache_bytes"]

    mib = 1 << 20
    print(
        f"\nprompt {args.context_length:,} tokens, {report['new_tokens']} new tokens, {model.device}, {model.dtype}\n"
        f"  prefill           {report['prefill_seconds']:.3f} s ({report['prefill_tokens_per_second']:,.0f} tokens/s)\n"
        f"  decode            {1e3 * report['decode_seconds_per_token_mean']:.2f} ms/token mean, "
        f"{1e3 * report['decode_seconds_per_token_median']:.2f} ms median\n"
        f"  NsaCache          {report['nsa_cache_bytes'] / mib:,.1f} MiB for {total_tokens:,} tokens "
        f"({report['cache_ratio']:.2f}x the {report['dense_kv_cache_bytes'] / mib:,.1f} MiB of a dense KV cache: NSA "
        f"keeps every raw K/V for selection, plus the window and the compressed blocks)\n"
        f"  keys per query    {report['nsa_keys_per_query']:,} with NSA vs {total_tokens:,} dense "
        f"(what decoding reads, and where NSA saves time at long context)\n"
        f"  continuation      {tokenizer.decode(out.sequences[0, args.context_length :][:40])!r}"
    )
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
