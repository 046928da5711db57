"""Triton kernels against the PyTorch reference: outputs, lse and every gradient.

On a CPU machine the kernels run under the Triton interpreter (tests/conftest.py) at small sizes and
float32; on a GPU they run compiled, in bf16/fp16 at sizes that are not multiples of the tiles.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools

import pytest
import torch
from torch import Tensor

triton = pytest.importorskip("triton")

from nsa_hf import NsaCache
from nsa_hf.modeling_nsa import apply_rotary
from nsa_hf.ops import backends, composition, library, reference
from nsa_hf.ops import triton as triton_ops
from nsa_hf.ops.backends import resolve_backend
from nsa_hf.ops.layout import QueryLayout, SparsePattern, branch_ranges, num_compressed_blocks
from nsa_hf.ops.triton import block as triton_block
from nsa_hf.ops.triton import decode as triton_decode
from nsa_hf.ops.triton import common as triton_common
from nsa_hf.ops.triton import interval as triton_interval
from nsa_hf.ops.triton import pointwise as triton_pointwise
from nsa_hf.ops.triton import select as triton_select
from nsa_hf.ops.triton import store as triton_store

from .factories import make_model, tiny_config

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.bfloat16, torch.float16] if CUDA else [torch.float32]


def tolerance(dtype: torch.dtype) -> dict:
    # FlashAttention-style: low-precision kernels are compared with a loose absolute bound.
    return {torch.float32: dict(atol=2e-4, rtol=2e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
            torch.float16: dict(atol=5e-3, rtol=5e-3)}[dtype]


def reference_grads(fn, inputs, grad_out):
    """Reference in fp32 from the same (rounded) inputs, as FlashAttention's tests do."""
    upcast = [x.detach().float().requires_grad_() for x in inputs]
    out = fn(*upcast)
    out = out[0] if isinstance(out, tuple) else out
    # An input the reference never reads (an empty store) gets a zero gradient.
    return out, torch.autograd.grad(out, upcast, grad_out.float(), allow_unused=True, materialize_grads=True)


def assert_close_rel(actual, expected, dtype, name):
    actual, expected = actual.float(), expected.float()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.numel() == 0:
        return
    scale = expected.abs().max().clamp(min=1.0)
    tol = tolerance(dtype)
    err = (actual - expected).abs().max() / scale
    assert err <= tol["atol"], f"{name}: max error {err:.2e} (relative to {scale:.2e}) > {tol['atol']:.0e}"


def pack_layout(lengths: list[int], block_size: int, stride: int):
    cu = torch.tensor([0] + lengths).cumsum(0).to(DEVICE)
    return QueryLayout.from_cu_seqlens(cu, block_size, stride)


def nsa_inputs(num_q: int, num_cmp: int, num_keys: int, heads_q: int, heads_kv: int, dim: int, dtype: torch.dtype,
               grad: bool = True) -> list[Tensor]:
    """Random inputs of `nsa_attention_varlen`: q, the compressed K/V, the selection and window K/V over `num_keys`
    keys, and gates in (0, 1)."""

    def rand(*shape):
        return torch.randn(*shape, device=DEVICE, dtype=dtype, requires_grad=grad)

    inputs = [rand(num_q, heads_q, dim), rand(num_cmp, heads_kv, dim), rand(num_cmp, heads_kv, dim)]
    inputs += [rand(num_keys, heads_kv, dim) for _ in range(4)]
    inputs.append(torch.rand(num_q, heads_q, 3, device=DEVICE, dtype=dtype, requires_grad=grad))
    return inputs


