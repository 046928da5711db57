"""Per-step decode attention: NSA (Triton backend) over an NsaCache-shaped store vs dense decode, on a GPU.

    python benchmarks/bench_decode.py --out benchmarks/results [--contexts 8192 ... 131072] [--batches 1 32]

One new token per row attends to a context of S tokens. NSA reads the compressed store, the n selected
blocks and the window; dense decode (SDPA with GQA, one query per row) reads all S. NSA runs twice: composed from
the backend's primitives (`nsa_ms`) and as the three-launch decode kernel (`fused_ms`, `ops/triton/decode.py`).
Reports ms per step, the bytes each must move (K and V read once: the floor), achieved GB/s, and the
measured device-to-device copy bandwidth for reference.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from nsa_hf.ops.backends import resolve_backend
from nsa_hf.ops.layout import QueryLayout, SparsePattern, num_compressed_blocks
from nsa_hf.ops.triton.decode import decode_attention

SHAPES = {"paper": (64, 4, 128), "llama": (32, 8, 128), "seed": (12, 2, 64), "1b": (16, 4, 128)}
PATTERN = SparsePattern(32, 16, 64, 16, 1, 2, 512)


def copy_bandwidth() -> float:
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), return_mode="median")
    return 2 * x.numel() / ms / 1e6  # GB/s, read + write


def nsa_keys_read(pattern: SparsePattern, context: int) -> int:
    """Keys (and values) one NSA query reads at `context` tokens, per key head: its compressed blocks, n selected
    blocks of l' tokens and the window, each at most the context."""
    n_cmp = num_compressed_blocks(context, pattern.compress_block_size, pattern.compress_stride)
    selected = min(context, pattern.num_selected_blocks * pattern.select_block_size)
    return n_cmp + selected + min(context, pattern.window_size)


def decode_inputs(shape: str, context: int, batch: int) -> tuple:
    """(q, k_cmp, v_cmp, k, v, gates, layout) of one decoding step over an NsaCache-shaped store: random K/V, every
    row at `context` tokens, the selection and window branches reading the same K/V."""
    heads_q, heads_kv, dim = SHAPES[shape]
    dtype, device = torch.bfloat16, "cuda"
    n_cmp = num_compressed_blocks(context, PATTERN.compress_block_size, PATTERN.compress_stride)
    rows = torch.arange(batch, device=device)
    layout = QueryLayout(
        positions=torch.full((batch,), context - 1, device=device),
        key_offsets=rows * context, cmp_offsets=rows * n_cmp, window_offsets=rows * context, run_length=1,
    )
    q = torch.randn(batch, heads_q, dim, device=device, dtype=dtype)
    k = torch.randn(batch * context, heads_kv, dim, device=device, dtype=dtype)
    v = torch.randn_like(k)
    k_cmp = torch.randn(batch * n_cmp, heads_kv, dim, device=device, dtype=dtype)
    v_cmp = torch.randn_like(k_cmp)
    gates = torch.rand(batch, heads_q, 3, device=device, dtype=dtype)
    return q, k_cmp, v_cmp, k, v, gates, layout


def decode_step(shape: str, context: int, batch: int):
    """One decoding step (`decode_inputs`): the composed and the fused step as closures, and the tensors dense
    decode reads."""
    q, k_cmp, v_cmp, k, v, gates, layout = decode_inputs(shape, context, batch)
    dim = q.shape[-1]
    nsa = resolve_backend("triton", torch.device("cuda"))

    def step():
        return nsa(q, k_cmp, v_cmp, k, v, k, v, gates, layout, PATTERN, dim**-0.5)

    def fused_step():
        return decode_attention(q, k_cmp, v_cmp, k, v, k, v, gates, layout, PATTERN, dim**-0.5)

    return step, fused_step, q, k, v


def eager_and_graph_ms(step) -> tuple[float, float]:
    """ms per call of `step` as called, and captured in a CUDA graph: kernel time without launch overhead (capture
    also proves the step has no host sync)."""
    eager_ms = triton.testing.do_bench(step, return_mode="median")
    step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return eager_ms, triton.testing.do_bench(graph.replay, return_mode="median")


def measure(shape: str, context: int, batch: int) -> dict:
    heads_q, heads_kv, dim = SHAPES[shape]
    step, fused_step, q, k, v = decode_step(shape, context, batch)
    nsa_ms, nsa_graph_ms = eager_and_graph_ms(step)
    fused_ms, fused_graph_ms = eager_and_graph_ms(fused_step)
    torch.testing.assert_close(fused_step(), step(), rtol=2e-2, atol=2e-2)  # the two paths compute one thing
    # Dense decode over the same cache: SDPA with GQA (no expanded copy of K/V), one query per row.
    qd = q.view(batch, heads_q, 1, dim)
    kd, vd = (x.view(batch, context, heads_kv, dim).transpose(1, 2) for x in (k, v))
    dense_ms = triton.testing.do_bench(
        lambda: F.scaled_dot_product_attention(qd, kd, vd, enable_gqa=True), return_mode="median"
    )
    row_bytes = 2 * heads_kv * dim * 2  # K and V, bf16, per token per row
    nsa_bytes, dense_bytes = batch * nsa_keys_read(PATTERN, context) * row_bytes, batch * context * row_bytes
    return {
        "shape": shape, "context": context, "batch": batch, "nsa_ms": nsa_ms, "nsa_graph_ms": nsa_graph_ms,
        "fused_ms": fused_ms, "fused_graph_ms": fused_graph_ms,
        "dense_ms": dense_ms, "speedup": dense_ms / nsa_ms, "speedup_graph": dense_ms / nsa_graph_ms, "nsa_floor_bytes": nsa_bytes, "dense_bytes": dense_bytes,
        "nsa_GBps": nsa_bytes / nsa_graph_ms / 1e6, "dense_GBps": dense_bytes / dense_ms / 1e6,
    }


def profile_step(shape: str, context: int, batch: int) -> str:
    """Kernel-by-kernel CUDA time of one eager decode step (torch.profiler), as a table."""
    step, *_ = decode_step(shape, context, batch)  # the composed step: its kernels one by one
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=40)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 65536, 131072])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--shapes", nargs="+", default=["paper"], choices=list(SHAPES))
    parser.add_argument("--commit", default=None, help="commit measured (when the tree has no .git, e.g. on the GPU machine)")
    parser.add_argument("--profile", action="store_true", help="also print the kernels of one step at 64k, batch 1 and 32")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    bandwidth = copy_bandwidth()
    print(f"device copy bandwidth: {bandwidth:.0f} GB/s", flush=True)
    rows = []
    for shape in args.shapes:
        for batch in args.batches:
            for context in args.contexts:
                row = measure(shape, context, batch)
                row["nsa_fraction_of_copy_bw"] = row["nsa_GBps"] / bandwidth
                rows.append(row)
                print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
                torch.cuda.empty_cache()
    commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    record = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "commit": commit or "unknown", "copy_GBps": bandwidth, "pattern": PATTERN.__dict__, "rows": rows}
    (args.out / "decode.json").write_text(json.dumps(record, indent=1))
    if args.profile:
        for batch in args.batches:
            print(f"one eager step, {args.shapes[0]} shape, context 65536, batch {batch}:")
            print(profile_step(args.shapes[0], 65536, batch), flush=True)


if __name__ == "__main__":
    main()
