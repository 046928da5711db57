"""Where the default generate() path spends its host time per token: NSA (NsaCache, eager) against Llama
(DynamicCache, eager), seed shape, batch 1, on a GPU.

    python benchmarks/profile_decode_host.py [--context 4096] [--new-tokens 32] > decode_host.txt
    python benchmarks/profile_decode_host.py --timeline --contexts 4096 131072 > decode_timeline.txt

The default path is host-bound (its ms per token is many times its kernel time, bench_generate.py --profile), so
what counts is the host work per token: the PyTorch ops dispatched per decoded token (generate() of 1 + N tokens
minus generate() of 1, over N), the Triton launches per forward pass (prefill and N - 1 steps, 1 + N calls of
`JITFunction.run` counted over N), and cProfile's table of one generate() of 1 + N tokens, prefill included.

`--timeline` profiles NSA's default path (CUDA-graph decoding) instead, at each of `--contexts`: per decoding step
(from one graph replay's launch to the next), its wall time, the GPU's busy time (the union of its kernels and
copies) and idle time, and the host ops that ran while the GPU sat idle: where the time between kernels goes, and
whether it grows with the context.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import itertools
import pstats
from collections import Counter

import torch
from bench_generate import build, per_token_figure, timed_generate
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


_SHORT_GAP_US = 5  # idle stretches shorter than this are launch gaps inside a replayed graph


def _union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def decode_timeline(model, prompt: torch.Tensor, new_tokens: int, rows: int) -> str:
    """Wall, GPU busy and GPU idle time per decoding step of one generate() (steps delimited by the launches of
    the recorded graph), and the host ops overlapping the GPU's idle stretches, by name (microseconds per step)."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        timed_generate(model, prompt, 1 + new_tokens)
    events = prof.events()
    launches = sorted(e.time_range.start for e in events if e.name == "cudaGraphLaunch")
    if len(launches) < 3:
        return f"only {len(launches)} graph launches: the steps did not replay recorded graphs"
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    gpu = sorted((e.time_range.start, e.time_range.end) for e in events if e.device_type == cuda)
    host = [
        e for e in events if e.device_type == cpu and e.name != "cudaGraphLaunch"
        and e.time_range.end > launches[0] and e.time_range.start < launches[-1]
    ]
    walls, busy, short_idle, idle_by_op = [], [], 0.0, Counter()
    for begin, end in itertools.pairwise(launches):
        spans = [(max(a, begin), min(b, end)) for a, b in gpu if b > begin and a < end]
        walls.append(end - begin)
        busy.append(_union_us(spans))
        gaps, cursor = [], begin  # the GPU's idle stretches inside this step
        for a, b in sorted(spans):
            if a > cursor:
                gaps.append((cursor, a))
            cursor = max(cursor, b)
        gaps += [(cursor, end)] if end > cursor else []
        short_idle += sum(b - a for a, b in gaps if b - a < _SHORT_GAP_US)
        for gap_start, gap_end in (gap for gap in gaps if gap[1] - gap[0] >= _SHORT_GAP_US):
            for event in host:
                overlap = min(event.time_range.end, gap_end) - max(event.time_range.start, gap_start)
                if overlap > 0:
                    idle_by_op[event.name] += overlap
    steps = len(walls)
    median, longest = sorted(walls)[steps // 2], max(walls)
    summary = (
        f"{steps} steps: wall {sum(walls) / steps:.1f} us (median {median:.1f}, max {longest:.1f}), GPU busy "
        f"{sum(busy) / steps:.1f} us, GPU idle {(sum(walls) - sum(busy)) / steps:.1f} us per step, of which "
        f"{short_idle / steps:.1f} in gaps under {_SHORT_GAP_US} us (between a graph's kernels)"
    )
    lines = [
        summary,
        "host ops overlapping the GPU's longer idle stretches, us per step (nested ops count in each):",
    ]
    lines += [f"{us / steps:9.1f}  {name[:100]}" for name, us in idle_by_op.most_common(rows)]
    return "\n".join(lines)


def per_token_text(one: float, many: float, new_tokens: int) -> str:
    """ms per token from the best seconds of generate(1) and generate(1 + N), as bench_generate measures it, or why
    there is no figure (the prompt's spread exceeded the decode) rather than a negative one."""
    figure = per_token_figure(one, many, new_tokens)
    if "ms_per_token" in figure:
        return f"{figure['ms_per_token']:.3f} ms per token"
    return f"no figure per token: {figure['no_figure']}"


def timeline_main(args: argparse.Namespace) -> None:
    print(f"# {torch.cuda.get_device_name()}, seed shape, batch 1, NSA default generate() (CUDA-graph decoding)")
    for context in args.contexts:
        model = build("nsa", "seed", context + args.new_tokens + 128)
        prompt = torch.randint(1, 32000, (1, context), device="cuda")
        for _ in range(2):  # warm-up: Triton compiles, the graphs are recorded
            timed_generate(model, prompt, 1 + args.new_tokens)
        one = min(timed_generate(model, prompt, 1) for _ in range(3))
        many = min(timed_generate(model, prompt, 1 + args.new_tokens) for _ in range(3))
        print(f"\n## context {context}: {per_token_text(one, many, args.new_tokens)} (bench_generate's measure), "
              f"prefill {one * 1e3:.1f} ms")
        print(decode_timeline(model, prompt, args.new_tokens, args.rows), flush=True)
        del model
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rows", type=int, default=30, help="functions listed per model")
    parser.add_argument("--timeline", action="store_true", help="NSA's per-step GPU busy and idle time instead")
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 131072], help="with --timeline")
    args = parser.parse_args()
    if args.timeline:
        return timeline_main(args)
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
        print(f"\n## {kind}: {per_token_text(one, many, args.new_tokens)}, {sum(ops.values()):.0f} PyTorch "
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
