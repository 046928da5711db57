"""CPU tests of `select_blocks` (NSA selection: Eq. 9 overlap weights, Eq. 10 group sum, forced blocks, top-n).

The oracle below is written from NSA_SPEC.md and shares no code with the op: p_cmp is a masked softmax
with the visibility rule i*d + l - 1 <= t, the Eq. 9 weight w(i, j) is the number of tokens two
intervals share divided by d, scores are summed over the G query heads of a key head, forced blocks are
added, and the rest is a sort by (-score, index). Slot order is not semantic, so selections are compared
as sets (plus the exact count of -1 slots).
"""

from __future__ import annotations

import math

import pytest
import torch

from nsa_hf.ops import compressed_attention, num_compressed_blocks, select_blocks

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed: int, dtype=F64) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=dtype)


# ---------------------------------------------------------------------------------------------------
# Oracle
# ---------------------------------------------------------------------------------------------------


def overlap_weight(i: int, j: int, l: int, d: int, lp: int) -> float:
    """Eq. 9: tokens shared by compressed block [i*d, i*d + l) and selection block [j*lp, (j+1)*lp), over d."""
    shared = min(i * d + l, (j + 1) * lp) - max(i * d, j * lp)
    return max(0, shared) / d


def oracle_selection(q, k_cmp, l, d, lp, n, init, local, scale):
    """q [T, HQ, D], k_cmp [N, H, D] (one document) -> (selected, scores, forced): per (t, h) python sets.

    scores[t][h] is the list of group-summed p_slc over the candidates j = 0 .. t // lp.
    """
    T, HQ, _ = q.shape
    N, H, _ = k_cmp.shape
    G = HQ // H
    q, k_cmp = q.to(F64), k_cmp.to(F64)
    num_sel = max(1, math.ceil(T / lp))
    W = torch.tensor([[overlap_weight(i, j, l, d, lp) for j in range(num_sel)] for i in range(N)], dtype=F64).reshape(N, num_sel)
    selected, scores, forced_sets = [], [], []
    for t in range(T):
        visible = [i for i in range(N) if i * d + l - 1 <= t]
        current = t // lp
        row_sel, row_scores, row_forced = [], [], []
        for h in range(H):
            score = torch.zeros(current + 1, dtype=F64)
            for g in range(G):
                if not visible:
                    continue  # no visible block: contributes nothing
                logits = torch.stack([q[t, h * G + g] @ k_cmp[i, h] for i in visible]) * scale
                p = torch.softmax(logits, 0)
                score += p @ W[visible, : current + 1]
            candidates = range(current + 1)
            forced = {j for j in candidates if j < init or j > current - local}
            rest = sorted((j for j in candidates if j not in forced), key=lambda j: (-float(score[j]), j))
            row_sel.append(forced | set(rest[: n - len(forced)]))
            row_scores.append(score.tolist())
            row_forced.append(forced)
        selected.append(row_sel)
        scores.append(row_scores)
        forced_sets.append(row_forced)
    return selected, scores, forced_sets


def _as_sets(indices: torch.Tensor):
    """[T, H, n] -> per (t, h): (set of selected blocks, number of -1 slots); duplicates are an error."""
    out = []
    for row in indices.tolist():
        row_sets = []
        for slots in row:
            chosen = [j for j in slots if j != -1]
            assert len(chosen) == len(set(chosen)), f"duplicate block in {slots}"
            assert all(j >= 0 for j in slots if j != -1), slots
            row_sets.append((set(chosen), len(slots) - len(chosen)))
        out.append(row_sets)
    return out


