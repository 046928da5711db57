# Generated from src/nsa_hf by `nsa-hf export-remote-code` (nsa_hf/remote_code.py); do not edit.
"""`NsaCache`: the decoding state of Native Sparse Attention, as a transformers `Cache`.

The cache stores; the attention computes. Per layer it holds exactly what NSA_SPEC's "Decoding" lists, so
token-by-token decoding computes what one full forward computes:
- the raw K/V of the selection branch for the whole history (`keys`, `values`, with room for the next
  `_HISTORY_ROOM` tokens, so that a decoding step writes in place rather than copying the history);
- the K/V of the window branch for the last w tokens (only with independent branch K/V; with shared
  K/V the window reads the selection history);
- the compressed K/V, one slot per completed block (slot = block index in the row's document), and the raw,
  un-rotated compression-branch K/V of the last l tokens that the next blocks still need;
- the number of tokens seen.
Where each row's document starts (left padding) is kept once, on `NsaCache.doc_starts`.

A step: the model plans it once for every layer (`NsaCache.step_geometry`: the stores' sizes after the step,
the blocks the new tokens complete); each attention layer `append`s its new K/V, compresses the completed
blocks it reads from `compression_buffer()` (phi and RoPE are the attention's), `write_compressed`, and reads
its stores with `stores()`. The rolling buffers keep `max_rollback` extra tokens so that `crop` (assisted
decoding) can undo that many tokens exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from .configuration_nsa import NsaConfig
from .nsa_ops_layout import SparsePattern, num_compressed_blocks

__all__ = ["NsaCache", "NsaCacheLayer", "NsaStores", "StepGeometry", "sparse_pattern"]


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
    """Flat key/value stores one attention step reads ([B * S, H, D] each)."""

    k_cmp: Tensor
    v_cmp: Tensor
    k_slc: Tensor
    v_slc: Tensor
    k_win: Tensor
    v_win: Tensor


@dataclass(frozen=True)
class StepGeometry:
    """The sizes of every layer's stores once a step's tokens are appended (all layers hold the same history)."""

    seq_len: int  # tokens seen, the new ones included (the selection store's valid length per row)
    history_capacity: int  # the selection store's row length: seq_len and room for the next steps
    window_len: int  # window store length per row (= seq_len when the window reads the selection store)
    window_stride: int  # the window store's row length (history_capacity when it is the selection store)
    buffer_len: int  # raw compression buffer length per row
    capacity: int  # compressed slots per row
    num_new_blocks: int  # upper bound on the blocks the new tokens complete in any row (host-side, no sync)


def _ends_a_block(past: int, num_new: int, start_residues: frozenset[int], l: int, d: int) -> bool:
    """Whether a row whose document starts at r (mod d) may end a compressed block at one of the positions
    past .. past + num_new - 1 (num_new < d): block i of a document ends at its position i * d + l - 1, so the first
    such token is (l - 1 + r - past) mod d tokens into the step."""
    return any((l - 1 + r - past) % d < num_new for r in start_residues)


def _last(x: Tensor, count: int) -> Tensor:
    """The last `count` tokens of [B, S, ...] (all of them when S <= count; none when count is 0)."""
    return x[:, x.shape[1] - min(count, x.shape[1]) :]


def _grown_capacity(capacity: int, needed: int) -> int:
    """Compressed slots after a step that needs `needed`: grown with slack, so most steps copy nothing."""
    return capacity if needed <= capacity else needed + max(64, needed // 8)


# Tokens of room the selection history gets whenever it grows: a decoding step then writes into place instead of
# copying the whole history (torch.cat every step copied it per layer and token); the history is copied once per
# this many steps, and the room costs at most this many tokens of memory.
_HISTORY_ROOM = 256


def _grown_history(capacity: int, needed: int) -> int:
    return capacity if needed <= capacity else needed + _HISTORY_ROOM


class NsaCacheLayer(CacheLayerMixin):
    """One layer's NSA decoding state. `keys`/`values` are the selection branch's raw history [B, capacity, H, D],
    valid up to `seq_len`."""

    is_compileable = False
    is_croppable = True
    is_sliding = False

    def __init__(self, pattern: SparsePattern, separate_window: bool, max_rollback: int = 256):
        super().__init__()
        self.pattern = pattern
        self.separate_window = separate_window
        self.max_rollback = max_rollback
        self.seq_len = 0  # valid tokens of `keys` / `values`, whose rows have room for more (`_HISTORY_ROOM`)
        # The last tokens; between steps at most twice what is kept (w - 1 or l - 1, plus max_rollback): `append`
        # drops the rest before it adds a step, `stores` after a long step has been read.
        self.window_keys: Tensor | None = None  # [B, <= 2 * (w - 1 + max_rollback), H, D]
        self.window_values: Tensor | None = None
        self.raw_cmp_keys: Tensor | None = None  # [B, <= 2 * (l - 1 + max_rollback), H, D], un-rotated
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
        raise NotImplementedError("NSA layers store a step with `NsaCacheLayer.append` and `write_compressed`.")

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
        names = ("keys", "values", "window_keys", "window_values", "raw_cmp_keys", "raw_cmp_values", "cmp_keys", "cmp_values")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def _map(self, fn: Callable[[Tensor], Tensor]) -> None:
        for name, tensor in self._tensors().items():
            setattr(self, name, fn(tensor))

    def reset(self) -> None:
        self.seq_len = 0
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
            # Counted as the next `append` keeps them (needed + max_rollback), so the budget does not depend on the
            # size of the last step.
            if buffer is not None and min(buffer.shape[1], needed + self.max_rollback) - removed < min(needed, target):
                raise ValueError(
                    f"cannot crop {removed} tokens: the cache keeps {self.max_rollback} tokens of rollback "
                    "(`NsaCache(max_rollback=...)`)."
                )
        for key_name, value_name in (("window_keys", "window_values"), ("raw_cmp_keys", "raw_cmp_values")):
            if getattr(self, key_name) is not None:
                keep = getattr(self, key_name).shape[1] - removed
                setattr(self, key_name, getattr(self, key_name)[:, :keep])
                setattr(self, value_name, getattr(self, value_name)[:, :keep])
        self.seq_len = target  # history past it, and compressed entries past each row's block count, are unused

    # -- storage operations of one step -----------------------------------------------------------

    def _window_keep(self) -> int:
        return self.pattern.window_size - 1 + self.max_rollback

    def _buffer_keep(self) -> int:
        return self.pattern.compress_block_size - 1 + self.max_rollback

    def geometry_after(self, num_new: int, start_residues: frozenset[int] | None = None) -> StepGeometry:
        """The sizes of this layer's stores once `num_new` tokens are appended (host ints, no device sync).
        `start_residues`: the rows' document starts modulo the compression stride, when the host knows them; a
        step in which no row ends a compressed block then has no new blocks."""
        l, d = self.pattern.compress_block_size, self.pattern.compress_stride
        seq_len = self.seq_len + num_new
        history_capacity = _grown_history(self.keys.shape[1] if self.is_initialized else 0, seq_len)
        window_len, window_stride = seq_len, history_capacity
        if self.separate_window:
            window_len = (min(self.window_keys.shape[1], self._window_keep()) if self.is_initialized else 0) + num_new
            window_stride = window_len
        buffer_len = (min(self.raw_cmp_keys.shape[1], self._buffer_keep()) if self.is_initialized else 0) + num_new
        # T new tokens complete at most ceil(T / d) blocks in any row, and no row (its document starts at >= 0)
        # has more blocks than the whole row.
        num_new_blocks = min(num_compressed_blocks(seq_len, l, d), -(-num_new // d))
        if start_residues is not None and num_new < d and not _ends_a_block(self.seq_len, num_new, start_residues, l, d):
            num_new_blocks = 0
        capacity = self.cmp_keys.shape[1] if self.is_initialized else 0
        if num_new_blocks:
            capacity = _grown_capacity(capacity, num_compressed_blocks(self.seq_len, l, d) + num_new_blocks)
        return StepGeometry(seq_len, history_capacity, window_len, window_stride, buffer_len, capacity, num_new_blocks)

    def append(self, k_slc: Tensor, v_slc: Tensor, k_win: Tensor | None, v_win: Tensor | None, k_raw: Tensor, v_raw: Tensor) -> None:
        """Store a step's new tokens ([B, T, H, D] each): the selection history grows; the window and the raw
        compression buffer first drop what no later step (nor a rollback of `max_rollback` tokens) reads."""
        if not self.is_initialized:
            self.lazy_initialization(k_slc, v_slc)
        if k_slc.shape[0] != self.keys.shape[0]:
            raise ValueError(f"the cache holds {self.keys.shape[0]} rows but {k_slc.shape[0]} were given.")
        end = self.seq_len + k_slc.shape[1]
        capacity = _grown_history(self.keys.shape[1], end)
        if capacity > self.keys.shape[1]:  # grow once per _HISTORY_ROOM steps; else write in place
            self.keys, self.values = (
                torch.cat([t[:, : self.seq_len], t.new_zeros(t.shape[0], capacity - self.seq_len, *t.shape[2:])], dim=1)
                for t in (self.keys, self.values)
            )
        autograd = torch.is_grad_enabled() and (k_slc.requires_grad or v_slc.requires_grad)
        if autograd or (self.keys.is_inference() and not torch.is_inference_mode_enabled()):
            # Autograd may hold views of the history from earlier steps, and a history made under inference_mode
            # cannot be written outside it: write out of place (a copy per step, as before the room was kept).
            self.keys = self.keys.slice_scatter(k_slc.to(self.keys.dtype), dim=1, start=self.seq_len, end=end)
            self.values = self.values.slice_scatter(v_slc.to(self.values.dtype), dim=1, start=self.seq_len, end=end)
        else:
            self.keys[:, self.seq_len : end] = k_slc
            self.values[:, self.seq_len : end] = v_slc
        keep = self._buffer_keep()
        self.raw_cmp_keys = torch.cat([_last(self.raw_cmp_keys, keep), k_raw], dim=1)
        self.raw_cmp_values = torch.cat([_last(self.raw_cmp_values, keep), v_raw], dim=1)
        if self.separate_window:
            keep = self._window_keep()
            self.window_keys = torch.cat([_last(self.window_keys, keep), k_win], dim=1)
            self.window_values = torch.cat([_last(self.window_values, keep), v_win], dim=1)
        self.seq_len += k_slc.shape[1]

    def compression_buffer(self) -> tuple[Tensor, Tensor]:
        """The raw, un-rotated compression-branch keys and values of the last tokens, flat [B * L, H, D]."""
        return self.raw_cmp_keys.flatten(0, 1), self.raw_cmp_values.flatten(0, 1)

    def write_compressed(self, slots: Tensor, k_new: Tensor, v_new: Tensor, capacity: int) -> None:
        """Write compressed entries [B, m, H, D] into each row's `slots` [B, m], growing the store to `capacity`."""
        batch, grow = self.cmp_keys.shape[0], capacity - self.cmp_keys.shape[1]
        if grow > 0:
            self.cmp_keys = torch.cat([self.cmp_keys, self.cmp_keys.new_zeros(batch, grow, *self.cmp_keys.shape[2:])], 1)
            self.cmp_values = torch.cat([self.cmp_values, self.cmp_values.new_zeros(batch, grow, *self.cmp_values.shape[2:])], 1)
        index = slots[..., None, None]
        self.cmp_keys = self.cmp_keys.scatter(1, index.expand(-1, -1, *k_new.shape[2:]), k_new.to(self.cmp_keys.dtype))
        self.cmp_values = self.cmp_values.scatter(1, index.expand(-1, -1, *v_new.shape[2:]), v_new.to(self.cmp_values.dtype))

    def stores(self) -> NsaStores:
        """Flat views of every store a step's attention reads. Afterwards the layer keeps of a long step (a prefill)
        only what later steps and a rollback read, so the layers of one prefill do not all hold its whole window
        and compression buffers at once; the views stay valid for this step."""
        window_keys, window_values = (self.window_keys, self.window_values) if self.separate_window else (self.keys, self.values)
        stores = NsaStores(
            k_cmp=self.cmp_keys.flatten(0, 1),
            v_cmp=self.cmp_values.flatten(0, 1),
            k_slc=self.keys.flatten(0, 1),
            v_slc=self.values.flatten(0, 1),
            k_win=window_keys.flatten(0, 1),
            v_win=window_values.flatten(0, 1),
        )
        # A copy only when the buffer is over twice what is kept: never for single-token steps.
        keep = self._buffer_keep()
        if self.raw_cmp_keys.shape[1] > 2 * keep:
            self.raw_cmp_keys, self.raw_cmp_values = _last(self.raw_cmp_keys, keep).clone(), _last(self.raw_cmp_values, keep).clone()
        keep = self._window_keep()
        if self.separate_window and self.window_keys.shape[1] > 2 * keep:
            self.window_keys, self.window_values = _last(self.window_keys, keep).clone(), _last(self.window_values, keep).clone()
        return stores


