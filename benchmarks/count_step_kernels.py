"""The work one decoding step over an `NsaStaticCache` queues: what generate()'s default path records as a CUDA graph
and replays per token, so each item costs GPU time (a replayed kernel takes 1-3 us even when it moves a few bytes).

    TRITON_INTERPRET=1 python benchmarks/count_step_kernels.py [--layers 12] [--by-line] > step_kernels.txt

Runs on the CPU (Triton through its interpreter, the seed model's layer count at a tiny width: the count does not
depend on the width): PyTorch ops that do work (views and allocations left out), by op or by source line of nsa_hf,
and Triton launches by kernel, for one one-token step after a 40-token prompt.
"""

from __future__ import annotations

import argparse
import traceback
from collections import Counter

import torch
import triton.runtime.interpreter as interpreter
from torch.utils._python_dispatch import TorchDispatchMode

from nsa_hf import NsaConfig, NsaForCausalLM, NsaStaticCache

# Ops that only make views or uninitialized tensors: no kernel.
NO_WORK = {
    "view", "t", "expand", "unsqueeze", "squeeze", "slice", "_unsafe_view", "transpose", "permute", "select",
    "split_with_sizes", "split", "unbind", "alias", "as_strided", "empty", "new_empty", "empty_strided", "detach",
}


class _CountWork(TorchDispatchMode):
    def __init__(self, by_line: bool) -> None:
        super().__init__()
        self.by_line = by_line
        self.in_triton = 0  # the interpreter runs a kernel's body as PyTorch ops: those are the launch, counted once
        self.ops: Counter = Counter()
        self.launches: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.in_triton and name not in NO_WORK:
            if self.by_line:
                frames = [f for f in traceback.extract_stack() if "nsa_hf" in f.filename]
                name += f" @ {frames[-1].filename.split('nsa_hf/')[-1]}:{frames[-1].lineno}" if frames else ""
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--by-line", action="store_true", help="count PyTorch ops by the nsa_hf line that issues them")
    args = parser.parse_args()
    config = NsaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=args.layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, compress_block_size=8, compress_stride=4, select_block_size=16,
        num_selected_blocks=3, num_init_blocks=1, num_local_blocks=1, window_size=16, nsa_backend="triton",
        fused_kernels="triton", pad_token_id=0,
    )
    torch.manual_seed(0)
    model = NsaForCausalLM(config).eval()
    cache = NsaStaticCache(config, max_cache_len=128)
    counter = _CountWork(args.by_line)
    launch = interpreter.GridExecutor.__call__

    def counted_launch(executor, *call_args, **call_kwargs):
        counter.launches[executor.fn.__name__] += 1
        counter.in_triton += 1
        try:
            return launch(executor, *call_args, **call_kwargs)
        finally:
            counter.in_triton -= 1

    interpreter.GridExecutor.__call__ = counted_launch
    with torch.no_grad():
        model(input_ids=torch.randint(1, 128, (1, 40)), cache=cache)
        step = torch.randint(1, 128, (1, 1))
        model._step_logits(cache, step)  # the warm-up step generate() runs before recording
        counter.launches.clear()
        with counter:
            model._step_logits(cache, step)
    ops, launches = sum(counter.ops.values()), sum(counter.launches.values())
    print(f"{args.layers} layers: {ops} PyTorch ops and {launches} Triton launches per step ({ops + launches} in all)")
    for name, count in counter.ops.most_common():
        print(f"{count:6d}  {name}")
    for name, count in counter.launches.most_common():
        print(f"{count:6d}  triton {name}")


if __name__ == "__main__":
    main()
