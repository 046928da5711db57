"""A decoding step's compressed entry, per layer, on a GPU: `store_compressed` (phi, the key's RoPE and the write into
the compressed stores, one launch or two for the MLP phi) against what the default decoding step runs without it
(`NsaAttention._store_step`'s fallback: `NsaCompressor` for keys and values, the fused kernels' RoPE
`ops/triton/pointwise.py::apply_rotary`, one launch, as `rotate_all` calls it, and `write_compressed`'s two
scatters), each replayed from a CUDA graph.

    python benchmarks/bench_compressed_entry.py [--shapes seed 1b] [--batches 1 8] [--kinds mlp mean]

Prints microseconds per layer and step (median of `triton.testing.do_bench_cudagraph`).
"""

from __future__ import annotations

import argparse

import torch
import triton
from bench_decode import SHAPES  # this folder is on the path when run from the repo root

from nsa_hf import NsaConfig
from nsa_hf.modeling_nsa import NsaCompressor
from nsa_hf.ops.triton import apply_rotary, store_compressed

BLOCK, SLOTS = 32, 4096  # the compressed block l of NSA's defaults; compressed slots per row


def measure(shape: str, kind: str, batch: int) -> str:
    """One row: the fused entry and the ops it replaces, us per layer and step, and their largest difference."""
    _, heads, dim = SHAPES[shape]
    config = NsaConfig(head_dim=dim, compress_block_size=BLOCK, compression_type=kind)
    phis = [NsaCompressor(config).cuda().to(torch.bfloat16) for _ in "kv"]
    weights = [phi.fused_weights() for phi in phis]
    blocks = [torch.randn(batch, 1, heads, BLOCK, dim, device="cuda", dtype=torch.bfloat16).transpose(-3, -2)
              for _ in "kv"]
    cos, sin = (torch.rand(batch, 1, dim, device="cuda", dtype=torch.bfloat16) for _ in "cs")
    slots = torch.randint(0, SLOTS, (batch, 1), device="cuda")
    stores = [torch.zeros(batch, SLOTS + 1, heads, dim, device="cuda", dtype=torch.bfloat16) for _ in "kv"]
    index = slots[..., None, None].expand(-1, -1, heads, dim)

    def fused() -> None:
        store_compressed(*blocks, *weights, cos, sin, slots, *stores)

    def plain() -> None:  # the Triton RoPE the step would run (`rotate_all`), not PyTorch's four ops
        (keys,) = apply_rotary((phis[0](blocks[0]),), cos, sin)
        stores[0].scatter_(1, index, keys)
        stores[1].scatter_(1, index, phis[1](blocks[1]))

    with torch.no_grad():
        fused()
        got = [s.clone() for s in stores]
        plain()
        error = max((a.float() - b.float()).abs().max().item() for a, b in zip(got, stores, strict=True))
        times = [triton.testing.do_bench_cudagraph(run, return_mode="median") * 1e3 for run in (fused, plain)]
    return f"{shape:5s} {kind:6s} batch {batch:3d}: {times[0]:6.2f} / {times[1]:6.2f} us (max |fused - ops| {error:.3g})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["seed", "1b"], choices=sorted(SHAPES))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--kinds", nargs="+", default=["mlp", "mean"], choices=["mlp", "linear", "mean"])
    args = parser.parse_args()
    print(f"# {torch.cuda.get_device_name()}: us per layer and step (fused / the ops it replaces)")
    for shape in args.shapes:
        for kind in args.kinds:
            for batch in args.batches:
                print(measure(shape, kind, batch), flush=True)


if __name__ == "__main__":
    main()
