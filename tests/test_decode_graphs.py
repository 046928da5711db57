"""generate()'s default path on CUDA: a kept `NsaStaticCache` whose decoding steps replay CUDA graphs recorded from the
eager model (`decode_graphs.py`), held to cache-free recomputation and to the growing `NsaCache`. Recording needs
CUDA; on the CPU the tests check which models may be recorded and that the default path there is unchanged."""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from nsa_hf import NsaCache, NsaForCausalLM, NsaStaticCache, modeling_nsa
from nsa_hf.compat import CACHE_KWARG
from nsa_hf.decode_graphs import DecodeGraphs, why_not_graphable

from .factories import make_model, tiny_config
from .test_generate import full_logits

NEW_TOKENS = 30  # past several compressed blocks (l = 8, d = 4) and the window (w = 12)
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA graphs are CUDA's (the CPU tests of the static cache hold the math)")


class RecordScores(LogitsProcessor):
    """Keeps every step's raw logits (generate() hands them back only with return_dict_in_generate, which decodes
    without graphs)."""

    def __init__(self):
        self.scores: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.scores.append(scores.clone())
        return scores


def generate(model: NsaForCausalLM, prompt: torch.Tensor, **kwargs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    recorder = RecordScores()
    out = model.generate(prompt, logits_processor=LogitsProcessorList([recorder]), **kwargs)
    return out, recorder.scores


def test_plain_triton_models_may_be_recorded_and_others_may_not():
    model = make_model(tiny_config(nsa_backend="triton"))
    assert why_not_graphable(model) is None
    assert "'reference' attention backend" in why_not_graphable(make_model(tiny_config(nsa_backend="reference")))
    handle = model.model.layers[1].mlp.register_forward_hook(lambda *args: None)
    assert "hooks" in why_not_graphable(model) and "model.layers.1.mlp" in why_not_graphable(model)
    handle.remove()
    peft = pytest.importorskip("peft")
    adapted = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert "q_proj" in why_not_graphable(adapted.base_model.model)


def test_the_default_path_decides_per_call_whether_to_decode_from_graphs(monkeypatch):
    """On a CUDA device (the device faked: only the decision runs), the default path records its steps unless the
    config switches it off, the call returns its cache or prefills in chunks, or the model cannot be recorded."""
    from transformers import GenerationConfig

    monkeypatch.setattr(NsaForCausalLM, "device", property(lambda self: torch.device("cuda")))
    model = make_model(tiny_config(nsa_backend="triton"))
    assert model._decodes_with_graphs(GenerationConfig())
    assert not model._decodes_with_graphs(GenerationConfig(return_dict_in_generate=True))
    assert not model._decodes_with_graphs(GenerationConfig(prefill_chunk_size=16))
    model.config.cuda_graph_decoding = False
    assert not model._decodes_with_graphs(GenerationConfig())
    dynamic = make_model(tiny_config(nsa_backend="triton", rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                                              "rope_theta": 10000.0}))
    assert "rope_type='dynamic'" in why_not_graphable(dynamic) and not dynamic._decodes_with_graphs(GenerationConfig())


class _ReplayByRunning:
    """A CPU stand-in for a recorded graph: a replay runs the recorded step on the recorded input buffer."""

    def __init__(self, run, recorded):
        self.run, self.recorded, self.replays = run, recorded, 0

    def replay(self) -> None:
        self.replays += 1
        self.recorded.logits = self.run(self.recorded.input_ids)


@pytest.fixture
def fake_recording(monkeypatch):
    """`DecodeGraphs._record` without CUDA: the graph is `_ReplayByRunning`; returns the list of recordings."""
    from nsa_hf.decode_graphs import _RecordedStep

    recordings = []

    def record(self, run, input_ids, key):
        recorded = _RecordedStep(graph=None, input_ids=input_ids.clone(), logits=torch.empty(0))
        recorded.graph = _ReplayByRunning(run, recorded)
        recordings.append(recorded.graph)
        self._steps[key] = recorded
        return recorded

    monkeypatch.setattr(DecodeGraphs, "_record", record)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    return recordings


