"""Tests added by a mutation check: each pins a behaviour that a planted one-line bug changed while every
other test still passed. Expectations come from NSA_SPEC.md, the Llama block structure the model documents,
or transformers' own cache classes, never from numbers produced by the code under test."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from nsa_hf import NsaCache
from nsa_hf.ops import library, reference
from nsa_hf.ops.backends import resolve_primitives
from nsa_hf.ops.layout import QueryLayout, SparsePattern, num_compressed_blocks

from .factories import make_model, tiny_config


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def test_decoder_blocks_are_pre_norm_residual_attention_then_mlp():
    """Llama-style blocks (modeling_nsa's docstring): h = x + attn(norm_1(x)), then
    y = h + down(silu(gate(norm_2(h))) * up(norm_2(h))); after the last block the final norm and lm_head. The norms
    get distinct weights, so using the wrong one shows; the attention output itself is taken from the layer
    (test_spec.py checks it against the spec)."""
    config = tiny_config()
    model = make_model(config)
    eps = config.rms_norm_eps
    with torch.no_grad():
        norms = [model.model.norm]
        norms += [n for layer in model.model.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
        for norm in norms:
            norm.weight.copy_(torch.rand(config.hidden_size) + 0.5)
    captured: dict[str, list] = {"layer": [], "attn": []}
    handles = []
    for layer in model.model.layers:
        handles.append(layer.register_forward_hook(lambda m, args, out: captured["layer"].append((args[0], out))))
        handles.append(
            layer.self_attn.register_forward_hook(lambda m, args, out: captured["attn"].append((args[0], out[0])))
        )
    torch.manual_seed(8)
    input_ids = torch.randint(0, config.vocab_size, (2, 40))
    try:
        with torch.no_grad():
            logits = model(input_ids, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    assert len(captured["layer"]) == len(captured["attn"]) == config.num_hidden_layers

    x = model.model.embed_tokens.weight[input_ids]
    for layer, (layer_in, layer_out), (attn_in, attn_out) in zip(
        model.model.layers, captured["layer"], captured["attn"]
    ):
        torch.testing.assert_close(layer_in, x)
        torch.testing.assert_close(attn_in, rms_norm(x, layer.input_layernorm.weight, eps))
        h = x + attn_out
        n2 = rms_norm(h, layer.post_attention_layernorm.weight, eps)
        mlp = layer.mlp
        gate, up = F.linear(n2, mlp.gate_proj.weight), F.linear(n2, mlp.up_proj.weight)
        expected = h + F.linear(F.silu(gate) * up, mlp.down_proj.weight)
        torch.testing.assert_close(layer_out, expected, rtol=1e-5, atol=1e-5)
        x = expected
    expected_logits = F.linear(rms_norm(x, model.model.norm.weight, eps), model.lm_head.weight)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("branch_kv", ["independent", "shared"])
def test_crop_of_a_cache_shorter_than_window_and_block_then_redecode_equals_full_forward(branch_kv):
    """NSA_SPEC "Decoding": rollback (crop) must be exact. With 6 cached tokens (fewer than w - 1 = 11 and
    l - 1 = 7) every buffer still holds the whole history, so rolling back 2 tokens is always possible."""
    config = tiny_config(branch_kv=branch_kv)
    model = make_model(config)
    torch.manual_seed(9)
    prompt = torch.randint(0, config.vocab_size, (2, 6))
    rest = torch.randint(0, config.vocab_size, (2, 9))
    cache = NsaCache(config)
    with torch.no_grad():
        model(prompt, past_key_values=cache, use_cache=True)
        cache.crop(-2)
        assert cache.get_seq_length() == 4
        redecoded = torch.cat(
            [model(rest[:, i : i + 1], past_key_values=cache, use_cache=True).logits for i in range(rest.shape[1])], 1
        )
        full = model(torch.cat([prompt[:, :4], rest], 1), use_cache=False).logits
    torch.testing.assert_close(redecoded, full[:, 4:], rtol=1e-5, atol=1e-5)


def test_cache_cropped_to_empty_takes_the_padding_of_the_next_prompt():
    """A cache rolled back to 0 tokens is an empty cache: the next prompt's layout (here: no padding) decides
    where each row's document starts, not the padding of the prompt that was rolled back."""
    config = tiny_config()
    model = make_model(config)
    torch.manual_seed(10)
    padded = torch.randint(1, config.vocab_size, (2, 20))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[0, :7] = 0
    fresh = torch.randint(1, config.vocab_size, (2, 20))
    cache = NsaCache(config)
    with torch.no_grad():
        model(padded, attention_mask=mask, past_key_values=cache, use_cache=True)
        cache.crop(-20)
        assert cache.get_seq_length() == 0
        reused = model(fresh[:, :15], past_key_values=cache, use_cache=True).logits
        reused = torch.cat([reused, model(fresh[:, 15:], past_key_values=cache, use_cache=True).logits], 1)
        full = model(fresh, use_cache=False).logits
    torch.testing.assert_close(reused, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_cache", [False, True])
@pytest.mark.parametrize("rows", [1, 3])
def test_mask_with_another_batch_size_is_named(rows, use_cache):
    """A 2-D mask is [B, past + T]: a mask for another number of rows must fail up front naming `attention_mask`,
    not later in the layout or RoPE code with an error about `cu_seqlens` or tensor sizes."""
    config = tiny_config()
    model = make_model(config)
    ids = torch.randint(1, config.vocab_size, (2, 10))
    with torch.no_grad(), pytest.raises(ValueError, match=r"`attention_mask` must have shape \(2, 10\)"):
        model(ids, attention_mask=torch.ones(rows, 10, dtype=torch.long), use_cache=use_cache)


def test_mask_sizes_are_cached_plus_new_tokens():
    """`get_mask_sizes(query_length, layer)` is transformers' Cache contract (read by masking_utils): the kv length
    is the cached tokens plus the new queries, offset 0 for a cache holding the whole history (as transformers'
    DynamicLayer reports)."""
    config = tiny_config()
    model = make_model(config)
    cache = NsaCache(config)
    with torch.no_grad():
        model(torch.randint(0, config.vocab_size, (1, 9)), past_key_values=cache, use_cache=True)
    for query_length in (1, 3):
        for layer_idx in range(config.num_hidden_layers):
            assert cache.get_mask_sizes(query_length, layer_idx) == (9 + query_length, 0)


# -- Found by planting bugs in the custom-op layer (issue 14): the lse gradient of interval attention, the compiled
# -- selection's pattern fields, the compiled cross entropy's ignore_index, and a row that is all padding.

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
BACKENDS = ["reference", pytest.param("triton", marks=pytest.mark.skipif(
    __import__("importlib").util.find_spec("triton") is None, reason="needs triton (CPU: its interpreter)"))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_interval_attention_lse_gradient_matches_autograd(backend):
    """Both outputs of `interval_attention` are differentiable: a loss on o and lse gets the gradients of the pure
    PyTorch reference (window intervals: every query sees a key), and stays finite where no key is seen (lse -inf:
    the compressed branch's first queries), where the lse gradient contributes nothing."""
    torch.manual_seed(0)
    name = resolve_primitives(backend, torch.device(DEVICE))
    layout, blocks = QueryLayout.from_cu_seqlens(torch.tensor([0, 30, 41], device=DEVICE), 8, 4)
    q = torch.randn(41, 4, 8, device=DEVICE, requires_grad=True)
    k, v = torch.randn(41, 2, 8, device=DEVICE, requires_grad=True), torch.randn(41, 2, 8, device=DEVICE, requires_grad=True)
    lo = layout.key_offsets + (layout.positions - 11).clamp(min=0)
    hi = layout.key_offsets + layout.positions + 1
    go, glse = torch.randn(41, 4, 8, device=DEVICE), torch.randn(41, 4, device=DEVICE)

    o, lse = library.interval_attention(q, k, v, lo, hi, 0.3, backend=name, documents=layout.documents)
    grads = torch.autograd.grad((o * go).sum() + (lse * glse).sum(), (q, k, v))
    o_ref, lse_ref = reference.interval_attention(q, k, v, lo, hi, 0.3)
    expected = torch.autograd.grad((o_ref * go).sum() + (lse_ref * glse).sum(), (q, k, v), retain_graph=True)
    without_lse = torch.autograd.grad((o_ref * go).sum(), (q, k, v))
    for g, g_ref in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=2e-4, atol=2e-4)
    for g_ref, g_o in zip(expected[:2], without_lse[:2], strict=True):
        assert (g_ref - g_o).abs().max() > 1e-2  # the lse term is felt (in dq and dk: lse does not depend on v)

    k_cmp = torch.randn(blocks.count, 2, 8, device=DEVICE, requires_grad=True)
    v_cmp = torch.randn(blocks.count, 2, 8, device=DEVICE, requires_grad=True)
    lo = layout.cmp_offsets
    hi = lo + num_compressed_blocks(layout.positions + 1, 8, 4)
    o, lse = library.interval_attention(q, k_cmp, v_cmp, lo, hi, 0.3, backend=name, documents=layout.documents)
    assert torch.isinf(lse).any()
    grads = torch.autograd.grad((o * go).sum() + (torch.where(torch.isfinite(lse), lse, 0) * glse).sum(), (q, k_cmp, v_cmp))
    assert all(torch.isfinite(g).all() for g in grads)
    unseen = torch.isinf(lse).all(-1)
    assert (grads[0][unseen] == 0).all()


def test_compiled_select_blocks_equals_eager_with_unequal_forced_blocks():
    """The pattern reaches the compiled op as a list of ints: fields in the wrong order would go unseen with the tiny
    config (as many initial as local blocks), so here they differ."""
    torch.manual_seed(0)
    name = resolve_primitives("reference", torch.device(DEVICE))
    pattern = SparsePattern(8, 4, 16, 3, num_init_blocks=0, num_local_blocks=2, window_size=12)
    layout, blocks = QueryLayout.from_cu_seqlens(torch.tensor([0, 70, 90], device=DEVICE), 8, 4)
    q = torch.randn(90, 4, 8, device=DEVICE)
    k_cmp, v_cmp = torch.randn(blocks.count, 2, 8, device=DEVICE), torch.randn(blocks.count, 2, 8, device=DEVICE)
    lo = layout.cmp_offsets
    hi = lo + num_compressed_blocks(layout.positions + 1, 8, 4)
    _, lse = library.interval_attention(q, k_cmp, v_cmp, lo, hi, 0.3, backend=name)

    def select(q, k_cmp, lse):
        return library.select_blocks(q, k_cmp, lse, layout, pattern, 0.3, backend=name)

    eager = select(q, k_cmp, lse)
    torch._dynamo.reset()
    compiled = torch.compile(select, fullgraph=True)(q, k_cmp, lse)
    torch._dynamo.reset()
    assert torch.equal(compiled, eager)


@pytest.mark.skipif(__import__("importlib").util.find_spec("triton") is None, reason="needs triton (CPU: its interpreter)")
def test_compiled_cross_entropy_honours_its_ignore_index():
    """The compiled cross entropy's gradient skips the rows labelled with its own ignore_index, not only -100's."""
    from nsa_hf.ops import triton as kernels

    torch.manual_seed(0)
    logits = torch.randn(6, 33, device=DEVICE, requires_grad=True)
    labels = torch.tensor([1, 5, 0, 32, 0, 7], device=DEVICE)

    def loss(logits):
        return kernels.cross_entropy(logits, labels, ignore_index=0).sum()

    expected = torch.autograd.grad(
        torch.nn.functional.cross_entropy(logits, labels, ignore_index=0, reduction="sum"), logits
    )[0]
    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True)(logits)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.autograd.grad(compiled, logits)[0], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("use_cache", [False, True])
def test_a_fully_padded_row_is_not_a_mask_with_holes(use_cache):
    """A row with no real token (an empty example in a batch) is padding only, not holes: the model runs, and the
    other row is what it is alone."""
    model = make_model(tiny_config())
    ids = torch.randint(1, 97, (2, 20))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1] = 0
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=use_cache).logits
        torch.testing.assert_close(logits[0], model(input_ids=ids[:1], use_cache=use_cache).logits[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("prefill_s", "full_s"), [(2.0, 1.9), (2.0, 2.0)])
def test_bench_generate_gives_no_figure_when_the_prompts_spread_exceeds_the_decode(monkeypatch, prefill_s, full_s):
    """bench_generate's ms/token is (generate(1 + N) - generate(1)) / N: when the longer call took no longer (a long
    prompt's run-to-run spread exceeded the whole decode), the row says why under `no_figure`, both timings in it,
    and holds no ms_per_token (not a negative or zero one), nor an `error` (a failed run's key); profile_decode_host
    prints the same instead of a figure. A longer call gives the figure."""
    from .test_quality_scripts import _load

    bench = _load("bench_generate")

    def timed_generate(model, prompt, new_tokens, clock=None, **kwargs) -> float:
        if clock is not None:  # the steps' own clock: 3 ms a token, whatever the two calls took
            clock.times += [0.003 * step + (step > 0) for step in range(new_tokens)]  # the prompt's 1 s at the 2nd
        return prefill_s if new_tokens == 1 else full_s

    monkeypatch.setattr(bench, "timed_generate", timed_generate)
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *args, **kwargs: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *args, **kwargs: 0)
    row = bench.measure(None, batch=1, context=8, new_tokens=4, repeats=2)
    assert "ms_per_token" not in row and "error" not in row
    assert f"{full_s:.4f} s" in row["no_figure"] and f"{prefill_s:.4f} s" in row["no_figure"]
    assert row["step_ms_per_token"] == pytest.approx(3.0)
    assert _load("profile_decode_host").per_token_text(prefill_s, full_s, 4).startswith("no figure")
    def ten_ms_a_token(model, prompt, new_tokens, clock=None, **kwargs) -> float:
        if clock is not None:
            clock.times += list(range(new_tokens))
        return 1.0 + 0.01 * new_tokens

    monkeypatch.setattr(bench, "timed_generate", ten_ms_a_token)
    row = bench.measure(None, batch=1, context=8, new_tokens=4, repeats=2)
    assert row["ms_per_token"] == pytest.approx(10.0) and "no_figure" not in row


