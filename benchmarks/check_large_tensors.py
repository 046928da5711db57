"""Proof on a GPU that the Triton backend runs tensors past 2**31 elements (its kernels add int32 offsets to
int64 bases, and cut row-wise launches into chunks below 2**31 elements).

    python benchmarks/check_large_tensors.py --out benchmarks/results [--parts prefill cross_entropy primitives]

- prefill: NsaForCausalLM of a 1B shape (hidden 2048, 16 layers, 16 heads, 4 KV heads, head dim 128, MLP 5632,
  vocab 32000; random weights, bf16, Triton backend, eval, no grad) prefills 8 x 32768 tokens as generate() does
  (use_cache=True, logits_to_keep=1), where SwiGLU's gate_up holds 8 * 32768 * 11264 = 2.95e9 elements; then
  LlamaForCausalLM of the same shape. Seconds (after a 4k-token warm-up that compiles the kernels), peak memory,
  finite logits, and the last row's logits against that row prefilled alone (below the limit: one launch each).
- cross_entropy: the fused cross entropy over bf16 logits [131072, 150000] (19.7e9 elements), forward and
  backward, against F.cross_entropy in fp32 chunk by chunk: every loss, their mean, and the gradient of
  sampled rows (among them the first rows past 2**31 elements).
- primitives: RMSNorm, RoPE, silu_mul and the gate mix on tensors just past 2**31 elements, forward and
  backward, against the same op on slices of them; interval attention, block attention (both forward
  strategies), block selection and a decoding step over a key store past 2**31 elements (queries past it
  too), against the same call on one document's slice (the last document starts at element 2**31 of k).

Each check runs on its own (an error is recorded, and the others still run); large_tensors.json under --out
holds every number, and a table is printed. `--smoke` runs the same code at tiny sizes with the launch limit
lowered to match (on a CPU: the Triton interpreter): it checks this script, not int32 addressing.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import subprocess
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
import triton
from torch import Tensor
from transformers import LlamaConfig, LlamaForCausalLM

from nsa_hf import NsaConfig, NsaForCausalLM
from nsa_hf.ops import triton as triton_ops
from nsa_hf.ops.layout import QueryLayout, SparsePattern
from nsa_hf.ops.triton import block as triton_block
from nsa_hf.ops.triton import common as triton_common


@dataclasses.dataclass(frozen=True)
class Scale:
    limit: int  # elements one launch addresses with int32 offsets (the kernels' _LAUNCH_ELEMENTS)
    shape: dict  # model shape, NSA and Llama alike
    pattern: SparsePattern  # NSA hyperparameters of the model and of the attention checks
    batch: int  # prefill rows
    seq: int  # prefill tokens per row
    ce_rows: int
    ce_vocab: int
    ce_chunk: int  # rows per fp32 reference chunk
    doc: int  # tokens per document of the attention store
    heads_q: int
    heads_kv: int
    dim: int
    slice_rows: int  # rows compared per slice of a pointwise op


FULL = Scale(
    limit=2**31,
    shape=dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
               num_attention_heads=16, num_key_value_heads=4, head_dim=128),
    pattern=SparsePattern(32, 16, 64, 16, 1, 2, 512),
    batch=8, seq=32768, ce_rows=131072, ce_vocab=150000, ce_chunk=4096, doc=32768, heads_q=8, heads_kv=4, dim=128,
    slice_rows=4096,
)
SMOKE = Scale(
    limit=2**14,
    shape=dict(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16),
    pattern=SparsePattern(8, 4, 16, 3, 1, 1, 12),
    batch=2, seq=160, ce_rows=40, ce_vocab=500, ce_chunk=16, doc=256, heads_q=4, heads_kv=2, dim=16, slice_rows=24,
)
BF16_TOL = 2e-2  # max error relative to the expected tensor's largest magnitude
PREFILL_TOL = 5e-2  # a row prefilled with others or alone: other GEMM shapes, 16 layers of bf16 rounding


@dataclasses.dataclass(frozen=True)
class Env:
    scale: Scale
    device: torch.device
    dtype: torch.dtype


# ---------------------------------------------------------------------------------------------- utilities


def synchronize(env: Env) -> None:
    if env.device.type == "cuda":
        torch.cuda.synchronize()


def timed(env: Env, fn: Callable[[], object]) -> tuple[float, object]:
    synchronize(env)
    start = time.perf_counter()
    result = fn()
    synchronize(env)
    return time.perf_counter() - start, result


def peak_gib(env: Env) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if env.device.type == "cuda" else None


def reset_peak(env: Env) -> None:
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def free_memory(env: Env) -> None:
    gc.collect()
    if env.device.type == "cuda":
        torch.cuda.empty_cache()


def compare(actual: Tensor, expected: Tensor, tol: float = BF16_TOL) -> dict:
    """Max |actual - expected| relative to max |expected| (at least 1), bitwise equality, and a verdict."""
    actual, expected = actual.float(), expected.float()
    finite = bool(torch.isfinite(actual).all())
    error = (actual - expected).abs().max().item() / max(expected.abs().max().item(), 1.0) if expected.numel() else 0.0
    return {"rel_err": error, "bitwise_equal": torch.equal(actual, expected), "ok": finite and error <= tol}


def verdict(comparisons: dict[str, dict]) -> dict:
    return {"ok": all(c["ok"] for c in comparisons.values()), "compared": comparisons}


def randn(env: Env, *shape: int, grad: bool = False) -> Tensor:
    return torch.randn(*shape, device=env.device, dtype=env.dtype).requires_grad_(grad)


def edge_slices(rows: int, width: int) -> list[tuple[int, int]]:
    """The first and last `width` rows: the last ones lie past 2**31 elements, in the last launch."""
    return [(0, width), (rows - width, rows)]


def leaf(x: Tensor) -> Tensor:
    return x.detach().requires_grad_()


# ---------------------------------------------------------------------------------------------- prefill


def build_model(env: Env, kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    shape = dict(env.scale.shape, max_position_embeddings=env.scale.seq)
    if kind == "nsa":
        pattern = dataclasses.asdict(env.scale.pattern)
        config = NsaConfig(**shape, **pattern, nsa_backend="triton")
        cls = NsaForCausalLM
    else:
        config, cls = LlamaConfig(**shape, attn_implementation="sdpa"), LlamaForCausalLM
    with torch.device(env.device):
        model = cls(config)
    return model.to(env.dtype).eval()


def check_prefill(env: Env, kind: str) -> dict:
    """generate()'s prefill of batch x seq tokens, timed after a warm-up; the last row against itself alone."""
    scale = env.scale
    model = build_model(env, kind)
    generator = torch.Generator(env.device).manual_seed(0)
    ids = torch.randint(0, scale.shape["vocab_size"], (scale.batch, scale.seq), device=env.device, generator=generator)
    with torch.no_grad():
        warmup_s, _ = timed(env, lambda: model(ids[:1, : min(scale.seq, 4096)], use_cache=True, logits_to_keep=1))
        free_memory(env)
        reset_peak(env)
        seconds, out = timed(env, lambda: model(ids, use_cache=True, logits_to_keep=1))
        peak = peak_gib(env)
        logits = out.logits.float()
        del out
        free_memory(env)
        alone = model(ids[-1:], use_cache=True, logits_to_keep=1).logits.float()
    last_row = compare(logits[-1:], alone, PREFILL_TOL)
    finite = bool(torch.isfinite(logits).all())
    # NSA's MLP runs one stacked gate/up projection, the tensor past 2**31 elements; Llama's runs two halves.
    mlp_width = (2 if kind == "nsa" else 1) * scale.shape["intermediate_size"]
    return {
        "ok": finite and last_row["ok"], "seconds": seconds, "peak_gib": peak, "warmup_s": warmup_s,
        "tokens": scale.batch * scale.seq, "largest_mlp_elements": scale.batch * scale.seq * mlp_width,
        "logits_shape": list(logits.shape), "finite": finite, "last_row_vs_alone": last_row,
    }