def test_decode_graphs_run_eagerly_then_record_then_replay_until_the_model_changes(fake_recording):
    model = make_model(tiny_config(pad_token_id=0))
    cache = NsaStaticCache(model.config, max_cache_len=64)
    graphs = DecodeGraphs(cache)
    graphs.refresh(model)
    reference = NsaStaticCache(model.config, max_cache_len=64)  # the same steps, eager
    prompt, ids = torch.randint(1, 97, (2, 9)), torch.randint(1, 97, (2, 1))
    with torch.no_grad():
        model(prompt, cache=cache)
        model(prompt, cache=reference)
        for _ in range(4):
            logits = graphs.step(functools.partial(model._step_logits, cache), ids)
            torch.testing.assert_close(logits, model._step_logits(reference, ids))
        assert len(fake_recording) == 1 and fake_recording[0].replays == 3  # step 1 eager, step 2 records
        with torch.autocast("cpu", dtype=torch.bfloat16):  # another key: warms up and records its own
            graphs.step(functools.partial(model._step_logits, cache), ids)
            graphs.step(functools.partial(model._step_logits, cache), ids)
        assert len(fake_recording) == 2
        graphs.refresh(model)  # nothing changed
        with torch.no_grad():
            model.lm_head.weight.mul_(2)  # in place: a replay reads it
        graphs.refresh(model)
        assert graphs.num_recorded == 2
        precision = torch.get_float32_matmul_precision()
        changes = (lambda: setattr(model.lm_head, "weight", torch.nn.Parameter(model.lm_head.weight.clone())),
                   lambda: model.train(), lambda: setattr(model.config, "fused_kernels", "none"),
                   lambda: torch.set_float32_matmul_precision("medium" if precision != "medium" else "high"))
        try:
            for change in changes:
                change()
                graphs.refresh(model)
                assert graphs.num_recorded == 0, change
                graphs.step(functools.partial(model._step_logits, cache), ids)  # eager again first
                assert graphs.num_recorded == 0
                graphs.step(functools.partial(model._step_logits, cache), ids)
                assert graphs.num_recorded == 1
        finally:
            torch.set_float32_matmul_precision(precision)


def test_decoding_steps_read_stacked_attention_weights_kept_and_copied_again_per_call(fake_recording):
    """`DecodeGraphs` keeps one stacked copy of each layer's attention input projections (the MLP's stay apart), so no
    step stacks them again, and copies the weights into it at every refresh (each generate()): after an in-place
    update of a projection, the next steps equal the eager model's."""
    model = make_model(tiny_config(pad_token_id=0))
    cache, reference = (NsaStaticCache(model.config, max_cache_len=64) for _ in range(2))
    graphs = DecodeGraphs(cache)
    graphs.refresh(model)
    prompt, ids = torch.randint(1, 97, (2, 9)), torch.randint(1, 97, (2, 1))
    step = functools.partial(model._step_logits, cache)
    with torch.no_grad():
        model(prompt, cache=cache)
        model(prompt, cache=reference)
        for _ in range(3):
            torch.testing.assert_close(graphs.step(step, ids), model._step_logits(reference, ids))
        rows = [sum(p.out_features for p in layer.self_attn._input_projections()) for layer in model.model.layers]
        kept = sum(-(-r // 8) * 8 for r in rows) * model.config.hidden_size * model.dtype.itemsize
        assert graphs.stacks.num_bytes == kept
        weight = model.model.layers[1].self_attn.k_proj.weight
        weight.mul_(-1.5)
        graphs.refresh(model)
        for _ in range(2):
            torch.testing.assert_close(graphs.step(step, ids), model._step_logits(reference, ids))
        # Until the next refresh the steps read the stacked copy, not the weight (the last step here: it stores K/V
        # of the old weight).
        weight.mul_(-1.5)
        assert not torch.allclose(graphs.step(step, ids), model._step_logits(reference, ids), atol=1e-3)
    assert len(fake_recording) == 1


def test_a_step_that_cannot_be_recorded_runs_eagerly_with_a_warning(monkeypatch, caplog):
    model = make_model(tiny_config(pad_token_id=0))
    cache = NsaStaticCache(model.config, max_cache_len=64)
    graphs = DecodeGraphs(cache)
    graphs.refresh(model)

    class Unrecordable:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "graph", Unrecordable)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: None)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: None)
    reference = NsaStaticCache(model.config, max_cache_len=64)
    prompt, ids = torch.randint(1, 97, (1, 9)), torch.randint(1, 97, (1, 1))
    with torch.no_grad(), caplog.at_level("WARNING"):
        model(prompt, cache=cache)
        model(prompt, cache=reference)
        for _ in range(3):
            logits = graphs.step(functools.partial(model._step_logits, cache), ids)
            torch.testing.assert_close(logits, model._step_logits(reference, ids))
        assert graphs.num_recorded == 0
        assert sum("could not record" in record.message for record in caplog.records) == 1
        model.train()  # a changed model is tried again
        graphs.refresh(model)
        for _ in range(2):
            graphs.step(functools.partial(model._step_logits, cache), ids)
    assert sum("could not record" in record.message for record in caplog.records) == 2


