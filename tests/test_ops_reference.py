"""CPU tests of the pure-PyTorch NSA reference ops (compressed, selection, sliding window, nsa_attention).

Every oracle here is an independent brute-force implementation written from NSA_SPEC.md: dense
[T, S] boolean masks built position by position at tiny sizes, then a plain masked softmax. Exactness
checks run in float64. Block selection (`select_blocks`) has its own file, test_ops_selection.py.
"""

from __future__ import annotations

import math
import re
import time

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from nsa_hf.ops import (
    compressed_attention,
    cu_seqlens_from_batch,
    cu_seqlens_from_left_padding,
    cu_seqlens_from_position_ids,
    nsa_attention,
    num_compressed_blocks,
    select_blocks,
    selection_attention,
    sliding_window_attention,
)

F64 = torch.float64
INF = float("inf")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed: int, dtype=F64) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=dtype)


# ---------------------------------------------------------------------------------------------------
# Brute-force oracles
# ---------------------------------------------------------------------------------------------------


def dense_attention(q, k, v, mask, scale):
    """Masked softmax attention, one row (batch element) at a time.

    q [T, HQ, D], k/v [S, H, D], mask [T, HQ, S] bool (or [T, S], shared by heads). Query head h reads
    key head h // G. Rows without a visible key give o = 0 and lse = -inf.
    """
    T, HQ, _ = q.shape
    G = HQ // k.shape[1]
    if mask.dim() == 2:
        mask = mask[:, None, :].expand(T, HQ, mask.shape[-1])
    o = q.new_zeros(T, HQ, v.shape[-1])
    lse = q.new_full((T, HQ), -INF)
    for h in range(HQ):
        scores = (q[:, h] @ k[:, h // G].T) * scale  # [T, S]
        for t in range(T):
            visible = mask[t, h]
            if not bool(visible.any()):
                continue
            s = scores[t][visible]
            lse[t, h] = torch.logsumexp(s, 0)
            o[t, h] = torch.softmax(s, 0) @ v[visible, h // G]
    return o, lse


def num_blocks_brute(length: int, l: int, d: int) -> int:
    """Number of blocks [i*d, i*d + l) lying entirely inside [0, length)."""
    count = 0
    while count * d + l <= length:
        count += 1
    return count


def compressed_mask(T: int, n_cmp: int, l: int, d: int) -> torch.Tensor:
    mask = torch.zeros(T, n_cmp, dtype=torch.bool)
    for t in range(T):
        for i in range(n_cmp):
            mask[t, i] = i * d + l - 1 <= t
    return mask


def window_mask(T: int, w: int) -> torch.Tensor:
    mask = torch.zeros(T, T, dtype=torch.bool)
    for t in range(T):
        for s in range(T):
            mask[t, s] = t - w + 1 <= s <= t
    return mask


def selection_mask(block_indices: torch.Tensor, T: int, block_size: int, G: int) -> torch.Tensor:
    """block_indices [T, H, n] -> [T, HQ, T]: key s visible to query t iff s <= t and s's block is selected."""
    H = block_indices.shape[1]
    mask = torch.zeros(T, H * G, T, dtype=torch.bool)
    for t in range(T):
        for h in range(H * G):
            chosen = {int(j) for j in block_indices[t, h // G] if int(j) >= 0}
            for s in range(t + 1):
                mask[t, h, s] = (s // block_size) in chosen
    return mask


def random_block_indices(B, T, H, n, block_size, seed) -> torch.Tensor:
    """Distinct random selection blocks per (b, t, h), some slots -1, future blocks included; at least one
    block per row holds a visible key (so each row has something to attend to)."""
    g = _gen(seed)
    num_blocks = math.ceil(T / block_size)
    out = torch.full((B, T, H, n), -1, dtype=torch.int32)
    for b in range(B):
        for t in range(T):
            for h in range(H):
                count = int(torch.randint(1, min(n, num_blocks) + 1, (1,), generator=g))
                chosen = torch.randperm(num_blocks, generator=g)[:count]
                if not bool((chosen <= t // block_size).any()):
                    chosen[0] = int(torch.randint(0, t // block_size + 1, (1,), generator=g))
                slots = torch.randperm(n, generator=g)[:count]
                out[b, t, h, slots] = chosen.to(torch.int32)
    return out


# ---------------------------------------------------------------------------------------------------
# 1. Compressed branch
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("G", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("l, d, T", [(32, 16, 101), (64, 64, 203), (8, 4, 37)])
def test_compressed_attention_matches_dense_oracle(G, l, d, T):
    B, H, D = 2, 2, 8
    HQ = G * H
    n_cmp = num_blocks_brute(T, l, d)
    assert n_cmp >= 2 and T % l and T % d  # T is not a multiple of the block sizes
    q = _randn(B, T, HQ, D, seed=1)
    k_cmp = _randn(B, n_cmp, H, D, seed=2)
    v_cmp = _randn(B, n_cmp, H, D, seed=3)
    scale = 0.37 if G == 3 else None  # exercise both the explicit and the default scale D**-0.5
    o, lse = compressed_attention(q, k_cmp, v_cmp, l, d, scale=scale)
    assert o.shape == (B, T, HQ, D) and lse.shape == (B, T, HQ)
    mask = compressed_mask(T, n_cmp, l, d)
    for b in range(B):
        o_ref, lse_ref = dense_attention(q[b], k_cmp[b], v_cmp[b], mask, D**-0.5 if scale is None else scale)
        torch.testing.assert_close(o[b], o_ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(lse[b].to(F64), lse_ref, rtol=1e-10, atol=1e-12)
    # queries before the first complete block see nothing: exactly 0 and -inf
    assert bool((o[:, : l - 1] == 0).all()) and bool((lse[:, : l - 1] == -INF).all())
    assert bool(torch.isfinite(lse[:, l - 1 :]).all())


@pytest.mark.parametrize("T, l, d", [(5, 8, 4), (31, 32, 16), (1, 64, 64)])
def test_compressed_attention_sequence_shorter_than_block(T, l, d):
    B, H, G, D = 2, 1, 2, 4
    assert num_compressed_blocks(T, l, d) == 0
    q = _randn(B, T, H * G, D, seed=4).requires_grad_()
    k_cmp = _randn(B, 0, H, D, seed=5).requires_grad_()
    v_cmp = _randn(B, 0, H, D, seed=6).requires_grad_()
    o, lse = compressed_attention(q, k_cmp, v_cmp, l, d)
    assert bool((o == 0).all()) and not bool(o.isnan().any())
    assert bool((lse == -INF).all())
    # The output is a constant 0; the reference returns it detached from q (no grad_fn), which is fine.
    if o.requires_grad:
        (grad_q,) = torch.autograd.grad(o.sum(), q, allow_unused=True)
        assert grad_q is None or bool((grad_q == 0).all())


def test_num_compressed_blocks_matches_brute_force():
    for l, d in [(32, 16), (64, 64), (8, 4), (12, 4)]:
        for length in range(3 * l + 5):
            assert num_compressed_blocks(length, l, d) == num_blocks_brute(length, l, d)
        lengths = torch.arange(0, 3 * l + 5)
        expected = torch.tensor([num_blocks_brute(int(x), l, d) for x in lengths])
        assert torch.equal(num_compressed_blocks(lengths, l, d), expected)


# ---------------------------------------------------------------------------------------------------
# 2. Sliding window
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("G", [1, 3])
@pytest.mark.parametrize("w", [1, 3, 7, 23, 40])
def test_sliding_window_matches_dense_oracle(G, w):
    B, T, H, D = 2, 23, 2, 8
    q = _randn(B, T, G * H, D, seed=10)
    k = _randn(B, T, H, D, seed=11)
    v = _randn(B, T, H, D, seed=12)
    o = sliding_window_attention(q, k, v, w)
    mask = window_mask(T, w)
    for b in range(B):
        o_ref, _ = dense_attention(q[b], k[b], v[b], mask, D**-0.5)
        torch.testing.assert_close(o[b], o_ref, rtol=1e-10, atol=1e-12)


def test_sliding_window_one_is_own_value_and_large_window_is_causal_attention():
    B, T, H, G, D = 1, 19, 1, 2, 4
    q, k, v = _randn(B, T, H * G, D, seed=13), _randn(B, T, H, D, seed=14), _randn(B, T, H, D, seed=15)
    o1 = sliding_window_attention(q, k, v, 1)
    torch.testing.assert_close(o1, v.repeat_interleave(G, dim=2), rtol=0, atol=1e-15)
    big = sliding_window_attention(q, k, v, 10 * T)
    causal = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.repeat_interleave(G, 2).transpose(1, 2), v.repeat_interleave(G, 2).transpose(1, 2), is_causal=True
    ).transpose(1, 2)
    torch.testing.assert_close(big, causal, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------------
# 3. Selection attention
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("G", [1, 2, 4])
@pytest.mark.parametrize("block_size, n", [(4, 3), (8, 2), (5, 4)])
def test_selection_attention_matches_dense_oracle(G, block_size, n):
    """Random distinct block indices with -1 slots and future blocks (which causality must hide).

    Duplicate indices are avoided on purpose: the spec defines o_slc as a softmax over the SET of tokens in
    the selected blocks, but the reference gathers one copy of the keys per slot, so a repeated index would
    count its keys twice. `select_blocks` never emits duplicates.
    """
    B, T, H, D = 2, 29, 2, 8
    q = _randn(B, T, G * H, D, seed=20)
    k = _randn(B, T, H, D, seed=21)
    v = _randn(B, T, H, D, seed=22)
    block_indices = random_block_indices(B, T, H, n, block_size, seed=23)
    assert bool((block_indices == -1).any())
    o = selection_attention(q, k, v, block_indices, block_size)
    for b in range(B):
        mask = selection_mask(block_indices[b], T, block_size, G)
        o_ref, _ = dense_attention(q[b], k[b], v[b], mask, D**-0.5)
        torch.testing.assert_close(o[b], o_ref, rtol=1e-10, atol=1e-12)


def test_selection_attention_all_empty_or_future_slots_gives_zero():
    B, T, H, G, D, bs = 1, 12, 1, 2, 4, 4
    q, k, v = _randn(B, T, H * G, D, seed=24), _randn(B, T, H, D, seed=25), _randn(B, T, H, D, seed=26)
    idx = torch.full((B, T, H, 2), -1, dtype=torch.int32)
    idx[0, :4, 0, 0] = 2  # a block entirely in the future of queries 0..3
    o = selection_attention(q, k, v, idx, bs)
    assert bool(torch.isfinite(o).all()) and bool((o == 0).all())


# ---------------------------------------------------------------------------------------------------
# nsa_attention = gated sum of the three brute-force branches
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("G", [1, 2])
def test_nsa_attention_matches_branch_oracles(G):
    """o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win with every branch from a dense mask. The selection
    mask is built from `select_blocks`' indices (that op has its own oracle in test_ops_selection.py)."""
    B, T, H, D = 2, 45, 2, 8
    l, d, lp, n, init, local, w = 8, 4, 8, 3, 1, 1, 5
    HQ = G * H
    n_cmp = num_blocks_brute(T, l, d)
    q = _randn(B, T, HQ, D, seed=90)
    kc, vc = _randn(B, n_cmp, H, D, seed=91), _randn(B, n_cmp, H, D, seed=92)
    ks, vs, kw, vw = (_randn(B, T, H, D, seed=93 + i) for i in range(4))
    gates = torch.rand(B, T, HQ, 3, generator=_gen(97), dtype=F64)
    o = nsa_attention(
        q, kc, vc, ks, vs, kw, vw, gates, compress_block_size=l, compress_stride=d, select_block_size=lp,
        num_selected_blocks=n, num_init_blocks=init, num_local_blocks=local, window_size=w,
    )
    _, lse = compressed_attention(q, kc, vc, l, d)
    idx = select_blocks(q, kc, lse, l, d, lp, n, init, local)
    scale = D**-0.5
    for b in range(B):
        o_cmp, _ = dense_attention(q[b], kc[b], vc[b], compressed_mask(T, n_cmp, l, d), scale)
        o_slc, _ = dense_attention(q[b], ks[b], vs[b], selection_mask(idx[b], T, lp, G), scale)
        o_win, _ = dense_attention(q[b], kw[b], vw[b], window_mask(T, w), scale)
        g = gates[b]
        expected = g[..., 0:1] * o_cmp + g[..., 1:2] * o_slc + g[..., 2:3] * o_win
        torch.testing.assert_close(o[b], expected, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------------
# 5. Packed documents (cu_seqlens): packed output == each document run alone, and isolation
# ---------------------------------------------------------------------------------------------------

DOC_LENGTHS = [5, 37, 70, 1]  # includes documents shorter than a compressed / selection block
PK = dict(l=8, d=4, lp=8, n=4, init=1, local=2, w=6)


def _packed_inputs(seed: int, HQ=4, H=2, D=8, lengths=DOC_LENGTHS):
    """Per-document tensors and their packed (B == 1) concatenation."""
    docs = []
    for i, L in enumerate(lengths):
        n_cmp = num_blocks_brute(L, PK["l"], PK["d"])
        s = seed + 100 * i
        docs.append(
            dict(
                q=_randn(1, L, HQ, D, seed=s),
                k_cmp=_randn(1, n_cmp, H, D, seed=s + 1),
                v_cmp=_randn(1, n_cmp, H, D, seed=s + 2),
                k_slc=_randn(1, L, H, D, seed=s + 3),
                v_slc=_randn(1, L, H, D, seed=s + 4),
                k_win=_randn(1, L, H, D, seed=s + 5),
                v_win=_randn(1, L, H, D, seed=s + 6),
                gates=torch.rand(1, L, HQ, 3, generator=_gen(s + 7), dtype=F64),
            )
        )
    packed = {key: torch.cat([doc[key] for doc in docs], dim=1) for key in docs[0]}
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return docs, packed, cu


def _split(x: torch.Tensor, lengths=DOC_LENGTHS):
    return torch.split(x, lengths, dim=1)


def _nsa(t, cu=None):
    return nsa_attention(
        t["q"], t["k_cmp"], t["v_cmp"], t["k_slc"], t["v_slc"], t["k_win"], t["v_win"], t["gates"],
        compress_block_size=PK["l"], compress_stride=PK["d"], select_block_size=PK["lp"],
        num_selected_blocks=PK["n"], num_init_blocks=PK["init"], num_local_blocks=PK["local"],
        window_size=PK["w"], cu_seqlens=cu,
    )


def test_packed_compressed_attention_equals_documents_alone():
    docs, packed, cu = _packed_inputs(seed=30)
    o, lse = compressed_attention(packed["q"], packed["k_cmp"], packed["v_cmp"], PK["l"], PK["d"], cu_seqlens=cu)
    for doc, o_doc, lse_doc in zip(docs, _split(o), _split(lse)):
        o_ref, lse_ref = compressed_attention(doc["q"], doc["k_cmp"], doc["v_cmp"], PK["l"], PK["d"])
        torch.testing.assert_close(o_doc, o_ref, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(lse_doc, lse_ref, rtol=1e-12, atol=1e-14)
        # and against the brute-force oracle, document-relative visibility
        L = doc["q"].shape[1]
        mask = compressed_mask(L, doc["k_cmp"].shape[1], PK["l"], PK["d"])
        o_bf, _ = dense_attention(doc["q"][0], doc["k_cmp"][0], doc["v_cmp"][0], mask, 8**-0.5)
        torch.testing.assert_close(o_doc[0], o_bf, rtol=1e-10, atol=1e-12)


def test_packed_sliding_window_equals_documents_alone():
    docs, packed, cu = _packed_inputs(seed=31)
    o = sliding_window_attention(packed["q"], packed["k_win"], packed["v_win"], PK["w"], cu_seqlens=cu)
    for doc, o_doc in zip(docs, _split(o)):
        o_ref = sliding_window_attention(doc["q"], doc["k_win"], doc["v_win"], PK["w"])
        torch.testing.assert_close(o_doc, o_ref, rtol=1e-12, atol=1e-14)


def test_packed_selection_attention_equals_documents_alone():
    docs, packed, cu = _packed_inputs(seed=32)
    per_doc = [random_block_indices(1, L, 2, PK["n"], PK["lp"], seed=33 + i) for i, L in enumerate(DOC_LENGTHS)]
    idx = torch.cat(per_doc, dim=1)  # document-relative indices
    o = selection_attention(packed["q"], packed["k_slc"], packed["v_slc"], idx, PK["lp"], cu_seqlens=cu)
    for doc, idx_doc, o_doc in zip(docs, per_doc, _split(o)):
        o_ref = selection_attention(doc["q"], doc["k_slc"], doc["v_slc"], idx_doc, PK["lp"])
        torch.testing.assert_close(o_doc, o_ref, rtol=1e-12, atol=1e-14)
        L = doc["q"].shape[1]
        o_bf, _ = dense_attention(doc["q"][0], doc["k_slc"][0], doc["v_slc"][0], selection_mask(idx_doc[0], L, PK["lp"], 2), 8**-0.5)
        torch.testing.assert_close(o_doc[0], o_bf, rtol=1e-10, atol=1e-12)


def test_packed_nsa_attention_equals_documents_alone():
    docs, packed, cu = _packed_inputs(seed=34)
    o = _nsa(packed, cu)
    for doc, o_doc in zip(docs, _split(o)):
        torch.testing.assert_close(o_doc, _nsa(doc), rtol=1e-12, atol=1e-14)


def test_packed_nsa_attention_no_query_sees_another_document():
    """Replacing every input of the other documents (their K/V of all branches, compressed blocks, queries,
    gates) must leave a document's output bit-for-bit unchanged."""
    docs, packed, cu = _packed_inputs(seed=35)
    o = _nsa(packed, cu)
    _, other, _ = _packed_inputs(seed=36)
    n_cmp = [num_blocks_brute(L, PK["l"], PK["d"]) for L in DOC_LENGTHS]
    for a in range(len(DOC_LENGTHS)):
        mixed = {}
        for key, x in packed.items():
            sizes = n_cmp if key in ("k_cmp", "v_cmp") else DOC_LENGTHS
            parts = list(torch.split(x, sizes, dim=1))
            alt = list(torch.split(other[key], sizes, dim=1))
            mixed[key] = torch.cat([parts[i] if i == a else alt[i] for i in range(len(sizes))], dim=1)
        o_mixed = _nsa(mixed, cu)
        assert torch.equal(_split(o_mixed)[a], _split(o)[a]), f"document {a} changed when other documents changed"


def test_left_padding_cu_seqlens_matches_unpadded_rows():
    """cu_seqlens_from_left_padding: the real tokens of each left-padded row compute what the row alone computes."""
    T, lengths = 21, [21, 13, 4]
    pads = torch.tensor([T - L for L in lengths])
    cu = cu_seqlens_from_left_padding(pads, T)
    bounds = sorted({0, *[r * T for r in range(len(lengths) + 1)], *[r * T + int(p) for r, p in enumerate(pads)]})
    assert cu.tolist() == bounds
    q, k, v = _randn(1, T * 3, 2, 4, seed=37), _randn(1, T * 3, 1, 4, seed=38), _randn(1, T * 3, 1, 4, seed=39)
    o = sliding_window_attention(q, k, v, 5, cu_seqlens=cu)
    for r, L in enumerate(lengths):
        sl = slice(r * T + T - L, (r + 1) * T)
        torch.testing.assert_close(o[:, sl], sliding_window_attention(q[:, sl], k[:, sl], v[:, sl], 5), rtol=1e-12, atol=1e-14)


def test_cu_seqlens_helpers():
    assert cu_seqlens_from_batch(3, 7).tolist() == [0, 7, 14, 21]
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1, 2, 3]])
    assert cu_seqlens_from_position_ids(pos).tolist() == [0, 3, 5, 6, 10]
    assert cu_seqlens_from_position_ids(torch.tensor([[4, 5, 0, 1]])).tolist() == [0, 2, 4]
    with pytest.raises(ValueError, match="position_ids"):
        cu_seqlens_from_position_ids(torch.tensor([0, 1, 2]))


# ---------------------------------------------------------------------------------------------------
# 6. Gradients (float64 gradcheck, tiny sizes)
# ---------------------------------------------------------------------------------------------------

GC = dict(T=12, D=4, HQ=2, H=1, l=4, d=2, lp=4, w=3)


def _leaf(*shape, seed):
    return _randn(*shape, seed=seed).requires_grad_()


def test_gradcheck_compressed_attention():
    T, D, HQ, H, l, d = (GC[k] for k in ("T", "D", "HQ", "H", "l", "d"))
    n_cmp = num_blocks_brute(T, l, d)
    q, kc, vc = _leaf(1, T, HQ, D, seed=40), _leaf(1, n_cmp, H, D, seed=41), _leaf(1, n_cmp, H, D, seed=42)
    assert torch.autograd.gradcheck(lambda *x: compressed_attention(*x, l, d)[0], (q, kc, vc))
    # lse: only where at least one block is visible (elsewhere it is the constant -inf)
    assert torch.autograd.gradcheck(lambda *x: compressed_attention(*x, l, d)[1][:, l - 1 :], (q, kc, vc))


def test_gradcheck_selection_attention():
    T, D, HQ, H, lp = (GC[k] for k in ("T", "D", "HQ", "H", "lp"))
    q, k, v = _leaf(1, T, HQ, D, seed=43), _leaf(1, T, H, D, seed=44), _leaf(1, T, H, D, seed=45)
    idx = random_block_indices(1, T, H, 2, lp, seed=46)
    assert torch.autograd.gradcheck(lambda *x: selection_attention(*x, idx, lp), (q, k, v))


def test_gradcheck_sliding_window_attention():
    T, D, HQ, H, w = (GC[k] for k in ("T", "D", "HQ", "H", "w"))
    q, k, v = _leaf(1, T, HQ, D, seed=47), _leaf(1, T, H, D, seed=48), _leaf(1, T, H, D, seed=49)
    assert torch.autograd.gradcheck(lambda *x: sliding_window_attention(*x, w), (q, k, v))


def test_gradcheck_nsa_attention():
    """All float inputs, gates included; block indices come from top-n and carry no gradient."""
    T, D, HQ, H, l, d, lp, w = (GC[k] for k in ("T", "D", "HQ", "H", "l", "d", "lp", "w"))
    n_cmp = num_blocks_brute(T, l, d)
    inputs = (
        _leaf(1, T, HQ, D, seed=50),
        _leaf(1, n_cmp, H, D, seed=51),
        _leaf(1, n_cmp, H, D, seed=52),
        _leaf(1, T, H, D, seed=53),
        _leaf(1, T, H, D, seed=54),
        _leaf(1, T, H, D, seed=55),
        _leaf(1, T, H, D, seed=56),
        torch.rand(1, T, HQ, 3, generator=_gen(57), dtype=F64).requires_grad_(),
    )

    kw = dict(compress_block_size=l, compress_stride=d, select_block_size=lp, num_selected_blocks=2, num_init_blocks=0, num_local_blocks=1)

    def fn(*x):
        return nsa_attention(*x, **kw, window_size=w)

    # Full-Jacobian gradcheck needs ~800 forward calls of ~15 ms each here; fast mode (random projections)
    # checks every input at a fraction of that. The composition check below complements it exactly.
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)
    # exact: nsa's gradients equal those of the gated sum of the (fully gradchecked) branch ops, indices fixed
    q, kc, vc, ks, vs, kw_, vw, g = inputs
    with torch.no_grad():
        _, lse = compressed_attention(q, kc, vc, l, d)
        idx = select_blocks(q, kc, lse, l, d, lp, 2, 0, 1)
    assert bool((idx[:, 2 * lp :] >= 0).all())  # a genuine choice is made for the last block's queries
    composed = (
        compressed_attention(q, kc, vc, l, d)[0] * g[..., 0:1]
        + selection_attention(q, ks, vs, idx, lp) * g[..., 1:2]
        + sliding_window_attention(q, kw_, vw, w) * g[..., 2:3]
    )
    out = fn(*inputs)
    torch.testing.assert_close(out, composed, rtol=1e-12, atol=1e-14)
    cot = _randn(*out.shape, seed=58)
    grads = torch.autograd.grad(out, inputs, cot)
    grads_ref = torch.autograd.grad(composed, inputs, cot)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------------
# 7. Long sequence: linear memory
# ---------------------------------------------------------------------------------------------------


class _LargestStorage(TorchDispatchMode):
    """Records the largest storage (bytes) of any tensor an op produces while active."""

    def __init__(self):
        super().__init__()
        self.max_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.max_bytes = max(self.max_bytes, t.untyped_storage().nbytes())
        return out


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+)", f.read(), re.MULTILINE).group(1))


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: reset VmHWM (peak RSS) to the current RSS
        return True
    except OSError:
        return False


def _nsa_long(T: int):
    HQ, H, D = 2, 1, 16
    n_cmp = num_compressed_blocks(T, 32, 16)
    q, k, v = _randn(1, T, HQ, D, seed=60, dtype=torch.float32), _randn(1, T, H, D, seed=61, dtype=torch.float32), _randn(1, T, H, D, seed=62, dtype=torch.float32)
    kc, vc = _randn(1, n_cmp, H, D, seed=63, dtype=torch.float32), _randn(1, n_cmp, H, D, seed=64, dtype=torch.float32)
    gates = torch.rand(1, T, HQ, 3, generator=_gen(65))
    can_measure_rss = _reset_peak_rss()
    rss_before = _proc_status_kib("VmRSS")
    with _LargestStorage() as probe:
        o = nsa_attention(
            q, kc, vc, k, v, k, v, gates, compress_block_size=32, compress_stride=16, select_block_size=64,
            num_selected_blocks=16, num_init_blocks=1, num_local_blocks=2, window_size=512,
        )
    rss_growth = (_proc_status_kib("VmHWM") - rss_before) * 1024 if can_measure_rss else None
    return o, probe.max_bytes, rss_growth


@pytest.mark.slow
def test_nsa_attention_long_sequence_memory_is_linear():
    """T = 32768 on CPU (HQ=2, H=1, D=16, paper l/d/l'/n/w): runs, finite output, and memory grows linearly.

    Memory is measured two ways, each comparing T = 8192 with T = 32768 (4x the tokens; a T x T tensor
    would grow 16x):
    - deterministic: a TorchDispatchMode records the largest storage any op allocates; it must grow < 6x
      and stay far below a T x T matrix (which would be 4 GiB in fp32 at 32768);
    - process peak RSS (Linux VmHWM, reset through /proc/self/clear_refs before each run): the growth over
      the pre-call RSS must stay far below what one T x T fp32 tensor would take.
    Timing is deliberately not used.
    """
    start = time.perf_counter()
    _, small_bytes, small_rss = _nsa_long(8192)
    T = 32768
    o, big_bytes, big_rss = _nsa_long(T)
    assert o.shape == (1, T, 2, 16) and bool(torch.isfinite(o).all())
    assert big_bytes < 6 * small_bytes, (small_bytes, big_bytes)
    assert big_bytes < T * T // 16, big_bytes  # nothing close to a T x T tensor
    if small_rss is not None:
        # Process RSS includes allocator caching, so only a bound that a quadratic tensor would break is
        # asserted (a growth ratio flaked at 7x on a busy CI machine).
        assert big_rss < T * T, (small_rss, big_rss)  # < 1 GiB; a dense fp32 score matrix alone is 4 GiB
    assert time.perf_counter() - start < 120  # generous guard against a pathological slowdown


# ---------------------------------------------------------------------------------------------------
# 8. Input validation
# ---------------------------------------------------------------------------------------------------


def _small(B=1, T=10, HQ=2, H=1, D=4, l=4, d=2, dtype=F64):
    n_cmp = num_blocks_brute(T, l, d)
    return dict(
        q=_randn(B, T, HQ, D, seed=70, dtype=dtype),
        k_cmp=_randn(B, n_cmp, H, D, seed=71, dtype=dtype),
        v_cmp=_randn(B, n_cmp, H, D, seed=72, dtype=dtype),
        k=_randn(B, T, H, D, seed=73, dtype=dtype),
        v=_randn(B, T, H, D, seed=74, dtype=dtype),
        gates=torch.rand(B, T, HQ, 3, generator=_gen(75), dtype=dtype),
        idx=torch.zeros(B, T, H, 2, dtype=torch.int32),
    )


NSA_KW = dict(compress_block_size=4, compress_stride=2, select_block_size=4, num_selected_blocks=2, num_init_blocks=1, num_local_blocks=1, window_size=3)


def _call(op: str, t: dict, cu=None):
    if op == "compressed":
        return compressed_attention(t["q"], t["k_cmp"], t["v_cmp"], 4, 2, cu_seqlens=cu)
    if op == "select":
        lse = t.get("lse", torch.zeros(t["q"].shape[:3], dtype=t["q"].dtype))
        return select_blocks(t["q"], t["k_cmp"], lse, 4, 2, 4, 2, 1, 1, cu_seqlens=cu)
    if op == "selection":
        return selection_attention(t["q"], t["k"], t["v"], t["idx"], 4, cu_seqlens=cu)
    if op == "window":
        return sliding_window_attention(t["q"], t["k"], t["v"], 3, cu_seqlens=cu)
    if op == "nsa":
        k_slc = t.get("k_slc", t["k"])
        return nsa_attention(t["q"], t["k_cmp"], t["v_cmp"], k_slc, t["v"], t["k"], t["v"], t["gates"], **NSA_KW, cu_seqlens=cu)
    raise AssertionError(op)


OPS = ["compressed", "select", "selection", "window", "nsa"]


@pytest.mark.parametrize("op", OPS)
def test_valid_small_inputs_pass(op):
    _call(op, _small(B=2))


@pytest.mark.parametrize("op", OPS)
def test_wrong_q_dims_raises(op):
    t = _small()
    t["q"] = t["q"][0]
    with pytest.raises(ValueError, match="`q`"):
        _call(op, t)


@pytest.mark.parametrize("op", OPS)
def test_query_heads_not_multiple_of_kv_heads_raises(op):
    t = _small(HQ=3, H=2)
    t["idx"] = torch.zeros(1, 10, 2, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="heads"):
        _call(op, t)


@pytest.mark.parametrize("op, name", [("compressed", "k_cmp"), ("select", "k_cmp"), ("selection", "k"), ("window", "v"), ("nsa", "v_cmp")])
def test_mismatched_dtype_raises(op, name):
    t = _small()
    t[name] = t[name].float()
    with pytest.raises(ValueError, match=f"`{name}`.*dtype"):
        _call(op, t)


@pytest.mark.parametrize("op", ["compressed", "select", "nsa"])
@pytest.mark.parametrize("delta", [-1, 1])
def test_wrong_compressed_block_count_raises(op, delta):
    t = _small()
    n = t["k_cmp"].shape[1] + delta
    t["k_cmp"] = _randn(1, n, 1, 4, seed=76)
    t["v_cmp"] = _randn(1, n, 1, 4, seed=77)
    with pytest.raises(ValueError, match="`k_cmp`"):
        _call(op, t)


@pytest.mark.parametrize("shape", [(1, 10, 2, 2), (1, 10, 1, 3), (1, 10, 2), (1, 9, 2, 3)])
def test_wrong_gates_shape_raises(shape):
    t = _small()
    t["gates"] = torch.rand(shape, dtype=F64)
    with pytest.raises(ValueError, match="`gates`"):
        _call("nsa", t)


def test_wrong_lse_and_block_indices_shapes_raise():
    t = _small()
    t["lse"] = torch.zeros(1, 10, 1, dtype=F64)
    with pytest.raises(ValueError, match="`lse`"):
        _call("select", t)
    t = _small()
    t["idx"] = torch.zeros(1, 10, 2, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="`block_indices`"):
        _call("selection", t)
    t = _small()
    with pytest.raises(ValueError, match="window_size"):
        sliding_window_attention(t["q"], t["k"], t["v"], 0)


@pytest.mark.parametrize("op", OPS)
def test_cu_seqlens_with_batch_larger_than_one_raises(op):
    with pytest.raises(ValueError, match="cu_seqlens"):
        _call(op, _small(B=2), cu=torch.tensor([0, 10]))


def _with_cmp_for(t: dict, cu: torch.Tensor) -> dict:
    """Give `t` a k_cmp/v_cmp count consistent with the (possibly malformed) boundaries, so that only
    `cu_seqlens` itself is wrong."""
    flat = [int(x) for x in cu.flatten().tolist()]
    n = sum(num_blocks_brute(b - a, 4, 2) for a, b in zip(flat[:-1], flat[1:]))
    t = dict(t)
    t["k_cmp"], t["v_cmp"] = _randn(1, n, 1, 4, seed=78), _randn(1, n, 1, 4, seed=79)
    return t


BAD_CU = {
    "not_from_zero": torch.tensor([2, 10]),
    "decreasing": torch.tensor([0, 6, 4, 10]),
    "ends_before_T": torch.tensor([0, 4, 8]),  # T = 10
    "ends_after_T": torch.tensor([0, 4, 12]),
    "two_dims": torch.tensor([[0, 4, 10]]),
    "float_dtype": torch.tensor([0.0, 4.0, 10.0]),
}


@pytest.mark.parametrize("case", list(BAD_CU))
def test_bad_cu_seqlens_raises(case):
    """Malformed document boundaries must be rejected by every op with a ValueError naming `cu_seqlens`.

    (The validation is shared code, so each case checks all five ops and reports those that fail.)
    """
    cu = BAD_CU[case]
    problems = []
    for op in OPS:
        t = _with_cmp_for(_small(), cu)
        try:
            _call(op, t, cu=cu)
        except ValueError as e:
            if "cu_seqlens" not in str(e):
                problems.append(f"{op}: ValueError without naming cu_seqlens: {e}")
        except Exception as e:  # noqa: BLE001 - the point is to report which exception escaped
            problems.append(f"{op}: {type(e).__name__}: {e}")
        else:
            problems.append(f"{op}: no error")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("delta", [-1, 1])
def test_key_sequence_length_must_match_queries(delta):
    """k/v are [B, T, H, D] with the queries' T. A different length must be a ValueError: with B = 2 a longer
    k/v silently misaligns the second row, a shorter one crashes or silently reads clamped keys."""
    problems = []
    for op in ["selection", "window", "nsa"]:
        t = _small(B=2)
        t["k"], t["v"] = _randn(2, 10 + delta, 1, 4, seed=80), _randn(2, 10 + delta, 1, 4, seed=81)
        try:
            _call(op, t)
        except ValueError:
            pass
        except Exception as e:  # noqa: BLE001
            problems.append(f"{op}: {type(e).__name__}: {e}")
        else:
            problems.append(f"{op}: no error")
    assert not problems, "\n".join(problems)


def test_nsa_branch_kv_heads_must_agree():
    """k_cmp has H key heads; the selection K/V with another head count must be a ValueError, not an IndexError."""
    t = _small(HQ=2, H=2)
    t["k_slc"] = _randn(1, 10, 1, 4, seed=82)
    with pytest.raises(ValueError, match="heads"):
        _call("nsa", t)