def causal_blocks(num_q: int, heads_kv: int, slots: int, block: int) -> tuple[Tensor, Tensor]:
    """(hi, starts) of block attention for queries at positions 0 .. num_q - 1 of one store: each (query, key head)
    picks `slots` distinct blocks, those past the query's own block left empty (-1)."""
    hi = torch.arange(1, num_q + 1, device=DEVICE)
    blocks = torch.rand(num_q, heads_kv, slots, device=DEVICE).argsort(-1)
    return hi, torch.where(blocks <= ((hi - 1) // block)[:, None, None], blocks * block, -1)


SIZES = [(4, 4, 64), (6, 2, 64), (8, 1, 32), (16, 1, 128), (1, 1, 64)] if CUDA else [(4, 2, 16), (3, 1, 16), (1, 1, 8)]


@pytest.mark.parametrize("heads_q,heads_kv,dim", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_interval_attention_matches_reference(heads_q, heads_kv, dim, dtype):
    torch.manual_seed(heads_q * 7 + dim)
    lengths = [700, 37, 1100, 5] if CUDA else [45, 7, 70]
    layout, _ = pack_layout(lengths, 32, 16)
    total = sum(lengths)
    q = torch.randn(total, heads_q, dim, device=DEVICE, dtype=dtype, requires_grad=True)
    # A compressed-branch-like store (non-decreasing intervals) and a sliding window over the tokens; query
    # tiles cut from the intervals (host sync) or from the layout's host document boundaries.
    for kind, documents in [(kind, documents) for kind in ("compressed", "window") for documents in (None, layout.documents)]:
        if kind == "compressed":
            counts = num_compressed_blocks(layout.positions + 1, 32, 16)
            lo, hi = layout.cmp_offsets, layout.cmp_offsets + counts
            num_keys = int(hi.max()) + 3
        else:
            lo = layout.key_offsets + (layout.positions - 63 + 1).clamp(min=0)
            hi, num_keys = layout.key_offsets + layout.positions + 1, total
        k = torch.randn(num_keys, heads_kv, dim, device=DEVICE, dtype=dtype, requires_grad=True)
        v = torch.randn(num_keys, heads_kv, dim, device=DEVICE, dtype=dtype, requires_grad=True)
        o, lse = triton_interval.interval_attention(q, k, v, lo, hi, dim**-0.5, documents=documents)
        grad_out = torch.randn_like(o)
        grads = torch.autograd.grad(o, (q, k, v), grad_out)
        o_ref, grads_ref = reference_grads(lambda *x: reference.interval_attention(*x, lo, hi, dim**-0.5), (q, k, v), grad_out)
        _, lse_ref = reference.interval_attention(q.float(), k.float(), v.float(), lo, hi, dim**-0.5)
        assert torch.isfinite(o).all()
        assert_close_rel(o, o_ref, dtype, f"{kind} o")
        assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref))
        finite = torch.isfinite(lse_ref)
        assert_close_rel(lse[finite], lse_ref[finite], dtype, f"{kind} lse")
        for name, g, g_ref in zip(("dq", "dk", "dv"), grads, grads_ref):
            assert_close_rel(g, g_ref, dtype, f"{kind} {name}")


def test_interval_backward_splits_long_reader_ranges_and_takes_the_lse_gradient(monkeypatch):
    """Keys seen by more queries than one dk/dv program takes (patched down to 16) are split over programs, as many
    as `max_readers` bounds (the window's w) or all queries (the compressed branch); the lse's own gradient folds into
    FlashAttention's delta. Against the reference's autograd of (o, lse), -inf lse rows excluded."""
    monkeypatch.setattr(triton_interval, "_READER_CHUNK", 16)
    torch.manual_seed(5)
    dtype = DTYPES[0]
    window = 96 if CUDA else 24
    layout, _ = pack_layout([700, 37, 1100] if CUDA else [45, 7, 70], 32, 16)
    total = layout.positions.numel()
    q = torch.randn(total, 4, 16, device=DEVICE, dtype=dtype)
    for kind, max_readers in (("compressed", None), ("window", window)):
        if kind == "compressed":
            lo = layout.cmp_offsets
            hi = lo + num_compressed_blocks(layout.positions + 1, 32, 16)
        else:
            lo = layout.key_offsets + (layout.positions - window + 1).clamp(min=0)
            hi = layout.key_offsets + layout.positions + 1
        num_keys = int(hi.max())
        k, v = (torch.randn(num_keys, 2, 16, device=DEVICE, dtype=dtype) for _ in range(2))
        o, lse = triton_interval.interval_forward(q, k, v, lo, hi, 0.25, None, layout.documents)
        grad_o, grad_lse = torch.randn_like(o), torch.randn_like(lse)
        grads = triton_interval.interval_backward(grad_o, grad_lse, q, k, v, o, lse, lo, hi, 0.25, None, layout.documents,
                                                  max_readers)

        def both(*qkv):
            o, lse = reference.interval_attention(*qkv, lo, hi, 0.25)
            return o, torch.where(torch.isfinite(lse), lse, 0)

        upcast = [x.float().requires_grad_() for x in (q, k, v)]
        o_ref, lse_ref = both(*upcast)
        grads_ref = torch.autograd.grad((o_ref, lse_ref), upcast, (grad_o.float(), grad_lse.float()))
        for name, g, g_ref in zip(("dq", "dk", "dv"), grads, grads_ref):
            assert_close_rel(g, g_ref, dtype, f"{kind} {name}")


@pytest.mark.parametrize("heads_q,heads_kv,dim", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_centric", [True, False], ids=["block-centric", "query-centric"])
@pytest.mark.parametrize("pow2_block", [True, False], ids=["pow2-block", "padded-block"])
def test_block_attention_matches_reference(heads_q, heads_kv, dim, dtype, block_centric, pow2_block, monkeypatch):
    """Both forward strategies. The backward is block-centric, with query lists cut into pieces that meet
    in atomics (small pieces on CPU, so that every block's list is cut); its dq parts are summed from
    per-slot partials, or (no budget for partials, run with the query-centric forward) by atomics. A block size
    that is no power of two runs in a padded tile whose extra keys the kernels must mask."""
    if not CUDA:
        monkeypatch.setattr(triton_block, "_PIECE", 7)
    if not block_centric:
        monkeypatch.setattr(triton_block, "_PARTIALS_BUDGET", 0)
    torch.manual_seed(heads_q * 5 + dim)
    block = (64 if CUDA else 16) if pow2_block else (48 if CUDA else 12)
    num_q, slots = (1500, 16) if CUDA else (60, 3)
    q = torch.randn(num_q, heads_q, dim, device=DEVICE, dtype=dtype, requires_grad=True)
    k = torch.randn(num_q, heads_kv, dim, device=DEVICE, dtype=dtype, requires_grad=True)
    v = torch.randn(num_q, heads_kv, dim, device=DEVICE, dtype=dtype, requires_grad=True)
    hi = torch.arange(1, num_q + 1, device=DEVICE)
    blocks = torch.rand(num_q, heads_kv, slots, device=DEVICE).argsort(-1)  # distinct blocks per (query, head)
    current = ((hi - 1) // block)[:, None, None]
    starts = torch.where((blocks <= current) & (torch.rand_like(blocks.float()) > 0.1), blocks * block, -1)
    o = triton_block.block_attention(q, k, v, starts, block, hi, dim**-0.5, block_centric=block_centric)
    grad_out = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), grad_out)
    o_ref, grads_ref = reference_grads(lambda *x: reference.block_attention(*x, starts, block, hi, dim**-0.5), (q, k, v), grad_out)
    assert_close_rel(o, o_ref, dtype, "o")
    for name, g, g_ref in zip(("dq", "dk", "dv"), grads, grads_ref):
        assert_close_rel(g, g_ref, dtype, name)


@pytest.mark.parametrize("num_q", [256, 40], ids=["block-centric", "query-centric"])
def test_the_block_forward_keeps_its_inverted_selection_for_the_backward(num_q, monkeypatch):
    """A block-centric forward (256 queries or more) keeps its inverted selection for the backward, which then does not
    sort again; a query-centric one keeps none. Either way the residual has the size the op's fake declares
    (opcheck), and the backward given it equals the backward that inverts the selection itself."""
    if not CUDA:
        monkeypatch.setattr(triton_block, "_PIECE", 7)
    torch.manual_seed(num_q)
    backend = backends.resolve_primitives("triton", torch.device(DEVICE))
    q, k, v = (torch.randn(num_q, heads, 16, device=DEVICE, requires_grad=True) for heads in (2, 1, 1))
    hi, starts = causal_blocks(num_q, 1, 2, 16)
    o, lse, residual = triton_block.block_forward(q, k, v, starts, 16, hi, 0.25)
    assert residual.numel() == (4 * starts.numel() + 1 if num_q >= 256 else 0)
    assert residual.numel() == triton_block.block_residual_size(q, k, v, starts)
    sorts, invert = [], triton_block._queries_per_block
    monkeypatch.setattr(triton_block, "_queries_per_block", lambda *args, **kw: sorts.append(1) or invert(*args, **kw))
    grad_out = torch.randn_like(o)
    kept = triton_block.block_backward(grad_out, q, k, v, o, lse, residual, starts, 16, hi, 0.25)
    assert len(sorts) == (0 if num_q >= 256 else 1)
    again = triton_block.block_backward(grad_out, q, k, v, o, lse, residual[:0], starts, 16, hi, 0.25)
    for name, a, b in zip(("dq", "dk", "dv"), kept, again):
        torch.testing.assert_close(a, b, msg=lambda m: f"{name}: {m}")
    if num_q >= 256:
        torch.library.opcheck(torch.ops.nsa_hf.block_attention.default, (q, k, v, starts, 16, hi, 0.25, backend),
                              test_utils=("test_schema", "test_faketensor"))


def test_block_attention_compiles_once_for_every_query_count():
    """Under torch.compile with dynamic shapes, the op's fake (its residual's size included) keeps the query count
    symbolic: three block-centric query counts share one graph."""
    from torch._dynamo.utils import counters

    backend = backends.resolve_primitives("triton", torch.device(DEVICE))
    torch._dynamo.reset()
    counters.clear()

    def attend(q, k, v, starts, hi):
        return torch.ops.nsa_hf.block_attention(q, k, v, starts, 16, hi, 0.25, backend)[0]

    compiled = torch.compile(attend, dynamic=True, backend="eager", fullgraph=True)
    for num_q in (256, 272, 288):
        q, k, v = (torch.randn(num_q, heads, 16, device=DEVICE) for heads in (2, 1, 1))
        hi = torch.arange(1, num_q + 1, device=DEVICE)
        starts = torch.full((num_q, 1, 2), -1, dtype=torch.long, device=DEVICE)
        starts[:, :, 0] = 0
        torch.testing.assert_close(compiled(q, k, v, starts, hi), attend(q, k, v, starts, hi))
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


_CHOSEN: dict[str, Tensor] = {}  # the blocks Triton selected, for the reference backend that reads them


@pytest.mark.parametrize("dtype", DTYPES)
def test_nsa_attention_backends_agree_on_packed_documents(dtype):
    torch.manual_seed(0)
    pattern = SparsePattern(32, 16, 64, 4, 1, 1, 96) if CUDA else SparsePattern(8, 4, 16, 3, 1, 1, 12)
    lengths = [900, 10, 1300] if CUDA else [50, 7, 33]
    layout, blocks = pack_layout(lengths, pattern.compress_block_size, pattern.compress_stride)
    total, n_cmp = sum(lengths), blocks.token_starts.numel()
    heads_q, heads_kv, dim = (8, 2, 64) if CUDA else (4, 2, 16)
    inputs = nsa_inputs(total, n_cmp, total, heads_q, heads_kv, dim, dtype)
    fast = resolve_backend("triton", torch.device(DEVICE))(*inputs, layout, pattern, dim**-0.5)
    grad_out = torch.randn_like(fast)
    grads = torch.autograd.grad(fast, inputs, grad_out)
    # The reference reads the blocks the Triton path selected: selection itself is checked on its own below,
    # where a near-tie may legitimately resolve differently at low precision.
    _, lse = triton_interval.interval_attention(
        inputs[0], inputs[1], inputs[2], layout.cmp_offsets,
        layout.cmp_offsets + num_compressed_blocks(layout.positions + 1, pattern.compress_block_size, pattern.compress_stride),
        dim**-0.5,
    )
    chosen = triton_select.select_blocks(inputs[0], inputs[1], lse, layout, pattern, dim**-0.5)
    name = f"reference_with_triton_selection_{str(dtype)[6:]}"
    if name not in backends.backend_names():
        backends.register_backend(name, lambda: composition.Primitives(reference.interval_attention, reference.block_attention,
                                                                       lambda *_: _CHOSEN[name]))
    _CHOSEN[name] = chosen
    same_blocks = resolve_backend(name, torch.device(DEVICE))
    out_ref, grads_ref = reference_grads(lambda *x: same_blocks(*x, layout, pattern, dim**-0.5), inputs, grad_out)
    assert_close_rel(fast, out_ref, dtype, "o")
    for i, (g, g_ref) in enumerate(zip(grads, grads_ref)):
        assert_close_rel(g, g_ref, dtype, f"grad {i}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocks", [(32, 16, 64), (64, 64, 64), (8, 2, 16)] if CUDA else [(8, 4, 16), (16, 16, 16), (8, 2, 16)])
def test_block_selection_matches_reference(blocks, dtype):
    torch.manual_seed(sum(blocks))
    pattern = SparsePattern(*blocks, 4, 1, 1, 64)
    lengths = [3000, 70, 1500] if CUDA else [90, 9, 60]
    layout, cmp_blocks = pack_layout(lengths, pattern.compress_block_size, pattern.compress_stride)
    heads_q, heads_kv, dim = (12, 2, 64) if CUDA else (4, 2, 16)
    q = torch.randn(sum(lengths), heads_q, dim, device=DEVICE, dtype=dtype)
    k_cmp = torch.randn(cmp_blocks.token_starts.numel(), heads_kv, dim, device=DEVICE, dtype=dtype)
    _, lse = composition.compressed_attention_varlen(q.float(), k_cmp.float(), k_cmp.float(), layout, pattern, dim**-0.5)
    expected = reference.select_blocks_varlen(q.float(), k_cmp.float(), lse, layout, pattern, dim**-0.5).sort(-1).values
    chosen = triton_select.select_blocks(q, k_cmp, lse, layout, pattern, dim**-0.5).sort(-1).values
    differing = (chosen != expected).any(-1).float().mean().item()
    # Exact in fp32; at bf16/fp16 a near-tie between two blocks may resolve either way.
    assert differing <= (0.0 if dtype == torch.float32 else 0.02), f"{differing:.2%} of rows select other blocks"
    assert bool(((chosen >= 0).sum(-1) == (expected >= 0).sum(-1)).all())  # -1 slots agree exactly


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("parts", [1, 3])
def test_rotary_kernel_matches_pytorch_rope(dtype, parts):
    """The fused RoPE on strided slices (as of the stacked projection), one or three tensors with different head
    counts in one launch (q and the keys), forward and gradient; columns it does not read get no gradient."""
    torch.manual_seed(0)
    batch, seq, dim = (3, 70, 64) if CUDA else (2, 9, 8)
    heads = (6, 2, 1)[:parts]
    stacked = torch.randn(batch, seq, (sum(heads) + 2) * dim, device=DEVICE, dtype=dtype, requires_grad=True)
    angles = torch.randn(batch, seq, dim // 2, device=DEVICE).repeat(1, 1, 2)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    bounds = [dim * (1 + sum(heads[:i])) for i in range(parts + 1)]
    xs = tuple(stacked[..., a:b].unflatten(-1, (-1, dim)) for a, b in itertools.pairwise(bounds))
    outs = triton_pointwise.apply_rotary(xs, cos, sin)
    grads_out = [torch.randn_like(out) for out in outs]
    (grad,) = torch.autograd.grad(outs, stacked, grads_out)
    for x, out, grad_out, (a, b) in zip(xs, outs, grads_out, itertools.pairwise(bounds)):
        out_ref, (grad_ref, _, _) = reference_grads(apply_rotary, (x, cos, sin), grad_out)
        assert out.dtype == dtype and out.is_contiguous()
        assert_close_rel(out, out_ref, dtype, "out")
        assert_close_rel(grad[..., a:b].unflatten(-1, (-1, dim)), grad_ref, dtype, "dx")
    assert not grad[..., :dim].any() and not grad[..., bounds[-1] :].any()
    with pytest.raises(ValueError, match="`cos` and `sin` must have shape"):
        triton_pointwise.apply_rotary(xs, cos[:, 1:], sin[:, 1:])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("padding", [0, 4])
def test_silu_mul_kernel_matches_pytorch_swiglu(dtype, padding):
    """silu(gate) * up from the stacked gate/up projection (with zero padding columns), forward and gradient."""
    torch.manual_seed(0)
    shape = (3, 70) if CUDA else (2, 7)
    width = 1000 if CUDA else 24
    stacked = (torch.randn(*shape, 2 * width + padding, device=DEVICE, dtype=dtype) * 3).requires_grad_()
    out = triton_pointwise.silu_mul(stacked, width)
    grad_out = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, stacked, grad_out)
    out_ref, (grad_ref,) = reference_grads(
        lambda x: torch.nn.functional.silu(x[..., :width]) * x[..., width : 2 * width], (stacked,), grad_out
    )
    assert out.dtype == dtype and out.is_contiguous()
    assert_close_rel(out, out_ref, dtype, "out")
    assert_close_rel(grad, grad_ref, dtype, "d_gate_up")
    with pytest.raises(ValueError, match="`gate_up` must hold gate and up"):
        triton_pointwise.silu_mul(stacked[..., : 2 * width - 1], width)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_dtype", [torch.float32, None])
def test_rms_norm_kernel_matches_pytorch_rmsnorm(dtype, weight_dtype):
    """RMSNorm forward and gradients (x and weight), with an fp32 weight (autocast training) or the input's dtype;
    enough rows that the backward sums the weight gradient over several programs, one of them partial."""
    torch.manual_seed(0)
    shape, width = ((3, 700), 768) if CUDA else ((2, 150), 24)
    x = torch.randn(*shape, width, device=DEVICE, dtype=dtype, requires_grad=True)
    weight = (1 + torch.randn(width, device=DEVICE) / 4).to(weight_dtype or dtype).requires_grad_()
    out = triton_pointwise.rms_norm(x, weight, 1e-6)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, weight), grad_out)
    out_ref, grads_ref = reference_grads(lambda x, w: w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)),
                                         (x, weight), grad_out)
    assert out.dtype == torch.promote_types(weight.dtype, dtype)  # as the PyTorch module's weight * x_hat
    assert_close_rel(out, out_ref, dtype, "out")
    for name, grad, grad_ref, like in zip(("dx", "dweight"), grads, grads_ref, (x, weight)):
        assert grad.dtype == like.dtype
        assert_close_rel(grad, grad_ref, dtype, name)
    with pytest.raises(ValueError, match="`weight` must have shape"):
        triton_pointwise.rms_norm(x, weight[1:], 1e-6)


