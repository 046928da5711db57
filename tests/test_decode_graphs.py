"""generate()'s default path on CUDA: a kept `NsaStaticCache` whose decoding steps replay CUDA graphs recorded from the
eager model (`decode_graphs.py`), held to cache-free recomputation and to the growing `NsaCache`. Recording needs
CUDA; on the CPU the tests check which models may be recorded and that the default path there is unchanged."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from nsa_hf import NsaCache, NsaForCausalLM, NsaStaticCache
from nsa_hf.compat import CACHE_KWARG
from nsa_hf.decode_graphs import DecodeGraphs, graphable

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
    assert graphable(model) is None
    assert "'reference' attention backend" in graphable(make_model(tiny_config(nsa_backend="reference")))
    handle = model.model.layers[1].mlp.register_forward_hook(lambda *args: None)
    assert "hooks" in graphable(model) and "model.layers.1.mlp" in graphable(model)
    handle.remove()
    peft = pytest.importorskip("peft")
    adapted = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert "q_proj" in graphable(adapted.base_model.model)


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
    the replay; a replaced weight (new storage) makes the next call record again."""
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
        check()
        assert len(records) == 1
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().roll(1, 0).clone())  # new storage
        check()
        assert len(records) == 2
    finally:
        DecodeGraphs._record = original


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
    steps.clear()  # a one-token prompt is a prompt: it fills the reset cache, eagerly
    out = model.generate(prompt[:, :1], max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(out, greedy_without_cache(model, prompt[:, :1], NEW_TOKENS))
    assert steps == [(1, 1)] * (NEW_TOKENS - 1)
    model.generate(prompt, max_new_tokens=3, cache_implementation="static")  # another path turns the graphs off
    assert not model._decode_graphs.enabled
    assert compile_disabled == [True, True, True, True, False]
