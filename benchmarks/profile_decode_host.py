"""Where the default generate() path spends its host time per token: NSA (NsaCache, eager) against Llama
(DynamicCache, eager), seed shape, batch 1, on a GPU.

    python benchmarks/profile_decode_host.py [--context 4096] [--new-tokens 32] > decode_host.txt

The default path is host-bound (its ms per token is many times its kernel time, bench_generate.py --profile), so
what counts is the host work per token: the PyTorch ops dispatched per decoded token (generate() of 1 + N tokens
minus generate() of 1, over N), the Triton launches per forward pass (prefill and N - 1 steps, 1 + N calls of
`JITFunction.run` counted over N), and cProfile's table of one generate() of 1 + N tokens, prefill included.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
from collections import Counter

import torch
from bench_generate import build, timed_generate
from torch.utils._python_dispatch import TorchDispatchMode


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def ops_per_token(model, prompt: torch.Tensor, new_tokens: int) -> Counter:
    """PyTorch ops dispatched per decoded token (a generate() of 1 + N tokens minus one of 1, over N)."""
    counts = []
    for tokens in (1, 1 + new_tokens):
        with _CountOps() as mode:
            timed_generate(model, prompt, tokens)
        counts.append(mode.counts)
    return Counter({name: (counts[1][name] - counts[0][name]) / new_tokens for name in counts[1]})


def profile(model, prompt: torch.Tensor, new_tokens: int) -> pstats.Stats:
    profiler = cProfile.Profile()
    profiler.enable()
    timed_generate(model, prompt, 1 + new_tokens)
    profiler.disable()
    return pstats.Stats(profiler)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rows", type=int, default=30, help="functions listed per model")
    args = parser.parse_args()
    print(f"# {torch.cuda.get_device_name()}, seed shape, batch 1, context {args.context}")
    for kind in ("nsa", "llama"):
        model = build(kind, "seed", args.context + args.new_tokens + 128)
        prompt = torch.randint(1, 32000, (1, args.context), device="cuda")
        for _ in range(2):  # warm-up: Triton compiles, cuBLAS picks its kernels
            timed_generate(model, prompt, 1 + args.new_tokens)
        one = min(timed_generate(model, prompt, 1) for _ in range(3))
        many = min(timed_generate(model, prompt, 1 + args.new_tokens) for _ in range(3))
        ops = ops_per_token(model, prompt, args.new_tokens)
        stats = profile(model, prompt, args.new_tokens)
        stats_items = stats.stats.items()
        launches = sum(calls for (file, _, name), (calls, *_) in stats_items if name == "run" and "jit.py" in file)
        print(f"\n## {kind}: {(many - one) / args.new_tokens * 1e3:.2f} ms per token, {sum(ops.values()):.0f} PyTorch "
              f"ops per token, {launches / args.new_tokens:.1f} Triton launches per forward pass")
        print("ops per token: " + ", ".join(f"{name} {count:.1f}" for name, count in ops.most_common(20)))
        text = io.StringIO()
        stats.stream = text
        stats.sort_stats("tottime").print_stats(args.rows)
        print(text.getvalue())
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