# ---------------------------------------------------------------------------------------------- cross entropy


def cross_entropy_reference(logits: Tensor, labels: Tensor, chunk: int) -> Tensor:
    """F.cross_entropy per row in fp32, chunk by chunk (an fp32 copy of all the logits would not fit)."""
    losses = torch.empty(labels.shape, device=logits.device, dtype=torch.float32)
    for start in range(0, labels.numel(), chunk):
        rows = slice(start, start + chunk)
        losses[rows] = F.cross_entropy(logits[rows].float(), labels[rows], reduction="none")
    return losses


def sampled_rows(rows: int, vocab: int, limit: int, generator: torch.Generator) -> Tensor:
    """The first and last rows, the first rows whose logits start past `limit` elements, and random rows."""
    past = limit // vocab + 1
    fixed = torch.tensor([0, 1, past - 1, past, rows - 1])
    return torch.cat([fixed, torch.randint(0, rows, (59,), generator=generator)]).unique()


def gradient_reference(logits: Tensor, labels: Tensor, grad: Tensor) -> Tensor:
    """d(loss_r)/d(logits_r) * grad_r in fp32: softmax - onehot(label), 0 on ignored rows."""
    probs = torch.softmax(logits.float(), dim=-1)
    ignored = labels == -100
    probs[torch.arange(labels.numel(), device=labels.device), labels.clamp(min=0)] -= (~ignored).float()
    return probs * torch.where(ignored, 0.0, grad)[:, None]


