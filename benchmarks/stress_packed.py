"""Stress the Triton training path with packed batches of short documents (GPU): forward and backward
of a G=6 model on random document lengths, each checked against the reference backend's loss.

    python benchmarks/stress_packed.py [--batches 40]
"""

from __future__ import annotations

import argparse
import random

import torch

from nsa_hf import NsaConfig, NsaForCausalLM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=40)
    args = parser.parse_args()
    config = NsaConfig(vocab_size=512, hidden_size=768, intermediate_size=512, num_hidden_layers=2, num_attention_heads=12,
                       num_key_value_heads=2, head_dim=64, window_size=512, num_selected_blocks=16, nsa_backend="triton")
    torch.manual_seed(0)
    model = NsaForCausalLM(config).cuda().to(torch.bfloat16).train()
    rng = random.Random(0)
    for step in range(args.batches):
        lengths = [rng.choice([1, 2, 5, 15, 31, 32, 33, 47, 63, 64, 65, 100, 130, 300, 700]) for _ in range(rng.randint(1, 8))]
        cu = torch.tensor([0] + lengths).cumsum(0).cuda()
        position_ids = torch.cat([torch.arange(n) for n in lengths]).cuda()[None]
        ids = torch.randint(0, 512, (1, sum(lengths)), device="cuda")
        config.nsa_backend, config.fused_kernels = "triton", "triton"
        out = model(ids, labels=ids, position_ids=position_ids, cu_seq_lens_q=cu, use_cache=False)
        out.loss.backward()
        torch.cuda.synchronize()
        with torch.no_grad():
            config.nsa_backend, config.fused_kernels = "reference", "none"
            ref = model(ids, labels=ids, position_ids=position_ids, cu_seq_lens_q=cu, use_cache=False).loss
        print(step, lengths, f"{out.loss.item():.4f} {ref.item():.4f}", flush=True)
        model.zero_grad(set_to_none=True)


if __name__ == "__main__":
    main()
