"""What the Triton kernel families share: launch chunking, the device's multiprocessors, the split merge and
FlashAttention's delta, the tiling of queries into document pieces, and the `@triton.jit` building blocks of
the attention kernels (row addressing, key tiles, the online softmax, the dk/dv step).

The attention kernels work on the flat varlen tensors of `nsa_hf.ops.reference` (q [Nq, HQ, D], k/v [Nk, H, D]).
Tensors may pass 2**31 elements (a decoding batch's key store, a long batch's queries): each program
addresses them from scalar int64 bases (its first query, its tile's first key, each selected block's
start), the offsets added to a base staying int32. The row-wise kernels run in chunks of rows
(`_row_chunks`). What stays int32 is the span of one tile's keys, one document's at most (2**31 elements of
keys: tens of millions of tokens).
"""

from __future__ import annotations

import functools
from itertools import pairwise

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..layout import host_documents, host_to_device


def _next_pow2(x: int) -> int:
    """`triton.next_power_of_2` in plain Python: Triton's is a jit-level function whose every call costs the host
    over a microsecond, and the launch wrappers of one decoding step make dozens of them."""
    return 0 if x <= 0 else 1 << (x - 1).bit_length()


def _prev_pow2(x: int) -> int:
    """The largest power of two <= x (x >= 1)."""
    return 1 << (x.bit_length() - 1)


def _cdiv(a: int, b: int) -> int:
    """`triton.cdiv` in plain Python, for the same reason as `_next_pow2`."""
    return (a + b - 1) // b


def _pow2(x: int, minimum: int = 16) -> int:
    return max(minimum, _next_pow2(x))


# The most elements one launch of a row-wise kernel addresses. Kernel offsets are int32 (vectors of int64
# offsets miscompiled in Triton 3.6), so a wrapper cuts a larger tensor into launches over row ranges, each
# through a view whose data pointer the host advanced: one launch whenever the tensors are smaller.
_LAUNCH_ELEMENTS = 2**31


