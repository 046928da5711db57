"""Eager decoding step time of the default NsaCache against context length, on CPU (reference backend, one thread,
one layer): how a step's cost grows with the history. With the history copied every step (torch.cat) it grew with
the context; written in place into room kept ahead (`cache_nsa._HISTORY_ROOM`) it stays near flat.

    python benchmarks/bench_decode_cpu.py [--contexts 4096 32768 131072] > benchmarks/results/decode_cpu.txt
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import time

import torch

from nsa_hf import NsaCache, NsaConfig, NsaForCausalLM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768, 131072])
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = NsaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=64, nsa_backend="reference", fused_kernels="none",
                       max_position_embeddings=max(args.contexts) + args.steps + 1)
    model = NsaForCausalLM(config).eval()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, commit {commit}")
    for context in args.contexts:
        cache = NsaCache(config)
        with torch.no_grad():
            token = model(input_ids=torch.randint(0, 97, (1, context)), cache=cache).logits[:, -1:].argmax(-1)
            times = []
            for _ in range(args.steps):
                start = time.perf_counter()
                token = model(input_ids=token, cache=cache).logits[:, -1:].argmax(-1)
                times.append(time.perf_counter() - start)
        print(f"context {context}: median {sorted(times)[len(times) // 2] * 1e3:.2f} ms per decoding step", flush=True)


if __name__ == "__main__":
    main()
