"""Training throughput: the seed NSA model vs a dense Llama of the same shape, one GPU, bf16.

    python benchmarks/bench_training.py --out benchmarks/results [--lengths 2048 8192 32768] [--compile]

Both models (hidden 768, 12 layers, 12 heads, 2 KV heads, head dim 64, MLP 2048, vocab 32000) train
with the same loop: fp32 master weights, bf16 autocast, fused AdamW, about `--tokens-per-step` tokens
per step (batch = tokens / length). NSA runs its Triton backend (l=32, d=16, l'=64, n=16, w=512); Llama
runs `LlamaForCausalLM` with SDPA. Reports tokens/s (median of timed steps after warm-up), peak
memory, and the NSA / Llama ratio; `--compile` adds `torch.compile(model)` rows at the first length (NSA with
fullgraph=True) and counts graph breaks;
`--profile` adds, per row, the GPU kernels that take the most time in one step (`training_profile.txt`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
import warnings
from pathlib import Path

import torch
import triton
from torch._dynamo.utils import counters
from transformers import LlamaConfig, LlamaForCausalLM

from nsa_hf import NsaConfig, NsaForCausalLM

SHAPE = dict(
    vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
    num_key_value_heads=2, head_dim=64,
)
NSA = dict(
    compress_block_size=32, compress_stride=16, select_block_size=64, num_selected_blocks=16, num_init_blocks=1,
    num_local_blocks=2, window_size=512, nsa_backend="triton",
)


def build(kind: str, length: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "nsa":
        model = NsaForCausalLM(NsaConfig(**SHAPE, **NSA, max_position_embeddings=length))
    else:
        model = LlamaForCausalLM(LlamaConfig(**SHAPE, max_position_embeddings=length, attn_implementation="sdpa"))
    return model.cuda().train()


def kernel_totals(profiler: torch.profiler.profile) -> dict[str, tuple[float, int]]:
    """GPU kernel time (ms) and launches of a profiled region, by kernel name."""
    totals: dict[str, tuple[float, int]] = {}
    for event in profiler.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            ms, calls = totals.get(event.name, (0.0, 0))
            totals[event.name] = (ms + event.device_time_total / 1e3, calls + 1)
    return totals


def kernel_table(profiler: torch.profiler.profile, rows: int = 40) -> str:
    """The GPU kernels of a profiled step, most time first: total ms, calls, name."""
    totals = kernel_totals(profiler)
    ranked = sorted(totals.items(), key=lambda item: -item[1][0])
    lines = [f"{ms:9.2f} ms {calls:6d}x  {name[:110]}" for name, (ms, calls) in ranked[:rows]]
    return "\n".join([f"{sum(ms for ms, _ in totals.values()):9.2f} ms total GPU time", *lines])


def optimizer_step(step_model: torch.nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor) -> torch.Tensor:
    """One training step as a user runs it: bf16 autocast forward and loss, backward, optimizer step; the loss."""
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = step_model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def measure(kind: str, length: int, tokens_per_step: int, steps: int, warmup: int, compile: str | None,
            profile: bool = False) -> dict:
    """One row: `compile` is None (eager) or a torch.compile mode ("default", "reduce-overhead" = CUDA graphs, ...)."""
    model = build(kind, length)
    # NSA compiles as one graph (its attention is custom ops): fullgraph=True fails on any graph break.
    step_model = torch.compile(model, fullgraph=kind == "nsa", mode=compile) if compile else model
    counters["graph_break"].clear()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
    batch = max(1, tokens_per_step // length)
    generator = torch.Generator(device="cuda").manual_seed(0)

    def train_step(ids: torch.Tensor) -> tuple[float, float]:
        """(loss, seconds the host took to queue the step: near the step time, the GPU waits for the host)."""
        start = time.perf_counter()
        loss = optimizer_step(step_model, optimizer, ids)
        queued = time.perf_counter() - start
        torch.cuda.synchronize()
        return loss.item(), queued

    torch.cuda.reset_peak_memory_stats()
    times, host_times, losses = [], [], []
    for step in range(warmup + steps):
        ids = torch.randint(0, SHAPE["vocab_size"], (batch, length), device="cuda", generator=generator)
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss, queued = train_step(ids)
        losses.append(loss)
        if step >= warmup:
            times.append(time.perf_counter() - start)
            host_times.append(queued)
    with warnings.catch_warnings(record=True) as syncs:  # one step's host syncs, its own final one excluded
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                step_model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        optimizer.zero_grad(set_to_none=True)
    sync_sites = [f"{Path(w.filename).name}:{w.lineno}" for w in syncs if "called a synchronizing" in str(w.message)]
    if profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
            train_step(ids)
    seconds = statistics.median(times)
    row = {
        "model": kind, "length": length, "batch": batch, "compile": compile,
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "step_s": seconds, "host_queue_s": statistics.median(host_times), "tokens_per_s": batch * length / seconds,
        "peak_memory_GiB": torch.cuda.max_memory_allocated() / 2**30, "final_loss": losses[-1],
        "graph_breaks": sum(counters["graph_break"].values()),
        "host_syncs_fwd_bwd": len(sync_sites),
        "host_sync_sites": sorted(set(sync_sites)),
        # cudaMalloc retries free the allocator's cache, which waits for the GPU: a host stall no sync mode sees.
        "alloc_retries": torch.cuda.memory_stats()["num_alloc_retries"],
    }
    if profile:
        row["profile"] = kernel_table(profiler)
    del model, step_model, optimizer
    torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--tokens-per-step", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per row (after --warmup)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per row (with 3, the 2k compiled row measured 188 ms per step against 141 ms with 5)")
    parser.add_argument("--compile", action="store_true", help="add torch.compile rows at the first length")
    parser.add_argument("--compile-modes", nargs="+", default=["default"],
                        help="torch.compile modes of the --compile rows (reduce-overhead: CUDA graphs)")
    parser.add_argument("--models", nargs="+", default=["nsa", "llama"], choices=["nsa", "llama"])
    parser.add_argument("--eager", action=argparse.BooleanOptionalAction, default=True,
                        help="the eager rows (--no-eager: only the --compile rows)")
    parser.add_argument("--profile", action="store_true", help="write each row's top GPU kernels of one step")
    parser.add_argument("--commit", default=None, help="commit measured (when the tree has no .git)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("this benchmark needs a CUDA GPU")
    args.out.mkdir(parents=True, exist_ok=True)
    runs = [(kind, length, None) for length in args.lengths for kind in args.models] if args.eager else []
    if args.compile:
        runs += [(kind, args.lengths[0], mode) for mode in args.compile_modes for kind in args.models]
    rows = []
    for kind, length, compile in runs:
        try:
            row = measure(kind, length, args.tokens_per_step, args.steps, args.warmup, compile, args.profile)
        except Exception as error:  # noqa: BLE001 - a failed row is reported, the others still run
            row = {"model": kind, "length": length, "compile": compile, "error": f"{type(error).__name__}: {error}"[:500]}
            torch.cuda.empty_cache()
        profile = row.pop("profile", None)
        rows.append(row)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        if profile:
            with open(args.out / "training_profile.txt", "a") as file:
                file.write(f"## {kind} length {length} compile {compile}\n{profile}\n\n")
    ratios = {}
    for row in rows:
        dense = next((r for r in rows if r["model"] == "llama" and r["length"] == row["length"]
                      and r["compile"] == row["compile"] and "tokens_per_s" in r), None)
        if row["model"] == "nsa" and dense and "tokens_per_s" in row:
            ratios[f"{row['length']}{'_' + row['compile'] if row['compile'] else ''}"] = row["tokens_per_s"] / dense["tokens_per_s"]
    print("NSA / Llama tokens/s:", json.dumps({k: round(v, 3) for k, v in ratios.items()}))
    commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    record = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "commit": commit or "unknown", "shape": SHAPE, "nsa": NSA, "tokens_per_step": args.tokens_per_step,
              "rows": rows, "nsa_over_llama": ratios}
    (args.out / "training.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
