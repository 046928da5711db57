# Generated from src/nsa_hf by `nsa-hf export-remote-code` (nsa_hf/remote_code.py); do not edit.
"""`NsaStaticCache`: NSA's decoding state in buffers of fixed shape, for torch.compile and CUDA graphs.

What `NsaCache` keeps, preallocated for `max_cache_len` tokens and written in place, so a decoding step has the
same shapes and addresses at every position:
- the selection branch's raw K/V for the whole history, [B, max_cache_len, H, D];
- the window branch's K/V (independent branch K/V only) in a mirrored ring of R = w + max_rollback slots: token a
  is written at slots a mod R and a mod R + R of a [B, 2R, H, D] buffer, so the last R tokens always lie contiguous
  (at (p mod R) + 1 .. (p mod R) + R for the newest token p) and every window is one interval, as the kernels read
  it. The max_rollback extra slots serve steps of several tokens (assisted decoding verifies its drafts in one) and
  `crop`: a rolled-back token only overwrote slots of tokens more than w before any later query;
- the raw, un-rotated compression-branch K/V of the last l + max_rollback tokens, in a mirrored ring the same way;
- the compressed K/V, one slot per block of the row's document, plus one scratch slot that a step writes when
  it completes no block (a write at a fixed shape instead of a branch on the data);
- the number of tokens stored, a device tensor (`cumulative_length`), and where each row's document starts.

A prompt is prefilled by the model's full-pass attention, then the layers write its stores. Decoding steps
`append` their tokens (one per row, or up to max_rollback + 1 when verifying drafts) and write the compressed
blocks they may complete.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from .cache_nsa import sparse_pattern
from .configuration_nsa import NsaConfig
from .nsa_ops_compression import PhiWeights
from .nsa_ops_layout import SparsePattern, num_compressed_blocks

__all__ = ["DEFAULT_ROLLBACK", "NsaStaticCache", "NsaStaticCacheLayer"]

DEFAULT_ROLLBACK = 64  # tokens crop can undo, and the most of a step after the prompt minus one


class NsaStaticCacheLayer(CacheLayerMixin):
    """One layer's NSA state in fixed-shape buffers (see the module docstring)."""

    is_compileable = True
    is_croppable = True
    is_sliding = False

    def __init__(self, pattern: SparsePattern, separate_window: bool, max_cache_len: int,
                 max_rollback: int = DEFAULT_ROLLBACK):
        super().__init__()
        self.pattern = pattern
        self.separate_window = separate_window
        self.max_cache_len = max_cache_len
        self.max_rollback = max_rollback
        self.window_ring = pattern.window_size + max_rollback
        self.raw_ring = pattern.compress_block_size + max_rollback
        # Slots for every block a document of max_cache_len tokens completes, then the scratch slot.
        self.num_blocks = num_compressed_blocks(max_cache_len, pattern.compress_block_size, pattern.compress_stride)
        self.cumulative_length = torch.tensor(0, dtype=torch.long)

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor | None = None) -> None:
        batch, _, heads, dim = key_states.shape
        dim_v = value_states.shape[-1] if value_states is not None else dim
        dtype, self.device = key_states.dtype, key_states.device

        def buffer(length: int, width: int) -> Tensor:
            # Plain tensors even when the prompt runs under inference_mode: later steps (no_grad) write in place.
            with torch.inference_mode(False):
                return torch.zeros(batch, length, heads, width, dtype=dtype, device=self.device)

        self.keys, self.values = buffer(self.max_cache_len, dim), buffer(self.max_cache_len, dim_v)
        self.raw_cmp_keys, self.raw_cmp_values = buffer(2 * self.raw_ring, dim), buffer(2 * self.raw_ring, dim_v)
        self.cmp_keys, self.cmp_values = buffer(self.num_blocks + 1, dim), buffer(self.num_blocks + 1, dim_v)
        self.window_keys = self.window_values = None
        if self.separate_window:
            self.window_keys, self.window_values = buffer(2 * self.window_ring, dim), buffer(2 * self.window_ring, dim_v)
        with torch.inference_mode(False):
            # A new tensor, not .to(): on the CPU .to() would keep one made under inference_mode, which a later
            # reset() or append() outside it could not write.
            self.cumulative_length = torch.zeros((), dtype=torch.long, device=self.device)
        if not torch.compiler.is_compiling():  # fixed addresses: CUDA graphs replay over them
            for tensor in self._tensors().values():
                torch._dynamo.mark_static_address(tensor)
            torch._dynamo.mark_static_address(self.cumulative_length)
        self.is_initialized = True

    def _tensors(self) -> dict[str, Tensor]:
        names = ("keys", "values", "window_keys", "window_values", "raw_cmp_keys", "raw_cmp_values", "cmp_keys", "cmp_values")
        return {name: getattr(self, name) for name in names if getattr(self, name, None) is not None}

    # -- transformers' CacheLayerMixin interface -------------------------------------------------

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        raise NotImplementedError("NSA layers store a step with `NsaStaticCacheLayer.append` and `write_compressed`.")

    def get_seq_length(self) -> int:
        return int(self.cumulative_length) if self.is_initialized else 0

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        return self.max_cache_len, 0

    def get_max_cache_shape(self) -> int:
        return self.max_cache_len

    def get_max_length(self) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        if self.is_initialized:
            for tensor in self._tensors().values():
                tensor.zero_()
            self.cumulative_length.zero_()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            for tensor in self._tensors().values():
                tensor.copy_(tensor.index_select(0, beam_idx.to(tensor.device)))

    def crop(self, max_length: int) -> None:
        """Keep the first `max_length` tokens; a value <= 0 removes that many from the end (assisted decoding rolls
        back rejected drafts). At most `max_rollback` tokens at a time: the rings hold no more."""
        if not self.is_initialized:
            return
        length = int(self.cumulative_length)  # a host read: crop runs between steps, outside the compiled step
        max_length = int(max_length)
        target = max_length if max_length > 0 else length + max_length
        if length - target > self.max_rollback:
            raise ValueError(
                f"cannot crop {length - target} tokens: the static cache keeps {self.max_rollback} tokens of rollback "
                "(`NsaStaticCache(max_rollback=...)`)."
            )
        self.cumulative_length.fill_(min(length, max(target, 0)))

    # -- storage operations ---------------------------------------------------------------------

    def _check_rows(self, new: Tensor) -> None:
        if new.shape[0] != self.keys.shape[0]:
            raise ValueError(
                f"the static cache holds {self.keys.shape[0]} rows but {new.shape[0]} were given: build a new "
                "NsaStaticCache for another batch size."
            )

    def _write_ring(self, keys: Tensor, values: Tensor, ring_keys: Tensor, ring_values: Tensor, positions: Tensor) -> None:
        """Write the newest min(T, R) of a step's tokens [B, T, ...] at slot (position mod R) of both halves of a
        mirrored ring [B, 2R, ...]: one copy per store, from the tokens broadcast over the halves."""
        batch, ring = ring_keys.shape[0], ring_keys.shape[1] // 2
        keep = min(keys.shape[1], ring)
        slots = positions[-keep:] % ring
        for store, new in ((ring_keys, keys), (ring_values, values)):
            halves = store.view(batch, 2, ring, *store.shape[2:])
            halves.index_copy_(2, slots, new[:, None, -keep:].expand(-1, 2, -1, *new.shape[2:]))

    def append(self, k_slc: Tensor, v_slc: Tensor, k_win: Tensor | None, v_win: Tensor | None, k_raw: Tensor,
               v_raw: Tensor, positions: Tensor) -> None:
        """Store a step's tokens [B, T, H, D] at `positions` [T], which are cumulative_length .. + T (computed once
        per step for every layer, by the model's plan); in place, no host sync."""
        if not self.is_initialized:
            self.lazy_initialization(k_slc, v_slc)
        self._check_rows(k_slc)
        self.keys.index_copy_(1, positions, k_slc.to(self.keys.dtype))
        self.values.index_copy_(1, positions, v_slc.to(self.values.dtype))
        self._write_ring(k_raw.to(self.keys.dtype), v_raw.to(self.values.dtype), self.raw_cmp_keys, self.raw_cmp_values,
                         positions)
        if self.separate_window:
            self._write_ring(k_win.to(self.keys.dtype), v_win.to(self.values.dtype), self.window_keys,
                             self.window_values, positions)
        self.cumulative_length.add_(k_slc.shape[1])

    def append_token(self, k_slc: Tensor, v_slc: Tensor, k_win: Tensor | None, v_win: Tensor | None, k_raw: Tensor,
                     v_raw: Tensor, positions: Tensor,
                     kernel: Callable[..., tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        """`append` for a decoding step of one token per row [B, 1, H, D] after the prompt, as one launch of `kernel`
        (the fused kernels' `append_token`), which also reads back the raw K/V of the l tokens that end at the new
        one ([B, 1, l, H, D] each, as `take_blocks` gives them): phi's input when the token completes a block."""
        self._check_rows(k_slc)
        return kernel(self.keys, self.values, self.window_keys, self.window_values, self.raw_cmp_keys,
                      self.raw_cmp_values, self.cumulative_length, k_slc, v_slc, k_win, v_win, k_raw, v_raw, positions,
                      self.pattern.compress_block_size)

    def store_compressed(self, slots: Tensor, k_blocks: Tensor, v_blocks: Tensor, phi_k: PhiWeights, phi_v: PhiWeights,
                         cos: Tensor, sin: Tensor, kernel: Callable[..., None]) -> None:
        """`write_compressed` of phi(block) (the key RoPE'd at `cos`/`sin` [B, 1, D]) for `append_token`'s blocks, in
        one launch of `kernel` (the fused kernels' `store_compressed`; two for the MLP phi)."""
        kernel(k_blocks, v_blocks, phi_k, phi_v, cos, sin, slots, self.cmp_keys, self.cmp_values)

    def write_compressed(self, slots: Tensor, k_new: Tensor, v_new: Tensor) -> None:
        """Write compressed entries [B, m, H, D] at each row's `slots` [B, m] (the scratch slot `num_blocks` for
        entries no query reads)."""
        index = slots[..., None, None]
        self.cmp_keys.scatter_(1, index.expand(-1, -1, *k_new.shape[2:]), k_new.to(self.cmp_keys.dtype))
        self.cmp_values.scatter_(1, index.expand(-1, -1, *v_new.shape[2:]), v_new.to(self.cmp_values.dtype))


class NsaStaticCache(Cache):
    """A fixed-shape `NsaCache` for compiled decoding (`generate(..., cache_implementation="static")`), or built by
    hand: `NsaStaticCache(model.config, max_cache_len=4096)`, passed as `cache=` (or `past_key_values=`).

    Args:
        config: the model's `NsaConfig`.
        max_cache_len: the most tokens (prompt and new ones) a row holds.
        max_rollback: tokens `crop` can undo at once, and the most tokens of a step after the prompt minus one
            (assisted decoding verifies its drafts in one step); each costs 2 slots in each ring.
    """

    def __init__(self, config: NsaConfig, max_cache_len: int, max_rollback: int = DEFAULT_ROLLBACK, **kwargs):
        if max_cache_len < 1:
            raise ValueError(f"`max_cache_len` must be >= 1, got {max_cache_len}.")
        if max_rollback < 0:
            raise ValueError(f"`max_rollback` must be >= 0, got {max_rollback}.")
        pattern = sparse_pattern(config)
        separate_window = config.branch_kv == "independent"
        layers = [
            NsaStaticCacheLayer(pattern, separate_window, max_cache_len, max_rollback) for _ in range(config.num_hidden_layers)
        ]
        super().__init__(layers=layers)
        # [B]: where each row's document starts, written by each prompt into the same buffer (a recorded decoding
        # step reads it at a fixed address; `prefilled` says whether it holds the current prompt's).
        self._doc_starts: Tensor | None = None
        self.prefilled = False  # a Python bool: compiled decoding steps are traced once, after the prompt

    @property
    def max_cache_len(self) -> int:
        return self.layers[0].max_cache_len

    @property
    def doc_starts(self) -> Tensor | None:
        """Where each row's document starts [B] (after its left padding), once the prompt is stored."""
        return self._doc_starts if self.prefilled else None

    def set_doc_starts(self, starts: Tensor) -> None:
        """Store the prompt's document starts, in place when the buffer of an earlier prompt fits."""
        if self._doc_starts is None or self._doc_starts.shape != starts.shape or self._doc_starts.device != starts.device:
            with torch.inference_mode(False):  # later steps (no_grad) and `reorder_cache` write it in place
                self._doc_starts = torch.zeros_like(starts, dtype=torch.long)
            if not torch.compiler.is_compiling():
                torch._dynamo.mark_static_address(self._doc_starts)
        self._doc_starts.copy_(starts)
        self.prefilled = True

    def reset(self) -> None:
        super().reset()
        self.prefilled = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.doc_starts is not None:
            self.doc_starts.copy_(self.doc_starts.index_select(0, beam_idx.to(self.doc_starts.device)))

    def can_hold(self, rows: int, max_cache_len: int, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether this filled cache can serve (after `reset`) a generation of `rows` rows and up to `max_cache_len`
        tokens in `dtype` on `device`; its geometry is the config's it was built from. `NsaForCausalLM.generate`
        keeps its static cache between calls when it can."""
        layer = self.layers[0]
        return (
            layer.is_initialized
            and layer.keys.shape[0] == rows
            and self.max_cache_len >= max_cache_len
            and layer.keys.dtype == dtype
            and layer.keys.device == device
        )

    def nbytes(self) -> int:
        tensors = [t for layer in self.layers if layer.is_initialized for t in layer._tensors().values()]
        return sum(t.numel() * t.element_size() for t in tensors)
