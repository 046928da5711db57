"""generate() end to end, as a user calls it: NsaForCausalLM against LlamaForCausalLM of the same shape, on a GPU.

    python benchmarks/bench_generate.py --out benchmarks/results [--shapes seed 1b] [--contexts 4096 32768 131072]
        [--batches 1 8] [--new-tokens 32] [--llama] [--runs nsa llama ...] [--extra seed:32768:32]

As ../shared/BENCHMARKS.md describes: random weights, bf16, greedy, `eos_token_id=None`, `min_new_tokens =
max_new_tokens`, prompt ids drawn without the pad id, an all-ones attention mask. Prefill = generate(max_new_tokens=1);
decode ms/token = (generate(1 + N) - generate(1)) / N, best of `--repeats` runs after a warm-up (a row gives
`no_figure`, with both timings, instead when the difference is not positive; `error` is a run that failed). Every row
also gives `step_ms_per_token`, timed inside the 1 + N call from the second token to the last (`StepClock`): it holds
where a long prompt's spread swamps the difference of two calls (large batches at long context). NSA runs its
default generate() (on CUDA: a kept NsaStaticCache whose eager step replays CUDA graphs,
`NsaConfig.cuda_graph_decoding`), its static one (`cache_implementation="static"`: NsaStaticCache, which generate()
compiles with fullgraph=True and CUDA graphs) and, as `nsa-dynamic`, the growing NsaCache with eager steps
(`cache_implementation="dynamic"`, the default path before CUDA-graph decoding); `--llama` adds Llama's default
(DynamicCache, eager) and its static path. The `-static-kept` runs pass one static cache made once per row and
reset before every call:
transformers' generate() makes Llama a new StaticCache per call, whose new buffers make CUDA graphs record the step
again (measured: 3.2 against 1.8 ms per token at 4k on the H200), while NSA's generate() keeps its static cache
between calls by itself (`NsaForCausalLM._static_cache_for`; results before it show NSA's static row paying the
same). Each NSA row also gives its step's bytes floor: the weights plus the cache bytes one token reads
(compressed keys, the selected blocks, the window, per layer and row) over the measured copy bandwidth, and the
fraction of the measured ms/token that floor is. `--profile` adds the GPU kernel time per token (a step whose
ms/token is far above it waits on the host) and the decoding steps' kernels per token (the prompt's subtracted).
Writes generate.json and generate.png.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache, StoppingCriteria, StoppingCriteriaList

from bench_decode import copy_bandwidth, nsa_keys_read  # this folder is on the path when run from the repo root
from bench_training import kernel_totals
from nsa_hf import NsaConfig, NsaForCausalLM, NsaStaticCache
from nsa_hf.cache_nsa import sparse_pattern
from nsa_hf.compat import CACHE_KWARG

SHAPES = {
    "seed": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=2, head_dim=64),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4, head_dim=128),
}


RUNS = ("nsa", "nsa-static", "nsa-static-kept", "nsa-dynamic", "llama", "llama-static", "llama-static-kept")
DEVICE = "cuda"  # where the prompts are made (the tests make them on the CPU)


def build(kind: str, shape: str, max_positions: int) -> torch.nn.Module:
    fields = dict(SHAPES[shape], vocab_size=32000, pad_token_id=0, eos_token_id=None, max_position_embeddings=max_positions)
    torch.manual_seed(0)
    if kind == "nsa":
        model = NsaForCausalLM(NsaConfig(**fields))
    else:
        model = LlamaForCausalLM(LlamaConfig(**fields, attn_implementation="sdpa"))
    return model.to("cuda", torch.bfloat16).eval()


def nsa_step_bytes(model: NsaForCausalLM, batch: int, context: int) -> int:
    """Bytes one decoding step must read at least: every weight once, and per layer and row the keys and values
    NSA reads at this context (its compressed blocks, n selected blocks of l' tokens, the window)."""
    config = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    tokens = nsa_keys_read(sparse_pattern(config), context)
    per_token = config.num_key_value_heads * 2 * config.head_dim * 2  # K and V, bf16
    return weights + config.num_hidden_layers * batch * tokens * per_token


def kept_cache(model, max_cache_len: int):
    """A static cache for every generate() call of one row (`-static-kept` runs)."""
    if isinstance(model, NsaForCausalLM):
        return NsaStaticCache(model.config, max_cache_len=max_cache_len)
    return StaticCache(config=model.config, max_cache_len=max_cache_len)


class StepClock(StoppingCriteria):
    """Never stops generation; notes the host clock each time generate() asks whether to stop, once per token.

    generate() waits for the GPU at every step (its check that all rows finished) right after asking, so at the
    second call the prompt's work is done and the first decoding step queued: the time from the second call to the
    last, over the steps between, is the decoding step's period as the user feels it, with no prompt in it, a figure
    that holds where a long prompt's run-to-run spread swamps the difference of two generate() calls. (From the
    first call it would include the prompt's GPU work still queued then.)"""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        self.times.append(self.clock())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def ms_per_token(self) -> float:
        if len(self.times) < 3:
            raise ValueError(f"StepClock needs at least three steps (the prompt's token and two decoded), saw "
                             f"{len(self.times)}")
        return 1e3 * (self.times[-1] - self.times[1]) / (len(self.times) - 2)


def timed_generate(model, prompt: torch.Tensor, new_tokens: int, kept=None, clock: StepClock | None = None,
                   **kwargs) -> float:
    if kept is not None:  # a fresh generation in the same buffers
        kept.reset()
        kwargs[CACHE_KWARG] = kept
    if clock is not None:
        kwargs["stopping_criteria"] = StoppingCriteriaList([clock])
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, **kwargs,
        )
    torch.cuda.synchronize()
    return time.perf_counter() - start


