"""Where bench_attention.py's time goes: GPU kernel time against the wall time do_bench reports, for any tree.

    PYTHONPATH=TREE/src python benchmarks/kernel_profile.py --tree TREE --lengths 32768 [--backward]

Runs TREE's own `benchmarks/bench_attention.py` (so an older commit's API is measured by its own bench), with its
`bench` function replaced by one that reports both do_bench's median (CUDA events around each call, host gaps
included) and the summed device time of the kernels one call launches (torch.profiler): their difference is the
host work a call waits on. One JSON line per part (nsa, select, cmp, slc, win), the kernels of each sorted by time.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path

import torch
import triton
from torch.profiler import ProfilerActivity, profile


def kernel_times(fn, calls: int = 20) -> tuple[float, Counter]:
    """(ms of kernel time per call, ms per kernel name per call) over `calls` calls after a warm-up."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    per_kernel: Counter = Counter()
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[event.name[:60]] += event.device_time / 1000 / calls
    return sum(per_kernel.values()), per_kernel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", type=Path, required=True, help="a checkout or export whose bench_attention.py runs")
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768])
    parser.add_argument("--backward", action="store_true")
    parser.add_argument("--label", default=None)
    args = parser.parse_args()
    spec = importlib.util.spec_from_file_location("tree_bench", args.tree / "benchmarks" / "bench_attention.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["tree_bench"] = bench
    spec.loader.exec_module(bench)
    found: list[dict] = []

    def measured(fn) -> float:
        wall = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        total, per_kernel = kernel_times(fn)
        found.append({"wall_ms": round(wall, 3), "kernel_ms": round(total, 3),
                      "kernels": {name: round(ms, 3) for name, ms in per_kernel.most_common(12)}})
        return wall

    bench.bench = measured
    parts = ["nsa", "select", "cmp", "slc", "win", "dense", "window512"]
    for length in args.lengths:
        found.clear()
        bench.measure("seed", length, args.backward)
        for part, row in zip(parts, found):
            print(json.dumps({"tree": args.label or str(args.tree), "T": length, "backward": args.backward,
                              "part": part, **row}), flush=True)


if __name__ == "__main__":
    main()