def _row_chunks(num_rows: int, row_elements: int) -> list[tuple[int, int]]:
    """Row ranges [start, end) that each span at most `_LAUNCH_ELEMENTS` elements, a row spanning
    `row_elements` (the largest row stride among the tensors one launch addresses); one row at least."""
    per_chunk = max(1, _LAUNCH_ELEMENTS // max(1, row_elements))
    return [(start, min(start + per_chunk, num_rows)) for start in range(0, num_rows, per_chunk)]


def _rows_of(tensor: Tensor, start: int, end: int) -> Tensor:
    """tensor[start:end] for one `_row_chunks` launch, or the tensor itself when the chunk is all of it: a slice is
    a host op, and a decoding step's wrappers run a few per layer."""
    return tensor if start == 0 and end == tensor.shape[0] else tensor[start:end]


@triton.jit
def _bisect_step(X, bound, lo, hi, ok):
    """One step of a per-lane binary search for the first index in [lo, hi] whose X exceeds `bound` (X non-decreasing
    there; hi when none does): the narrowed (lo, hi), unchanged in lanes not `ok` or already closed. Kernels run
    their searches' steps side by side in one loop, so that the searches' loads overlap."""
    mid = (lo + hi) // 2
    open_range = ok & (lo < hi)
    above = tl.load(X + mid, mask=open_range, other=0) > bound
    return tl.where(open_range & ~above, mid + 1, lo), tl.where(open_range & above, mid, hi)


@triton.jit
def _at_row(X, row, stride):
    """X advanced by `row` rows of `stride` elements, in int64: the attention kernels address tensors past 2**31
    elements from one such scalar base per program (or per key block), the offsets added to it staying int32
    (vectors of int64 offsets miscompiled in Triton 3.6)."""
    return X + tl.cast(row, tl.int64) * stride


@triton.jit
def _key_bases(K, V, first, kv_head, stride_kt, stride_kh, stride_vt, stride_vh):
    """K and V at key `first` of key head `kv_head`."""
    return _at_row(K, first, stride_kt) + kv_head * stride_kh, _at_row(V, first, stride_vt) + kv_head * stride_vh


@triton.jit
def _online_softmax_step(s, v, m_i, l_i, acc):
    """Fold one tile of masked scores s [M, N] (-inf = invisible) and values v [N, DV] into the running state."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet stay at exactly 0
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    return m_new, l_i * alpha + tl.sum(p, axis=1), acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)


@triton.jit
def _softmax_finish(acc, m_i, l_i):
    """Output and lse of the running state; a row that saw no key gives 0 and -inf."""
    has_keys = l_i > 0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    return out, tl.where(has_keys, m_i + tl.log(tl.where(has_keys, l_i, 1.0)), float("-inf"))


@triton.jit
def _program_tile(TILE_START, TILE_LEN, run_length, COMPUTED_TILES: tl.constexpr, BLOCK_T: tl.constexpr):
    """First query and length of this program's tile: read from the tile arrays, or, when queries come in
    runs of `run_length` (decoding, or the equal rows of a batch), computed (`query_runs`)."""
    if COMPUTED_TILES:
        per_run = tl.cdiv(run_length, BLOCK_T)
        start = (tl.program_id(0) % per_run) * BLOCK_T
        first = (tl.program_id(0) // per_run) * run_length + start
        length = tl.minimum(run_length - start, BLOCK_T)
    else:
        first = tl.load(TILE_START + tl.program_id(0))
        length = tl.load(TILE_LEN + tl.program_id(0))
    return first, length


@triton.jit
def _tile_rows(first, length, G: tl.constexpr, ROWS: tl.constexpr, BLOCK_T: tl.constexpr):
    """ROWS rows for BLOCK_T consecutive tokens from `first` (`length` of them real) x the G heads of a group,
    flattened: the tile pads only its last rows to a power of two, not every group (G = 6 would waste 1/4)."""
    rows = tl.arange(0, ROWS)
    token = first + rows // G
    return token, rows % G, (rows // G < length) & (rows < BLOCK_T * G)


@triton.jit
def _kv_tile(K, V, keys, key_ok, stride_kt, stride_vt,
             D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """K [N, BLOCK_D] and V [N, BLOCK_DV]: rows `keys` counted from the bases K and V (`_key_bases`); masked rows
    and columns read 0."""
    dk_idx = tl.arange(0, BLOCK_D)
    dv_idx = tl.arange(0, BLOCK_DV)
    k = tl.load(K + keys[:, None] * stride_kt + dk_idx[None, :], mask=key_ok[:, None] & (dk_idx < D)[None, :],
                other=0.0)
    v = tl.load(V + keys[:, None] * stride_vt + dv_idx[None, :], mask=key_ok[:, None] & (dv_idx < DV)[None, :],
                other=0.0)
    return k, v


@triton.jit
def _query_rows(Q, DO, LSE, DELTA, token, head, row_ok, stride_qt, stride_qh, stride_dot, stride_doh, heads_q,
                D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """What the backward pass reads per query row: q, dO, lse (-inf as 0: such rows have p = 0) and delta; `token`
    counted from the bases Q, DO, LSE and DELTA (`_query_bases`)."""
    dq_idx = tl.arange(0, BLOCK_D)
    dv_idx = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + token[:, None] * stride_qt + head[:, None] * stride_qh + dq_idx[None, :],
                mask=row_ok[:, None] & (dq_idx < D)[None, :], other=0.0)
    do = tl.load(DO + token[:, None] * stride_dot + head[:, None] * stride_doh + dv_idx[None, :],
                 mask=row_ok[:, None] & (dv_idx < DV)[None, :], other=0.0)
    lse = tl.load(LSE + token * heads_q + head, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + token * heads_q + head, mask=row_ok, other=0.0)
    return q, do, tl.where(lse == float("-inf"), 0.0, lse), delta


@triton.jit
def _query_bases(Q, DO, LSE, DELTA, first, stride_qt, stride_dot, heads_q):
    """Q, DO, LSE and DELTA at query `first`."""
    return (_at_row(Q, first, stride_qt), _at_row(DO, first, stride_dot), _at_row(LSE, first, heads_q),
            _at_row(DELTA, first, heads_q))


@triton.jit
def _dkv_step(q, do, lse, delta, k, v, valid, scale, dk, dv):
    """Accumulate one tile of query rows into a key tile's dk (unscaled) and dv; also returns the tile's dS."""
    p = tl.where(valid, tl.exp(tl.dot(q, tl.trans(k)) * scale - lse[:, None]), 0.0)
    dv += tl.dot(tl.trans(p).to(do.dtype), do)
    ds = tl.where(valid, p * (tl.dot(do, tl.trans(v)) - delta[:, None]), 0.0)
    return dk + tl.dot(tl.trans(ds).to(q.dtype), q), dv, ds


@triton.jit
def _combine_splits_kernel(O_PART, LSE_PART, O, LSE, num_rows, stride_ps, stride_ls, DV: tl.constexpr,
                           BLOCK_DV: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
                           BLOCK_R: tl.constexpr):
    """Merge the partial (o, lse) of every split of BLOCK_R (query, head) rows, softmax-weighted by their lse.
    A split's partials lie `stride_ps` (o) and `stride_ls` (lse) elements after the previous split's."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < num_rows
    splits = tl.arange(0, SPLITS_PAD)
    dv = tl.arange(0, BLOCK_DV)
    lse = tl.load(LSE_PART + splits[:, None] * stride_ls + rows[None, :],
                  mask=(splits < NUM_SPLITS)[:, None] & row_ok[None, :], other=float("-inf"))
    top = tl.max(lse, axis=0)
    top_safe = tl.where(top == float("-inf"), 0.0, top)
    total = tl.sum(tl.exp(lse - top_safe[None, :]), axis=0)  # splits that saw no key weigh 0
    out = tl.zeros([BLOCK_R, BLOCK_DV], tl.float32)
    for split in range(NUM_SPLITS):
        lse_split = tl.load(LSE_PART + split * stride_ls + rows, mask=row_ok, other=float("-inf"))
        # Such a split may not have written its o (block-centric slots without a block): never read it.
        part = tl.load(_at_row(O_PART, split, stride_ps) + rows[:, None] * DV + dv[None, :],
                       mask=(lse_split > float("-inf"))[:, None] & (dv < DV)[None, :], other=0.0)
        out += part * tl.exp(lse_split - top_safe)[:, None]
    out = out / tl.where(total > 0, total, 1.0)[:, None]
    tl.store(O + rows[:, None] * DV + dv[None, :], out.to(O.dtype.element_ty), mask=row_ok[:, None] & (dv < DV)[None, :])
    tl.store(LSE + rows, tl.where(total > 0, top_safe + tl.log(tl.where(total > 0, total, 1.0)), float("-inf")),
             mask=row_ok)


@triton.jit
def _row_dot_kernel(A, B, OUT, num_rows, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    """OUT[r] = sum_d A[r, d] * B[r, d] in fp32 for BLOCK_R contiguous rows."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    mask = (rows < num_rows)[:, None] & (d < D)[None, :]
    a = tl.load(A + rows[:, None] * D + d[None, :], mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + rows[:, None] * D + d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + rows, tl.sum(a * b, axis=1), mask=rows < num_rows)


@functools.cache
def _device_multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _multiprocessors(device: torch.device) -> int:
    return _device_multiprocessors(device.index if device.index is not None else torch.cuda.current_device())


def _num_splits(programs: int, device: torch.device, limit: int = 32) -> int:
    """How many programs share one unit of work so that a small grid (decoding) still fills the GPU:
    about four programs per multiprocessor. 1 off CUDA (the interpreter gains nothing)."""
    if device.type != "cuda" or programs == 0:
        return 1
    return max(1, min(limit, _cdiv(4 * _multiprocessors(device), programs)))


def _split_outputs(splits: int, num_q: int, heads_q: int, dim_v: int, dtype: torch.dtype, device: torch.device):
    """Output buffers with a leading split axis: the final (o, lse) when there is one split, else fp32 partials."""
    o_dtype = dtype if splits == 1 else torch.float32
    o = torch.empty(splits, num_q, heads_q, dim_v, device=device, dtype=o_dtype)
    return o, torch.empty(splits, num_q, heads_q, device=device, dtype=torch.float32)


def _combine_splits(o: Tensor, lse: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(o, lse) [S, Nq, HQ, ...] of S splits -> the attention over all of them."""
    splits, num_q, heads_q, dim_v = o.shape
    if splits == 1:
        return o[0].to(dtype), lse[0]
    out = torch.empty(num_q, heads_q, dim_v, device=o.device, dtype=dtype)
    out_lse = torch.empty(num_q, heads_q, device=o.device, dtype=torch.float32)
    # Chunks of whole queries: the split offsets come from the kernel's int64 bases, the row offsets stay int32.
    for start, end in _row_chunks(num_q, heads_q * dim_v):
        rows = (end - start) * heads_q
        _combine_splits_kernel[(_cdiv(rows, 32),)](
            o[:, start:end], lse[:, start:end], _rows_of(out, start, end), _rows_of(out_lse, start, end), rows,
            o.stride(0), lse.stride(0), DV=dim_v, BLOCK_DV=_pow2(dim_v), NUM_SPLITS=splits, SPLITS_PAD=_pow2(splits, 2),
            BLOCK_R=32,
        )
    return out, out_lse


def _softmax_delta(do: Tensor, o: Tensor) -> Tensor:
    """FlashAttention's delta, sum(dO * O) over the value dim in fp32 ([Nq, HQ]), read once from the
    low-precision tensors (the PyTorch expression writes two fp32 copies and their product first)."""
    do, o = do.contiguous(), o.contiguous()
    num_q, heads_q, dim_v = do.shape
    delta = torch.empty(do.shape[:2], device=do.device, dtype=torch.float32)
    for start, end in _row_chunks(num_q, heads_q * dim_v):
        rows = (end - start) * heads_q
        _row_dot_kernel[(_cdiv(rows, 64),)](
            _rows_of(do, start, end), _rows_of(o, start, end), _rows_of(delta, start, end), rows, D=dim_v,
            BLOCK_D=_pow2(dim_v), BLOCK_R=64,
        )
    return delta


def _tile_tokens(width: int, run_length: int | None, rows: int = 64) -> int:
    """Tokens per query tile of `rows` rows, each token taking `width` rows (its group heads; block selection
    pads them to a power of two, as it sums scores over each group), or when decoding, just enough for the
    run (tl.dot needs 16 rows)."""
    tokens = max(1, rows // width)
    if run_length is None:
        return tokens
    return min(tokens, max(1, 16 // width, _next_pow2(run_length)))


def _split_runs(run_first: Tensor, run_len: Tensor, piece: int, num_pieces: int | None = None) -> tuple[Tensor, Tensor]:
    """Cut runs [first, first + len) into pieces of at most `piece`: (first, length) per piece.
    `num_pieces`, when the host knows it, spares the host sync that sizes the result."""
    pieces_per_run = (run_len + piece - 1) // piece
    runs = torch.arange(run_first.numel(), device=run_first.device)
    run = torch.repeat_interleave(runs, pieces_per_run, output_size=num_pieces)
    index = torch.arange(run.numel(), device=run_first.device) - (torch.cumsum(pieces_per_run, 0) - pieces_per_run)[run]
    first = run_first[run] + index * piece
    return first, torch.minimum(run_len[run] - index * piece, torch.full_like(first, piece))


Documents = Tensor | tuple[int, ...] | None  # a full pass's host document boundaries (`QueryLayout.documents`)


def query_runs(run_length: int | None, documents: Documents, num_queries: int) -> int:
    """The length of the runs the queries come in, when they all have one (0 otherwise): decoding's `run_length`,
    or documents of one length that cover the `num_queries` queries from the first (the rows of a batch, one
    document). The kernels then compute their query tiles (`_program_tile`): no tile arrays, which cost launches
    per call and, kept across calls, would be memory a CUDA graph's pool does not own."""
    if run_length:
        return run_length
    if documents is None:
        return 0
    bounds = _unique_bounds(documents)
    lengths = {end - start for start, end in pairwise(bounds)}
    uniform = len(lengths) == 1 and bounds[0] == 0 and bounds[-1] == num_queries
    return lengths.pop() if uniform else 0


def _unique_bounds(documents: Tensor | tuple[int, ...]) -> tuple[int, ...]:
    return host_documents(documents) if isinstance(documents, Tensor) else tuple(dict.fromkeys(documents))


def known_tiles(
    run_length: int | None, documents: Documents, placeholder: Tensor, tile: int
) -> tuple[Tensor, Tensor, int, int] | None:
    """Query tiles of `placeholder.numel()` queries that the host knows without a sync, as (first, length, count,
    run): runs of one length (`query_runs`: decoding, a batch's rows), which the kernels compute themselves (the
    tile arrays are then `placeholder`, never read), or cut from other host `documents` (`document_pieces`, kept
    once per boundaries); None when neither applies."""
    num_queries = placeholder.numel()
    run = query_runs(run_length, documents, num_queries)
    if run:
        return placeholder, placeholder, num_queries // run * _cdiv(run, tile), run
    if documents is not None:
        return *document_pieces(documents, tile, placeholder.device), 0
    return None


def document_pieces(documents: Tensor | tuple[int, ...], tile: int, device: torch.device) -> tuple[Tensor, Tensor, int]:
    """Tiles of at most `tile` consecutive queries cut from host document boundaries: (first, length, count),
    built once per boundaries, tile and device (the layers of a pass, and the passes of a training run with one
    shape, share them)."""
    return _document_pieces(_unique_bounds(documents), tile, device)


@functools.lru_cache(maxsize=64)
def _document_pieces(documents: tuple[int, ...], tile: int, device: torch.device) -> tuple[Tensor, Tensor, int]:
    # The count comes from the host copy, the tiles from the GPU (small CPU tensor ops cost a millisecond
    # each on a busy host, measured on the H200 machine).
    count = sum(-(-(end - start) // tile) for start, end in pairwise(documents))
    bounds = host_to_device(torch.tensor(documents), device)
    first, length = _split_runs(bounds[:-1], bounds.diff(), tile, num_pieces=count)
    return first.int(), length.int(), count


def _tuning_configs(stages: tuple[int, ...] = (1, 2)) -> list[triton.Config]:
    """Launch settings tuned on a GPU, once per shape, for the kernels whose best one moves with the shape (the
    block-centric kernels and block selection: their loops gather rows or merge lists, so how many warps hide
    the latency depends on the head dims and tile heights); the interpreter runs one."""
    if not torch.cuda.is_available():
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in stages]