def check_cross_entropy(env: Env) -> dict:
    scale = env.scale
    generator = torch.Generator(env.device).manual_seed(0)
    logits = torch.randn(scale.ce_rows, scale.ce_vocab, device=env.device, dtype=env.dtype, generator=generator)
    logits.requires_grad_()
    labels = torch.randint(0, scale.ce_vocab, (scale.ce_rows,), device=env.device, generator=generator)
    labels[::7] = -100
    grad_out = torch.rand(scale.ce_rows, device=env.device, generator=generator)
    forward_s, losses = timed(env, lambda: triton_ops.cross_entropy(logits, labels))
    backward_s, (d_logits,) = timed(env, lambda: torch.autograd.grad(losses, logits, grad_out))
    peak = peak_gib(env)
    logits, losses = logits.detach(), losses.detach()
    mean = losses.sum() / (labels != -100).sum()  # the model's loss reduction
    expected = cross_entropy_reference(logits, labels, scale.ce_chunk)
    rows = sampled_rows(scale.ce_rows, scale.ce_vocab, scale.limit, torch.Generator().manual_seed(0)).to(env.device)
    grad_ref = gradient_reference(logits[rows], labels[rows], grad_out[rows])
    grad = d_logits[rows].float()
    # bf16 rounds the fp32 gradient to 2**-9 of its magnitude: 2**-7 leaves room for fp32 exp differences.
    grad_rel = ((grad - grad_ref).abs() / grad_ref.abs().clamp(min=1e-30)).max().item()
    loss_err = (losses - expected).abs().max().item()
    mean_err = abs(mean.item() - (expected.sum() / (labels != -100).sum()).item())
    return {
        "ok": bool(torch.isfinite(losses).all()) and loss_err <= 1e-3 and mean_err <= 1e-4 and grad_rel <= 2**-7,
        "elements": logits.numel(), "forward_s": forward_s, "backward_s": backward_s, "peak_gib": peak,
        "loss_max_abs_err": loss_err, "mean_loss": mean.item(), "mean_abs_err": mean_err,
        "sampled_rows": rows.tolist(), "grad_max_rel_err": grad_rel, "grad_dtype": str(d_logits.dtype),
    }


# ---------------------------------------------------------------------------------------------- pointwise ops