def test_the_default_path_off_cuda_or_switched_off_keeps_the_growing_cache():
    """On the CPU (and with `cuda_graph_decoding=False` anywhere) generate() without flags decodes with `NsaCache`."""
    for model in (make_model(tiny_config(eos_token_id=None)),
                  make_model(tiny_config(eos_token_id=None, cuda_graph_decoding=False))):
        out = model.generate(torch.randint(1, 97, (1, 9)), max_new_tokens=3, return_dict_in_generate=True)
        assert isinstance(getattr(out, CACHE_KWARG), NsaCache)
        assert model._decode_graphs is None and model._kept_static_cache is None


def test_cuda_graph_decoding_is_a_saved_config_field(tmp_path):
    config = tiny_config(cuda_graph_decoding=False)
    config.save_pretrained(tmp_path)
    assert type(config).from_pretrained(tmp_path).cuda_graph_decoding is False
    assert tiny_config().cuda_graph_decoding is True


def cuda_model(backend: str, dtype: torch.dtype, **overrides) -> NsaForCausalLM:
    config = tiny_config(pad_token_id=0, eos_token_id=None, nsa_backend=backend, **overrides)
    return make_model(config).to("cuda", dtype)


@needs_cuda
def test_gpu_default_generate_replays_graphs_that_match_recomputation_in_bf16():
    """Triton, bf16: every step's logits (all but the first two replayed) within bf16 tolerance of the cache-free
    forward of the sequence, one recording for the whole call."""
    model = cuda_model("triton", torch.bfloat16, hidden_size=128, head_dim=32)
    prompt = torch.randint(1, 97, (2, 40), device="cuda")
    out, scores = generate(model, prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
    graphs = model._decode_graphs
    assert isinstance(graphs, DecodeGraphs) and graphs.cache is model._kept_static_cache and graphs.num_recorded == 1
    with torch.no_grad():
        expected = full_logits(model, out)[:, prompt.shape[1] - 1 : -1].float()
    torch.testing.assert_close(torch.stack(scores, 1).float(), expected, rtol=3e-2, atol=3e-2)


@needs_cuda
@pytest.mark.parametrize("branch_kv", ["independent", "shared"])
def test_gpu_graphs_replay_exactly_the_eager_static_steps(branch_kv):
    """A replay computes what the eager step over the same static cache computes, kernel for kernel: greedy decoding
    of a left-padded batch, sampling with a seed and beam search (the cache reordered in place) give the eager
    static path's tokens and logits exactly (the CPU tests hold that path to the growing cache and recomputation)."""
    model = cuda_model("triton", torch.bfloat16, branch_kv=branch_kv)
    ids = torch.randint(1, 97, (2, 21), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :12] = 0
    ids[1, :12] = 0
    calls = [
        dict(do_sample=False),
        dict(do_sample=True, top_k=5),
        dict(do_sample=False, num_beams=3, num_return_sequences=2),
    ]
    for kwargs in calls:
        torch.manual_seed(0)
        graphed, graphed_scores = generate(model, ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, **kwargs)
        assert model._decode_graphs.enabled and model._decode_graphs.num_recorded >= 1, kwargs
        torch.manual_seed(0)
        eager, eager_scores = generate(model, ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                                       cache_implementation="static", disable_compile=True, **kwargs)
        assert not model._decode_graphs.enabled
        assert torch.equal(graphed, eager), kwargs
        assert all(torch.equal(a, b) for a, b in zip(graphed_scores, eager_scores, strict=True)), kwargs


@needs_cuda
def test_gpu_graphs_are_recorded_once_and_follow_the_model():
    """A second call replays the first call's graph over the same kept cache; an in-place weight update is read by
    the replay (an attention projection's through the stacked copy the graphs keep); a replaced weight (new storage)
    makes the next call record again."""
    model = cuda_model("triton", torch.bfloat16)
    prompt = torch.randint(1, 97, (1, 21), device="cuda")
    records = []
    original = DecodeGraphs._record
    DecodeGraphs._record = lambda self, *args: records.append(1) or original(self, *args)
    try:
        def check() -> None:
            out, scores = generate(model, prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
            with torch.no_grad():
                expected = full_logits(model, out)[:, prompt.shape[1] - 1 : -1]
            torch.testing.assert_close(torch.stack(scores, 1).float(), expected.float(), rtol=3e-2, atol=3e-2)

        check()
        cache = model._kept_static_cache
        check()
        assert len(records) == 1 and model._kept_static_cache is cache
        with torch.no_grad():
            model.lm_head.weight.mul_(-1.5)
            model.model.layers[0].self_attn.q_proj.weight.mul_(-1.5)  # read through the kept stacked copy
        check()
        assert len(records) == 1
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().roll(1, 0).clone())  # new storage
        check()
        assert len(records) == 2
    finally:
        DecodeGraphs._record = original


@needs_cuda
def test_gpu_graphs_under_autocast_read_the_weights_at_every_replay():
    """An fp32 model decoding under bf16 autocast in two separate autocast regions (the second replays the first's
    graph): the tokens and logits of the eager static steps, also after an in-place weight update between them."""
    model = cuda_model("triton", torch.float32)
    prompt = torch.randint(1, 97, (1, 21), device="cuda")
    for _ in range(2):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            graphed, graphed_scores = generate(model, prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
            eager, eager_scores = generate(model, prompt, max_new_tokens=NEW_TOKENS, do_sample=False,
                                           cache_implementation="static", disable_compile=True)
        assert torch.equal(graphed, eager)
        assert all(torch.equal(a, b) for a, b in zip(graphed_scores, eager_scores, strict=True))
        with torch.no_grad():
            model.lm_head.weight.mul_(-1.5)


@needs_cuda
def test_gpu_graphs_with_weights_too_large_to_stack_match_recomputation(monkeypatch):
    """While recording, projections whose stacked copy would cost more than a GEMM run apart (`_stacks`): with every
    weight counted as large, the replayed steps still match the cache-free forward in bf16."""
    monkeypatch.setattr(modeling_nsa, "_COPY_BYTES_PER_LAUNCH", 0)
    model = cuda_model("triton", torch.bfloat16, hidden_size=128, head_dim=32)
    prompt = torch.randint(1, 97, (2, 40), device="cuda")
    out, scores = generate(model, prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert model._decode_graphs.num_recorded == 1
    with torch.no_grad():
        expected = full_logits(model, out)[:, prompt.shape[1] - 1 : -1].float()
    torch.testing.assert_close(torch.stack(scores, 1).float(), expected, rtol=3e-2, atol=3e-2)


@needs_cuda
def test_gpu_graphs_recorded_under_inference_mode_replay_outside_it():
    model = cuda_model("triton", torch.bfloat16)
    prompt = torch.randint(1, 97, (1, 21), device="cuda")
    with torch.inference_mode():
        inside, inside_scores = generate(model, prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
    outside, outside_scores = generate(model, prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert model._decode_graphs.num_recorded == 1
    assert torch.equal(inside, outside)
    assert all(torch.equal(a, b) for a, b in zip(inside_scores, outside_scores, strict=True))


@needs_cuda
def test_gpu_explicit_caches_and_returned_caches_decode_without_graphs():
    """cache_implementation="dynamic", a returned cache (return_dict_in_generate) and a cache passed in keep their
    own paths: no recording."""
    model = cuda_model("triton", torch.bfloat16)
    prompt = torch.randint(1, 97, (1, 21), device="cuda")
    model.generate(prompt, max_new_tokens=4, cache_implementation="dynamic")
    assert model._decode_graphs is None
    out = model.generate(prompt, max_new_tokens=4, return_dict_in_generate=True)
    assert isinstance(getattr(out, CACHE_KWARG), NsaCache) and model._decode_graphs is None
    given = NsaStaticCache(model.config, max_cache_len=64)
    model.generate(prompt, max_new_tokens=4, disable_compile=True, **{CACHE_KWARG: given})
    assert model._decode_graphs is None


def test_the_default_path_decodes_its_steps_through_the_graphs_over_a_kept_static_cache(monkeypatch):
    """generate()'s plumbing of the default path, on the CPU with the recording replaced by the eager step it records:
    the call gets a kept static cache without compiling, every step after the prompt goes through
    `DecodeGraphs.step`, and the tokens are cache-free recomputation's, also for a left-padded batch."""
    from .test_generate import greedy_without_cache

    model = make_model(tiny_config(pad_token_id=0, eos_token_id=None))
    steps = []
    monkeypatch.setattr(NsaForCausalLM, "_decodes_with_graphs", lambda self, generation_config: True)
    monkeypatch.setattr(DecodeGraphs, "step", lambda self, run, input_ids: steps.append(input_ids.shape) or run(input_ids))
    compile_disabled = []  # per call, whether generate() was told not to compile
    monkeypatch.setattr(NsaForCausalLM, "_valid_auto_compile_criteria",
                        lambda self, kwargs, config: compile_disabled.append(bool(config.disable_compile)) and False)
    prompt = torch.randint(1, 97, (1, 21))
    out = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(out, greedy_without_cache(model, prompt, NEW_TOKENS))
    assert steps == [(1, 1)] * (NEW_TOKENS - 1)
    steps.clear()
    assert model._decode_graphs.cache is model._kept_static_cache and model._decode_graphs.enabled
    ids = torch.cat([torch.zeros(1, 8, dtype=torch.long), torch.randint(1, 97, (1, 13))], 1)
    batch = torch.cat([prompt, ids])
    mask = (batch != 0).long()
    longest = model._kept_static_cache.max_cache_len
    out = model.generate(batch, attention_mask=mask, max_new_tokens=NEW_TOKENS // 2, do_sample=False)
    # Two rows need a new cache: only as long as this call needs (graphs are per cache; a compiled step would want
    # the longest shape it has seen).
    assert model._kept_static_cache.max_cache_len < longest
    out = model.generate(batch, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(out[0], greedy_without_cache(model, prompt, NEW_TOKENS)[0])
    assert torch.equal(out[1, 21:], greedy_without_cache(model, ids[:, 8:], NEW_TOKENS)[0, 13:])
    steps.clear()  # prompt lookup verifies several tokens per step: those steps run eagerly
    out = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, prompt_lookup_num_tokens=3)
    assert torch.equal(out, greedy_without_cache(model, prompt, NEW_TOKENS))
    assert set(steps) <= {(1, 1)}
    steps.clear()  # a one-token prompt is a prompt: it fills the reset cache, eagerly
    out = model.generate(prompt[:, :1], max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(out, greedy_without_cache(model, prompt[:, :1], NEW_TOKENS))
    assert steps == [(1, 1)] * (NEW_TOKENS - 1)
    model.generate(prompt, max_new_tokens=3, cache_implementation="static")  # another path turns the graphs off
    assert not model._decode_graphs.enabled
    model.generate(batch, attention_mask=mask, max_new_tokens=3 * NEW_TOKENS, cache_implementation="static")
    assert model._decode_graphs is None  # a new kept cache: the graphs recorded over the old one go with it
    # Every default-path call told generate() not to compile (assisted decoding on 5.17 does not ask); the two
    # static calls did not.
    assert set(compile_disabled[:-2]) == {True} and compile_disabled[-2:] == [False, False]
