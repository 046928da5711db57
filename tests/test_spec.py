"""NSA_SPEC.md checked from the outside, not against another path of the same code.

1. An `NsaAttention` layer's output equals a composition written in this file from NSA_SPEC.md with plain
   loops over tokens, heads and blocks (projections, RoPE, phi, the three branches, Eq. 9/10 selection, gates),
   from the layer's own weights. No library op is used by the composition.
2. The library's Eq. 9 overlap weights equal the spec's token-overlap formula for several block geometries.
3. Cached decoding with small rollback budgets (max_rollback 0, 1, 3) equals one full forward, cropping the
   whole budget is exact, and cropping one token more raises.
4. Every configuration rule raises a ValueError naming its field; the boundary values are accepted.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.nn import functional as F

from nsa_hf import NsaCache, NsaConfig, NsaForCausalLM
from nsa_hf.ops.layout import SparsePattern
from nsa_hf.ops.reference import _overlap_weights

from .factories import make_model, tiny_config

F64 = torch.float64


# ---------------------------------------------------------------------------------------------------
# 1. The attention layer against a composition written from NSA_SPEC.md
# ---------------------------------------------------------------------------------------------------


def inverse_frequencies(config: NsaConfig) -> torch.Tensor:
    """theta ** (-2k / D), k = 0 .. D/2 - 1 (default RoPE, the theta of `config.rope_parameters`)."""
    theta, dim = config.rope_parameters["rope_theta"], config.head_dim
    return float(theta) ** (-torch.arange(0, dim, 2, dtype=F64) / dim)


def rope(x: torch.Tensor, position: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """x [..., D] rotated at `position`, rotate-half convention (Llama): dimension k pairs with k + D/2."""
    half = x.shape[-1] // 2
    angle = position * inv_freq
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def attend(q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor], scale: float) -> torch.Tensor:
    """softmax_s(q . k_s * scale) v_s over the given keys; the zero vector when there are none."""
    if not keys:
        return torch.zeros_like(q)
    weights = torch.softmax(torch.stack([q @ k for k in keys]) * scale, dim=0)
    return sum(weight * value for weight, value in zip(weights, values))


def overlap_weight(i: int, j: int, l: int, d: int, lp: int) -> float:
    """Eq. 9: tokens shared by compressed block [i*d, i*d + l) and selection block [j*l', (j+1)*l'), over d."""
    shared = min(i * d + l, (j + 1) * lp) - max(i * d, j * lp)
    return max(shared, 0) / d


def top_n(scores: list[float], t: int, lp: int, n: int, init: int, local: int) -> list[int]:
    """The spec's selection for query t: forced init/local blocks, then the best scores, ties to the lower index."""
    current = t // lp
    candidates = range(current + 1)
    forced = [j for j in candidates if j < init or j > current - local]
    others = sorted((j for j in candidates if j not in forced), key=lambda j: (-scores[j], j))
    return forced + others[: n - len(forced)]


