"""Bytes of a static NsaCache against a dense static KV cache (transformers' StaticCache) of the same shape and
length, per row, for the generate() benchmark's shapes: the memory target of issue 15 counts the caches, not a
run's peak (which also holds the weights and the prompt's transient tensors). Exact counts of the buffers
NsaStaticCache allocates, made on the meta device (no memory, no GPU):

    python benchmarks/cache_memory.py [--contexts 4096 32768 131072] [--new-tokens 64]

What a static NsaCache holds per layer beyond the dense history (keys and values): the compressed store (one entry
per stride d, so 1/d of the history), a ring of l + r raw tokens (r = max_rollback) for the next compressed block,
and with `branch_kv="independent"` a ring of w + r window tokens; each ring is allocated twice over, so that a read
never wraps. The rings do not grow with the length, so the ratio falls as the context grows.
"""

from __future__ import annotations

import argparse

import torch
from bench_generate import SHAPES  # this folder is on the path when run from the repo root
from transformers import LlamaConfig, StaticCache

from nsa_hf import NsaConfig, NsaStaticCache


def cache_bytes(shape: str, branch_kv: str, max_cache_len: int) -> tuple[int, int]:
    """(NsaStaticCache bytes, StaticCache bytes) for one row of `max_cache_len` tokens in bf16, each cache's
    buffers allocated as its first update would, on the meta device."""
    config = NsaConfig(**SHAPES[shape], branch_kv=branch_kv)
    heads, dim = config.num_key_value_heads, config.head_dim
    nsa = NsaStaticCache(config, max_cache_len=max_cache_len)
    key = torch.empty(1, 1, heads, dim, dtype=torch.bfloat16, device="meta")  # NSA's layout: [B, T, H, D]
    for layer in nsa.layers:
        layer.lazy_initialization(key, key)
    dense = StaticCache(config=LlamaConfig(**SHAPES[shape]), max_cache_len=max_cache_len)
    key = key.transpose(1, 2)  # transformers' layout: [B, H, T, D]
    for layer in dense.layers:
        layer.lazy_initialization(key, key)
    dense_bytes = sum(t.numel() * t.element_size() for layer in dense.layers for t in (layer.keys, layer.values))
    return nsa.nbytes(), dense_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768, 131072])
    parser.add_argument("--new-tokens", type=int, default=64, help="as bench_generate.py's rows: context + 1 + N")
    args = parser.parse_args()
    print("| shape | branch_kv | context | NsaStaticCache MiB | dense static MiB | ratio |")
    print("|---|---|---|---|---|---|")
    for shape in SHAPES:
        for branch_kv in ("independent", "shared"):
            for context in args.contexts:
                nsa, dense = cache_bytes(shape, branch_kv, context + 1 + args.new_tokens)
                print(f"| {shape} | {branch_kv} | {context} | {nsa / 2**20:.1f} | {dense / 2**20:.1f} | "
                      f"{nsa / dense:.3f}x |")


if __name__ == "__main__":
    main()
