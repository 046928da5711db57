"""torch.compile over NSA: the primitives are custom ops (`nsa_hf.ops.library`), so a whole training step and a
forward on packed documents compile with fullgraph=True (no graph break) and compute what eager computes.

On CPU the reference backend runs inside the ops; on a GPU, Triton (the same tests, `benchmarks/gpu_check.sh`).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

import nsa_hf
from nsa_hf.ops import backends, library
from nsa_hf.ops.backends import resolve_primitives
from nsa_hf.ops.layout import QueryLayout, SparsePattern

from .factories import make_model, tiny_config

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
BACKEND = "triton" if CUDA else "reference"


def _model(layers: int = 1):
    config = tiny_config(num_hidden_layers=layers, nsa_backend=BACKEND, fused_kernels="auto")
    return make_model(config).train().to(DEVICE)


def _step(model, **inputs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Loss and every parameter's gradient of one training step (no optimizer: the two runs share weights)."""
    for p in model.parameters():
        p.grad = None
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def _tolerance() -> dict[str, float]:
    return dict(rtol=2e-2, atol=2e-3) if CUDA else dict(rtol=1e-4, atol=1e-5)


def _assert_same_step(eager, compiled) -> None:
    loss, grads = eager
    loss_c, grads_c = compiled
    tol = _tolerance()
    torch.testing.assert_close(loss_c, loss, **tol)
    for g_c, g in zip(grads_c, grads, strict=True):
        torch.testing.assert_close(g_c, g, **tol)


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    assert not counters["graph_break"], f"graph breaks: {dict(counters['graph_break'])}"
    torch._dynamo.reset()


def test_fullgraph_training_step_equals_eager(fresh_dynamo):
    """Loss and gradients of a compiled step (fullgraph: dynamo raises on any graph break) equal eager's, for a
    plain batch and for packed rows whose position_ids restart (DataCollatorWithFlattening)."""
    model = _model(layers=2)
    ids = torch.randint(0, 97, (2, 40), device=DEVICE)
    compiled = torch.compile(model, fullgraph=True)
    _assert_same_step(_step(model, input_ids=ids, labels=ids), _step(compiled, input_ids=ids, labels=ids))
    positions = torch.cat([torch.arange(25), torch.arange(15)]).to(DEVICE)[None].expand(2, -1)
    packed = dict(input_ids=ids, labels=ids, position_ids=positions)
    _assert_same_step(_step(model, **packed), _step(compiled, **packed))
    # The packing is real: the second document's logits are those of the document alone, not of the whole row.
    with torch.no_grad():
        logits = compiled(input_ids=ids, position_ids=positions).logits[:, 25:]
        torch.testing.assert_close(logits, model(input_ids=ids[:, 25:]).logits, **_tolerance())
        assert (logits - model(input_ids=ids).logits[:, 25:]).abs().max() > 1e-3


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_training_step_under_cuda_graphs_equals_eager(fresh_dynamo):
    """mode="reduce-overhead" (the compiled step recorded as CUDA graphs, then replayed): every graph output lives
    in the graphs' memory pool (no CPU tensor such as host document boundaries among them), and the replayed
    steps equal eager's."""
    model = _model(layers=2)
    compiled = torch.compile(model, fullgraph=True, mode="reduce-overhead")
    for seed in range(3):  # warm-up, recording, replay
        ids = torch.randint(0, 97, (2, 40), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(seed))
        _assert_same_step(_step(model, input_ids=ids, labels=ids), _step(compiled, input_ids=ids, labels=ids))
    assert not counters["inductor"]["cudagraph_skips"], "inductor skipped the CUDA graphs (its log says why)"


