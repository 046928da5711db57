"""CUDA graphs of a decoding step over an `NsaStaticCache`, recorded from the eager model (no torch.compile).

generate() without `cache_implementation` decodes this way on CUDA (`NsaConfig.cuda_graph_decoding`): one token per
row is an eager forward of about a thousand small kernels, launched one by one from Python, so the host, not the
GPU, sets the pace. A static cache's step has fixed shapes, keeps its lengths in device tensors and makes no host
sync, so it can be recorded once as a CUDA graph and replayed at every later position: the GPU then runs the same
kernels back to back, with no compile wait.

A graph records the model as it is: its parameters' storage, the cache's buffers and the kernels chosen, and reads
the attention's input projections from stacked copies kept beside it (`KeptStacks`). generate() calls
`DecodeGraphs.refresh` before every call, which copies the weights into those stacks again, or drops the graphs once
the model's parameters or settings changed; models whose modules do things a replay would skip (hooks, adapters,
quantized layers) decode eagerly (`why_not_graphable`).
"""

from __future__ import annotations

import contextvars
import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers.utils import logging

from .cache_static import NsaStaticCache
from .ops.backends import resolve_primitives

__all__ = ["DecodeGraphs", "why_not_graphable"]

logger = logging.get_logger(__name__)

# Modules whose forward a replay reproduces: the model's own and torch.nn's. Anything else (PEFT's LoRA layers,
# quantized linears) may branch in Python on state that changes between calls (an adapter switched off).
# transformers_modules: the model's own classes loaded as remote code.
_PLAIN_MODULE_PREFIXES = ("torch.nn.", "transformers.activations", "nsa_hf.", "transformers_modules.")


def why_not_graphable(model: nn.Module) -> str | None:
    """Why `model`'s decoding steps cannot be recorded as CUDA graphs, or None when they can."""
    backend = resolve_primitives(model.config.nsa_backend, model.device)
    if backend != "triton":  # the reference reads sizes from the GPU (host syncs); other backends promise nothing
        return f"the {backend!r} attention backend's decoding step may wait for the GPU, which a graph cannot record"
    rope_type = (model.config.rope_parameters or {}).get("rope_type", "default")
    if "dynamic" in rope_type or rope_type == "longrope":  # transformers grows their tables on a host-side check
        return f"rope_type={rope_type!r} reads the positions on the host at every step"
    for name, module in model.named_modules():
        if module._forward_hooks or module._forward_pre_hooks:
            return f"module {name or 'model'!r} has forward hooks, which a replayed graph would not run"
        if not type(module).__module__.startswith(_PLAIN_MODULE_PREFIXES):
            return f"module {name!r} is a {type(module).__qualname__}, whose forward a replayed graph may not follow"
        if "forward" in module.__dict__:
            return f"module {name or 'model'!r} has a patched forward"
    if getattr(model, "hf_quantizer", None) is not None:
        return "the model is quantized"
    if len(set(getattr(model, "hf_device_map", {}).values())) > 1:
        return "the model is spread over several devices"
    return None


def _fingerprint(model: nn.Module) -> tuple:
    """What a recorded step depends on beyond the cache: every parameter's and buffer's storage, and the settings
    that choose kernels."""
    tensors = tuple((t.data_ptr(), t.dtype, t.shape) for t in itertools.chain(model.parameters(), model.buffers()))
    config = model.config
    # fp32 GEMMs follow the TF32 settings of the moment they are recorded.
    precision = torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32
    return tensors, config.nsa_backend, config.fused_kernels, model.training, precision