def test_bench_generate_step_clock_times_the_decoding_steps_of_a_real_generate_call():
    """StepClock is asked once per generated token (the prompt's first, then each decoded one), never stops the
    call, and gives (last - second) / steps between, leaving out the prompt's GPU work still queued at the first
    ask: with a clock that advances 1 s per read but 100 s at the second, exactly 1000 ms."""
    from transformers import StoppingCriteriaList

    from .test_quality_scripts import _load

    bench = _load("bench_generate")
    ticks = iter([0.0, 100.0, 101.0, 102.0, 103.0, 104.0])
    clock = bench.StepClock(clock=lambda: next(ticks))
    model = make_model(tiny_config())
    prompt = torch.randint(1, 97, (2, 11))
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, min_new_tokens=6,
                             do_sample=False, stopping_criteria=StoppingCriteriaList([clock]))
    assert out.shape == (2, 11 + 6)
    assert len(clock.times) == 6
    assert clock.ms_per_token() == pytest.approx(1000.0)
    short = bench.StepClock()
    short.times = [0.0, 1.0]
    with pytest.raises(ValueError, match="at least three steps"):
        short.ms_per_token()


def test_bench_generate_refuses_fewer_than_two_new_tokens_before_any_work(monkeypatch, capsys):
    """The step clock times from the second token to the last, so `--new-tokens 1` is refused by name at the
    command line, before a model is built or the GPU touched."""
    from .test_quality_scripts import _load

    bench = _load("bench_generate")
    monkeypatch.setattr(bench, "copy_bandwidth", lambda: pytest.fail("the GPU was touched"))
    monkeypatch.setattr("sys.argv", ["bench_generate.py", "--new-tokens", "1"])
    with pytest.raises(SystemExit):
        bench.main()
    assert "--new-tokens must be at least 2, got 1" in capsys.readouterr().err
