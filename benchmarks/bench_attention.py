"""NSA attention speed vs dense FlashAttention-2 and fla-core's NSA (BENCHMARKS.md shapes), on a GPU.

    python benchmarks/bench_attention.py --out benchmarks/results [--lengths 8192 ... 131072]

Times (ms, median of CUDA-event timings via triton.testing.do_bench) the whole NSA attention of
`nsa_attention_varlen` with the Triton backend (three branches, block selection and gates; projections
and phi excluded, as for the peers), its parts, dense causal `varlen_attn` (FlashAttention-2 inside
torch), `varlen_attn` with a 512 window, and fla-core `parallel_nsa` where installed (paper shape only,
window_size=0; its whole-NSA time adds the 512-window time). Writes a JSON record and a PNG plot.
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import subprocess
from pathlib import Path

import torch
import triton
from torch.nn.attention.varlen import varlen_attn

from nsa_hf.ops import triton as triton_ops
from nsa_hf.ops.backends import resolve_backend
from nsa_hf.ops.layout import QueryLayout, SparsePattern, num_compressed_blocks
from nsa_hf.ops.layout import branch_ranges, window_intervals

SHAPES = {"paper": (64, 4, 128), "llama": (32, 8, 128), "seed": (12, 2, 64)}
PATTERN = SparsePattern(32, 16, 64, 16, 1, 2, 512)


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def dense(q, k, v, cu, length, window=None):
    params = inspect.signature(varlen_attn).parameters
    kwargs = {"window_size": (window - 1, 0) if window else (-1, 0)} if "window_size" in params else {}
    if k.shape[1] != q.shape[1] and "enable_gqa" not in params:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
    elif "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    return varlen_attn(q, k, v, cu, cu, length, length, **kwargs)


def fla_nsa():
    try:
        from fla.ops.nsa import parallel_nsa
    except ImportError:
        return None
    return parallel_nsa


def measure(shape: str, length: int, backward: bool) -> dict:
    heads_q, heads_kv, dim = SHAPES[shape]
    device, dtype = "cuda", torch.bfloat16
    cu = torch.tensor([0, length], device=device, dtype=torch.int32)
    layout, blocks = QueryLayout.from_cu_seqlens(cu.long(), PATTERN.compress_block_size, PATTERN.compress_stride)
    n_cmp = blocks.token_starts.numel()

    def rand(*s):
        return torch.randn(*s, device=device, dtype=dtype, requires_grad=backward)

    q = rand(length, heads_q, dim)
    k_cmp, v_cmp = rand(n_cmp, heads_kv, dim), rand(n_cmp, heads_kv, dim)
    k_slc, v_slc, k_win, v_win = (rand(length, heads_kv, dim) for _ in range(4))
    gates = torch.rand(length, heads_q, 3, device=device, dtype=dtype, requires_grad=backward)
    scale = dim**-0.5
    nsa = resolve_backend("triton", torch.device(device))
    inputs = (q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates)

    def run(fn, *args):
        if not backward:
            with torch.no_grad():
                return bench(lambda: fn(*args))
        grad = None

        def step():
            nonlocal grad
            out = fn(*args)
            out = out[0] if isinstance(out, tuple) else out
            grad = torch.randn_like(out) if grad is None else grad
            out.backward(grad)

        return bench(step)

    row = {"shape": shape, "T": length, "pass": "fwd+bwd" if backward else "fwd"}
    # The model builds each branch's key ranges once per pass, for all its layers: one layer's attention gets them.
    ranges = branch_ranges(layout, PATTERN)
    row["nsa_ms"] = run(lambda *x: nsa(*x, layout, PATTERN, scale, ranges=ranges), *inputs)
    # Where the time goes: each part alone, in the same pass.
    counts = num_compressed_blocks(layout.positions + 1, 32, 16)
    lo, hi = layout.cmp_offsets, layout.cmp_offsets + counts
    with torch.no_grad():
        _, lse = triton_ops.interval_attention(q, k_cmp, v_cmp, lo, hi, scale)
        idx = triton_ops.select_blocks(q, k_cmp, lse, layout, PATTERN, scale)
        row["select_ms"] = bench(lambda: triton_ops.select_blocks(q, k_cmp, lse, layout, PATTERN, scale))
    starts = torch.where(idx >= 0, idx.long() * 64, -1)
    # The interval calls get the document boundaries, whose query tiles are built once and kept (as the model's
    # layers share them): the parts then time the kernels and their wrappers, not tiling.
    row["cmp_ms"] = run(lambda *x: triton_ops.interval_attention(*x, lo, hi, scale, documents=layout.documents),
                        q, k_cmp, v_cmp)
    row["slc_ms"] = run(lambda *x: triton_ops.block_attention(*x, starts, 64, layout.positions + 1, scale), q, k_slc, v_slc)
    win_lo, win_hi = window_intervals(layout, PATTERN.window_size)
    row["win_ms"] = run(lambda *x: triton_ops.interval_attention(*x, win_lo, win_hi, scale, documents=layout.documents,
                                                                max_readers=PATTERN.window_size)[0], q, k_win, v_win)
    k, v = rand(length, heads_kv, dim), rand(length, heads_kv, dim)
    row["dense_ms"] = run(lambda *x: dense(*x, cu, length), q, k, v)
    row["window512_ms"] = run(lambda *x: dense(*x, cu, length, window=512), q, k, v)
    parallel_nsa = fla_nsa()
    if parallel_nsa is not None and heads_q // heads_kv >= 16:
        gq = [torch.rand(1, length, heads_q, device=device, dtype=dtype) for _ in range(2)]
        row["fla_nsa_ms"] = run(
            lambda *x: parallel_nsa(*x, g_cmp=gq[0], g_slc=gq[1], block_counts=16, block_size=64, window_size=0),
            q[None], k[None], v[None],
        )
        row["fla_nsa_plus_window_ms"] = row["fla_nsa_ms"] + row["window512_ms"]
    row["speedup_vs_dense"] = row["dense_ms"] / row["nsa_ms"]
    return row


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(SHAPES), figsize=(5 * len(SHAPES), 8), squeeze=False)
    for col, shape in enumerate(SHAPES):
        for r, mode in enumerate(("fwd", "fwd+bwd")):
            ax = axes[r][col]
            sel = [x for x in rows if x["shape"] == shape and x["pass"] == mode]
            if not sel:
                continue
            ts = [x["T"] for x in sel]
            for key, label in (("nsa_ms", "nsa-hf (Triton)"), ("dense_ms", "dense FA2 (varlen_attn)"),
                               ("fla_nsa_plus_window_ms", "fla-core NSA + window")):
                if all(key in x for x in sel):
                    ax.plot(ts, [x[key] for x in sel], marker="o", label=label)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{shape} {mode}")
            ax.set_xlabel("T")
            ax.set_ylabel("ms")
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768, 65536, 131072])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--no-backward", action="store_true")
    parser.add_argument("--commit", default=None, help="commit measured (when the tree has no .git, e.g. on the GPU machine)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for shape in args.shapes:
        for length in args.lengths:
            for backward in (False,) if args.no_backward else (False, True):
                row = measure(shape, length, backward)
                rows.append(row)
                print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
                torch.cuda.empty_cache()
    commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    record = {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(), "commit": commit or "unknown", "pattern": PATTERN.__dict__, "rows": rows,
    }
    (args.out / "attention.json").write_text(json.dumps(record, indent=1))
    plot(rows, args.out / "attention.png")


if __name__ == "__main__":
    main()