def rows_past_limit(limit: int, row_elements: int, extra: int = 64) -> int:
    """Rows of `row_elements` elements just past `limit` elements in all."""
    return limit // row_elements + extra


def check_on_slices(env: Env, fn: Callable[..., Tensor], inputs: list[Tensor], rows: int) -> dict:
    """fn's output and the gradients of its inputs (the ones that require grad) on the whole tensors, against
    fn on the first and last `slice_rows` rows (rows are independent: each slice is the same computation)."""
    out = fn(*inputs)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x for x in inputs if x.requires_grad], grad_out)
    comparisons = {}
    for a, b in edge_slices(rows, env.scale.slice_rows):
        sliced = [leaf(x[a:b]) if x.requires_grad else x[a:b] for x in inputs]
        out_slice = fn(*sliced)
        grads_slice = torch.autograd.grad(out_slice, [x for x in sliced if x.requires_grad], grad_out[a:b])
        comparisons[f"out[{a}:{b}]"] = compare(out[a:b], out_slice)
        for i, (grad, grad_slice) in enumerate(zip(grads, grads_slice)):
            comparisons[f"grad{i}[{a}:{b}]"] = compare(grad[a:b], grad_slice)
    return verdict(comparisons) | {"elements": max(x.numel() for x in inputs)}


def check_rms_norm(env: Env) -> dict:
    width = env.scale.shape["hidden_size"]
    rows = rows_past_limit(env.scale.limit, width)
    x = randn(env, rows, width, grad=True)
    weight = (1 + torch.randn(width, device=env.device) / 4).to(env.dtype)
    result = check_on_slices(env, lambda x: triton_ops.rms_norm(x, weight, 1e-6), [x], rows)
    # The weight's gradient sums every row: against fp32 sums over chunks of rows, from the same rounded x_hat.
    weight = leaf(weight)
    out = triton_ops.rms_norm(x.detach(), weight, 1e-6)
    grad_out = torch.randn_like(out)
    (d_weight,) = torch.autograd.grad(out, weight, grad_out)
    expected = torch.zeros(width, device=env.device)
    for start in range(0, rows, 65536):
        chunk = x.detach()[start : start + 65536].float()
        x_hat = (chunk * torch.rsqrt(chunk.pow(2).mean(-1, keepdim=True) + 1e-6)).to(env.dtype).float()
        expected += (grad_out[start : start + 65536].float() * x_hat).sum(0)
    result["compared"]["d_weight"] = compare(d_weight, expected)
    return result | {"ok": result["ok"] and result["compared"]["d_weight"]["ok"]}