def generate_kernels(model, prompt: torch.Tensor, new_tokens: int, **kwargs) -> dict[str, tuple[float, int]]:
    """GPU kernel time (ms) and launches of one generate() call, by kernel name."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
        timed_generate(model, prompt, new_tokens, **kwargs)
    return kernel_totals(profiler)


def decoding_kernels(prefill: dict[str, tuple[float, int]], full: dict[str, tuple[float, int]], new_tokens: int,
                     rows: int = 30) -> str:
    """The kernels of the decoding steps alone (a call of 1 + N tokens minus a call of 1: the prompt's kernels
    cancel), per new token, most time first: microseconds, launches, name."""
    per_token = {}
    for name in full.keys() | prefill.keys():
        (ms, calls), (ms_prompt, calls_prompt) = full.get(name, (0.0, 0)), prefill.get(name, (0.0, 0))
        per_token[name] = ((ms - ms_prompt) * 1e3 / new_tokens, (calls - calls_prompt) / new_tokens)
    ranked = sorted(per_token.items(), key=lambda item: -item[1][0])
    lines = [f"{us:9.1f} us {calls:6.1f}x  {name[:110]}" for name, (us, calls) in ranked[:rows]]
    total = sum(us for us, _ in per_token.values())
    header = f"{total:9.1f} us per token of decoding kernels (most time first: us, launches per token)"
    return "\n".join([header, *lines])


def per_token_figure(prefill_s: float, full_s: float, new_tokens: int) -> dict:
    """{"ms_per_token": (generate(1 + N) - generate(1)) / N} from the best seconds of each, or, when the first took
    no longer than the second (a long prompt's run-to-run spread exceeded the whole decode), {"no_figure": why}
    with both timings rather than a negative figure. A key of its own: "error" is a run that failed (out of
    memory)."""
    if full_s > prefill_s:
        return {"ms_per_token": 1e3 * (full_s - prefill_s) / new_tokens}
    return {"no_figure": f"generate(1 + N) took {full_s:.4f} s, no longer than generate(1) at {prefill_s:.4f} s: "
                         "raise --new-tokens or --repeats"}


def measure(model, batch: int, context: int, new_tokens: int, repeats: int, profile: bool = False, keep: bool = False,
            **kwargs) -> dict:
    prompt = torch.randint(1, 32000, (batch, context), device=DEVICE)
    if keep:
        kwargs["kept"] = kept_cache(model, context + 1 + new_tokens)
    timed_generate(model, prompt, 1 + new_tokens, **kwargs)  # warm-up, compilation included
    torch.cuda.reset_peak_memory_stats()
    prefill = min(timed_generate(model, prompt, 1, **kwargs) for _ in range(repeats))
    clocks = [StepClock() for _ in range(repeats)]
    full = min(timed_generate(model, prompt, 1 + new_tokens, clock=clock, **kwargs) for clock in clocks)
    row = dict(prefill_s=prefill, peak_gib=torch.cuda.max_memory_allocated() / 2**30)
    row.update(per_token_figure(prefill, full, new_tokens))
    row["step_ms_per_token"] = min(clock.ms_per_token() for clock in clocks)
    if profile:  # the GPU's share of a token: kernel time of the decoding steps (generate(1 + N) minus generate(1))
        prefill_kernels = generate_kernels(model, prompt, 1, **kwargs)
        full_kernels = generate_kernels(model, prompt, 1 + new_tokens, **kwargs)
        total_ms = sum(ms for ms, _ in full_kernels.values()) - sum(ms for ms, _ in prefill_kernels.values())
        row.update(kernel_ms_per_token=total_ms / new_tokens,
                   kernels=decoding_kernels(prefill_kernels, full_kernels, new_tokens))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--shapes", nargs="+", default=["seed", "1b"], choices=sorted(SHAPES))
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768, 131072])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--extra", nargs="*", default=["seed:32768:32"],
                        help="more (shape:context:batch) rows, e.g. seed at 32k with batch 32 (any shape)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--llama", action="store_true", help="also Llama's default and static-cache generate()")
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=None,
                        help="the generate() paths to measure (default: NSA's two, and Llama's two with --llama)")
    parser.add_argument("--label", default="", help="a name for this tree in the results (e.g. old/new commit)")
    parser.add_argument("--profile", action="store_true",
                        help="also each row's GPU kernel time per token and its decoding kernels per token")
    parser.add_argument("--commit", default=None)
    args = parser.parse_args()
    commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    chosen = args.runs or ["nsa", "nsa-static"] + (["llama", "llama-static"] if args.llama else [])
    options = {"static": {"cache_implementation": "static"}, "kept": {"keep": True},
               "dynamic": {"cache_implementation": "dynamic"}}
    runs = [(kind, options.get(kind.split("-")[-1], {})) for kind in chosen]
    extra = [tuple(item.split(":")) for item in args.extra]
    bad = [item for item, parts in zip(args.extra, extra, strict=True)
           if len(parts) != 3 or parts[0] not in SHAPES or not all(part.isdigit() for part in parts[1:])]
    if bad:
        parser.error(f"--extra takes shape:context:batch (a shape of {sorted(SHAPES)}, integers), got {bad}")
    if args.new_tokens < 2:  # the step clock times from the second token to the last: at least two decoded
        parser.error(f"--new-tokens must be at least 2, got {args.new_tokens}")
    bandwidth = copy_bandwidth()
    print(f"device copy bandwidth: {bandwidth:.0f} GB/s", flush=True)
    rows = []
    # An extra row runs even when its shape is not among --shapes (then with no other row of that shape).
    shapes = list(dict.fromkeys([*args.shapes, *(shape for shape, _, _ in extra)]))
    for shape in shapes:
        cases = [(c, b) for c in args.contexts for b in args.batches] if shape in args.shapes else []
        cases += [(int(c), int(b)) for s, c, b in extra if s == shape and (int(c), int(b)) not in cases]
        for kind, kwargs in runs:
            model = build(kind.split("-")[0], shape, max(c for c, _ in cases) + args.new_tokens + 8)
            for context, batch in cases:
                try:
                    row = measure(model, batch, context, args.new_tokens, args.repeats, args.profile, **kwargs)
                except torch.OutOfMemoryError as error:
                    row = dict(error=str(error).splitlines()[0])
                if kind.startswith("nsa") and "ms_per_token" in row:
                    floor_ms = nsa_step_bytes(model, batch, context) / bandwidth / 1e6
                    row.update(floor_ms=floor_ms, fraction_of_floor=floor_ms / row["ms_per_token"])
                rows.append(dict(model=kind, shape=shape, context=context, batch=batch, label=args.label, **row))
                shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items() if k != "kernels"}
                print(json.dumps(shown), flush=True)
                if "kernels" in row:
                    print(row["kernels"], flush=True)
            del model
            gc.collect()
            torch.cuda.empty_cache()
    record = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, commit=commit, rows=rows)
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"generate{'_' + args.label if args.label else ''}.json"
    (args.out / name).write_text(json.dumps(record, indent=1))
    plot(rows, args.out / name.replace(".json", ".png"))


def plot(rows: list[dict], path: Path) -> None:
    """ms per token against context, one panel per (shape, batch), one line per generate() path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["shape"], r["batch"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, (shape, batch) in zip(axes[0], panels):
        for kind in dict.fromkeys(r["model"] for r in rows):
            points = sorted((r["context"], r["ms_per_token"]) for r in rows
                            if (r["shape"], r["batch"], r["model"]) == (shape, batch, kind) and "ms_per_token" in r)
            if points:
                ax.plot(*zip(*points), marker="o", label=kind)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{shape}, batch {batch}")
        ax.set_xlabel("context")
        ax.set_ylabel("ms per token")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