def test_rms_norm_of_a_bf16_input_with_an_fp32_weight_is_fp32():
    """Autocast training's case on every device (the CPU run of the test above has one dtype): a bf16 input and an
    fp32 weight give the promoted fp32 output, x / rms(x) rounded to bf16 first as the PyTorch module does."""
    torch.manual_seed(0)
    x = torch.randn(2, 20, 24, device=DEVICE, dtype=torch.bfloat16)
    weight = 1 + torch.randn(24, device=DEVICE) / 4
    out = triton_pointwise.rms_norm(x, weight, 1e-6)
    upcast = x.float()
    expected = weight * (upcast * torch.rsqrt(upcast.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    assert out.dtype == torch.float32
    assert_close_rel(out, expected, torch.bfloat16, "out")


def test_rms_norm_kernel_rounds_once_to_out_dtype():
    """With `out_dtype` (the model passes the autocast dtype), the output is the promoted output rounded once,
    and a gradient in that dtype gives the same dx and dweight as the fp32 gradient of the same values."""
    torch.manual_seed(0)
    x = torch.randn(2, 37, 24, device=DEVICE, requires_grad=True)
    weight = (1 + torch.randn(24, device=DEVICE) / 4).requires_grad_()
    out = triton_pointwise.rms_norm(x, weight, 1e-6)
    out_half = triton_pointwise.rms_norm(x, weight, 1e-6, out_dtype=torch.float16)
    assert out_half.dtype == torch.float16
    torch.testing.assert_close(out_half, out.to(torch.float16), rtol=0, atol=0)
    grad_out = torch.randn_like(out_half)
    grads = torch.autograd.grad(out, (x, weight), grad_out.float())
    grads_half = torch.autograd.grad(out_half, (x, weight), grad_out)
    for grad, grad_half in zip(grads, grads_half):
        assert grad_half.dtype == torch.float32
        torch.testing.assert_close(grad_half, grad, rtol=0, atol=0)

@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_kernel_matches_pytorch(dtype):
    """Per-token cross entropy and the logits' gradient against F.cross_entropy on fp32 logits, with ignored rows
    (zero loss and gradient) and a vocabulary that is not a multiple of the kernel's chunk; a label outside the
    vocabulary gives NaN, never a silent number."""
    torch.manual_seed(0)
    rows, vocab = (300, 5000) if CUDA else (10, 37)
    logits = (torch.randn(rows, vocab, device=DEVICE) * 4).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (rows,), device=DEVICE)
    labels[::3] = -100
    losses = triton_pointwise.cross_entropy(logits, labels)
    grad_out = torch.rand(rows, device=DEVICE)
    (grad,) = torch.autograd.grad(losses, logits, grad_out)
    losses_ref, (grad_ref,) = reference_grads(
        lambda x: torch.nn.functional.cross_entropy(x, labels, reduction="none"), (logits,), grad_out
    )
    assert losses.dtype == torch.float32 and grad.dtype == dtype
    assert_close_rel(losses, losses_ref, torch.float32, "losses")  # both in fp32 from the same rounded logits
    assert_close_rel(grad, grad_ref, dtype, "d_logits")
    assert not losses[::3].any() and not grad[::3].any()
    labels[1] = vocab
    assert triton_pointwise.cross_entropy(logits.detach(), labels)[1].isnan()
    with pytest.raises(ValueError, match="`labels` \\[N\\]"):
        triton_pointwise.cross_entropy(logits, labels[1:])


@pytest.mark.parametrize("num_items", [None, 7])
@pytest.mark.parametrize("shifted", [False, True])
def test_fused_causal_lm_loss_matches_transformers_loss(num_items, shifted):
    """The model's loss with the fused cross entropy against transformers' ForCausalLMLoss: label shift (or
    given `shift_labels`), ignored tokens and the `num_items_in_batch` sum reduction."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    from nsa_hf.modeling_nsa import fused_causal_lm_loss

    torch.manual_seed(0)
    vocab = 50
    logits = torch.randn(2, 9, vocab, device=DEVICE, requires_grad=True)
    labels = torch.randint(0, vocab, (2, 9), device=DEVICE)
    labels[0, :3] = -100
    kwargs = {"num_items_in_batch": num_items}
    if shifted:
        kwargs["shift_labels"] = torch.roll(labels, -1, dims=1)
    loss = fused_causal_lm_loss(triton_pointwise.cross_entropy, logits, labels, vocab, **kwargs)
    expected = ForCausalLMLoss(logits, labels, vocab, **kwargs)
    (grad,) = torch.autograd.grad(loss, logits)
    (grad_ref,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, grad_ref)


@pytest.mark.parametrize("separate_window", [True, False])
def test_append_token_kernel_stores_like_the_static_cache_and_reads_back_the_last_block(separate_window):
    """A static cache layer's decoding token in one launch against `append` and the raw ring's gather: every store
    equal after each of many steps (the rings wrap several times), the counter advanced, and the returned block the
    last l raw tokens as they were given (tracked here, apart from the cache), from strided, fp32 new tokens."""
    from nsa_hf.cache_static import NsaStaticCacheLayer
    from nsa_hf.ops.compression import take_blocks

    torch.manual_seed(21)
    dtype = DTYPES[0]
    batch, heads, dim, dim_v, prompt, steps = 2, 2, (64 if CUDA else 8), (32 if CUDA else 4), 5, 40
    pattern = SparsePattern(8, 4, 16, 3, 1, 1, 12)
    layers = [NsaStaticCacheLayer(pattern, separate_window, max_cache_len=prompt + steps, max_rollback=3) for _ in "ab"]

    def tokens(width: int, count: int = 1) -> Tensor:  # a strided slice of a wider projection, as the model's are
        return torch.randn(batch, count, heads, width + 3, device=DEVICE)[..., 1 : width + 1]

    first = [tokens(w, prompt).to(dtype) for w in (dim, dim_v) * 3]
    for layer in layers:
        layer.append(*first, torch.arange(prompt, device=DEVICE))
    raw_history = [first[4], first[5]]
    for step in range(steps):
        position = torch.tensor([prompt + step], device=DEVICE)
        new = [tokens(w) for w in (dim, dim_v) * 3]
        if not separate_window:
            new[2] = new[3] = None
        layers[0].append(*(None if x is None else x.to(dtype) for x in new), position)
        rings = (layers[0].raw_cmp_keys, layers[0].raw_cmp_values)
        expected = [take_blocks(ring.flatten(0, 1), torch.arange(batch, device=DEVICE)[:, None, None] * ring.shape[1]
                                + (prompt + step) % (ring.shape[1] // 2) + ring.shape[1] // 2 - 7
                                + torch.arange(8, device=DEVICE)) for ring in rings]
        blocks = layers[1].append_token(*new, position, triton_ops.append_token)
        for name, tensor in layers[0]._tensors().items():
            assert torch.equal(tensor, getattr(layers[1], name)), f"{name} after step {step}"
        assert int(layers[1].cumulative_length) == prompt + step + 1
        for got, want, history, raw in zip(blocks, expected, raw_history, new[4:]):
            assert got.shape == (batch, 1, 8, heads, raw.shape[-1]) and torch.equal(got, want)
            history = torch.cat([history, raw.to(dtype)], dim=1)
            if prompt + step >= 7:
                assert torch.equal(got[:, 0], history[:, -8:])
        raw_history = [torch.cat([h, r.to(dtype)], dim=1) for h, r in zip(raw_history, new[4:])]


@dataclasses.dataclass(frozen=True)
class EntryCase:
    """One shape and dtype for `store_compressed`: `weights_dtype` None = the blocks' dtype."""

    batch: int = 3
    heads: int = 5
    dim: int = 32
    dim_v: int = 6
    dtype: torch.dtype = DTYPES[0]
    weights_dtype: torch.dtype | None = None


ENTRY_CASES = {
    # l * D = 256 key features: the MLP's hidden layer splits them into shares (the values' 48 into one and an
    # empty one).
    "base": EntryCase(),
    "fp16": EntryCase(dtype=torch.float16),
    "rows_past_one_tile": EntryCase(batch=9, heads=8, dim=8),  # 72 rows: two tiles of 64, the second partial
    "dim_48": EntryCase(dim=48, dim_v=10),  # head dims not powers of two: masked halves
    # Weights left in fp32 with bf16 blocks (a model run under autocast): the kernel casts them as autocast would.
    # fp16 blocks under the interpreter, whose tl.dot multiplies bf16 operands' bit patterns (Triton 3.9: it keeps
    # bf16 as uint16); the weights' cast is the same code in either dtype.
    "fp32_weights_half_blocks": EntryCase(dtype=torch.bfloat16 if CUDA else torch.float16,
                                          weights_dtype=torch.float32),
}


@pytest.mark.parametrize("case", ENTRY_CASES)
@pytest.mark.parametrize("kind", ["mlp", "linear", "mean"])
def test_store_compressed_kernel_writes_rotated_phi_of_each_block_at_its_slot(kind, case):
    """A decoding step's compressed entries in one launch (two for the MLP phi) against the model's own modules in
    fp32 from the same (rounded) inputs, FlashAttention-style tolerances: `NsaCompressor.forward` of each block, the
    key rotated by `modeling_nsa.apply_rotary` at its row's (cos, sin); each row's entry at its own slot and nothing
    else in the stores changed. Blocks are the strided views `append_token` returns; rows and heads not multiples
    of the tiles; fp16, several row tiles, head dims that are not powers of two, fp32 weights with bf16 blocks."""
    from nsa_hf.modeling_nsa import NsaCompressor

    case = ENTRY_CASES[case]
    torch.manual_seed(3)
    batch, heads, dim, dim_v, dtype = case.batch, case.heads, case.dim, case.dim_v, case.dtype
    block, width, slots_per_row = 8, 24, 7
    k_blocks = torch.randn(batch, 1, heads, block, dim, device=DEVICE, dtype=dtype).transpose(-3, -2)
    v_blocks = torch.randn(batch, 1, heads, block, dim_v, device=DEVICE, dtype=dtype).transpose(-3, -2)
    angles = torch.rand(batch, 1, dim, device=DEVICE) * 6.0
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    slots = torch.randint(0, slots_per_row, (batch, 1), device=DEVICE)
    stores = [torch.randn(batch, slots_per_row, heads, d, device=DEVICE, dtype=dtype) for d in (dim, dim_v)]
    before = [s.clone() for s in stores]
    compressors = []
    for d in (dim, dim_v):
        config = tiny_config(head_dim=d, compress_block_size=block, compress_intermediate_size=width,
                             compression_type=kind)
        compressor = NsaCompressor(config).to(DEVICE, case.weights_dtype or dtype)
        with torch.no_grad():  # biases as large as the weights' outputs, so that a dropped bias shows
            for name, p in compressor.named_parameters():
                if name.endswith("bias"):
                    p.copy_(torch.randn_like(p))
        compressors.append(compressor)
    phi_k, phi_v = (c.fused_weights() for c in compressors)
    assert phi_k.kind == kind
    triton_ops.store_compressed(k_blocks, v_blocks, phi_k, phi_v, cos, sin, slots, *stores)
    if case == ENTRY_CASES["base"]:
        assert triton_store._hidden_shares(width, 1, block * dim) == 2  # the values' second share is empty

    reference_k, reference_v = (copy.deepcopy(c).float() for c in compressors)
    with torch.no_grad():
        keys = apply_rotary(reference_k(k_blocks.float()), cos.float(), sin.float())[:, 0]  # [B, H, D]
        values = reference_v(v_blocks.float())[:, 0]
    for store, old, want in zip(stores, before, (keys, values), strict=True):
        expected = old.clone()
        expected[torch.arange(batch), slots[:, 0]] = want.to(dtype)
        torch.testing.assert_close(store, expected, **tolerance(dtype))
        untouched = torch.ones(batch, slots_per_row, dtype=torch.bool, device=DEVICE)
        untouched[torch.arange(batch), slots[:, 0]] = False
        assert torch.equal(store[untouched], old[untouched])


def _entry_arguments(device: str = DEVICE, batch: int = 2, heads: int = 3, dim: int = 8, block: int = 4,
                     width: int = 16) -> dict:
    """Valid `store_compressed` arguments for an MLP phi, by parameter name."""
    from nsa_hf.ops.compression import PhiWeights

    def phi() -> PhiWeights:
        return PhiWeights("mlp", torch.randn(width, block * dim, device=device), torch.randn(width, device=device),
                          torch.randn(dim, width, device=device), torch.randn(dim, device=device))

    return {
        "k_blocks": torch.randn(batch, 1, block, heads, dim, device=device),
        "v_blocks": torch.randn(batch, 1, block, heads, dim, device=device), "phi_k": phi(), "phi_v": phi(),
        "cos": torch.randn(batch, 1, dim, device=device), "sin": torch.randn(batch, 1, dim, device=device),
        "slots": torch.zeros(batch, 1, dtype=torch.long, device=device),
        "cmp_keys": torch.zeros(batch, 5, heads, dim, device=device),
        "cmp_values": torch.zeros(batch, 5, heads, dim, device=device),
    }


BAD_ENTRY_ARGUMENTS = {  # parameter named in the error (a trailing space: a second case): its bad value
    "k_blocks": lambda a: a["k_blocks"].double(),
    "v_blocks": lambda a: a["v_blocks"].half(),  # not the keys' dtype
    "phi_v": lambda a: a["phi_v"]._replace(kind="mean"),  # not the keys' kind
    "phi_k.hidden": lambda a: a["phi_k"]._replace(hidden=None),
    "phi_v.out": lambda a: a["phi_v"]._replace(out=None),
    "phi_k.out_bias": lambda a: a["phi_k"]._replace(out_bias=a["phi_k"].out_bias.double()),
    "phi_v.hidden_bias": lambda a: a["phi_v"]._replace(hidden_bias=a["phi_v"].hidden_bias[:-1]),
    "cos": lambda a: a["cos"][..., :-2],
    "sin": lambda a: a["sin"].to(torch.int32),
    "slots": lambda a: torch.zeros(3, 1, dtype=torch.long),  # B + 1 elements
    "slots ": lambda a: a["slots"].float(),
    "cmp_keys": lambda a: a["cmp_keys"][:, :, :2],  # H - 1 heads
    "cmp_values": lambda a: a["cmp_values"][..., :6],  # another head dim
    "cmp_values ": lambda a: a["cmp_values"].to("meta"),  # another device
}


@pytest.mark.parametrize("name", BAD_ENTRY_ARGUMENTS)
def test_store_compressed_names_a_bad_argument_before_any_launch(name):
    """Each bad argument of `store_compressed` (a dtype the kernels do not compute in, the keys' and values' blocks
    of two dtypes, an MLP phi missing a weight, cos/sin/slots of another batch, stores of other heads, head dim or
    device) raises a ValueError that names it, and the stores stay as they were."""
    arguments = _entry_arguments()
    stores = [arguments["cmp_keys"], arguments["cmp_values"]]
    before = [store.clone() for store in stores]
    parameter = name.strip()
    arguments[parameter.split(".")[0]] = BAD_ENTRY_ARGUMENTS[name](arguments)  # `phi_k.hidden`: in phi_k
    with pytest.raises(ValueError, match=f"`{parameter}"):
        triton_ops.store_compressed(**arguments)
    assert all(torch.equal(store, old) for store, old in zip(stores, before, strict=True))


def test_store_compressed_refuses_stores_whose_tile_offsets_pass_int32():
    """A program writes from an int64 base at its tile's first batch row with int32 offsets: a store whose batch
    stride would take a tile's offsets past 2**31 is refused, naming it (meta tensors: no memory, no launch)."""
    arguments = _entry_arguments("meta")
    # Two batch rows in the one tile: the second row's last entry lies 2**31 - 64 + 119 elements past the base.
    arguments["cmp_keys"] = torch.empty_strided((2, 5, 3, 8), (2**31 - 64, 24, 8, 1), device="meta")
    with pytest.raises(ValueError, match="`cmp_keys`"):
        triton_ops.store_compressed(**arguments)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gate_kernel_matches_reference_mix(dtype):
    torch.manual_seed(0)
    num_q, heads, dim = (1000, 12, 64) if CUDA else (13, 3, 8)
    inputs = [torch.randn(num_q, heads, dim, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(3)]
    inputs.append(torch.rand(num_q, heads, 3, device=DEVICE, dtype=dtype, requires_grad=True))
    out = triton_pointwise.gate_branches(*inputs)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad_out)
    out_ref, grads_ref = reference_grads(reference.gate_branches, inputs, grad_out)
    assert_close_rel(out, out_ref, dtype, "o")
    for name, g, g_ref in zip(("d_cmp", "d_slc", "d_win", "d_gates"), grads, grads_ref):
        assert g.dtype == dtype
        assert_close_rel(g, g_ref, dtype, name)
    with pytest.raises(ValueError, match="`gates` be"):
        triton_pointwise.gate_branches(*inputs[:3], inputs[3][..., :2])


def test_model_with_triton_backend_matches_reference_logits_grads_and_decoding():
    dtype = torch.bfloat16 if CUDA else torch.float32
    config = tiny_config(nsa_backend="reference", fused_kernels="none")
    model = make_model(config).to(DEVICE, dtype)
    length, prefill = (300, 200) if CUDA else (36, 32)
    input_ids = torch.randint(0, config.vocab_size, (2 if CUDA else 1, length), device=DEVICE)
    loss_ref = model(input_ids, labels=input_ids, use_cache=False).loss
    grads_ref = torch.autograd.grad(loss_ref, list(model.parameters()))
    model.config.nsa_backend, model.config.fused_kernels = "triton", "triton"
    out = model(input_ids, labels=input_ids, use_cache=False)
    grads = torch.autograd.grad(out.loss, list(model.parameters()))
    assert abs(out.loss.item() - loss_ref.item()) <= tolerance(dtype)["atol"] * 3
    for g, g_ref in zip(grads, grads_ref):
        assert_close_rel(g, g_ref, dtype, "param grad")
    with torch.no_grad():
        full = model(input_ids, use_cache=False).logits
        cache = NsaCache(model.config)
        # A prefill, a 3-token step (as speculative decoding verifies drafts), then one token at a time.
        steps = [model(input_ids[:, :prefill], past_key_values=cache, use_cache=True).logits]
        steps.append(model(input_ids[:, prefill : prefill + 3], past_key_values=cache, use_cache=True).logits)
        steps += [model(input_ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits for t in range(prefill + 3, length)]
        truth = copy.deepcopy(model).float()
        truth.config.nsa_backend, truth.config.fused_kernels = "reference", "none"
        truth = truth(input_ids, use_cache=False).logits
    # FlashAttention-style: decoding (whose kernels split and merge differently) may round differently from
    # the full pass, but must be no further from the fp32 reference than twice the full pass's own error.
    err_full = (full.float() - truth).abs().max().item()
    err_decode = (torch.cat(steps, 1).float() - truth).abs().max().item()
    assert err_decode <= 2 * err_full + tolerance(dtype)["atol"] / 10, f"decode {err_decode:.2e} vs full {err_full:.2e}"


@pytest.mark.skipif(not CUDA, reason="host syncs are a CUDA notion")
@pytest.mark.parametrize("packed", [False, True])
def test_a_training_step_never_waits_for_the_gpu(packed):
    """Full-pass index work reads the host copy of the document boundaries: once the kernels are compiled, a
    forward and backward pass queues all its GPU work without a host sync, for plain rows and for packed
    documents whose boundaries are given on the host (given on the GPU, reading them is the one sync)."""
    model = make_model(tiny_config(nsa_backend="triton", fused_kernels="triton")).to(DEVICE, torch.bfloat16).train()
    input_ids = torch.randint(0, model.config.vocab_size, (2, 300), device=DEVICE)
    kwargs = {}
    if packed:
        kwargs["cu_seq_lens_q"] = torch.tensor([0, 120, 300, 333, 600])  # host boundaries, as a collator builds them
    for debug_mode in ("default", "error"):  # the first pass compiles and autotunes the kernels
        torch.cuda.set_sync_debug_mode(debug_mode)
        try:
            model(input_ids, labels=input_ids, use_cache=False, **kwargs).loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_query_key_and_value_head_dims_may_differ():
    """The paper's split (q/k 192, v 128): both primitives take separate q/k and v head dims."""
    torch.manual_seed(3)
    dtype = DTYPES[0]
    dim_qk, dim_v = (192, 128) if CUDA else (24, 16)
    layout, _ = pack_layout([300, 41] if CUDA else [40, 9], 32, 16)
    total = layout.positions.numel()
    q = torch.randn(total, 8, dim_qk, device=DEVICE, dtype=dtype, requires_grad=True)
    k = torch.randn(total, 2, dim_qk, device=DEVICE, dtype=dtype, requires_grad=True)
    v = torch.randn(total, 2, dim_v, device=DEVICE, dtype=dtype, requires_grad=True)
    lo = layout.key_offsets + (layout.positions - 15).clamp(min=0)
    hi = layout.key_offsets + layout.positions + 1
    starts = torch.where(layout.positions[:, None, None] >= 0, layout.key_offsets[:, None, None], -1).expand(-1, 2, 1)
    for name, fn in (
        ("interval", lambda impl, *x: impl.interval_attention(*x, lo, hi, 0.1)[0]),
        ("block", lambda impl, *x: impl.block_attention(*x, starts, 16, hi, 0.1)),
    ):
        out = fn(triton_ops, q, k, v)
        assert out.shape == (total, 8, dim_v)
        grad_out = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
        out_ref, grads_ref = reference_grads(lambda *x: fn(reference, *x), (q, k, v), grad_out)
        assert_close_rel(out, out_ref, dtype, f"{name} o")
        for g_name, g, g_ref in zip(("dq", "dk", "dv"), grads, grads_ref):
            assert_close_rel(g, g_ref, dtype, f"{name} {g_name}")


def test_split_forward_passes_equal_the_reference_on_decoding_layouts():
    """Decoding: few queries over long stores, so the forward kernels split each query's keys (or blocks)
    over several programs and merge the parts; every split count must give the reference's answer."""
    torch.manual_seed(11)
    dtype = DTYPES[0]
    heads_q, heads_kv, dim = (16, 2, 128) if CUDA else (4, 2, 16)
    pattern = SparsePattern(32, 16, 64, 16, 1, 2, 512) if CUDA else SparsePattern(8, 4, 16, 3, 1, 1, 100)
    context, positions = (9000, [8999, 4000, 70]) if CUDA else (700, [699, 300, 40])
    rows = torch.arange(len(positions), device=DEVICE)
    n_cmp = num_compressed_blocks(context, pattern.compress_block_size, pattern.compress_stride)
    layout = QueryLayout(
        positions=torch.tensor(positions, device=DEVICE), key_offsets=rows * context, cmp_offsets=rows * n_cmp,
        window_offsets=rows * context, run_length=1,
    )
    q = torch.randn(len(positions), heads_q, dim, device=DEVICE, dtype=dtype)
    k, v = (torch.randn(len(positions) * context, heads_kv, dim, device=DEVICE, dtype=dtype) for _ in range(2))
    k_cmp, v_cmp = (torch.randn(len(positions) * n_cmp, heads_kv, dim, device=DEVICE, dtype=dtype) for _ in range(2))
    lo = layout.cmp_offsets
    hi = lo + num_compressed_blocks(layout.positions + 1, pattern.compress_block_size, pattern.compress_stride)
    o_ref, lse_ref = reference.interval_attention(q.float(), k_cmp.float(), v_cmp.float(), lo, hi, dim**-0.5)
    chosen_ref = reference.select_blocks_varlen(q.float(), k_cmp.float(), lse_ref, layout, pattern, dim**-0.5)
    starts = torch.where(chosen_ref >= 0, layout.key_offsets[:, None, None] + chosen_ref * pattern.select_block_size, -1)
    key_hi = layout.key_offsets + layout.positions + 1
    block_ref = reference.block_attention(q.float(), k.float(), v.float(), starts, pattern.select_block_size, key_hi, dim**-0.5)
    unsplit = triton_select.select_blocks(q, k_cmp, lse_ref, layout, pattern, dim**-0.5, num_splits=1)
    if not CUDA:  # exact in fp32; at low precision a near-tie may differ (checked in the selection test above)
        assert torch.equal(unsplit.sort(-1).values, chosen_ref.sort(-1).values)
    for splits in (1, 3) if not CUDA else (1, 2, 7, 32):
        o, lse = triton_interval.interval_attention(q, k_cmp, v_cmp, lo, hi, dim**-0.5, 1, num_splits=splits)
        assert_close_rel(o, o_ref, dtype, f"interval o, {splits} splits")
        assert_close_rel(lse, lse_ref, dtype, f"interval lse, {splits} splits")
        block = triton_block.block_attention(q, k, v, starts, pattern.select_block_size, key_hi, dim**-0.5, num_splits=splits)
        assert_close_rel(block, block_ref, dtype, f"block o, {splits} splits")
        chosen = triton_select.select_blocks(q, k_cmp, lse_ref, layout, pattern, dim**-0.5, num_splits=splits)
        assert torch.equal(chosen.sort(-1).values, unsplit.sort(-1).values), f"selection, {splits} splits"


def test_equal_rows_compute_their_query_tiles_in_the_kernels():
    """A batch of equal rows (and one document) needs no tile arrays: the interval and selection kernels compute
    their tiles from the row length, with the outputs and gradients of the tiles read from arrays, and no tile array
    is built or kept (kept arrays would be memory outside a CUDA graph's pool)."""
    torch.manual_seed(4)
    dtype = DTYPES[0]
    pattern = SparsePattern(32, 16, 64, 4, 1, 1, 96) if CUDA else SparsePattern(8, 4, 16, 3, 1, 1, 12)
    rows, length = (3, 700) if CUDA else (2, 37)  # a row length no tile size divides
    layout, blocks = QueryLayout.for_batch(rows, length, pattern.compress_block_size, pattern.compress_stride, DEVICE)
    assert triton_common.query_runs(None, layout.documents, rows * length) == length
    assert triton_common.query_runs(None, (0, 5, 9), 9) == 0 and triton_common.query_runs(None, (0, 9), 9) == 9
    # Boundaries that do not cover the queries from the first are no runs: the tiles then come from arrays.
    assert triton_common.query_runs(None, (2, 9), 9) == 0 and triton_common.query_runs(None, (0, 9), 12) == 0
    total, n_cmp = rows * length, blocks.count
    heads_q, heads_kv, dim = (8, 2, 64) if CUDA else (4, 2, 16)
    inputs = nsa_inputs(total, n_cmp, total, heads_q, heads_kv, dim, dtype)
    attention = resolve_backend("triton", torch.device(DEVICE))
    triton_common._document_pieces.cache_clear()
    computed = attention(*inputs, layout, pattern, dim**-0.5)
    grad_out = torch.randn_like(computed)
    computed_grads = torch.autograd.grad(computed, inputs, grad_out)
    assert triton_common._document_pieces.cache_info().currsize == 0, "tile arrays were built for equal rows"
    # The same layout without its host boundaries: tiles found on the device (cut where intervals stop chaining,
    # so at other places: the online softmax then adds in another order) and read from arrays.
    arrays = dataclasses.replace(layout, documents=None)
    from_arrays = attention(*inputs, arrays, pattern, dim**-0.5)
    assert_close_rel(computed, from_arrays, dtype, "o")
    for i, (g, g_arrays) in enumerate(zip(computed_grads, torch.autograd.grad(from_arrays, inputs, grad_out))):
        assert_close_rel(g, g_arrays, dtype, f"grad {i}")
    if CUDA:  # at low precision a near-tie may select differently (the selection test above)
        return
    with torch.no_grad():
        lse = triton_interval.interval_attention(
            inputs[0], inputs[1], inputs[2], layout.cmp_offsets,
            layout.cmp_offsets + num_compressed_blocks(layout.positions + 1, 8 if not CUDA else 32, 4 if not CUDA else 16),
            dim**-0.5,
        )[1]
        chosen = triton_select.select_blocks(inputs[0], inputs[1], lse, layout, pattern, dim**-0.5)
        expected = reference.select_blocks_varlen(inputs[0].float(), inputs[1].float(), lse, layout, pattern, dim**-0.5)
    assert torch.equal(chosen.sort(-1).values, expected.sort(-1).values)


def decoding_inputs(positions: list[int], pattern: SparsePattern, heads_q: int, heads_kv: int, dim: int,
                    dtype: torch.dtype) -> tuple[list[Tensor], QueryLayout]:
    """Random inputs of one decoding step, a query per row at `positions`, each row's stores holding a few keys more
    than it has written."""
    capacity = max(positions) + 7
    rows = torch.arange(len(positions), device=DEVICE)
    n_cmp = num_compressed_blocks(capacity, pattern.compress_block_size, pattern.compress_stride)
    layout = QueryLayout(
        positions=torch.tensor(positions, device=DEVICE), key_offsets=rows * capacity, cmp_offsets=rows * n_cmp,
        window_offsets=rows * capacity, run_length=1,
    )
    num_q = len(positions)
    return nsa_inputs(num_q, num_q * n_cmp, num_q * capacity, heads_q, heads_kv, dim, dtype, grad=False), layout


_DECODE_SIZES = [(4, 2, 16), (3, 1, 8)] if not CUDA else [(12, 2, 64), (16, 1, 128)]
_DECODE_SPLITS = [(1, None, 1), (3, None, 1), (3, 32, 1)]
_KEY_SHARES = [(1, 32, 3), (3, 32, 2), (1, 16, 2)]  # on CPU at one size: the interpreter takes seconds per case


@pytest.mark.parametrize(
    "heads_q,heads_kv,dim,splits,tile_keys,key_splits",
    [size + case for size in _DECODE_SIZES for case in _DECODE_SPLITS]
    + [size + case for size in (_DECODE_SIZES if CUDA else _DECODE_SIZES[:1]) for case in _KEY_SHARES],
)
def test_fused_decode_attention_equals_the_composed_reference(heads_q, heads_kv, dim, splits, tile_keys, key_splits,
                                                              monkeypatch):
    """Decoding's three-launch attention (compressed partials, selection from their lse, one merge kernel for the
    selected blocks, the window and the gates) against the reference composition, for rows at different positions
    (one before its first compressed block, one inside its first selection block, stores holding more than each
    row has written), with the first two launches split over programs or not, with the merge kernel's key tile
    holding all selected blocks or two per step (the last step half empty), and with the merge kernel's keys shared
    by one program or several (some with no selection tile, or no window tile, to attend; with 16-key tiles the
    window spans more tiles than there are programs)."""
    if tile_keys is not None:
        if CUDA:
            tile_keys = 128
        monkeypatch.setattr(triton_decode, "_merge_tile_keys", lambda dim, dim_v: tile_keys)
    torch.manual_seed(12)
    dtype = DTYPES[0]
    pattern = SparsePattern(32, 16, 64, 16, 1, 2, 512) if CUDA else SparsePattern(8, 4, 16, 3, 1, 1, 12)
    if tile_keys == 16 and not CUDA:
        pattern = dataclasses.replace(pattern, window_size=40)
    positions = [9000, 4000, 70, 20] if CUDA else [700, 60, 5, 13]  # 700: 173 compressed blocks, three shares
    inputs, layout = decoding_inputs(positions, pattern, heads_q, heads_kv, dim, dtype)
    fused = triton_decode.decode_attention(*inputs, layout, pattern, dim**-0.5, num_splits=splits,
                                           key_splits=key_splits)
    expected = composition.nsa_attention_varlen(*(x.float() for x in inputs), layout, pattern, dim**-0.5)
    assert_close_rel(fused, expected, dtype, f"decode, {splits} splits, {key_splits} key splits")
    # Each branch and the gates are felt: the output moves when any one of them changes.
    for i in (2, 4, 6, 7) if splits > 1 else ():  # several shares in every launch once: (3, 32, 2)
        moved = [x.clone() for x in inputs]
        moved[i] = moved[i] + 1.0 if i != 7 else moved[i].flip(-1)
        changed = triton_decode.decode_attention(*moved, layout, pattern, dim**-0.5, num_splits=splits,
                                                 key_splits=key_splits)
        assert (changed.float() - fused.float()).abs().max() > 1e-3, f"input {i} left the output unchanged"


def test_fused_decode_merges_the_key_shares_of_large_scores(monkeypatch):
    """Scores in the hundreds (a query 50 times larger): the merge kernel's key shares and the compressed branch's
    shares are merged relative to their largest softmax maximum, so nothing overflows and the output is the
    reference's."""
    monkeypatch.setattr(triton_decode, "_merge_tile_keys", lambda dim, dim_v: 32 if not CUDA else 128)
    torch.manual_seed(15)
    pattern = SparsePattern(32, 16, 64, 16, 1, 2, 512) if CUDA else SparsePattern(8, 4, 16, 3, 1, 1, 12)
    dtype = DTYPES[0]
    inputs, layout = decoding_inputs([9000, 4000, 70, 20] if CUDA else [700, 60, 5, 13], pattern, 4, 2, 16, dtype)
    inputs[0] = inputs[0] * 50
    fused = triton_decode.decode_attention(*inputs, layout, pattern, 0.25, num_splits=3, key_splits=3)
    expected = composition.nsa_attention_varlen(*(x.float() for x in inputs), layout, pattern, 0.25)
    assert torch.isfinite(fused).all()
    assert_close_rel(fused, expected, dtype, "decode with large scores")


def test_decoding_shares_are_sized_by_the_store_and_compile_few_kernels(monkeypatch):
    """The first two decode launches split each row's compressed keys and selection blocks no further than every
    share keeps two steps of work (128 compressed keys, two tiles of selection blocks) and the GPU is filled (32
    programs per row and key head here), nearly as far as that allows, and in powers of two: a growing cache's
    store, decoded from 100 tokens to 128k, meets few share counts (each compiles the kernels anew)."""
    monkeypatch.setattr(triton_decode, "_num_splits", lambda programs, device: 32)
    pattern = SparsePattern(32, 16, 64, 16, 1, 2, 512)
    tile = triton_select.selection_tile_blocks(pattern)
    seen = set()
    for context, rows in itertools.product(range(100, 131073, 997), (1, 8)):
        keys = num_compressed_blocks(context, 32, 16) + 1  # a static cache's store: one spare slot per row
        counts = triton_decode._store_splits(rows, 2, rows * keys, pattern, torch.device("cpu"))
        for shares, work, step in zip(counts, (keys, -(-keys * 16 // 64)), (128, 2 * tile), strict=True):
            assert shares & (shares - 1) == 0 and shares <= 32, (context, shares)
            assert shares == 1 or work / shares >= step, (context, rows, shares, work)  # none short of work
            assert shares == 32 or work / shares < 4 * step, (context, rows, shares, work)  # none long
        seen.add(counts)
    assert len(seen) <= 8


@pytest.mark.skipif(not CUDA, reason="the interpreter runs a grid's programs one after another: no order to vary")
def test_gpu_merge_kernel_key_shares_give_the_same_bits_whichever_finishes_last():
    """The merge kernel's shares of a row's keys finish in any order on a GPU, and the last to arrive merges the
    others' states: many rows x 8 shares, run again and again, give the same bits every time (a share that merged
    before the others had stored, or a second share storing the output, would race), close to one program's walk
    over all the keys (the same selection: the first two launches are the same)."""
    torch.manual_seed(13)
    pattern = SparsePattern(32, 16, 64, 16, 1, 2, 512)
    positions = torch.randint(600, 9000, (96,)).tolist()
    inputs, layout = decoding_inputs(positions, pattern, 12, 2, 64, torch.bfloat16)
    first = triton_decode.decode_attention(*inputs, layout, pattern, 0.125, key_splits=8)
    one_program = triton_decode.decode_attention(*inputs, layout, pattern, 0.125, key_splits=1)
    assert_close_rel(first, one_program, torch.bfloat16, "decode, 8 key splits against 1")
    for run in range(40):
        again = triton_decode.decode_attention(*inputs, layout, pattern, 0.125, key_splits=8)
        assert torch.equal(again, first), f"run {run} differs"


def test_decoding_steps_without_gradients_run_the_fused_op(monkeypatch):
    """The composition sends a step of one query per row without gradients to the backend's fused decode, whose
    op passes opcheck; a step that needs gradients, or has more queries per row, runs the differentiable
    primitives, to the same output."""
    torch.manual_seed(14)
    pattern = SparsePattern(8, 4, 16, 3, 1, 1, 12)
    backend = backends.resolve_primitives("triton", torch.device(DEVICE))
    positions, capacity = [40, 9], 48
    rows = torch.arange(2, device=DEVICE)
    n_cmp = num_compressed_blocks(capacity, 8, 4)
    layout = QueryLayout(torch.tensor(positions, device=DEVICE), rows * capacity, rows * n_cmp, rows * capacity,
                         run_length=1)
    inputs = nsa_inputs(2, 2 * n_cmp, 2 * capacity, 4, 2, 16, DTYPES[0])
    calls, kernels = [], library._KERNELS[backend]
    monkeypatch.setitem(library._KERNELS, backend, kernels._replace(decode=lambda *a: calls.append(1) or kernels.decode(*a)))
    with torch.no_grad():
        fused = composition.nsa_attention_varlen(*inputs, layout, pattern, 0.25, backend=backend)
    assert calls == [1]
    composed = composition.nsa_attention_varlen(*inputs, layout, pattern, 0.25, backend=backend)
    several = composition.nsa_attention_varlen(*inputs, dataclasses.replace(layout, run_length=None), pattern, 0.25,
                                               backend=backend)
    assert calls == [1] and composed.requires_grad
    # Each path splits and merges differently, so each is held to the fp32 reference, not to the others' rounding.
    expected = composition.nsa_attention_varlen(*(x.detach().float() for x in inputs), layout, pattern, 0.25)
    for name, out in (("fused", fused), ("composed", composed), ("several queries per row", several)):
        assert_close_rel(out, expected, DTYPES[0], name)
    ranges = branch_ranges(layout, pattern)
    args = [x.detach() for x in inputs] + [layout.positions, layout.key_offsets, layout.cmp_offsets,
                                           layout.window_offsets, *ranges[:4], ranges.key_ends, [8, 4, 16, 3, 1, 1, 12],
                                           0.25, backend]
    torch.library.opcheck(torch.ops.nsa_hf.decode_attention.default, args, test_utils=("test_schema", "test_faketensor"))


def test_a_compiled_static_decoding_step_runs_the_fused_decode_op():
    """The static cache's decoding step under torch.compile (fullgraph) on the Triton backend: the fused decode op is
    in the graph, whose logits equal the eager step's."""
    from torch._dynamo.utils import counters

    from nsa_hf import NsaStaticCache

    model = make_model(tiny_config(nsa_backend="triton", fused_kernels="none", num_hidden_layers=1)).to(DEVICE)
    prompt = torch.randint(1, model.config.vocab_size, (2, 21), device=DEVICE)
    ops_seen = []

    def capture(gm, example_inputs):
        ops_seen.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm

    torch._dynamo.reset()
    counters.clear()
    step = torch.compile(model, fullgraph=True, backend=capture)
    logits = {}
    for name, forward in (("eager", model), ("compiled", step)):
        cache = NsaStaticCache(model.config, max_cache_len=30)
        with torch.no_grad():
            token = model(input_ids=prompt, cache=cache).logits[:, -1:].argmax(-1)
            logits[name] = [forward(input_ids=token, cache=cache).logits for _ in range(3)]
    assert any("decode_attention" in target for target in ops_seen), sorted(set(ops_seen))
    assert not counters["graph_break"]
    for eager, compiled in zip(logits["eager"], logits["compiled"]):
        torch.testing.assert_close(compiled, eager)
    torch._dynamo.reset()


def test_block_selection_merges_partial_lse_of_the_compressed_branch():
    """Selection given the compressed branch's lse as shares (`interval_partials`) merges them: the same blocks as
    from the merged lse, with shares that split each head's mass unevenly (a wrong merge reweights the heads)."""
    torch.manual_seed(13)
    pattern = SparsePattern(8, 4, 16, 3, 1, 1, 12)
    layout, blocks = pack_layout([60, 30], pattern.compress_block_size, pattern.compress_stride)
    q = torch.randn(90, 4, 16, device=DEVICE)
    k_cmp = torch.randn(blocks.count, 2, 16, device=DEVICE)
    lo = layout.cmp_offsets
    hi = lo + num_compressed_blocks(layout.positions + 1, 8, 4)
    lse = reference.interval_attention(q, k_cmp, k_cmp, lo, hi, 0.25)[1]
    shares = torch.tensor([0.99, 0.5, 0.2, 0.9], device=DEVICE)  # per head: the first share's part of the mass
    partials = torch.stack([lse + shares.log(), lse + (1 - shares).log()])
    merged = triton_select.select_blocks(q, k_cmp, lse, layout, pattern, 0.25)
    assert torch.equal(triton_select.select_blocks(q, k_cmp, partials, layout, pattern, 0.25), merged)
    assert not torch.equal(triton_select.select_blocks(q, k_cmp, partials[0], layout, pattern, 0.25), merged)
    # A first share with almost none of the mass: the merge must scale by the largest share, not the first (exp(100)
    # overflows fp32).
    lopsided = torch.stack([lse - 100, lse])
    assert torch.equal(triton_select.select_blocks(q, k_cmp, lopsided, layout, pattern, 0.25), merged)


def test_fused_decode_attention_refuses_more_than_one_query_per_row():
    layout = QueryLayout(*(torch.zeros(2, dtype=torch.long) for _ in range(4)), run_length=2)
    x = torch.zeros(2, 2, 8)
    with pytest.raises(ValueError, match="run_length == 1"):
        triton_decode.decode_attention(x, x, x, x, x, x, x, torch.zeros(2, 2, 3), layout, SparsePattern(), 0.3)


def test_layers_sharing_a_layout_build_its_query_tiles_once():
    """The query tiles of the interval kernels and the document tiles of block selection derive from the host
    document boundaries alone: built once per boundaries and tile (each build costs launches), shared by the layers
    of a pass and by later passes, which get the same output."""
    torch.manual_seed(2)
    dtype = DTYPES[0]
    pattern = SparsePattern(32, 16, 64, 4, 1, 1, 96) if CUDA else SparsePattern(8, 4, 16, 3, 1, 1, 12)
    layout, blocks = pack_layout([300, 45] if CUDA else [40, 9], pattern.compress_block_size, pattern.compress_stride)
    total, n_cmp = layout.positions.numel(), blocks.token_starts.numel()
    inputs = [torch.randn(total, 4, 16, device=DEVICE, dtype=dtype), torch.randn(n_cmp, 2, 16, device=DEVICE, dtype=dtype),
              torch.randn(n_cmp, 2, 16, device=DEVICE, dtype=dtype)]
    inputs += [torch.randn(total, 2, 16, device=DEVICE, dtype=dtype) for _ in range(4)]
    inputs.append(torch.rand(total, 4, 3, device=DEVICE, dtype=dtype))
    inputs = [x.requires_grad_() for x in inputs]
    triton_common._document_pieces.cache_clear()
    attention = resolve_backend("triton", torch.device(DEVICE))
    outputs, builds = [], []
    for _ in range(2):  # two layers over one layout
        out = attention(*inputs, layout, pattern, 0.25)
        out.sum().backward()
        outputs.append(out.detach())
        builds.append(triton_common._document_pieces.cache_info().misses)
    assert builds[0] >= 1, "the interval and selection tiles are built from the document boundaries"
    assert builds[1] == builds[0], f"the second layer rebuilt {builds[1] - builds[0]} tilings"
    assert torch.equal(outputs[0], outputs[1])


def _chunking_case(name: str):
    """(inputs, the Triton function, its PyTorch reference, a launch limit that cuts it into several launches) of
    one op; inputs that require grad are the ones whose gradients are compared."""
    dtype = DTYPES[0]

    def rand(*shape, grad=True):
        return torch.randn(*shape, device=DEVICE, dtype=dtype).requires_grad_(grad)

    if name == "rms_norm":  # rows strided wider than the norm (as a slice of a stacked tensor)
        return ([rand(2, 9, 32, grad=False)[..., :24].requires_grad_(), (1 + rand(24, grad=False) / 4).requires_grad_()],
                lambda x, w: triton_pointwise.rms_norm(x, w, 1e-6),
                lambda x, w: w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)), 100)
    if name == "rotary":  # q and two key tensors sliced from one stacked projection
        angles = torch.randn(2, 9, 4, device=DEVICE).repeat(1, 1, 2)
        bounds = list(itertools.pairwise([8, 56, 72, 80]))

        def rotate(impl, stacked, cos, sin):
            xs = tuple(stacked[..., a:b].unflatten(-1, (-1, 8)) for a, b in bounds)
            outs = impl(xs, cos, sin) if impl is triton_pointwise.apply_rotary else [impl(x, cos, sin) for x in xs]
            return torch.cat([out.flatten() for out in outs])

        return ([rand(2, 9, 88), angles.cos().to(dtype), angles.sin().to(dtype)],
                lambda *x: rotate(triton_pointwise.apply_rotary, *x), lambda *x: rotate(apply_rotary, *x), 200)
    if name == "silu_mul":  # with padding columns past gate and up
        return ([rand(2, 7, 52)], lambda x: triton_pointwise.silu_mul(x, 24),
                lambda x: torch.nn.functional.silu(x[..., :24]) * x[..., 24:48], 120)
    if name == "gate":
        gates = torch.rand(13, 3, 3, device=DEVICE, dtype=dtype).requires_grad_()
        inputs = [rand(13, 3, 8) for _ in range(3)] + [gates]
        return inputs, triton_pointwise.gate_branches, reference.gate_branches, 60
    if name == "interval":  # split over programs: the splits' merge and the backward's delta run in chunks
        layout, _ = pack_layout([30, 22], 32, 16)
        lo = layout.key_offsets + (layout.positions - 15).clamp(min=0)
        hi = layout.key_offsets + layout.positions + 1
        return ([rand(52, 4, 16), rand(52, 2, 16), rand(52, 2, 16)],
                lambda *x: triton_interval.interval_attention(*x, lo, hi, 0.25, num_splits=3)[0],
                lambda *x: reference.interval_attention(*x, lo, hi, 0.25)[0], 1000)
    # Block attention: queries in chunks, each a pass of its own; both forward strategies.
    hi, starts = causal_blocks(40, 2, 3, 16)
    block_centric = name == "block-centric"
    return ([rand(40, 4, 16), rand(40, 2, 16), rand(40, 2, 16)],
            lambda *x: triton_block.block_attention(*x, starts, 16, hi, 0.25, block_centric=block_centric),
            lambda *x: reference.block_attention(*x, starts, 16, hi, 0.25), 1000)


def _count_chunks(monkeypatch) -> list[int]:
    """Spies on `_row_chunks` wherever a kernel family looks it up (the split merge and delta in `common`, block
    attention, the pointwise ops): how many launches each call cut."""
    counts, original = [], triton_common._row_chunks

    def counting(*args):
        chunks = original(*args)
        counts.append(len(chunks))
        return chunks

    for module in (triton_common, triton_block, triton_pointwise):
        monkeypatch.setattr(module, "_row_chunks", counting)
    return counts


def _output_and_grads(fn, inputs, grad_out=None):
    out = fn(*inputs)
    grad_out = torch.randn_like(out) if grad_out is None else grad_out
    return out, torch.autograd.grad(out, [x for x in inputs if x.requires_grad], grad_out), grad_out


def test_wrappers_record_gradients_when_only_some_inputs_need_them():
    """The wrappers skip autograd only when no input needs a gradient (decoding): a frozen weight (LoRA fine-tuning)
    or frozen keys still leave the other inputs' gradients, equal to those of a call where every input needs one."""
    torch.manual_seed(0)
    x, weight = torch.randn(2, 5, 16, device=DEVICE), 1 + torch.randn(16, device=DEVICE) / 4
    angles = torch.randn(2, 5, 4, device=DEVICE).repeat(1, 1, 2)  # RoPE over head dim 8
    q, k, v = (torch.randn(12, heads, 16, device=DEVICE) for heads in (4, 2, 2))
    lo, hi = torch.zeros(12, dtype=torch.long, device=DEVICE), torch.arange(1, 13, device=DEVICE)
    branches = [torch.randn(6, 4, 16, device=DEVICE) for _ in range(3)]
    gates = torch.rand(6, 4, 3, device=DEVICE)
    cases = {
        "rms_norm": (lambda x, w: triton_pointwise.rms_norm(x, w, 1e-6), (x, weight)),
        "rotary": (lambda a, b: torch.cat(triton_pointwise.apply_rotary((a, b), angles.cos(), angles.sin()), -2),
                   (x.unflatten(-1, (2, 8)), x.unflatten(-1, (2, 8)).flip(0))),
        "gate": (triton_pointwise.gate_branches, (*branches, gates)),
        "interval": (lambda *qkv: triton_interval.interval_attention(*qkv, lo, hi, 0.25)[0], (q, k, v)),
    }
    for name, (fn, inputs) in cases.items():
        full = [t.clone().requires_grad_() for t in inputs]
        out = fn(*full)
        grad_out = torch.randn_like(out)
        expected = torch.autograd.grad(out, full, grad_out)
        for frozen in range(len(inputs)):
            some = [t.clone().requires_grad_(i != frozen) for i, t in enumerate(inputs)]
            wanted = [t for t in some if t.requires_grad]
            grads = torch.autograd.grad(fn(*some), wanted, grad_out)
            for grad, ref in zip(grads, [g for i, g in enumerate(expected) if i != frozen], strict=True):
                torch.testing.assert_close(grad, ref, msg=lambda m: f"{name}, input {frozen} frozen: {m}")


def test_the_wrappers_powers_of_two_are_tritons():
    """`_next_pow2` (plain Python, for the launch wrappers' host time) is `triton.next_power_of_2`, which sizes
    blocks and pads: from 0 up, around powers of two, and past 2**31."""
    values = [*range(0, 4100), *(2**e + d for e in range(12, 40) for d in (-1, 0, 1))]
    assert [triton_common._next_pow2(x) for x in values] == [triton.next_power_of_2(x) for x in values]


CHUNKED_OPS = ["rms_norm", "rotary", "silu_mul", "gate", "interval", "block-centric", "query-centric"]


@pytest.mark.parametrize("name", CHUNKED_OPS)
def test_launches_cut_below_the_int32_limit_equal_one_launch(name, monkeypatch):
    """Tensors past `_LAUNCH_ELEMENTS` (2**31: int32 offsets) run in launches over row or query chunks: with the
    limit made small, the chunked forward and gradients equal one launch's and the PyTorch reference's."""
    torch.manual_seed(0)
    dtype = DTYPES[0]
    inputs, fn, ref, limit = _chunking_case(name)
    out, grads, grad_out = _output_and_grads(fn, inputs)
    chunk_counts = _count_chunks(monkeypatch)
    monkeypatch.setattr(triton_common, "_LAUNCH_ELEMENTS", limit)
    out_chunked, grads_chunked, _ = _output_and_grads(fn, inputs, grad_out)
    assert max(chunk_counts) > 1
    upcast = [x.detach().float().requires_grad_(x.requires_grad) for x in inputs]
    out_ref, grads_ref, _ = _output_and_grads(ref, upcast, grad_out.float())
    results = zip((out_chunked, *grads_chunked), (out, *grads), (out_ref, *grads_ref))
    # Block attention's k and v gradients are sums over query chunks, rounded to k's dtype once per chunk: equal
    # to one launch up to that rounding, so they are held to FlashAttention's bound against the fp32 reference
    # (at most twice one launch's error, plus the dtype's rounding), every other tensor to one launch exactly.
    summed_over_chunks = {2, 3} if name in ("block-centric", "query-centric") else set()
    for i, (chunked, single, expected) in enumerate(results):
        if i in summed_over_chunks:
            single_error = (single.float() - expected).abs().max()
            chunked_error = (chunked.float() - expected).abs().max()
            bound = 2 * single_error + tolerance(dtype)["atol"] * expected.abs().max().clamp(min=1.0)
            assert chunked_error <= bound, f"{name} grad {i}: error {chunked_error:.2e} > {bound:.2e}"
        else:
            torch.testing.assert_close(chunked, single, msg=lambda m: f"{name} output/grad {i}: {m}")
        assert_close_rel(chunked, expected, dtype, f"{name} output/grad {i}")


def test_tile_readers_are_the_queries_that_see_some_key_of_each_tile():
    """The interval backward's dk/dv programs read their key tile's readers from one binary-search kernel: for random
    non-decreasing intervals (empty ones, repeats, a partial last tile; once more tiles than one program holds), the
    range [first hi > the tile's first key, first lo > its last key), which holds every query q with
    lo[q] <= c < hi[q] for some key c of the tile, as a brute-force check finds them, and besides them only empty
    intervals (which the kernel masks)."""
    torch.manual_seed(3)
    sizes = [(int(torch.randint(1, 200, ())), int(torch.randint(1, 300, ()))) for _ in range(20)] + [(900, 4200)]
    for num_q, num_k in sizes:
        lo = torch.sort(torch.randint(0, num_k, (num_q,), device=DEVICE))[0]
        hi = torch.cummax(torch.clamp(lo + torch.randint(0, 40, (num_q,), device=DEVICE), max=num_k), 0)[0]
        q_lo, q_hi = triton_interval._tile_readers(lo, hi, num_k, 16)
        first = torch.arange(0, num_k, 16, device=DEVICE)
        last = torch.clamp(first + 15, max=num_k - 1)
        assert torch.equal(q_lo.long(), torch.searchsorted(hi, first, right=True))
        assert torch.equal(q_hi.long(), torch.searchsorted(lo, last, right=True))
        keys = torch.arange(num_k, device=DEVICE)
        sees = (lo[:, None] <= keys[None, :]) & (keys[None, :] < hi[:, None])  # [query, key]
        for tile in range(q_lo.numel()):
            reads = sees[:, tile * 16:(tile + 1) * 16].any(1)
            in_range = torch.zeros_like(reads)
            in_range[q_lo[tile]:q_hi[tile]] = True
            assert not (reads & ~in_range).any(), f"tile {tile}: a reader outside [{q_lo[tile]}, {q_hi[tile]})"
            assert (reads | (lo == hi))[in_range].all(), f"tile {tile}: a query in range that reads nothing"


def test_a_store_past_int32_sort_keys_is_refused_by_name():
    """Block attention sorts (key head, key) pairs as int32, a limit past any GPU's memory: named, not wrapped."""
    with pytest.raises(ValueError, match="got 2 key heads x 1073741824 keys"):
        triton_block._queries_per_block(torch.zeros(1, 2, 1, dtype=torch.int32, device=DEVICE), 2**30, 7)


def test_documents_shorter_than_a_compressed_block_have_an_empty_store():
    """All documents shorter than l: the compressed store is empty; outputs, gradients and selection still
    follow the reference (the kernels never receive the empty tensor)."""
    torch.manual_seed(5)
    dtype = DTYPES[0]
    pattern = SparsePattern(32, 16, 64, 4, 1, 1, 96) if CUDA else SparsePattern(8, 4, 16, 3, 1, 1, 12)
    layout, blocks = pack_layout([2, 5, 1], pattern.compress_block_size, pattern.compress_stride)
    assert blocks.token_starts.numel() == 0
    heads_q, heads_kv, dim = (12, 2, 64) if CUDA else (4, 2, 16)
    total = layout.positions.numel()
    inputs = nsa_inputs(total, 0, total, heads_q, heads_kv, dim, dtype)
    fast = resolve_backend("triton", torch.device(DEVICE))(*inputs, layout, pattern, dim**-0.5)
    grad_out = torch.randn_like(fast)
    grads = torch.autograd.grad(fast, inputs, grad_out)
    out_ref, grads_ref = reference_grads(
        lambda *x: composition.nsa_attention_varlen(*x, layout, pattern, dim**-0.5), inputs, grad_out
    )
    assert_close_rel(fast, out_ref, dtype, "o")
    for i, (g, g_ref) in enumerate(zip(grads, grads_ref)):
        assert g.shape == g_ref.shape
        assert_close_rel(g, g_ref, dtype, f"grad {i}")