def check_rotary(env: Env) -> dict:
    """q and two key tensors sliced from one stacked projection, as the model rotates them; q alone passes the limit."""
    shape = env.scale.shape
    heads_q, heads_kv, dim = shape["num_attention_heads"], shape["num_key_value_heads"], shape["head_dim"]
    rows = rows_past_limit(env.scale.limit, heads_q * dim)
    bounds = [0, heads_q * dim, (heads_q + heads_kv) * dim, (heads_q + 2 * heads_kv) * dim]
    stacked = randn(env, rows, bounds[-1], grad=True)
    angles = torch.rand(rows, dim // 2, device=env.device).repeat(1, 2) * 100
    cos, sin = angles.cos().to(env.dtype), angles.sin().to(env.dtype)

    def rotate(stacked: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        xs = tuple(stacked[:, a:b].unflatten(-1, (-1, dim)) for a, b in zip(bounds, bounds[1:]))
        return torch.cat([out.flatten(1) for out in triton_ops.apply_rotary(xs, cos, sin)], dim=1)

    return check_on_slices(env, rotate, [stacked, cos, sin], rows)


def check_silu_mul(env: Env) -> dict:
    width = env.scale.shape["intermediate_size"]
    rows = rows_past_limit(env.scale.limit, 2 * width)
    gate_up = randn(env, rows, 2 * width, grad=True)
    return check_on_slices(env, lambda x: triton_ops.silu_mul(x, width), [gate_up], rows)


def check_gate(env: Env) -> dict:
    heads, dim = env.scale.shape["num_attention_heads"], env.scale.shape["head_dim"]
    rows = rows_past_limit(env.scale.limit, heads * dim)
    inputs = [randn(env, rows, heads, dim, grad=True) for _ in range(3)]
    inputs.append(torch.rand(rows, heads, 3, device=env.device, dtype=env.dtype, requires_grad=True))
    return check_on_slices(env, triton_ops.gate_branches, inputs, rows)


# ---------------------------------------------------------------------------------------------- attention


@dataclasses.dataclass
class Store:
    """Documents of `doc` tokens, enough that k and v pass `limit` elements (q, with more heads, passes it too);
    the last document's keys start at element `limit` of k or past it."""

    q: Tensor  # [N, HQ, D]
    k: Tensor  # [N, H, D]
    v: Tensor
    layout: QueryLayout
    starts: Tensor  # [N, H, n] int32: distinct causal blocks of each query's document
    docs: int

    @property
    def last(self) -> tuple[int, int]:
        return self.q.shape[0] - int(self.layout.documents[1]), self.q.shape[0]


def build_store(env: Env) -> Store:
    scale, pattern = env.scale, env.scale.pattern
    docs = scale.limit // (scale.doc * scale.heads_kv * scale.dim) + 1
    tokens = docs * scale.doc
    cu = torch.arange(docs + 1) * scale.doc
    layout, _ = QueryLayout.from_cu_seqlens(cu, pattern.compress_block_size, pattern.compress_stride, device=env.device)
    current = (layout.positions // pattern.select_block_size)[:, None, None]
    slots = torch.arange(pattern.num_selected_blocks, device=env.device)
    jitter = torch.randint(0, 4, (tokens, scale.heads_kv, pattern.num_selected_blocks), device=env.device)
    blocks = current - 4 * slots - jitter  # slot j in [current - 4j - 3, current - 4j]: distinct
    starts = torch.where(blocks >= 0, layout.key_offsets[:, None, None] + blocks * pattern.select_block_size, -1)
    return Store(
        q=randn(env, tokens, scale.heads_q, scale.dim), k=randn(env, tokens, scale.heads_kv, scale.dim),
        v=randn(env, tokens, scale.heads_kv, scale.dim), layout=layout, starts=starts.int(), docs=docs,
    )


def window(store: Store, window_size: int) -> tuple[Tensor, Tensor]:
    layout = store.layout
    lo = layout.key_offsets + (layout.positions - window_size + 1).clamp(min=0)
    return lo, layout.key_offsets + layout.positions + 1


def local_starts(starts: Tensor, first_key: int) -> Tensor:
    return torch.where(starts >= 0, starts - first_key, -1)


def attention_grads(out: Tensor, inputs: tuple[Tensor, ...], grad_out: Tensor) -> tuple[Tensor, ...]:
    return torch.autograd.grad(out, inputs, grad_out)


def compare_doc(comparisons: dict, name: str, full: tuple[Tensor, ...], sliced: tuple[Tensor, ...],
                rows: slice) -> None:
    for label, whole, part in zip(("o", "dq", "dk", "dv"), full, sliced):
        comparisons[f"{name} {label}"] = compare(whole[rows], part)


def check_interval(env: Env, store: Store) -> dict:
    """Sliding-window interval attention over every document, forward and backward, against the first and last
    document alone."""
    scale = env.scale.dim**-0.5
    lo, hi = window(store, env.scale.pattern.window_size)
    q, k, v = leaf(store.q), leaf(store.k), leaf(store.v)
    seconds, (o, lse) = timed(env, lambda: triton_ops.interval_attention(q, k, v, lo, hi, scale,
                                                                             documents=store.layout.documents))
    grad_out = torch.randn_like(o)
    backward_s, grads = timed(env, lambda: attention_grads(o, (q, k, v), grad_out))
    comparisons = {}
    for a, b in edge_slices(q.shape[0], env.scale.doc):
        qs, ks, vs = leaf(store.q[a:b]), leaf(store.k[a:b]), leaf(store.v[a:b])
        o_s, lse_s = triton_ops.interval_attention(qs, ks, vs, lo[a:b] - a, hi[a:b] - a, scale,
                                                       documents=(0, b - a))
        grads_s = attention_grads(o_s, (qs, ks, vs), grad_out[a:b])
        compare_doc(comparisons, f"[{a}:{b}]", (o, *grads), (o_s, *grads_s), slice(a, b))
        comparisons[f"[{a}:{b}] lse"] = compare(lse[a:b], lse_s)
    return verdict(comparisons) | {"forward_s": seconds, "backward_s": backward_s}


def check_block(env: Env, store: Store) -> dict:
    """Query-centric block attention over every query (q past the launch limit: query chunks) and a store past
    2**31 elements, forward and backward, against the first and last document alone."""
    pattern, scale = env.scale.pattern, env.scale.dim**-0.5
    _, hi = window(store, 1)
    q, k, v = leaf(store.q), leaf(store.k), leaf(store.v)

    def attend(q: Tensor, k: Tensor, v: Tensor, starts: Tensor, hi: Tensor) -> Tensor:
        block = pattern.select_block_size
        return triton_ops.block_attention(q, k, v, starts, block, hi, scale, block_centric=False)

    seconds, o = timed(env, lambda: attend(q, k, v, store.starts, hi))
    grad_out = torch.randn_like(o)
    backward_s, grads = timed(env, lambda: attention_grads(o, (q, k, v), grad_out))
    comparisons = {}
    for a, b in edge_slices(q.shape[0], env.scale.doc):
        qs, ks, vs = leaf(store.q[a:b]), leaf(store.k[a:b]), leaf(store.v[a:b])
        o_s = attend(qs, ks, vs, local_starts(store.starts[a:b], a), hi[a:b] - a)
        compare_doc(comparisons, f"[{a}:{b}]", (o, *grads), (o_s, *attention_grads(o_s, (qs, ks, vs), grad_out[a:b])),
                    slice(a, b))
    per_query = triton_block._gathered_per_query(q.shape[1], k.shape[1], q.shape[2], v.shape[2],
                                                 store.starts.shape[2], False)
    chunks = len(triton_common._row_chunks(q.shape[0], per_query))
    return verdict(comparisons) | {"forward_s": seconds, "backward_s": backward_s, "query_chunks": chunks}


def check_block_centric(env: Env, store: Store) -> dict:
    """Block-centric block attention for the last document's queries over the whole store (their blocks lie past
    element 2**31 of k), forward and backward, against that document's slice of the store."""
    pattern, scale = env.scale.pattern, env.scale.dim**-0.5
    a, b = store.last
    _, hi = window(store, 1)
    q, k, v = leaf(store.q[a:b]), leaf(store.k), leaf(store.v)

    def attend(q: Tensor, k: Tensor, v: Tensor, starts: Tensor, hi: Tensor) -> Tensor:
        block = pattern.select_block_size
        return triton_ops.block_attention(q, k, v, starts, block, hi, scale, block_centric=True)

    o = attend(q, k, v, store.starts[a:b], hi[a:b])
    grad_out = torch.randn_like(o)
    dq, dk, dv = attention_grads(o, (q, k, v), grad_out)
    qs, ks, vs = leaf(store.q[a:b]), leaf(store.k[a:b]), leaf(store.v[a:b])
    o_s = attend(qs, ks, vs, local_starts(store.starts[a:b], a), hi[a:b] - a)
    dq_s, dk_s, dv_s = attention_grads(o_s, (qs, ks, vs), grad_out)
    comparisons = {"o": compare(o, o_s), "dq": compare(dq, dq_s), "dk": compare(dk[a:b], dk_s),
                   "dv": compare(dv[a:b], dv_s)}
    untouched = not (dk[:a].any() or dv[:a].any())  # keys no query selected get no gradient
    result = verdict(comparisons)
    return result | {"ok": result["ok"] and untouched, "other_documents_grad_zero": untouched}


def check_selection(env: Env, store: Store) -> dict:
    """Fused block selection over every query (q past 2**31 elements), the store's keys standing in for each
    document's compressed keys (the last document's lie past element 2**31), against the last document alone."""
    pattern, scale = env.scale.pattern, env.scale.dim**-0.5
    a, b = store.last
    lse = torch.zeros(store.q.shape[:2], device=env.device)  # any finite lse: selection is compared, not scored
    layout = dataclasses.replace(store.layout, cmp_offsets=store.layout.key_offsets)
    with torch.no_grad():
        seconds, chosen = timed(env, lambda: triton_ops.select_blocks(store.q, store.k, lse, layout, pattern,
                                                                            scale))
        alone, _ = QueryLayout.from_cu_seqlens(torch.tensor([0, b - a]), pattern.compress_block_size,
                                               pattern.compress_stride, device=env.device)
        alone = dataclasses.replace(alone, cmp_offsets=alone.key_offsets)
        chosen_s = triton_ops.select_blocks(store.q[a:b], store.k[a:b], lse[a:b], alone, pattern, scale)
    equal = torch.equal(chosen[a:b], chosen_s)
    return {"ok": equal, "seconds": seconds, "last_document_equal": equal}


def check_decoding(env: Env, store: Store) -> dict:
    """One decoding step (a query per document at its last position, programs split over each query's keys) over
    the store past 2**31 elements: window interval attention, block attention and selection, against the last
    document's query alone over its slice of the store."""
    pattern, scale, doc = env.scale.pattern, env.scale.dim**-0.5, env.scale.doc
    rows = torch.arange(store.docs, device=env.device)
    q = store.q[doc - 1 :: doc].contiguous()
    starts = store.starts[doc - 1 :: doc].contiguous()
    hi = rows * doc + doc
    lo = hi - pattern.window_size

    def layout(offsets: Tensor) -> QueryLayout:
        return QueryLayout(positions=torch.full_like(offsets, doc - 1), key_offsets=offsets, cmp_offsets=offsets,
                           window_offsets=offsets, run_length=1)

    def step(q: Tensor, k: Tensor, v: Tensor, lo: Tensor, hi: Tensor, starts: Tensor, offsets: Tensor) -> tuple:
        o_win, _ = triton_ops.interval_attention(q, k, v, lo, hi, scale, run_length=1, num_splits=8)
        o_slc = triton_ops.block_attention(q, k, v, starts, pattern.select_block_size, hi, scale, num_splits=8)
        lse = torch.zeros(q.shape[:2], device=q.device)
        chosen = triton_ops.select_blocks(q, k, lse, layout(offsets), pattern, scale, num_splits=8)
        return o_win, o_slc, chosen

    a, b = store.last
    with torch.no_grad():
        full = step(q, store.k, store.v, lo, hi, starts, rows * doc)
        alone = step(q[-1:], store.k[a:b], store.v[a:b], lo[-1:] - a, hi[-1:] - a, local_starts(starts[-1:], a),
                     torch.zeros(1, dtype=torch.long, device=env.device))
    comparisons = {"window o": compare(full[0][-1:], alone[0]), "selection o": compare(full[1][-1:], alone[1])}
    equal = torch.equal(full[2][-1:], alone[2])
    result = verdict(comparisons)
    return result | {"ok": result["ok"] and equal, "selection_equal": equal}


# ---------------------------------------------------------------------------------------------- driver


def run_check(env: Env, results: dict, name: str, fn: Callable[[], dict]) -> None:
    """One check, on its own: an error is recorded (and its memory freed) and the next check runs."""
    free_memory(env)
    reset_peak(env)
    start = time.perf_counter()
    try:
        record = fn()
    except Exception as error:  # noqa: BLE001 - every failure is a result to report
        record = {"ok": False, "error": f"{type(error).__name__}: {error}"[:2000],
                  "traceback": traceback.format_exc()[-6000:]}
    record["wall_s"] = time.perf_counter() - start
    record.setdefault("peak_gib", peak_gib(env))
    results[name] = record
    free_memory(env)
    print(table_row(name, record), flush=True)


def table_row(name: str, record: dict) -> str:
    keys = ("seconds", "forward_s", "backward_s", "warmup_s", "elements", "query_chunks")
    details = ", ".join(f"{k}={fmt(record[k])}" for k in keys if record.get(k) is not None)
    errors = [f"{label} rel_err={c['rel_err']:.1e}" for label, c in record.get("compared", {}).items() if not c["ok"]]
    if "error" in record:
        details = record["error"].splitlines()[0][:150]
    elif errors:
        details += "; FAILED " + ", ".join(errors[:4])
    peak = f"{record['peak_gib']:7.1f}" if record.get("peak_gib") is not None else "      -"
    return f"{name:28s} {'ok' if record['ok'] else 'FAIL':4s} {record['wall_s']:7.1f} {peak}  {details}"


def fmt(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def store_summary(stores: list[Store], store: Store) -> dict:
    stores.append(store)
    return {"ok": True, "q_elements": store.q.numel(), "k_elements": store.k.numel(), "documents": store.docs}


def check_primitives(env: Env, results: dict) -> None:
    for name, check in (("rms_norm", check_rms_norm), ("rotary", check_rotary), ("silu_mul", check_silu_mul),
                        ("gate_branches", check_gate)):
        run_check(env, results, name, lambda check=check: check(env))
    stores: list[Store] = []
    run_check(env, results, "attention_store", lambda: store_summary(stores, build_store(env)))
    if not stores:
        return
    for name, check in (("interval_attention", check_interval), ("block_attention", check_block),
                        ("block_attention_centric", check_block_centric), ("select_blocks", check_selection),
                        ("decoding_step", check_decoding)):
        run_check(env, results, name, lambda check=check: check(env, stores[0]))


def commit_id() -> str:
    if os.environ.get("COMMIT"):
        return os.environ["COMMIT"]
    run = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return run.stdout.strip() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--parts", nargs="+", choices=("prefill", "cross_entropy", "primitives"),
                        default=["prefill", "cross_entropy", "primitives"])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, launch limit lowered to match (any device)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        parser.error("this check needs a CUDA GPU (or --smoke)")
    device, dtype = (torch.device("cuda"), torch.bfloat16) if cuda else (torch.device("cpu"), torch.float32)
    env = Env(SMOKE if args.smoke else FULL, device, dtype)
    if args.smoke:
        triton_common._LAUNCH_ELEMENTS = env.scale.limit
    results: dict[str, dict] = {}
    print(f"{'check':28s} {'':4s} {'wall s':>7s} {'peak GiB':>7s}  details", flush=True)
    if "prefill" in args.parts:
        for kind in ("nsa", "llama"):
            run_check(env, results, f"prefill_{kind}", lambda kind=kind: check_prefill(env, kind))
    if "cross_entropy" in args.parts:
        run_check(env, results, "cross_entropy", lambda: check_cross_entropy(env))
    if "primitives" in args.parts:
        check_primitives(env, results)
    record = {
        "gpu": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
        "triton": triton.__version__, "transformers": transformers.__version__, "commit": commit_id(),
        "smoke": args.smoke, "launch_elements": triton_common._LAUNCH_ELEMENTS, "scale": dataclasses.asdict(env.scale),
        "all_ok": all(r["ok"] for r in results.values()), "checks": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / ("large_tensors_smoke.json" if args.smoke else "large_tensors.json")
    path.write_text(json.dumps(record, indent=1, default=str))
    print(f"all ok: {record['all_ok']}; wrote {path}")


if __name__ == "__main__":
    main()