def test_fullgraph_forward_on_cu_seq_lens_and_padding_equals_eager(fresh_dynamo):
    """A compiled forward over documents given as cu_seq_lens_q (one packed row) and over a left-padded batch."""
    model = _model().eval()
    compiled = torch.compile(model, fullgraph=True)
    ids = torch.randint(0, 97, (1, 50), device=DEVICE)
    cu = torch.tensor([0, 9, 30, 50], device=DEVICE, dtype=torch.int32)
    with torch.no_grad():
        eager = model(input_ids=ids, cu_seq_lens_q=cu, use_cache=False).logits
        torch.testing.assert_close(compiled(input_ids=ids, cu_seq_lens_q=cu, use_cache=False).logits, eager)
        # Each document alone gives the same logits as inside the packed row.
        alone = model(input_ids=ids[:, 9:30], use_cache=False).logits
        torch.testing.assert_close(eager[:, 9:30], alone, rtol=1e-4, atol=1e-5)
        mask = torch.ones(2, 50, dtype=torch.long, device=DEVICE)
        mask[1, :7] = 0
        batch = ids.expand(2, -1)
        eager = model(input_ids=batch, attention_mask=mask, use_cache=False).logits
        torch.testing.assert_close(compiled(input_ids=batch, attention_mask=mask, use_cache=False).logits, eager)


@pytest.mark.parametrize("setting", ["auto", BACKEND])
def test_a_compiled_first_call_finds_its_backend_resolved(fresh_dynamo, monkeypatch, setting):
    """A model whose very first call is compiled (fullgraph) on a process that never resolved its setting: the model
    resolved it when built, so the traced call only reads it (resolution logs, imports and registers kernels)."""
    for table in ("_RESOLVED_NAMES", "_RESOLVED_ATTENTION", "_RESOLVED_POINTWISE"):
        monkeypatch.setattr(backends, table, {})
    config = tiny_config(num_hidden_layers=1, nsa_backend=setting, fused_kernels="auto")
    model = make_model(config).eval().to(DEVICE)
    ids = torch.randint(0, 97, (1, 40), device=DEVICE)
    with torch.no_grad():
        compiled = torch.compile(model, fullgraph=True)(input_ids=ids, use_cache=False).logits
        torch.testing.assert_close(compiled, model(input_ids=ids, use_cache=False).logits, **_tolerance())


def test_compiled_model_rejects_a_mask_with_holes(fresh_dynamo):
    """The mask check needs the host; inside the compiled graph it still raises, with the eager message."""
    compiled = torch.compile(_model().eval(), fullgraph=True)
    mask = torch.ones(1, 20, dtype=torch.long, device=DEVICE)
    mask[0, 5] = 0
    with pytest.raises(ValueError, match="not between real tokens"):
        compiled(input_ids=torch.zeros(1, 20, dtype=torch.long, device=DEVICE), attention_mask=mask, use_cache=False)
    counters.clear()  # the failed call's break is the error itself


def test_custom_ops_pass_opcheck():
    """Schemas, fake implementations and registered autograd of every NSA op, as torch.library checks them."""
    torch.manual_seed(0)
    backend = resolve_primitives(BACKEND, torch.device(DEVICE))
    pattern = SparsePattern(8, 4, 16, 3, 1, 1, 12)
    layout, blocks = QueryLayout.from_cu_seqlens(torch.tensor([0, 30, 41]), 8, 4, device=DEVICE)
    dtype = torch.float32

    def rand(*shape, grad=True):
        return torch.randn(*shape, device=DEVICE, dtype=dtype, requires_grad=grad)

    q, k, v = rand(41, 4, 8), rand(41, 2, 8), rand(41, 2, 8)
    k_cmp, v_cmp = rand(blocks.count, 2, 8), rand(blocks.count, 2, 8)
    lo = layout.cmp_offsets
    hi = lo + nsa_hf.ops.num_compressed_blocks(layout.positions + 1, 8, 4)
    ops = torch.ops.nsa_hf
    torch.library.opcheck(ops.interval_attention.default, (q, k_cmp, v_cmp, lo, hi, 0.3, 0, None, list(layout.documents), 0, backend))
    # Boundaries that are data (packed documents found under torch.compile) come as a CPU tensor instead.
    torch.library.opcheck(ops.interval_attention.default, (q, k_cmp, v_cmp, lo, hi, 0.3, 0, torch.tensor(layout.documents), [], 0, backend))
    _, lse = library.interval_attention(q, k_cmp, v_cmp, lo, hi, 0.3, backend=backend)
    fields = [8, 4, 16, 3, 1, 1, 12]
    select_args = (q.detach(), k_cmp.detach(), lse.detach(), layout.positions, layout.cmp_offsets, 0, None,
                   list(layout.documents), fields, 0.3, backend)
    torch.library.opcheck(ops.select_blocks.default, select_args)
    chosen = library.select_blocks(q, k_cmp, lse, layout, pattern, 0.3, backend=backend)
    starts = (chosen.long() * 16 + layout.key_offsets[:, None, None]).masked_fill(chosen < 0, -1)
    key_ends = layout.key_offsets + layout.positions + 1
    torch.library.opcheck(ops.block_attention.default, (q, k, v, starts, 16, key_ends, 0.3, backend))
    starts_mask = torch.zeros(2, 20, dtype=torch.bool, device=DEVICE)
    starts_mask[0, 7] = starts_mask[1, 12] = True
    torch.library.opcheck(ops.document_layout.default, (starts_mask, None, None, "", 40, 8, 4, torch.device(DEVICE)))
    host_bounds = torch.tensor([0, 17, 40])  # as a collator builds them: the layout still lands on the model's device
    torch.library.opcheck(ops.document_layout.default, (None, host_bounds, None, "", 40, 8, 4, torch.device(DEVICE)))