def assert_matches_oracle(indices, q, k_cmp, l, d, lp, n, init, local, scale, tie_tol=1e-6):
    """indices [T, H, n] from the op vs the oracle for one document.

    Differences are tolerated only between blocks whose oracle scores agree within `tie_tol` (relative):
    a floating-point near-tie (an implementation may rank scores in float32), which random inputs almost
    never produce. Exact-tie behaviour is checked by the hand-made tests with exact expected sets.
    """
    expected, scores, _ = oracle_selection(q, k_cmp, l, d, lp, n, init, local, scale)
    got = _as_sets(indices)
    for t, (exp_row, got_row) in enumerate(zip(expected, got)):
        for h, (exp_set, (got_set, empties)) in enumerate(zip(exp_row, got_row)):
            assert empties == n - len(exp_set), (t, h, got_set, exp_set)
            if got_set != exp_set:
                s = scores[t][h]
                diff = got_set ^ exp_set
                assert all(j <= t // lp for j in got_set), (t, h, got_set)
                vals = [s[j] for j in diff]
                assert max(vals) - min(vals) <= tie_tol * max(1.0, max(abs(v) for v in vals)), (
                    f"t={t} h={h}: got {sorted(got_set)}, expected {sorted(exp_set)}, scores {s}"
                )


def _select(q, k_cmp, l, d, lp, n, init, local, scale=None, cu_seqlens=None):
    """compressed_attention (for lse) then select_blocks, as the model calls them."""
    v_dummy = torch.zeros_like(k_cmp)
    _, lse = compressed_attention(q, k_cmp, v_dummy, l, d, scale=scale, cu_seqlens=cu_seqlens)
    return select_blocks(q, k_cmp, lse, l, d, lp, n, init, local, scale=scale, cu_seqlens=cu_seqlens)


# ---------------------------------------------------------------------------------------------------
# The oracle itself reproduces the paper's multiplicities
# ---------------------------------------------------------------------------------------------------


def test_oracle_overlap_weights_are_the_papers():
    # l=32, d=16, l'=64: block j gets 1,2,2,2,1 from compressed blocks 4j-1 .. 4j+3, nothing else
    for j in range(1, 5):
        weights = {i: overlap_weight(i, j, 32, 16, 64) for i in range(4 * j + 8)}
        assert {i: w for i, w in weights.items() if w} == {4 * j - 1: 1, 4 * j: 2, 4 * j + 1: 2, 4 * j + 2: 2, 4 * j + 3: 1}
    # l = d = l': identity
    for i in range(6):
        for j in range(6):
            assert overlap_weight(i, j, 16, 16, 16) == (1.0 if i == j else 0.0)


# ---------------------------------------------------------------------------------------------------
# 4(a). Random inputs against the oracle (Eq. 9 weights, Eq. 10, forced blocks, top-n)
# ---------------------------------------------------------------------------------------------------

RANDOM_CASES = [
    # l, d, l', T, n, init, local
    (32, 16, 64, 300, 4, 1, 2),  # paper ratios, multiplicities 1,2,2,2,1
    (32, 16, 64, 200, 2, 0, 1),
    (16, 16, 16, 100, 3, 1, 1),  # identity mapping l = d = l'
    (4, 4, 4, 37, 4, 1, 2),  # identity mapping, small blocks
    (8, 4, 8, 61, 3, 0, 1),
    (16, 4, 8, 61, 4, 1, 0),  # l > l'
    (4, 2, 12, 50, 3, 2, 1),
]


@pytest.mark.parametrize("G", [1, 3])
@pytest.mark.parametrize("l, d, lp, T, n, init, local", RANDOM_CASES)
def test_select_blocks_matches_oracle_random(G, l, d, lp, T, n, init, local):
    B, H, D = 2, 2, 8
    n_cmp = num_compressed_blocks(T, l, d)
    q = _randn(B, T, G * H, D, seed=1) * 2.0  # peakier than unit scores
    k_cmp = _randn(B, n_cmp, H, D, seed=2)
    scale = 0.3 if G == 3 else None
    idx = _select(q, k_cmp, l, d, lp, n, init, local, scale)
    assert idx.shape == (B, T, H, n) and idx.dtype == torch.int32  # H key heads, not HQ
    for b in range(B):
        assert_matches_oracle(idx[b], q[b], k_cmp[b], l, d, lp, n, init, local, D**-0.5 if scale is None else scale)


# ---------------------------------------------------------------------------------------------------
# 4(a). Hand-made: a compressed distribution concentrated on known blocks
# ---------------------------------------------------------------------------------------------------

PAPER = dict(l=32, d=16, lp=64)


def _one_hot_queries(T, HQ=1, D=4, dtype=F64):
    q = torch.zeros(1, T, HQ, D, dtype=dtype)
    q[..., 0] = 1.0
    return q


def _peaked_k_cmp(n_cmp, peaks: dict[int, float], H=1, D=4, dtype=F64):
    k = torch.zeros(1, n_cmp, H, D, dtype=dtype)
    for i, logit in peaks.items():
        k[0, i, :, 0] = logit
    return k


@pytest.mark.parametrize(
    "peak, overlapped, n",
    [
        (11, {2, 3}, 5),  # block 11 = [176, 208): 16 tokens in selection block 2, 16 in block 3
        (9, {2}, 4),  # block 9 = [144, 176): entirely inside selection block 2
        (8, {2}, 4),  # block 8 = [128, 160): first compressed block of selection block 2
        (7, {1, 2}, 5),  # block 7 = [112, 144): straddles selection blocks 1 and 2
    ],
)
def test_concentrated_compressed_probability_selects_overlapping_blocks(peak, overlapped, n):
    T, l, d, lp = 512, PAPER["l"], PAPER["d"], PAPER["lp"]
    n_cmp = num_compressed_blocks(T, l, d)
    idx = _select(_one_hot_queries(T), _peaked_k_cmp(n_cmp, {peak: 40.0}), l, d, lp, n, 1, 2, scale=1.0)
    sets = _as_sets(idx[0])
    for t in range(5 * lp, T):  # block `peak` is complete and its selection blocks are not forced
        c = t // lp
        assert sets[t][0] == ({0, c - 1, c} | overlapped, 0), t


def test_overlap_weight_two_beats_two_weights_of_one():
    """p_cmp = 1/2 on block 17 (inside selection block 4: weight 2) and 1/2 on block 11 (weight 1 to each of
    blocks 2 and 3). Block 4 scores 1, blocks 2 and 3 score 1/2: with one free slot block 4 wins although a
    lower index would win a tie."""
    T, l, d, lp = 512, PAPER["l"], PAPER["d"], PAPER["lp"]
    n_cmp = num_compressed_blocks(T, l, d)
    idx = _select(_one_hot_queries(T), _peaked_k_cmp(n_cmp, {17: 40.0, 11: 40.0}), l, d, lp, 4, 1, 2, scale=1.0)
    sets = _as_sets(idx[0])
    for t in range(6 * lp, T):
        c = t // lp
        assert sets[t][0] == ({0, 4, c - 1, c}, 0), t


# ---------------------------------------------------------------------------------------------------
# 4(b). Forced blocks are always present
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("init, local, n", [(1, 2, 4), (2, 3, 6), (0, 2, 3), (3, 0, 4), (0, 0, 2)])
def test_forced_blocks_always_selected(init, local, n):
    """Adversarial scores: the initial blocks get the lowest probability and later blocks ever lower ones, so
    forced blocks would never win on score."""
    l = d = lp = 8
    T, H, G, D = 120, 2, 2, 4
    n_cmp = num_compressed_blocks(T, l, d)
    q = torch.zeros(1, T, H * G, D, dtype=F64)
    q[..., 0] = 1.0
    logits = torch.tensor([-20.0 if i < 3 else -0.5 * i for i in range(n_cmp)], dtype=F64)
    k_cmp = torch.zeros(1, n_cmp, H, D, dtype=F64)
    k_cmp[0, :, :, 0] = logits[:, None]
    idx = _select(q, k_cmp, l, d, lp, n, init, local, scale=1.0)
    for t, row in enumerate(_as_sets(idx[0])):
        c = t // lp
        forced = {j for j in range(c + 1) if j < init or j > c - local}
        for chosen, empties in row:
            assert forced <= chosen, (t, chosen, forced)
            assert len(chosen) == min(n, c + 1) and empties == n - len(chosen)
    assert_matches_oracle(idx[0], q[0], k_cmp[0], l, d, lp, n, init, local, 1.0)


# ---------------------------------------------------------------------------------------------------
# 4(c). Ties break toward the lower block index
# ---------------------------------------------------------------------------------------------------


def test_ties_break_to_lower_index_identity_mapping():
    """q = 0: p_cmp is uniform over the visible blocks, so with l = d = l' every complete block ties."""
    l = d = lp = 4
    T, n = 40, 5
    n_cmp = num_compressed_blocks(T, l, d)
    q = torch.zeros(1, T, 2, 4, dtype=F64)
    idx = _select(q, _randn(1, n_cmp, 1, 4, seed=3), l, d, lp, n, 1, 2)
    for t, ((chosen, empties),) in enumerate(_as_sets(idx[0])):
        c = t // lp
        expected = set(range(c + 1)) if c + 1 <= n else {0, 1, 2, c - 1, c}
        assert (chosen, empties) == (expected, n - len(expected)), t


def test_ties_break_to_lower_index_paper_mapping():
    """q = 0 with l=32, d=16, l'=64: every interior selection block scores 8/N (1+2+2+2+1 over N visible
    blocks), block 0 and the last ones less; the free slots take the lowest interior indices."""
    T, l, d, lp, n = 640, 32, 16, 64, 6
    n_cmp = num_compressed_blocks(T, l, d)
    q = torch.zeros(1, T, 1, 4, dtype=F64)
    idx = _select(q, _randn(1, n_cmp, 1, 4, seed=4), l, d, lp, n, 1, 2)
    sets = _as_sets(idx[0])
    for t in range(7 * lp, T):
        c = t // lp
        assert sets[t][0] == ({0, 1, 2, 3, c - 1, c}, 0), t


def test_ties_between_two_equal_peaks_pick_the_lower_block():
    l = d = lp = 4
    T, n = 48, 4
    n_cmp = num_compressed_blocks(T, l, d)
    for lo, hi in [(3, 6), (2, 5)]:
        k_cmp = _peaked_k_cmp(n_cmp, {hi: 5.0, lo: 5.0})
        idx = _select(_one_hot_queries(T), k_cmp, l, d, lp, n, 1, 2, scale=1.0)
        sets = _as_sets(idx[0])
        for t in range(8 * lp, T):
            c = t // lp
            assert sets[t][0] == ({0, lo, c - 1, c}, 0), (t, lo, hi)


# ---------------------------------------------------------------------------------------------------
# 4(d). Fewer candidates than n: all selected, the rest -1
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("init, local", [(1, 2), (0, 0), (2, 1)])
def test_fewer_candidates_than_n_gives_exact_empty_slots(init, local):
    T, l, d, lp, n = 200, 32, 16, 64, 6
    n_cmp = num_compressed_blocks(T, l, d)
    q, k_cmp = _randn(1, T, 4, 8, seed=5), _randn(1, n_cmp, 2, 8, seed=6)
    idx = _select(q, k_cmp, l, d, lp, n, init, local)
    assert idx.shape == (1, T, 2, n)
    for t, row in enumerate(_as_sets(idx[0])):
        c = t // lp
        for chosen, empties in row:
            assert chosen == set(range(c + 1)) and empties == n - (c + 1), t
    assert int((idx == -1).sum()) == 2 * sum(n - (t // lp + 1) for t in range(T))


# ---------------------------------------------------------------------------------------------------
# 4(e). Eq. 10: the G heads of a group share one selection, scored by the SUM of their p_slc
# ---------------------------------------------------------------------------------------------------


def _two_head_case(p0: dict[int, float], p1: dict[int, float], num_blocks=8):
    """l = d = l' = 4, T = 4 * num_blocks: query head h has p_cmp = p_h at the last token (identity mapping, so
    p_slc = p_cmp). Probabilities not listed share the remaining mass equally."""
    T = 4 * num_blocks

    def fill(p):
        rest = (1.0 - sum(p.values())) / (num_blocks - len(p))
        return torch.tensor([p.get(i, rest) for i in range(num_blocks)], dtype=F64).log()

    q = torch.zeros(1, T, 2, 2, dtype=F64)
    q[:, :, 0, 0] = 1.0
    q[:, :, 1, 1] = 1.0
    k_cmp = torch.zeros(1, num_blocks, 1, 2, dtype=F64)
    k_cmp[0, :, 0, 0] = fill(p0)
    k_cmp[0, :, 0, 1] = fill(p1)
    return q, k_cmp


def _last_token_selection(q, k_cmp, n=2, init=0, local=1):
    idx = _select(q, k_cmp, 4, 4, 4, n, init, local, scale=1.0)
    assert idx.shape[2] == k_cmp.shape[2]  # one selection per key head, not per query head
    return _as_sets(idx[0])[-1]


def test_group_sum_strong_head_wins():
    """Head 0 weakly prefers block A=2, head 1 strongly prefers block B=5; one free slot -> B (not a tie-break:
    A has the lower index)."""
    q, k_cmp = _two_head_case({2: 0.25, 5: 0.2}, {2: 0.01, 5: 0.9})
    assert _last_token_selection(q, k_cmp) == [({5, 7}, 0)]
    # head 0 alone would pick A
    assert _last_token_selection(q[:, :, :1], k_cmp) == [({2, 7}, 0)]
    # head 1 alone picks B
    assert _last_token_selection(q[:, :, 1:], k_cmp) == [({5, 7}, 0)]


def test_group_sum_not_max():
    """Sum over heads, not max: A=2 has 0.45 + 0.45, B=5 has 0.001 + 0.5. Sum picks A, a max would pick B."""
    q, k_cmp = _two_head_case({2: 0.45, 5: 0.001}, {2: 0.45, 5: 0.5})
    assert _last_token_selection(q, k_cmp) == [({2, 7}, 0)]


# ---------------------------------------------------------------------------------------------------
# 5. Packed documents
# ---------------------------------------------------------------------------------------------------

DOC_LENGTHS = [5, 37, 70, 1]


@pytest.mark.parametrize("l, d, lp, n, init, local", [(8, 4, 8, 4, 1, 2), (8, 8, 8, 3, 0, 1), (16, 4, 8, 3, 1, 1)])
def test_packed_select_blocks_equals_documents_alone(l, d, lp, n, init, local):
    H, G, D = 2, 2, 8
    qs = [_randn(1, L, H * G, D, seed=10 + i) for i, L in enumerate(DOC_LENGTHS)]
    ks = [_randn(1, num_compressed_blocks(L, l, d), H, D, seed=20 + i) for i, L in enumerate(DOC_LENGTHS)]
    cu = torch.tensor([0, *torch.tensor(DOC_LENGTHS).cumsum(0).tolist()])
    idx = _select(torch.cat(qs, 1), torch.cat(ks, 1), l, d, lp, n, init, local, cu_seqlens=cu)
    assert idx.shape == (1, sum(DOC_LENGTHS), H, n)
    for q, k, idx_doc in zip(qs, ks, torch.split(idx, DOC_LENGTHS, dim=1)):
        alone = _select(q, k, l, d, lp, n, init, local)
        assert _as_sets(idx_doc[0]) == _as_sets(alone[0])
        assert_matches_oracle(idx_doc[0], q[0], k[0], l, d, lp, n, init, local, D**-0.5)


# ---------------------------------------------------------------------------------------------------
# Large logits: probabilities of blocks a query cannot see must not poison its scores
# ---------------------------------------------------------------------------------------------------


# Geometry of the two tests below: l=8, d=4, l'=8, n=2, no initial block, 1 local block, scale 1, q = e0.
# Queries t = 16..18 sit in selection block 2 (forced) and see compressed blocks 0, 1, 2 only; compressed
# block 3 = tokens [12, 20) completes at t = 19. One visible compressed block gets logit 2, the others 0,
# so p = (0.79, 0.11, 0.11) on it and the others:
#   favoured block 0 -> selection block 0 (weights 2, 1 from blocks 0, 1) scores 1.68, block 1 0.32: picks 0;
#   favoured block 2 -> selection block 1 (weights 1, 2 from blocks 1, 2) scores 1.68, block 0 0.32: picks 1.
# Both outcomes are checked, so a poisoned score can neither win nor lose its way to the right answer.
FAVOURED = [({0: 2.0}, 0), ({2: 2.0}, 1)]


@pytest.mark.parametrize("favoured, winner", FAVOURED)
@pytest.mark.parametrize("dtype, logit", [(torch.float64, 1000.0), (torch.float32, 100.0)])
def test_select_blocks_large_logit_on_invisible_block(dtype, logit, favoured, winner):
    """A compressed block not yet visible to a query may have any logit; it must not change that query's
    selection (here block 3 with a logit far above the visible ones; from t = 19 on it is visible and
    dominates, putting selection block 1 in the free slot)."""
    T, l, d, lp, n = 24, 8, 4, 8, 2
    n_cmp = num_compressed_blocks(T, l, d)
    q = _one_hot_queries(T, dtype=dtype)
    k_cmp = _peaked_k_cmp(n_cmp, {**favoured, 3: logit}, dtype=dtype)
    idx = _select(q, k_cmp, l, d, lp, n, 0, 1, scale=1.0)
    got = {t: sorted(idx[0, t, 0].tolist()) for t in range(16, T)}
    expected = {t: sorted([winner, 2]) if t < 19 else [1, 2] for t in range(16, T)}
    assert got == expected
    assert_matches_oracle(idx[0], q[0], k_cmp[0], l, d, lp, n, 0, 1, 1.0, tie_tol=0.0)


@pytest.mark.parametrize("favoured, winner", FAVOURED)
def test_select_blocks_large_logit_in_another_document(favoured, winner):
    """Packed: a large logit on the first compressed block of a later document must not change an earlier
    document's selection (documents are independent). Same geometry as above, document A = 19 tokens; the
    large logit sits on block 0 of document B, which is where A's block 3 would be in the packed k_cmp."""
    l, d, lp, n = 8, 4, 8, 2
    q = _one_hot_queries(19 + 24)
    k_a = _peaked_k_cmp(num_compressed_blocks(19, l, d), favoured)
    k_b = _peaked_k_cmp(num_compressed_blocks(24, l, d), {0: 1000.0})
    cu = torch.tensor([0, 19, 43])
    packed = _select(q, torch.cat([k_a, k_b], 1), l, d, lp, n, 0, 1, scale=1.0, cu_seqlens=cu)
    alone = _select(q[:, :19], k_a, l, d, lp, n, 0, 1, scale=1.0)
    assert [sorted(r) for r in alone[0, 16:19, 0].tolist()] == [sorted([winner, 2])] * 3
    assert _as_sets(packed[0, :19]) == _as_sets(alone[0])
