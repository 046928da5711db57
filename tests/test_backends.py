"""The backend registry: a third attention backend plugs in by name, settings resolve once, and the fused
pointwise kernels have their own setting."""

from __future__ import annotations

import pytest
import torch

from nsa_hf import NsaConfig
from nsa_hf.ops import backends, reference
from nsa_hf.ops.composition import REFERENCE, Primitives

from .factories import make_model, tiny_config


@pytest.fixture()
def toy_backend(monkeypatch):
    """A backend that runs the reference primitives and counts what it is asked for; unregistered afterwards."""
    calls = {"built": 0, "interval": 0, "block": 0, "select": 0}

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapped

    def build() -> Primitives:
        calls["built"] += 1
        return Primitives(
            counting("interval", reference.interval_attention),
            counting("block", reference.block_attention),
            counting("select", reference.select_blocks_varlen),
        )

    monkeypatch.setattr(backends, "_BACKENDS", dict(backends._BACKENDS))
    monkeypatch.setattr(backends, "_RESOLVED_ATTENTION", {})
    backends.register_backend("toy", build)
    return calls


def test_a_registered_backend_runs_the_model_by_name(toy_backend):
    reference_model = make_model(tiny_config(nsa_backend="reference"))
    toy_model = make_model(tiny_config(nsa_backend="toy"))
    ids = torch.randint(0, reference_model.config.vocab_size, (2, 40))
    with torch.no_grad():
        expected = reference_model(ids, use_cache=False).logits
        got = toy_model(ids, use_cache=False).logits
        toy_model(ids, use_cache=False)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)  # the same primitives compose the same function
    layers = toy_model.config.num_hidden_layers
    # per layer and pass: compressed and window intervals, one selection, one block attention
    assert (toy_backend["interval"], toy_backend["select"], toy_backend["block"]) == (4 * layers, 2 * layers, 2 * layers)
    assert toy_backend["built"] == 1  # resolved once, not per layer or per pass


def test_registered_names_are_config_choices_and_duplicates_are_refused(toy_backend):
    assert "toy" in backends.backend_names()
    assert NsaConfig(nsa_backend="toy").nsa_backend == "toy"
    for taken in ("toy", "reference", "auto"):
        with pytest.raises(ValueError, match="exists already"):
            backends.register_backend(taken, lambda: REFERENCE)


def test_unknown_backend_names_list_the_registered_ones():
    with pytest.raises(ValueError, match=r"`nsa_backend` must be one of \('auto', 'reference', 'triton'"):
        NsaConfig(nsa_backend="flash")


def test_fused_kernels_setting_is_separate_from_the_attention_backend():
    cpu = torch.device("cpu")
    assert backends.resolve_pointwise("auto", cpu) is None  # Triton's fused kernels only run on CUDA by default
    assert backends.resolve_pointwise("none", cpu) is None
    assert backends.resolve_pointwise("triton", cpu) is not None  # on CPU: the Triton interpreter (tests)
    with pytest.raises(ValueError, match="`fused_kernels` must be one of"):
        NsaConfig(fused_kernels="cuda")


def test_fused_kernels_give_the_same_model_as_pytorch_ops():
    """The Triton pointwise kernels (interpreted on CPU) with the reference attention equal PyTorch ops."""
    plain = make_model(tiny_config(nsa_backend="reference", fused_kernels="none"))
    fused = make_model(tiny_config(nsa_backend="reference", fused_kernels="triton"))
    ids = torch.randint(0, plain.config.vocab_size, (1, 30))
    out_plain = plain(ids, labels=ids, use_cache=False)
    out_fused = fused(ids, labels=ids, use_cache=False)
    torch.testing.assert_close(out_fused.logits, out_plain.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out_fused.loss, out_plain.loss, rtol=1e-4, atol=1e-4)


def test_the_functional_api_runs_the_backend_it_is_given():
    """`nsa_attention(..., backend=...)`: the Triton kernels (interpreted on CPU) equal the reference; a backend
    that is not registered is named."""
    from nsa_hf.ops import nsa_attention

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 40, 4, 16), torch.randn(1, 40, 2, 16), torch.randn(1, 40, 2, 16)
    k_cmp, v_cmp = torch.randn(1, 9, 2, 16), torch.randn(1, 9, 2, 16)  # (40 - 8) // 4 + 1 blocks
    gates = torch.rand(1, 40, 4, 3)
    geometry = dict(compress_block_size=8, compress_stride=4, select_block_size=16, num_selected_blocks=2,
                    num_init_blocks=1, num_local_blocks=1, window_size=12)
    args = (q, k_cmp, v_cmp, k, v, k, v, gates)
    expected = nsa_attention(*args, **geometry, backend="reference")
    torch.testing.assert_close(nsa_attention(*args, **geometry, backend="triton"), expected, rtol=2e-4, atol=2e-4)
    with pytest.raises(ValueError, match="`backend` must be one of"):
        nsa_attention(*args, **geometry, backend="flash")


@pytest.mark.parametrize("has_cuda", [False, True])
def test_a_built_model_has_both_settings_resolved_for_every_device_type(monkeypatch, has_cuda):
    """`prepare_backends` (run when a model is built) resolves the attention and the fused-kernel settings for
    the CPU and, where CUDA is present, for CUDA: a first call under torch.compile on either finds them resolved."""
    for table in ("_RESOLVED_NAMES", "_RESOLVED_ATTENTION", "_RESOLVED_POINTWISE"):
        monkeypatch.setattr(backends, table, {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: has_cuda)
    make_model(tiny_config(nsa_backend="reference", fused_kernels="none"))
    expected = {("reference", "cpu"), ("reference", "cuda")} if has_cuda else {("reference", "cpu")}
    assert set(backends._RESOLVED_ATTENTION) == expected
    assert set(backends._RESOLVED_POINTWISE) == {("none", device) for _, device in expected}