class NsaCache(Cache):
    """The cache `generate()` uses for NSA models: one `NsaCacheLayer` per decoder layer, and where each row's
    document starts (`doc_starts` [B], set by the first step: left padding), with those starts modulo the
    compression stride on the host (`start_residues`), so that steps in which no row ends a compressed block skip
    compression.

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
        self.doc_starts: Tensor | None = None
        # A superset of the rows' starts modulo the stride: reordering or selecting rows keeps it a superset.
        self.start_residues: frozenset[int] | None = None

    def set_doc_starts(self, starts: Tensor) -> None:
        """Where each row's document starts [B]: read to the host once (at the first step), for `step_geometry`."""
        self.doc_starts = starts
        self.start_residues = frozenset((starts % self.layers[0].pattern.compress_stride).tolist())

    def step_geometry(self, num_new: int) -> StepGeometry:
        """The stores' sizes after a step of `num_new` tokens, the same in every layer."""
        return self.layers[0].geometry_after(num_new, self.start_residues)

    def reset(self) -> None:
        super().reset()
        self.doc_starts = None
        self.start_residues = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.doc_starts is not None:
            self.doc_starts = self.doc_starts.index_select(0, beam_idx.to(self.doc_starts.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.doc_starts is not None:
            self.doc_starts = self.doc_starts.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: Tensor) -> None:
        super().batch_select_indices(indices)
        if self.doc_starts is not None:
            self.doc_starts = self.doc_starts[indices]

    def nbytes(self) -> int:
        """Bytes held by every tensor of the cache."""
        tensors = [t for layer in self.layers for t in layer._tensors().values()]
        tensors += [self.doc_starts] if self.doc_starts is not None else []
        return sum(t.numel() * t.element_size() for t in tensors)