class KeptStacks:
    """Stacked copies of projection weights that a model's recorded decoding steps read (`kept_stack`), so that the
    projections of one input run as one GEMM with no copy of their weights in every replay. They are copied from the
    weights when first asked for (outside a recording) and again at every `refresh`, so that a step never reads
    weights older than its generate() call (an update made during a call, from a callback, is not seen until the
    next). They cost the stacked weights' bytes once more, until the graphs are dropped."""

    def __init__(self) -> None:
        self._stacks: dict[tuple[int, ...], tuple[list[Tensor], Tensor]] = {}

    def get(self, weights: list[Tensor]) -> Tensor | None:
        """`torch.cat(weights)`, kept; None while a graph is being recorded and no copy was made before (a recording
        may not run a copy that only this step would see)."""
        key = tuple(w.data_ptr() for w in weights)
        if key not in self._stacks:
            if weights[0].is_cuda and torch.cuda.is_current_stream_capturing():
                return None
            with torch.inference_mode(False), torch.no_grad():  # a normal tensor, read by later calls too
                self._stacks[key] = (list(weights), torch.cat(weights))
        return self._stacks[key][1]

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy every kept stack from its weights again (they may have been trained or loaded in place)."""
        for weights, stacked in self._stacks.values():
            torch.cat(weights, out=stacked)

    def clear(self) -> None:
        self._stacks.clear()

    @property
    def num_bytes(self) -> int:
        return sum(stacked.numel() * stacked.element_size() for _, stacked in self._stacks.values())

    @contextmanager
    def active(self) -> Iterator[None]:
        """`kept_stack` answers from these stacks inside the block."""
        token = _ACTIVE_STACKS.set(self)
        try:
            yield
        finally:
            _ACTIVE_STACKS.reset(token)


_ACTIVE_STACKS: contextvars.ContextVar[KeptStacks | None] = contextvars.ContextVar("nsa_hf_kept_stacks", default=None)


def kept_stack(weights: list[Tensor]) -> Tensor | None:
    """The kept `torch.cat(weights)` of the decoding step being run or recorded by `DecodeGraphs`, or None outside
    one (and with gradients: a kept copy is not the weights autograd sees)."""
    if torch.compiler.is_compiling():  # a compiled step stacks as `stacked_projection` decides
        return None
    stacks = _ACTIVE_STACKS.get()
    if stacks is None or torch.is_grad_enabled():
        return None
    return stacks.get(weights)


@dataclass
class _RecordedStep:
    graph: torch.cuda.CUDAGraph
    input_ids: Tensor  # the graph's input, copied into before each replay
    logits: Tensor  # the graph's output, overwritten by each replay


class DecodeGraphs:
    """The recorded decoding steps of one model over one static cache, by batch shape and autocast state.

    A step shape's first call runs eagerly (it compiles and autotunes the Triton kernels, which a recording may not
    do); the second records the step and replays it; later ones only replay. Only the cache's device tensors
    change between steps (written in place by the step itself), so one recording serves every position. Under
    autocast the step runs without autocast's weight-cast cache, whose copies live only as long as one autocast
    region: the graph casts the weights it reads at every replay instead. A step that cannot be recorded runs
    eagerly from then on, with a warning.
    """

    def __init__(self, cache: NsaStaticCache):
        self.cache = cache
        self.enabled = False  # set per generate() call: only its default path decodes through the graphs
        self._fingerprint: tuple | None = None
        self._steps: dict[tuple, _RecordedStep] = {}
        self._warm: set[tuple] = set()
        self._unrecordable: set[tuple] = set()
        self.stacks = KeptStacks()  # the stacked attention projections the steps read

    def refresh(self, model: nn.Module) -> None:
        """Drop the recorded steps when the model changed since they were recorded, else copy the kept stacks of its
        weights again (before each generate())."""
        fingerprint = _fingerprint(model)
        if fingerprint != self._fingerprint:
            self._steps.clear()
            self._warm.clear()
            self._unrecordable.clear()
            self.stacks.clear()
            self._fingerprint = fingerprint
        else:
            self.stacks.refresh()

    @property
    def num_recorded(self) -> int:
        return len(self._steps)

    def step(self, run: Callable[[Tensor], Tensor], input_ids: Tensor) -> Tensor:
        """The logits of `run(input_ids)`, a decoding step that writes the cache in place, from a replayed graph."""
        device_type = input_ids.device.type
        autocast = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        if autocast is not None:  # the same autocast, without its cache of weight casts (see the class docstring)
            run = _without_cast_cache(run, device_type, autocast)
        run = _with_stacks(run, self.stacks)
        key = (tuple(input_ids.shape), autocast)
        recorded = self._steps.get(key)
        if recorded is None:
            if key not in self._warm or key in self._unrecordable:
                self._warm.add(key)
                return run(input_ids)
            recorded = self._record(run, input_ids, key)
            if recorded is None:
                return run(input_ids)
        with torch.cuda.device(input_ids.device):  # a graph replays on its own device's current stream
            recorded.input_ids.copy_(input_ids)
            recorded.graph.replay()
        # A copy: the next replay overwrites the graph's output, and a caller may keep the logits of a step.
        return recorded.logits.clone()

    def _record(self, run: Callable[[Tensor], Tensor], input_ids: Tensor, key: tuple) -> _RecordedStep | None:
        """Record `run` as a graph (it does not run: the caller's replay does, on the cache as it is now), or None
        with a warning when the step cannot be recorded (it then runs eagerly for this key)."""
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(False):  # a plain tensor: later calls outside inference_mode copy into it
            static_ids = input_ids.clone()
        # On the model's device, from a stream of its own (torch's default capture stream belongs to whichever device
        # recorded first). Each graph has its own memory pool: graphs sharing one must replay in recording order.
        try:
            with torch.cuda.device(input_ids.device):
                with torch.cuda.graph(graph, stream=torch.cuda.Stream(input_ids.device)):
                    logits = run(static_ids)
        except RuntimeError as error:
            logger.warning(
                f"generate() could not record its decoding step as a CUDA graph and decodes eagerly instead "
                f"(`NsaConfig.cuda_graph_decoding=False` skips the attempt): {error}"
            )
            self._unrecordable.add(key)
            return None
        self._steps[key] = _RecordedStep(graph, static_ids, logits)
        return self._steps[key]


def _with_stacks(run: Callable[[Tensor], Tensor], stacks: KeptStacks) -> Callable[[Tensor], Tensor]:
    def stacked(input_ids: Tensor) -> Tensor:
        with stacks.active():
            return run(input_ids)

    return stacked


def _without_cast_cache(run: Callable[[Tensor], Tensor], device_type: str, dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
    def uncached(input_ids: Tensor) -> Tensor:
        with torch.autocast(device_type, dtype=dtype, cache_enabled=False):
            return run(input_ids)

    return uncached