def test_no_part_of_the_package_hides_from_the_compiler():
    """No `torch.compiler.disable` (or dynamo skip) in src/: the attention is ops that the compiler sees."""
    src = Path(nsa_hf.__file__).parent
    hidden = [
        f"{path.relative_to(src)}:{number}"
        for path in src.rglob("*.py")
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"compiler\.disable|_dynamo\.disable|disable_dynamo", line)
    ]
    assert not hidden, f"code hidden from torch.compile: {hidden}"


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (CPU: its interpreter)")
def test_fused_pointwise_kernels_are_custom_ops_that_compile():
    """RMSNorm, RoPE, SwiGLU, the gate mix and the cross entropy: each passes opcheck, and a function of one's own
    that calls them compiles with fullgraph=True to the eager values and gradients."""
    from nsa_hf.ops import triton as kernels

    torch.manual_seed(0)

    def rand(*shape, grad=True):
        return torch.randn(*shape, device=DEVICE, requires_grad=grad)

    x, weight = rand(3, 5, 24), rand(24)
    q, k, cos, sin = rand(3, 5, 4, 8), rand(3, 5, 2, 8), rand(3, 5, 8, grad=False), rand(3, 5, 8, grad=False)
    gate_up = rand(3, 5, 2 * 16 + 8)
    branches, gates = [rand(6, 4, 8) for _ in range(3)], rand(6, 4, 3)
    logits, labels = rand(6, 33), torch.tensor([1, 5, -100, 32, 0, 7], device=DEVICE)
    ops = torch.ops.nsa_hf
    for op, args in (
        (ops.rms_norm.default, (x, weight, 1e-6, None)),
        (ops.rotary.default, ([q, k], cos, sin, False)),
        (ops.silu_mul.default, (gate_up, 16)),
        (ops.gate_branches.default, (*branches, gates)),
        (ops.cross_entropy.default, (logits, labels, -100)),
    ):
        torch.library.opcheck(op, args)

    def everything(x, weight, q, k, gate_up, o_cmp, o_slc, o_win, gates, logits):
        rq, rk = kernels.apply_rotary((q, k), cos, sin)
        return (kernels.rms_norm(x, weight, 1e-6).sum() + rq.sum() + (rk * rk).sum()
                + kernels.silu_mul(gate_up, 16).sum() + kernels.gate_branches(o_cmp, o_slc, o_win, gates).square().sum()
                + kernels.cross_entropy(logits, labels).sum())

    inputs = (x, weight, q, k, gate_up, *branches, gates, logits)
    eager = everything(*inputs)
    grads = torch.autograd.grad(eager, inputs)
    torch._dynamo.reset()
    compiled = torch.compile(everything, fullgraph=True)(*inputs)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    for g_c, g in zip(torch.autograd.grad(compiled, inputs), grads, strict=True):
        torch.testing.assert_close(g_c, g, rtol=1e-4, atol=1e-5)
