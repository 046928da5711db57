"""Where a compiled training step spends its host time (the step is host-bound when the time to queue it nears the
step time): torch.profiler's CPU table for one step of the seed model at 2k x 16, after warm-up.

    python benchmarks/profile_host.py [--eager] > host_profile.txt
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench_training import build, optimizer_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eager", action="store_true", help="profile the eager model instead of the compiled one")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--rows", type=int, default=45)
    args = parser.parse_args()
    model = build("nsa", args.length)
    step_model = model if args.eager else torch.compile(model, fullgraph=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
    ids = torch.randint(0, 32000, (max(1, 32768 // args.length), args.length), device="cuda")

    def step() -> float:
        start = time.perf_counter()
        optimizer_step(step_model, optimizer, ids)
        return time.perf_counter() - start

    for _ in range(6):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        queued = step()
        torch.cuda.synchronize()
    print(f"queued one step in {queued * 1e3:.1f} ms ({'eager' if args.eager else 'compiled'})")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=70))


if __name__ == "__main__":
    main()
