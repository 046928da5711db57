# Generated from src/nsa_hf by `nsa-hf export-remote-code` (nsa_hf/remote_code.py); do not edit.
"""`NsaCache`: the decoding state of Native Sparse Attention, as a transformers `Cache`.

Per layer it holds exactly what NSA_SPEC's "Decoding" lists, so token-by-token decoding computes what
one full forward computes:
- the raw K/V of the selection branch for the whole history (`keys`, `values`);
- the K/V of the window branch for the last w tokens (only with independent branch K/V; with shared
  K/V the window reads the selection history);
- the compressed K/V, one entry per completed block, and the raw compression-branch K/V of the last l
  tokens that the next blocks still need;
- the number of tokens seen, and where each row's document starts (left padding).
The rolling buffers keep `max_rollback` extra tokens so that `crop` (assisted decoding) can undo that
many tokens exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from .configuration_nsa import NsaConfig
from .nsa_ops_compression import gather_blocks
from .nsa_ops_layout import QueryLayout, SparsePattern, num_compressed_blocks

__all__ = ["NsaCache", "NsaCacheLayer", "NsaStores", "sparse_pattern"]

# (k_blocks, v_blocks [..., l, H, D], block_positions [...]) -> (k_cmp, v_cmp [..., H, D])
Compressor = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


def sparse_pattern(config: NsaConfig) -> SparsePattern:
    return SparsePattern(
        compress_block_size=config.compress_block_size,
        compress_stride=config.compress_stride,
        select_block_size=config.select_block_size,
        num_selected_blocks=config.num_selected_blocks,
        num_init_blocks=config.num_init_blocks,
        num_local_blocks=config.num_local_blocks,
        window_size=config.window_size,
    )


@dataclass
class NsaStores:
    """Flat key/value stores one attention step reads, and where each query sits in them."""

    k_cmp: Tensor
    v_cmp: Tensor
    k_slc: Tensor
    v_slc: Tensor
    k_win: Tensor
    v_win: Tensor
    layout: QueryLayout


def _keep_last(x: Tensor, count: int) -> Tensor:
    """The last `count` tokens of [B, S, ...], copied so the full-length storage can be freed."""
    return x[:, -count:].clone() if x.shape[1] > count else x


class NsaCacheLayer(CacheLayerMixin):
    """One layer's NSA decoding state. `keys`/`values` are the selection branch's raw history [B, S, H, D]."""

    is_compileable = False
    is_croppable = True
    is_sliding = False

    def __init__(self, pattern: SparsePattern, separate_window: bool, max_rollback: int = 256):
        super().__init__()
        self.pattern = pattern
        self.separate_window = separate_window
        self.max_rollback = max_rollback
        self.seq_len = 0
        self.doc_starts: Tensor | None = None  # [B] first token of each row's document
        self.window_keys: Tensor | None = None  # [B, <= w - 1 + max_rollback, H, D], the last tokens
        self.window_values: Tensor | None = None
        self.raw_cmp_keys: Tensor | None = None  # [B, <= l - 1 + max_rollback, H, D], un-rotated
        self.raw_cmp_values: Tensor | None = None
        self.cmp_keys: Tensor | None = None  # [B, capacity, H, D]; row b's valid entries derive from its length
        self.cmp_values: Tensor | None = None

    # -- transformers' CacheLayerMixin interface -------------------------------------------------

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor | None = None) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        batch, _, heads, dim = key_states.shape
        empty = key_states.new_zeros(batch, 0, heads, dim)
        self.keys, self.values = empty, empty.new_zeros(batch, 0, heads, value_states.shape[-1] if value_states is not None else dim)
        self.raw_cmp_keys, self.raw_cmp_values = empty, self.values
        self.cmp_keys, self.cmp_values = empty, self.values
        if self.separate_window:
            self.window_keys, self.window_values = empty, self.values
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        raise NotImplementedError("NSA layers update their cache through `NsaCacheLayer.update_nsa`.")

    def get_seq_length(self) -> int:
        return self.seq_len

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        query_length = args[0] if args and isinstance(args[0], int) else 0
        return self.seq_len + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:
        return -1

    @property
    def batch_size(self) -> int:
        return self.keys.shape[0] if self.is_initialized else -1

    def _tensors(self) -> dict[str, Tensor]:
        names = ("keys", "values", "doc_starts", "window_keys", "window_values", "raw_cmp_keys", "raw_cmp_values", "cmp_keys", "cmp_values")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def _map(self, fn: Callable[[Tensor], Tensor]) -> None:
        for name, tensor in self._tensors().items():
            setattr(self, name, fn(tensor))

    def reset(self) -> None:
        self.seq_len = 0
        self.doc_starts = None
        if self.is_initialized:
            self._map(lambda t: t[:, :0])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        if self.is_initialized:
            self._map(lambda t: t[indices])

    def offload(self) -> None:
        if self.is_initialized:
            self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.is_initialized and self.keys.device != self.device:
            self._map(lambda t: t.to(self.device, non_blocking=True))

    def crop(self, max_length: int) -> None:
        """Keep the first `max_length` tokens; a value <= 0 removes that many tokens from the end (transformers >= 5.x)."""
        max_length = int(max_length)  # transformers 5.17 passes a 0-d tensor
        target = max_length if max_length > 0 else self.seq_len + max_length
        removed = self.seq_len - target
        if removed <= 0 or not self.is_initialized:
            return
        for name, needed in (("window_keys", self.pattern.window_size - 1), ("raw_cmp_keys", self.pattern.compress_block_size - 1)):
            buffer = getattr(self, name)
            if buffer is not None and buffer.shape[1] - removed < min(needed, target):
                raise ValueError(
                    f"cannot crop {removed} tokens: the cache keeps {self.max_rollback} tokens of rollback "
                    "(`NsaCache(max_rollback=...)`)."
                )
        self.keys, self.values = self.keys[:, :target], self.values[:, :target]
        for key_name, value_name in (("window_keys", "window_values"), ("raw_cmp_keys", "raw_cmp_values")):
            if getattr(self, key_name) is not None:
                keep = getattr(self, key_name).shape[1] - removed
                setattr(self, key_name, getattr(self, key_name)[:, :keep])
                setattr(self, value_name, getattr(self, value_name)[:, :keep])
        self.seq_len = target  # compressed entries past each row's new block count are now unused slots

    # -- NSA state update ------------------------------------------------------------------------

    def update_nsa(
        self,
        k_slc: Tensor,
        v_slc: Tensor,
        k_win: Tensor | None,
        v_win: Tensor | None,
        k_raw: Tensor,
        v_raw: Tensor,
        compress: Compressor,
        doc_starts: Tensor | None = None,
    ) -> NsaStores:
        """Append T new tokens ([B, T, H, D] each) and return the stores and layout their queries read.

        `k_raw`/`v_raw` are the compression branch's un-rotated K/V; `compress` turns the blocks that
        complete in this step into compressed entries. `doc_starts` [B] (left padding) is read on the
        first update only.
        """
        if not self.is_initialized:
            self.lazy_initialization(k_slc, v_slc)
        batch, num_new = k_slc.shape[:2]
        if self.seq_len == 0:
            self.doc_starts = (
                doc_starts.to(k_slc.device, torch.long) if doc_starts is not None else k_slc.new_zeros(batch, dtype=torch.long)
            )
        elif batch != self.keys.shape[0]:
            raise ValueError(f"the cache holds {self.keys.shape[0]} rows but {batch} were given.")
        pattern = self.pattern
        prev_len, seq_len = self.seq_len, self.seq_len + num_new
        starts = self.doc_starts

        self.keys = torch.cat([self.keys, k_slc], dim=1)
        self.values = torch.cat([self.values, v_slc], dim=1)
        raw_keys = torch.cat([self.raw_cmp_keys, k_raw], dim=1)
        raw_values = torch.cat([self.raw_cmp_values, v_raw], dim=1)
        self._append_compressed(raw_keys, raw_values, prev_len, seq_len, compress)

        rows = torch.arange(batch, device=starts.device)
        positions = (prev_len + torch.arange(num_new, device=starts.device))[None, :] - starts[:, None]
        key_offsets = rows * seq_len + starts
        capacity = self.cmp_keys.shape[1]
        if self.separate_window:
            window_keys = torch.cat([self.window_keys, k_win], dim=1)
            window_values = torch.cat([self.window_values, v_win], dim=1)
            window_len = window_keys.shape[1]
            window_offsets = rows * window_len + starts - (seq_len - window_len)
        else:
            window_keys, window_values, window_offsets = self.keys, self.values, key_offsets
        layout = QueryLayout(
            positions=positions.flatten(),
            key_offsets=key_offsets.repeat_interleave(num_new),
            cmp_offsets=(rows * capacity).repeat_interleave(num_new),
            window_offsets=window_offsets.repeat_interleave(num_new),
            run_length=num_new,
        )
        stores = NsaStores(
            k_cmp=self.cmp_keys.flatten(0, 1),
            v_cmp=self.cmp_values.flatten(0, 1),
            k_slc=self.keys.flatten(0, 1),
            v_slc=self.values.flatten(0, 1),
            k_win=window_keys.flatten(0, 1),
            v_win=window_values.flatten(0, 1),
            layout=layout,
        )

        # Keep only what later steps (and a rollback of max_rollback tokens) can read.
        self.raw_cmp_keys = _keep_last(raw_keys, pattern.compress_block_size - 1 + self.max_rollback)
        self.raw_cmp_values = _keep_last(raw_values, pattern.compress_block_size - 1 + self.max_rollback)
        if self.separate_window:
            self.window_keys = _keep_last(window_keys, pattern.window_size - 1 + self.max_rollback)
            self.window_values = _keep_last(window_values, pattern.window_size - 1 + self.max_rollback)
        self.seq_len = seq_len
        return stores

    def _append_compressed(self, raw_keys: Tensor, raw_values: Tensor, prev_len: int, seq_len: int, compress: Compressor) -> None:
        """Compress the blocks that complete among the new tokens and write them into each row's next slots."""
        l, d = self.pattern.compress_block_size, self.pattern.compress_stride
        # Host-side bounds (no device sync per decoding step): T new tokens complete at most ceil(T / d)
        # blocks in any row, and no row (its document starts at >= 0) has more blocks than the whole row.
        num_new = min(num_compressed_blocks(seq_len, l, d), -(-(seq_len - prev_len) // d))
        if num_new == 0:
            return
        done_before = num_compressed_blocks(prev_len - self.doc_starts, l, d)  # [B]
        batch = raw_keys.shape[0]
        block = done_before[:, None] + torch.arange(num_new, device=raw_keys.device)  # [B, m] slot = block index
        # Flat index of every block's first token in the raw buffer [B, L], whose last token is seq_len - 1.
        buffer_len = raw_keys.shape[1]
        first = torch.arange(batch, device=raw_keys.device)[:, None] * buffer_len
        offset = self.doc_starts[:, None] + block * d - (seq_len - buffer_len)
        first = first + offset.clamp(0, max(buffer_len - l, 0))
        # Slots past a row's completed count get a meaningless block: masked, and overwritten later.
        k_blocks = gather_blocks(raw_keys.flatten(0, 1), first, l)
        v_blocks = gather_blocks(raw_values.flatten(0, 1), first, l)
        k_new, v_new = compress(k_blocks, v_blocks, block * d + l - 1)
        needed = num_compressed_blocks(prev_len, l, d) + num_new  # >= every row's last slot + 1
        if needed > self.cmp_keys.shape[1]:
            grow = needed + max(64, needed // 8) - self.cmp_keys.shape[1]
            self.cmp_keys = torch.cat([self.cmp_keys, self.cmp_keys.new_zeros(batch, grow, *self.cmp_keys.shape[2:])], 1)
            self.cmp_values = torch.cat([self.cmp_values, self.cmp_values.new_zeros(batch, grow, *self.cmp_values.shape[2:])], 1)
        index = block[..., None, None]
        self.cmp_keys = self.cmp_keys.scatter(1, index.expand(-1, -1, *k_new.shape[2:]), k_new.to(self.cmp_keys.dtype))
        self.cmp_values = self.cmp_values.scatter(1, index.expand(-1, -1, *v_new.shape[2:]), v_new.to(self.cmp_values.dtype))


class NsaCache(Cache):
    """The cache `generate()` uses for NSA models: one `NsaCacheLayer` per decoder layer.

    Args:
        config: the model's `NsaConfig`.
        max_rollback: tokens that `crop` can undo exactly (assisted decoding rolls back rejected drafts).
    """

    def __init__(self, config: NsaConfig, max_rollback: int = 256, **kwargs):
        if max_rollback < 0:
            raise ValueError(f"`max_rollback` must be >= 0, got {max_rollback}.")
        pattern = sparse_pattern(config)
        separate_window = config.branch_kv == "independent"
        layers = [NsaCacheLayer(pattern, separate_window, max_rollback) for _ in range(config.num_hidden_layers)]
        super().__init__(layers=layers)

    def nbytes(self) -> int:
        """Bytes held by every tensor of the cache."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer._tensors().values())
