# Generated from src/nsa_hf by `nsa-hf export-remote-code` (nsa_hf/remote_code.py); do not edit.
"""Where every query sits: document boundaries and the indices each NSA branch reads from.

All NSA ops work on a flat token axis (batch folded into tokens, as in FlashAttention's varlen
interface). A `QueryLayout` tells, for each query, its position inside its document and where position
0 of that document lives in each key/value store the branches read. The same ops therefore serve a full
forward (stores = the sequence itself), packed documents (`cu_seqlens`), left-padded batches and
incremental decoding (stores = the cache), without any per-case code in the kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "PAPER",
    "BranchRanges",
    "CompressionBlocks",
    "QueryLayout",
    "SparsePattern",
    "compressed_intervals",
    "cu_seqlens_from_batch",
    "cu_seqlens_from_left_padding",
    "cu_seqlens_from_position_ids",
    "cu_seqlens_from_seq_idx",
    "cu_seqlens_from_starts",
    "host_documents",
    "host_to_device",
    "num_compressed_blocks",
    "seq_idx_starts",
    "window_intervals",
]


@dataclass(frozen=True)
class SparsePattern:
    """The static NSA hyperparameters every backend needs (NSA_SPEC's symbols in brackets). The defaults are the
    paper's settings, the one place they are written (`NsaConfig` and the functional API take theirs from here)."""

    compress_block_size: int = 32  # l
    compress_stride: int = 16  # d
    select_block_size: int = 64  # l'
    num_selected_blocks: int = 16  # n, forced blocks included
    num_init_blocks: int = 1
    num_local_blocks: int = 2
    window_size: int = 512  # w, the query's own token included

    def __post_init__(self) -> None:
        for name in ("compress_block_size", "compress_stride", "select_block_size", "num_selected_blocks", "window_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be positive, got {getattr(self, name)}.")
        for name in ("num_init_blocks", "num_local_blocks"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}.")
        if self.compress_block_size % self.compress_stride:
            raise ValueError(
                f"`compress_block_size` ({self.compress_block_size}) must be a multiple of `compress_stride` "
                f"({self.compress_stride})."
            )
        if self.select_block_size % self.compress_stride:
            raise ValueError(
                f"`select_block_size` ({self.select_block_size}) must be a multiple of `compress_stride` "
                f"({self.compress_stride})."
            )
        if self.num_selected_blocks < self.num_init_blocks + self.num_local_blocks:
            raise ValueError(
                f"`num_selected_blocks` ({self.num_selected_blocks}) must be >= num_init_blocks + num_local_blocks "
                f"({self.num_init_blocks} + {self.num_local_blocks}): forced blocks count toward n."
            )


PAPER = SparsePattern()  # NSA's published geometry (arXiv 2502.11089, section 4)


def host_to_device(values: Tensor, device: torch.device) -> Tensor:
    """A host tensor on `device` without a host sync: a plain copy to a GPU waits for the stream, and one
    from pageable memory may; pinned staging lets the copy run in stream order while the host goes on."""
    if device.type != "cuda":
        return values.to(device)
    return values.pin_memory().to(device, non_blocking=True)


def num_compressed_blocks(length: Tensor | int, block_size: int, stride: int) -> Tensor | int:
    """Complete compressed blocks among the first `length` tokens of a document: floor((L - l) / d) + 1, or 0."""
    if isinstance(length, Tensor):  # floor division keeps every L < l at <= 0
        return ((length - block_size) // stride + 1).clamp_(min=0)
    return (length - block_size) // stride + 1 if length >= block_size else 0


def cu_seqlens_from_batch(batch_size: int, seq_len: int, device: torch.device | str | None = None) -> Tensor:
    """Document boundaries of `batch_size` independent rows of `seq_len` tokens, folded into one axis."""
    return torch.arange(batch_size + 1, device=device, dtype=torch.long) * seq_len


def cu_seqlens_from_left_padding(pad_lengths: Tensor, seq_len: int) -> Tensor:
    """Boundaries for left-padded rows: each row is a padding document followed by its real document.

    Keeping the padding as a document of its own means the real tokens start their blocks, windows and
    selection indices at their first token, exactly as the prompt run alone would.
    """
    row_starts = torch.arange(pad_lengths.numel(), device=pad_lengths.device, dtype=torch.long) * seq_len
    bounds = torch.cat([row_starts, row_starts + pad_lengths.long(), row_starts.new_tensor([pad_lengths.numel() * seq_len])])
    return torch.unique(bounds)  # sorted; drops the empty padding documents of unpadded rows


def cu_seqlens_from_starts(starts: Tensor) -> Tensor:
    """cu_seqlens over the flattened [B, T] tokens from a mask of document starts; every row starts one, marked or
    not (one host sync when the mask lives on a GPU)."""
    starts = starts.clone()
    starts[:, 0] = True  # rows never share a document
    flat_starts = torch.nonzero(starts.reshape(-1)).flatten()
    return torch.cat([flat_starts, flat_starts.new_tensor([starts.numel()])]).long()


def cu_seqlens_from_position_ids(position_ids: Tensor) -> Tensor:
    """Boundaries of packed documents in [B, T] rows whose positions restart at 0 (DataCollatorWithFlattening)."""
    if position_ids.dim() != 2:
        raise ValueError(f"packed `position_ids` must have shape [B, T], got {tuple(position_ids.shape)}.")
    return cu_seqlens_from_starts(position_ids == 0)


def cu_seqlens_from_seq_idx(seq_idx: Tensor) -> Tensor:
    """Boundaries of packed documents in [B, T] rows from each token's document index (`return_seq_idx=True`)."""
    if seq_idx.dim() != 2:
        raise ValueError(f"packed `seq_idx` must have shape [B, T], got {tuple(seq_idx.shape)}.")
    return cu_seqlens_from_starts(seq_idx_starts(seq_idx))


def seq_idx_starts(seq_idx: Tensor) -> Tensor:
    """Where the document index of [B, T] rows changes: a mask of document starts, rows' first tokens unmarked."""
    return torch.nn.functional.pad(seq_idx[:, 1:] != seq_idx[:, :-1], (1, 0))


def _validated_documents(cu_seqlens: Tensor, num_tokens: int | None) -> tuple[int, ...]:
    """The validated boundaries on the host, empty documents dropped (one host sync if they live on a GPU)."""
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        shape = tuple(cu_seqlens.shape) if isinstance(cu_seqlens, Tensor) else type(cu_seqlens).__name__
        raise ValueError(f"`cu_seqlens` must be a 1-D tensor of document boundaries, got {shape}.")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"`cu_seqlens` must be int32 or int64, got {cu_seqlens.dtype}.")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or any(b < a for a, b in pairwise(bounds)):
        raise ValueError(f"`cu_seqlens` must start at 0 and never decrease, got {bounds[:8]}...")
    if num_tokens is not None and bounds[-1] != num_tokens:
        raise ValueError(f"`cu_seqlens` must end at the number of tokens ({num_tokens}), got {bounds[-1]}.")
    return tuple(dict.fromkeys(bounds))  # sorted already: this only drops repeats


@dataclass(frozen=True)
class CompressionBlocks:
    """Every compressed block of a packed token axis, documents concatenated in order."""

    token_starts: Tensor  # [N_cmp] flat index of each block's first token
    positions: Tensor  # [N_cmp] position of each block's last token in its document (where its RoPE is taken)
    count: int  # N_cmp, known on the host


@dataclass(frozen=True)
class QueryLayout:
    """Per query: its position in its document, and the flat index of that document's start in each store.

    `key_offsets` index the raw key/value store (read by selection), `window_offsets` the sliding-window
    store (the same store unless the cache keeps a separate window buffer) and `cmp_offsets` the
    compressed store, where block i of the document sits at `cmp_offsets + i`.
    """

    positions: Tensor  # [Nq] int64
    key_offsets: Tensor  # [Nq] int64
    cmp_offsets: Tensor  # [Nq] int64
    window_offsets: Tensor  # [Nq] int64
    run_length: int | None = None  # decoding: each row contributes this many consecutive queries (a tiling hint)
    # Full pass: the document boundaries (cu_seqlens) on the host, so that the sizes backends derive from them
    # (query tiles, the longest document) need no host sync; a tiling hint too. Host ints where the host knows
    # them; an int64 CPU tensor where they are data (packed documents under torch.compile, `document_layout`), in
    # which repeated boundaries (empty documents) may follow: `host_documents` drops them.
    documents: tuple[int, ...] | Tensor | None = None

    @classmethod
    def for_batch(
        cls, batch: int, seq_len: int, block_size: int, stride: int, device: torch.device | str | None = None,
    ) -> tuple[QueryLayout, CompressionBlocks]:
        """Layout of `batch` independent rows of `seq_len` tokens: index arithmetic on sizes the host knows, so it
        needs no host sync and torch.compile traces it with static shapes."""
        per_row = num_compressed_blocks(seq_len, block_size, stride)
        tokens = torch.arange(batch * seq_len, device=device)
        row = tokens // seq_len
        slots = torch.arange(batch * per_row, device=device)
        block_row, block_index = slots // max(per_row, 1), slots % max(per_row, 1)
        blocks = CompressionBlocks(
            token_starts=block_row * seq_len + block_index * stride,
            positions=block_index * stride + block_size - 1,
            count=batch * per_row,
        )
        layout = cls(
            positions=tokens - row * seq_len, key_offsets=row * seq_len, cmp_offsets=row * per_row,
            window_offsets=row * seq_len, documents=tuple(row * seq_len for row in range(batch + 1)),
        )
        return layout, blocks

    @classmethod
    def from_cu_seqlens(
        cls, cu_seqlens: Tensor, block_size: int, stride: int, num_tokens: int | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[QueryLayout, CompressionBlocks]:
        """Layout of a full (non-incremental) pass over packed documents, and the compressed blocks it needs.

        The index tensors live on `device` (default: cu_seqlens'). Boundaries given on the host cost no
        host sync; on a GPU, one (they are read once here, and every size is derived from that copy).
        """
        documents = _validated_documents(cu_seqlens, num_tokens)
        device = torch.device(device) if device is not None else cu_seqlens.device
        # Sizes from the host copy in plain Python: small CPU tensor ops cost a millisecond each on a busy host.
        lengths = [end - start for start, end in pairwise(documents)]
        num_blocks = sum(num_compressed_blocks(length, block_size, stride) for length in lengths)
        cu = host_to_device(torch.tensor(documents, dtype=torch.long), device)
        blocks_per_doc = num_compressed_blocks(cu.diff(), block_size, stride)

        tokens = torch.arange(documents[-1], device=device)
        doc = torch.searchsorted(cu[1:], tokens, right=True)
        key_offsets = cu[doc]
        positions = tokens - key_offsets
        cu_blocks = torch.cat([cu.new_zeros(1), blocks_per_doc.cumsum(0)])
        block_doc = torch.repeat_interleave(torch.arange(len(documents) - 1, device=device), blocks_per_doc, output_size=num_blocks)
        block_index = torch.arange(num_blocks, device=device) - cu_blocks[block_doc]
        blocks = CompressionBlocks(
            token_starts=cu[block_doc] + block_index * stride,
            positions=block_index * stride + block_size - 1,
            count=num_blocks,
        )
        layout = cls(
            positions=positions, key_offsets=key_offsets, cmp_offsets=cu_blocks[doc], window_offsets=key_offsets,
            documents=documents,
        )
        return layout, blocks


def host_documents(documents: Tensor) -> tuple[int, ...]:
    """A layout's host document boundaries as a tuple, repeated boundaries (empty documents) dropped."""
    return tuple(dict.fromkeys(documents.tolist()))


class BranchRanges(NamedTuple):
    """Where each query of a pass reads, per branch: built once per pass (`branch_ranges`), shared by its layers."""

    cmp_lo: Tensor  # [Nq] the compressed blocks [cmp_lo, cmp_hi) of the query's document that it sees
    cmp_hi: Tensor
    win_lo: Tensor  # [Nq] the window [win_lo, win_hi) in the window store
    win_hi: Tensor
    key_ends: Tensor  # [Nq] one past the query's own token in the raw key store (selection reads below it)


def branch_ranges(layout: QueryLayout, pattern: SparsePattern) -> BranchRanges:
    """Every branch's key ranges for the queries of `layout`."""
    return BranchRanges(
        *compressed_intervals(layout, pattern), *window_intervals(layout, pattern.window_size),
        layout.key_offsets + layout.positions + 1,
    )


def compressed_intervals(layout: QueryLayout, pattern: SparsePattern) -> tuple[Tensor, Tensor]:
    """Each query's compressed blocks [lo, hi) in the compressed store: its document's complete blocks."""
    counts = num_compressed_blocks(layout.positions + 1, pattern.compress_block_size, pattern.compress_stride)
    return layout.cmp_offsets, layout.cmp_offsets + counts


def window_intervals(layout: QueryLayout, window_size: int) -> tuple[Tensor, Tensor]:
    """Each query's window [lo, hi) in the window store: its document's last `window_size` tokens up to itself."""
    lo = layout.window_offsets + (layout.positions - window_size + 1).clamp(min=0)
    return lo, layout.window_offsets + layout.positions + 1
