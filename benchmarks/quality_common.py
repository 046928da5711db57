"""What the quality benchmarks share: the training loop both models run on the same batches, and the models of
one shape (NSA and a Llama with SDPA). Imported by quality_retrieval.py and quality_lm.py (run from the repository
root as `python benchmarks/<script>.py`, so this folder is on the path)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from nsa_hf import NsaConfig, NsaForCausalLM

Batches = Callable[[torch.Generator], Iterator[tuple[torch.Tensor, torch.Tensor]]]


def build(kind: str, shape: dict, nsa_geometry: dict, nsa_backend: str, seed: int) -> torch.nn.Module:
    """NSA (`kind="nsa"`) or a Llama with SDPA of the same `shape` (NsaConfig / LlamaConfig size fields)."""
    torch.manual_seed(seed)
    if kind == "nsa":
        return NsaForCausalLM(NsaConfig(**shape, **nsa_geometry, nsa_backend=nsa_backend))
    return LlamaForCausalLM(LlamaConfig(**shape, attn_implementation="sdpa"))


def train(model: torch.nn.Module, batches: Batches, steps: int, lr: float, seed: int, device: str,
          bf16: bool = True) -> list[float]:
    """AdamW with a one-cycle schedule over `steps` batches of `batches(generator)` (the same seed gives every model
    the same batches), bf16 autocast on CUDA (unless `bf16=False`), gradients clipped at 1; returns about 20 logged
    losses (each printed with the time spent and an estimate of the time left)."""
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.05)
    stream = batches(torch.Generator().manual_seed(seed))
    losses = []
    start = time.perf_counter()
    for step in range(steps):
        ids, labels = (t.to(device) for t in next(stream))
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16 and device == "cuda"):
            loss = model(input_ids=ids, labels=labels, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % max(1, steps // 20) == 0 or step == steps - 1:
            losses.append(loss.item())
            spent = time.perf_counter() - start
            print(f"{type(model).__name__} step {step} tokens {ids.numel()} loss {losses[-1]:.3f} "
                  f"({spent:.0f} s, about {spent / (step + 1) * (steps - step - 1):.0f} s left)", flush=True)
    return losses