def spec_attention(attn: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The output of NSA attention for one sequence x [T, hidden], composed from NSA_SPEC.md.

    Only the layer's modules are taken from the library: its nn.Linear projections, its gate layers and its
    phi (`compress_key` / `compress_value`). Everything else (RoPE, blocks, visibility, selection, windows,
    softmaxes, gating) is written here.
    """
    config = attn.config
    l, d, lp = config.compress_block_size, config.compress_stride, config.select_block_size
    n, init, local, w = config.num_selected_blocks, config.num_init_blocks, config.num_local_blocks, config.window_size
    HQ, H, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    G, scale = HQ // H, D**-0.5
    T = x.shape[0]
    inv_freq = inverse_frequencies(config)

    def heads(linear: torch.nn.Linear, count: int) -> torch.Tensor:
        return linear(x).view(T, count, D)

    q = heads(attn.q_proj, HQ)
    k_slc, v_slc = heads(attn.k_proj, H), heads(attn.v_proj, H)
    if config.branch_kv == "independent":  # paper section 3.3.3: one K/V projection per branch
        k_win, v_win = heads(attn.window_k_proj, H), heads(attn.window_v_proj, H)
        k_raw, v_raw = heads(attn.compress_k_proj, H), heads(attn.compress_v_proj, H)
    else:
        k_win, v_win, k_raw, v_raw = k_slc, v_slc, k_slc, v_slc

    # RoPE: queries and the selection and window keys at their own positions; values never.
    q = torch.stack([rope(q[t], t, inv_freq) for t in range(T)])
    k_slc = torch.stack([rope(k_slc[t], t, inv_freq) for t in range(T)])
    k_win = torch.stack([rope(k_win[t], t, inv_freq) for t in range(T)])

    # Compressed block i covers [i*d, i*d + l): phi on the un-rotated raw K/V, then the key rotated at i*d + l - 1.
    num_blocks = (T - l) // d + 1 if T >= l else 0
    k_cmp = [rope(attn.compress_key(k_raw[i * d : i * d + l]), i * d + l - 1, inv_freq) for i in range(num_blocks)]
    v_cmp = [attn.compress_value(v_raw[i * d : i * d + l]) for i in range(num_blocks)]

    gate = attn.branch_gate
    gate_logits = gate.proj(x) if hasattr(gate, "proj") else gate.fc2(F.silu(gate.fc1(x)))
    gates = torch.sigmoid(gate_logits).view(T, HQ, 3)  # per query head: (cmp, slc, win)

    out = torch.zeros(T, HQ, D, dtype=x.dtype)
    for t in range(T):
        visible = [i for i in range(num_blocks) if i * d + l - 1 <= t]
        window = range(max(0, t - w + 1), t + 1)
        for h in range(H):
            group = range(h * G, (h + 1) * G)
            o_cmp, scores = {}, [0.0] * (t // lp + 1)
            for hq in group:
                o_cmp[hq] = attend(q[t, hq], [k_cmp[i][h] for i in visible], [v_cmp[i][h] for i in visible], scale)
                if visible:
                    p_cmp = torch.softmax(torch.stack([q[t, hq] @ k_cmp[i][h] for i in visible]) * scale, 0).tolist()
                    for j in range(len(scores)):  # Eq. 9 per head, summed over the group's heads (Eq. 10)
                        scores[j] += sum(overlap_weight(i, j, l, d, lp) * p for i, p in zip(visible, p_cmp))
            chosen = top_n(scores, t, lp, n, init, local)
            selected = [s for j in chosen for s in range(j * lp, (j + 1) * lp) if s <= t]
            for hq in group:
                o_slc = attend(q[t, hq], [k_slc[s, h] for s in selected], [v_slc[s, h] for s in selected], scale)
                o_win = attend(q[t, hq], [k_win[s, h] for s in window], [v_win[s, h] for s in window], scale)
                g_cmp, g_slc, g_win = gates[t, hq]
                out[t, hq] = g_cmp * o_cmp[hq] + g_slc * o_slc + g_win * o_win
    return attn.o_proj(out.reshape(T, HQ * D))


def layer_inputs_and_outputs(model, input_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input, output) of every layer's `self_attn` in one full forward, captured with forward hooks."""
    captured = []

    def hook(module, args, output):
        captured.append((args[0].detach(), output[0].detach()))

    handles = [layer.self_attn.register_forward_hook(hook) for layer in model.model.layers]
    try:
        with torch.no_grad():
            model(input_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return captured


# l=8, d=4, l'=16, w=12 at T=80: 19 compressed blocks, 5 selection blocks, the window slides over 68 queries,
# and from t=48 on n=3 leaves a real choice among the non-forced blocks. The geometries at the end are the
# boundary values: l = d = l' (Eq. 9 is the identity), l > l', no forced block at all, a window of one token,
# and ties between blocks.
SPEC_CASES = [
    dict(branch_kv="independent", compression_type="mlp"),
    dict(branch_kv="shared", compression_type="mlp"),
    dict(branch_kv="independent", compression_type="linear", gate_intermediate_size=8),
    dict(branch_kv="shared", compression_type="mean", attention_bias=True),
    dict(branch_kv="independent", compression_type="mean", num_key_value_heads=1),  # G = 4
    dict(branch_kv="independent", compression_type="mlp", num_key_value_heads=4, num_init_blocks=0, num_local_blocks=2),
    dict(compression_type="mean", compress_block_size=4, compress_stride=4, select_block_size=4, num_selected_blocks=4),
    dict(compression_type="linear", compress_block_size=16, compress_stride=4, select_block_size=8, num_selected_blocks=4),
    dict(num_selected_blocks=2, num_init_blocks=0, num_local_blocks=0, window_size=1),
    # l = 16, l' = 4: queries 12 .. 14 see no compressed block, so their free slot is a tie between blocks 1 and 2.
    dict(compression_type="mean", compress_block_size=16, compress_stride=4, select_block_size=4),
]


def sharp_model(config: NsaConfig):
    """A tiny model whose queries are large enough for peaked compressed softmaxes, so that Eq. 9's weights
    decide between blocks (the closest selection decisions in these cases differ by ~1e-5, far above the
    float32 error)."""
    model = make_model(config, seed=3)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
    return model


@pytest.mark.parametrize("overrides", SPEC_CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_attention_layer_equals_composition_written_from_the_spec(overrides):
    config = tiny_config(**overrides)
    model = sharp_model(config)
    torch.manual_seed(4)
    input_ids = torch.randint(0, config.vocab_size, (2, 80))
    for layer, (x, out) in zip(model.model.layers, layer_inputs_and_outputs(model, input_ids)):
        attn64 = copy.deepcopy(layer.self_attn).double()
        with torch.no_grad():
            expected = torch.stack([spec_attention(attn64, row.double()) for row in x])
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_every_branch_of_the_composition_changes_the_output():
    """In the geometry above no branch is negligible, so an error in any of them shows at 1e-5: removing one
    branch (its gate forced to 0) changes the composed output by far more than the tolerance."""
    config = tiny_config()
    model = sharp_model(config)
    torch.manual_seed(4)
    x, _ = layer_inputs_and_outputs(model, torch.randint(0, config.vocab_size, (1, 80)))[0]
    attn64 = copy.deepcopy(model.model.layers[0].self_attn).double()
    with torch.no_grad():
        reference = spec_attention(attn64, x[0].double())
        for branch in ("cmp", "slc", "win"):
            removed = copy.deepcopy(attn64)
            removed.branch_gate.proj.bias.view(-1, 3)[:, ("cmp", "slc", "win").index(branch)] = -math.inf
            change = (spec_attention(removed, x[0].double()) - reference).abs().max()
            assert change > 1e-2 * reference.abs().max(), branch


# ---------------------------------------------------------------------------------------------------
# 2. Eq. 9 overlap weights
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "l, d, lp, expected",
    [
        (32, 16, 64, [1, 2, 2, 2, 1]),  # the paper's multiplicities
        (16, 16, 16, [1]),  # l = d = l': the identity mapping
        (8, 4, 16, [1, 2, 2, 2, 1]),
        (64, 16, 64, [1, 2, 3, 4, 3, 2, 1]),
        (16, 16, 64, [1, 1, 1, 1]),
        (64, 16, 32, [1, 2, 2, 2, 1]),  # l > l'
        (48, 16, 32, [1, 2, 2, 1]),
        (32, 32, 64, [1, 1]),
        (24, 8, 8, [1, 1, 1]),
    ],
)
def test_eq9_overlap_weights_are_shared_tokens_over_stride(l, d, lp, expected):
    pattern = SparsePattern(l, d, lp, num_selected_blocks=4, num_init_blocks=1, num_local_blocks=2, window_size=8)
    weights = _overlap_weights(pattern, torch.device("cpu"))
    # The library's kernel weighs compressed blocks i = j*m - r + 1 .. (j+1)*m - 1 for selection block j.
    r, m = l // d, lp // d
    for j in range(4):
        first = j * m - r + 1
        spec = [overlap_weight(i, j, l, d, lp) for i in range(first, first + weights.numel())]
        assert weights.tolist() == spec, j
        outside = [i for i in range(first - 2 * r - m, first + weights.numel() + 2 * r + m) if not 0 <= i - first < weights.numel()]
        assert all(overlap_weight(i, j, l, d, lp) == 0 for i in outside)
    assert weights.tolist() == expected


# ---------------------------------------------------------------------------------------------------
# 3. Decoding with small rollback budgets
# ---------------------------------------------------------------------------------------------------


def decode(model, input_ids: torch.Tensor, sizes: list[int], cache: NsaCache) -> torch.Tensor:
    """Logits of `input_ids` fed through `cache` in chunks of `sizes` tokens."""
    assert sum(sizes) == input_ids.shape[1]
    logits, start, past = [], 0, cache.get_seq_length()
    with torch.no_grad():
        for size in sizes:
            logits.append(model(input_ids[:, start : start + size], past_key_values=cache, use_cache=True).logits)
            start += size
    assert cache.get_seq_length() == past + start
    return torch.cat(logits, dim=1)


def cycle(total: int, pattern: list[int]) -> list[int]:
    """Cut `total` tokens into chunks cycling through `pattern` (the last one shortened)."""
    sizes = []
    while sum(sizes) < total:
        sizes.append(min(pattern[len(sizes) % len(pattern)], total - sum(sizes)))
    return sizes


PROMPT = 20  # longer than the window (w = 12): decoding starts with the window buffer already rolling
LENGTH = 70


@pytest.mark.parametrize("branch_kv", ["independent", "shared"])
@pytest.mark.parametrize("max_rollback", [0, 1, 3])
def test_decoding_with_small_rollback_budget_equals_full_forward(max_rollback, branch_kv):
    config = tiny_config(branch_kv=branch_kv)
    l, d, lp = config.compress_block_size, config.compress_stride, config.select_block_size
    model = make_model(config)
    torch.manual_seed(5)
    input_ids = torch.randint(0, config.vocab_size, (2, LENGTH))
    with torch.no_grad():
        full = model(input_ids, use_cache=False).logits
    schedules = {
        "token by token": [PROMPT] + [1] * (LENGTH - PROMPT),
        "chunks": [PROMPT] + cycle(LENGTH - PROMPT, [1, 2, d - 1, d, lp + 3]),
        "from one token": cycle(LENGTH, [1, l - 1, 2, lp + 3, d]),
    }
    for name, sizes in schedules.items():
        cache = NsaCache(config, max_rollback=max_rollback)
        torch.testing.assert_close(decode(model, input_ids, sizes, cache), full, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("branch_kv", ["independent", "shared"])
@pytest.mark.parametrize("max_rollback", [1, 3])
@pytest.mark.parametrize("redecode", ["same tokens", "other tokens"])
def test_crop_of_the_whole_rollback_budget_then_redecode_equals_full_forward(max_rollback, branch_kv, redecode):
    config = tiny_config(branch_kv=branch_kv)
    model = make_model(config)
    torch.manual_seed(6)
    seen = torch.randint(0, config.vocab_size, (2, 48))  # t = 47 completes compressed block 10
    kept = 48 - max_rollback
    tail = seen[:, kept:] if redecode == "same tokens" else torch.randint(0, config.vocab_size, (2, max_rollback))
    final = torch.cat([seen[:, :kept], tail, torch.randint(0, config.vocab_size, (2, 7))], dim=1)
    cache = NsaCache(config, max_rollback=max_rollback)
    decode(model, seen, [PROMPT] + [1] * (48 - PROMPT), cache)
    cache.crop(-max_rollback)
    assert cache.get_seq_length() == kept
    redecoded = decode(model, final[:, kept:], [1] * max_rollback + [7], cache)
    with torch.no_grad():
        full = model(final, use_cache=False).logits
    torch.testing.assert_close(redecoded, full[:, kept:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("branch_kv", ["independent", "shared"])
@pytest.mark.parametrize("max_rollback", [0, 1, 3])
def test_crop_past_the_rollback_budget_raises_and_leaves_the_cache_intact(max_rollback, branch_kv):
    config = tiny_config(branch_kv=branch_kv)
    model = make_model(config)
    torch.manual_seed(7)
    input_ids = torch.randint(0, config.vocab_size, (2, 50))
    cache = NsaCache(config, max_rollback=max_rollback)
    decode(model, input_ids[:, :40], [PROMPT] + [1] * (40 - PROMPT), cache)
    with pytest.raises(ValueError, match="max_rollback"):
        cache.crop(-(max_rollback + 1))
    with pytest.raises(ValueError, match="max_rollback"):
        cache.crop(40 - max_rollback - 1)  # the same request as a length to keep
    assert cache.get_seq_length() == 40
    with torch.no_grad():
        full = model(input_ids, use_cache=False).logits
    torch.testing.assert_close(decode(model, input_ids[:, 40:], [1] * 10, cache), full[:, 40:], rtol=1e-5, atol=1e-5)


def test_negative_rollback_budget_raises():
    with pytest.raises(ValueError, match="max_rollback"):
        NsaCache(tiny_config(), max_rollback=-1)


# ---------------------------------------------------------------------------------------------------
# 4. Configuration rules
# ---------------------------------------------------------------------------------------------------

POSITIVE_FIELDS = [
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "compress_intermediate_size", "compress_block_size", "compress_stride", "select_block_size",
    "num_selected_blocks", "window_size",
]
INVALID = [
    *[({name: value}, name) for name in POSITIVE_FIELDS for value in (0, -1)],
    ({"gate_intermediate_size": 0}, "gate_intermediate_size"),
    ({"gate_intermediate_size": -1}, "gate_intermediate_size"),
    ({"num_attention_heads": 4, "num_key_value_heads": 3}, "num_attention_heads"),  # HQ % H
    ({"num_attention_heads": 2, "num_key_value_heads": 4}, "num_attention_heads"),  # more K/V heads than query heads
    ({"compress_block_size": 10, "compress_stride": 4}, "compress_block_size"),  # l % d
    ({"compress_block_size": 4, "compress_stride": 8}, "compress_block_size"),  # d > l
    ({"select_block_size": 18, "compress_stride": 4}, "select_block_size"),  # l' % d
    ({"select_block_size": 2}, "select_block_size"),  # d > l'
    ({"num_selected_blocks": 2, "num_init_blocks": 1, "num_local_blocks": 2}, "num_selected_blocks"),  # n >= init + local
    ({"num_selected_blocks": 2, "num_init_blocks": 3, "num_local_blocks": 0}, "num_selected_blocks"),
    ({"num_init_blocks": -1}, "num_init_blocks"),
    ({"num_local_blocks": -1}, "num_local_blocks"),
    ({"num_local_blocks": -1, "num_init_blocks": 1, "num_selected_blocks": 1}, "num_local_blocks"),  # n would pass
    ({"head_dim": 7}, "head_dim"),  # RoPE rotates pairs of dimensions
    ({"compression_type": "attention"}, "compression_type"),
    ({"branch_kv": "tied"}, "branch_kv"),
    ({"nsa_backend": "magic"}, "nsa_backend"),
]


def _case_id(case) -> str:
    return ",".join(f"{k}={v}" for k, v in case.items()) if isinstance(case, dict) else str(case)


@pytest.mark.parametrize("overrides, field", INVALID, ids=_case_id)
def test_invalid_config_value_raises_value_error_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        tiny_config(**overrides)


@pytest.mark.parametrize("overrides, field", INVALID, ids=_case_id)
def test_model_rejects_invalid_value_set_after_the_config_was_checked(overrides, field):
    """`from_pretrained(path, field=value)` sets overrides after the config's own check (as `from_dict` does
    here): choice fields are checked on assignment, every other rule again when the model is built, so no model
    runs with an invalid value."""
    with pytest.raises(ValueError, match=f"`{field}`"):
        NsaForCausalLM(NsaConfig.from_dict(tiny_config().to_dict(), **overrides))


PATTERN_FIELDS = (
    "compress_block_size", "compress_stride", "select_block_size", "num_selected_blocks", "num_init_blocks",
    "num_local_blocks", "window_size",
)
VALID_PATTERN = dict(
    compress_block_size=8, compress_stride=4, select_block_size=16, num_selected_blocks=3, num_init_blocks=1,
    num_local_blocks=1, window_size=12,
)


@pytest.mark.parametrize(
    "overrides, field", [(o, f) for o, f in INVALID if set(o) <= set(PATTERN_FIELDS)], ids=_case_id
)
def test_invalid_sparse_pattern_raises_value_error_naming_the_field(overrides, field):
    """The backends build their `SparsePattern` from the config; it enforces the NSA rules on its own too."""
    with pytest.raises(ValueError, match=f"`{field}`"):
        SparsePattern(**{**VALID_PATTERN, **overrides})


BOUNDARY_VALID = [
    {"num_local_blocks": 0},
    {"num_init_blocks": 0},
    {"num_init_blocks": 0, "num_local_blocks": 0, "num_selected_blocks": 1},
    {"num_selected_blocks": 2, "num_init_blocks": 1, "num_local_blocks": 1},  # n == init + local
    {"window_size": 1},
    {"compress_block_size": 4, "compress_stride": 4, "select_block_size": 4},  # l = d = l'
    {"compress_block_size": 16, "compress_stride": 4, "select_block_size": 4},  # l' = d < l
    {"num_key_value_heads": 4},  # G = 1
    {"num_key_value_heads": 1},  # one K/V head
    {"head_dim": 2},
    {"gate_intermediate_size": 1},
    {"gate_intermediate_size": None},
    {"vocab_size": 1, "hidden_size": 1, "intermediate_size": 1, "num_hidden_layers": 1, "compress_intermediate_size": 1},
    *[{"compression_type": choice} for choice in ("mlp", "linear", "mean")],
    *[{"branch_kv": choice} for choice in ("independent", "shared")],
    *[{"nsa_backend": choice} for choice in ("auto", "reference", "triton")],
]


@pytest.mark.parametrize("overrides", BOUNDARY_VALID, ids=_case_id)
def test_boundary_config_values_are_accepted_and_run(overrides):
    config = tiny_config(**overrides)
    assert {name: getattr(config, name) for name in overrides} == overrides
    model = make_model(config)
    config.nsa_backend = "reference"  # the backend choice was accepted above; the forward runs on the CPU reference
    input_ids = torch.randint(0, config.vocab_size, (1, 40))
    with torch.no_grad():
        logits = model(input_ids, use_cache=False).logits
    assert logits.shape == (1, 40, config.vocab_size) and torch.isfinite(logits).all()
