"""Retrieval beyond the window: does an NSA model learn to use context its sliding window cannot see?

    python benchmarks/quality_retrieval.py --out benchmarks/results/quality [--lengths 2048 4096 8192 16384]
        [--train-lengths 256 512 1024 2048 4096 8192 16384] [--short-steps 600] [--steps 2600] [--window 512]

A synthetic passkey task, generated on the fly (no tokenizer, no data files): random filler tokens, a KEY marker
followed by k random digits at a chosen depth, and at the end a QUERY marker followed by the same digits, which are
the only tokens with a loss. NSA and a Llama of the same shape (SDPA) train on the same batches (lengths drawn from
--short-lengths for the first --short-steps, then from --train-lengths; depths uniform), then both are scored at
--lengths by depth: a sample counts when every digit is the argmax after the correct prefix (chance 10**-k). The NSA
model is scored a second time with only its window branch (the compressed and selection gates forced to 0): beyond
the stacked windows' reach (layers x --window tokens) it should be at chance, which shows the retrieval comes from
the sparse branches. Writes retrieval.json and retrieval.png (accuracy heatmaps).

`--conversion` asks the dense-to-NSA question instead: a dense model trained at short context (no length past
the window) is converted (`convert_dense_to_nsa`) and continued at long context for --steps, beside the same dense
model continued with the same budget (retrieval_conversion.json / .png).
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

import quality_common
from nsa_hf import NsaForCausalLM, convert_dense_to_nsa

KEY, QUERY, FIRST_DIGIT, FIRST_FILLER = 1, 2, 3, 16  # token ids: markers, 10 digits, then filler


def make_batch(batch: int, length: int, digits: int, vocab: int, generator: torch.Generator,
               depths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) [batch, length]: filler, KEY + digits at each row's depth, QUERY + digits at the end;
    labels are -100 except the answer digits."""
    ids = torch.randint(FIRST_FILLER, vocab, (batch, length), generator=generator)
    key = torch.randint(FIRST_DIGIT, FIRST_DIGIT + 10, (batch, digits), generator=generator)
    depths = torch.rand(batch, generator=generator) if depths is None else depths
    room = length - 2 * (digits + 1)  # where the needle may start, before the question
    starts = (depths * (room - 1)).long()
    needle = torch.cat([torch.full((batch, 1), KEY), key], dim=1)
    ids.scatter_(1, starts[:, None] + torch.arange(digits + 1), needle)
    ids[:, -digits - 1] = QUERY
    ids[:, -digits:] = key
    labels = torch.full_like(ids, -100)
    labels[:, -digits:] = key
    return ids, labels


def shape_and_geometry(args: argparse.Namespace) -> tuple[dict, dict]:
    shape = dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                 num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                 head_dim=args.hidden // args.heads, max_position_embeddings=max(args.lengths + args.train_lengths))
    geometry = dict(compress_block_size=args.block, compress_stride=args.block // 2, select_block_size=2 * args.block,
                    num_selected_blocks=args.selected, num_init_blocks=1, num_local_blocks=2, window_size=args.window)
    return shape, geometry


def build(kind: str, args: argparse.Namespace) -> torch.nn.Module:
    shape, geometry = shape_and_geometry(args)
    nsa_fields = {**geometry, "branch_kv": args.branch_kv, "compression_type": args.compression}
    return quality_common.build(kind, shape, nsa_fields, args.nsa_backend, args.seed)


def passkey_batches(args: argparse.Namespace, lengths: list[int], short_steps: int = 0):
    """Training batches of about --tokens-per-step tokens, depths uniform, lengths drawn from --short-lengths for
    the first `short_steps` batches, then from `lengths`; from either pool each length as often as the others
    (--length-sampling steps), as often as it is long (labels: a batch of length L holds --tokens-per-step / L
    answers, so every length then gives as many answers as the others), or half of each (mixed)."""
    def stream(generator: torch.Generator):
        for step in itertools.count():
            pool = args.short_lengths if step < short_steps else lengths
            if args.length_sampling == "steps":  # as the published runs drew them, to reproduce them
                index = torch.randint(len(pool), (1,), generator=generator)
            else:
                by_length = torch.tensor(pool, dtype=torch.float) / sum(pool)
                uniform = torch.full((len(pool),), 1 / len(pool))
                weights = by_length if args.length_sampling == "labels" else (by_length + uniform) / 2
                index = torch.multinomial(weights, 1, generator=generator)
            length = pool[int(index)]
            yield make_batch(max(1, args.tokens_per_step // length), length, args.digits, args.vocab, generator)
    return stream


@contextmanager
def window_only(model: NsaForCausalLM):
    """The compressed and selection gates forced to 0 (an ablation: only the sliding window reads the context)."""
    gates = [layer.self_attn.branch_gate for layer in model.model.layers]
    originals = [gate.from_projection for gate in gates]

    def masked(original):
        return lambda projected: original(projected) * projected.new_tensor([0.0, 0.0, 1.0])

    for gate, original in zip(gates, originals, strict=True):
        gate.from_projection = masked(original)
    try:
        yield model
    finally:
        for gate in gates:
            del gate.from_projection


@torch.no_grad()
def predict(model: torch.nn.Module, args: argparse.Namespace,
            device: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """By 'length/depth', on fresh samples the training never saw: (key digits, predicted digits), each
    [samples, digits], a digit predicted as the argmax after the correct prefix."""
    model.eval()
    generator = torch.Generator().manual_seed(args.seed + 1)
    predictions = {}
    for length in args.lengths:
        for depth in args.depths:
            ids, labels = make_batch(args.samples, length, args.digits, args.vocab, generator,
                                     depths=torch.full((args.samples,), depth))
            with torch.autocast(device, dtype=torch.bfloat16, enabled=not args.fp32 and device == "cuda"):
                logits = model(input_ids=ids.to(device), use_cache=False).logits[:, -args.digits - 1 : -1]
            predictions[f"{length}/{depth}"] = (labels[:, -args.digits :], logits.argmax(-1).cpu())
    return predictions


def accuracy_by_cell(predictions: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Accuracy (every digit right) by 'length/depth'."""
    return {cell: (predicted == key).all(-1).float().mean().item() for cell, (key, predicted) in predictions.items()}


def accuracy_by_key(predictions: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float | list[float]]:
    """Over every cell: accuracy on keys whose digits all differ and on keys where a digit repeats (a copy that
    finds each next digit by matching the one before, as an induction head does, is ambiguous only there), the
    share of such keys, and each digit's own accuracy (after the correct prefix)."""
    keys = torch.cat([key for key, _ in predictions.values()])
    right = torch.cat([predicted == key for key, predicted in predictions.values()])
    repeated = (keys.sort(-1).values.diff(dim=-1) == 0).any(-1)  # sorted, a repeated digit sits beside its twin
    whole = right.all(-1).float()

    def mean(values: torch.Tensor) -> float:
        return values.mean().item() if values.numel() else float("nan")

    return {"distinct digits": mean(whole[~repeated]), "repeated digit": mean(whole[repeated]),
            "share repeated": repeated.float().mean().item(), "by digit": right.float().mean(0).tolist()}


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(record["accuracy"])
    fig, axes = plt.subplots(1, len(runs), figsize=(4 * len(runs) + 1, 4), squeeze=False, layout="constrained")
    for ax, run in zip(axes[0], runs):
        grid = [[record["accuracy"][run][f"{length}/{depth}"] for length in record["lengths"]] for depth in record["depths"]]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", origin="lower", aspect="auto")
        ax.set_xticks(range(len(record["lengths"])), record["lengths"])
        ax.set_yticks(range(len(record["depths"])), record["depths"])
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("needle depth" if ax is axes[0][0] else "")
        ax.set_title(run)
    fig.colorbar(image, ax=axes[0].tolist())
    fig.savefig(path, dpi=100)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/quality"))
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384], help="scored contexts")
    # Each row has one answer (--digits labels), so rows of 16k alone give a step a few dozen labels: the short rows
    # (first alone, then in the mix) carry most of them and teach the lookup that the long rows have to stretch.
    parser.add_argument("--train-lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192, 16384],
                        help="training contexts, one per step (see --length-sampling)")
    parser.add_argument("--length-sampling", default="steps", choices=["steps", "labels", "mixed"],
                        help="steps: every training length equally often; labels: each as often as its length, so "
                        "that every length gives as many answers (a step of length L holds --tokens-per-step / L); "
                        "mixed: half of each")
    parser.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 0.9])
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--block", type=int, default=32, help="compressed block l (stride l/2, selection block 2l)")
    parser.add_argument("--selected", type=int, default=16, help="selected blocks n")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--digits", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2600, help="training steps, --short-steps included")
    parser.add_argument("--short-steps", type=int, default=600,
                        help="first steps at --short-lengths only (models trained from scratch)")
    parser.add_argument("--tokens-per-step", type=int, default=65536)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--samples", type=int, default=32, help="scored samples per (length, depth)")
    parser.add_argument("--nsa-backend", default="auto")
    parser.add_argument("--branch-kv", default="independent", choices=["independent", "shared"],
                        help="NsaConfig.branch_kv of the NSA model trained from scratch (conversion always shares)")
    parser.add_argument("--compression", default="mlp", choices=["mlp", "linear", "mean"],
                        help="NsaConfig.compression_type (phi) of the NSA model trained from scratch")
    parser.add_argument("--models", nargs="+", default=["nsa", "llama"], choices=["nsa", "llama"],
                        help="which from-scratch models to train (both by default; one each in two processes to "
                        "fit a time limit, each with its own --out)")
    parser.add_argument("--conversion", action="store_true",
                        help="instead: a dense model trained at --short-lengths (<= the window) for --conversion-steps, "
                        "then converted to NSA and continued at --train-lengths, against the dense model continued alike")
    parser.add_argument("--short-lengths", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--conversion-steps", type=int, default=1000)
    parser.add_argument("--fp32", action="store_true", help="train and score in float32 on CUDA (default: bf16 autocast)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--commit", default=None)
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    for name in ("lengths", "train_lengths", "short_lengths"):
        if min(getattr(args, name)) <= 2 * (args.digits + 1) + 1:
            raise SystemExit(f"--{name.replace('_', '-')} must exceed {2 * (args.digits + 1) + 1} "
                             "(the needle and the question)")
    if not 0 <= args.short_steps <= args.steps:
        raise SystemExit(f"--short-steps must be between 0 and --steps ({args.steps}), got {args.short_steps}")
    if args.conversion and "--models" in (argv if argv is not None else sys.argv[1:]):
        raise SystemExit("--models picks the from-scratch models; --conversion trains its own pair")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    record = {
        "gpu": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "commit": args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "lengths": args.lengths, "depths": args.depths, "chance": 10.0 ** -args.digits,
        "accuracy": {}, "by_key": {}, "losses": {}, "train_seconds": {}, "complete": False,
    }
    results = "retrieval_conversion" if args.conversion else "retrieval"

    def save() -> None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{results}.json").write_text(json.dumps(record, indent=1))

    long_batches = passkey_batches(args, args.train_lengths)
    scratch_batches = passkey_batches(args, args.train_lengths, args.short_steps)
    runs = {name: lambda name=name: build(name, args) for name in dict.fromkeys(args.models)}
    batches = scratch_batches
    if args.conversion:
        # A dense model trained at short context only (no length past the window), then converted to NSA: both
        # continue at long context with the same --steps, so the retrieval beyond w compares like with like.
        short = [length for length in args.short_lengths if length <= args.window] or [args.window]
        dense = build("llama", args)
        start = time.perf_counter()
        record["losses"]["dense short"] = quality_common.train(dense, passkey_batches(args, short), args.conversion_steps,
                                                              args.lr, args.seed, device, bf16=not args.fp32)
        record["train_seconds"]["dense short"] = time.perf_counter() - start
        state = {k: v.detach().cpu().clone() for k, v in dense.state_dict().items()}
        _, geometry = shape_and_geometry(args)

        def converted() -> NsaForCausalLM:
            source = build("llama", args)
            source.load_state_dict(state)
            return convert_dense_to_nsa(source.float(), **geometry, nsa_backend=args.nsa_backend)

        def continued_dense() -> torch.nn.Module:
            model = build("llama", args)
            model.load_state_dict(state)
            return model

        runs = {"converted nsa": converted, "continued dense": continued_dense}
        batches = long_batches  # both already had their short training
    for name, make in runs.items():
        model = make()
        start = time.perf_counter()
        record["losses"][name] = quality_common.train(model, batches, args.steps, args.lr, args.seed, device,
                                                      bf16=not args.fp32)
        record["train_seconds"][name] = time.perf_counter() - start
        scored = {name: predict(model, args, device)}
        if isinstance(model, NsaForCausalLM):
            with window_only(model):
                scored[f"{name} window only"] = predict(model, args, device)
        for run, predictions in scored.items():
            record["accuracy"][run] = accuracy_by_cell(predictions)
            record["by_key"][run] = accuracy_by_key(predictions)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
        save()  # after each model: a run cut short by a time limit keeps the models it finished
    for run, accuracy in record["accuracy"].items():
        mean = sum(accuracy.values()) / len(accuracy)
        by_key = record["by_key"][run]
        print(f"{run}: mean accuracy {mean:.3f} (chance {record['chance']:.0e}); keys with distinct digits "
              f"{by_key['distinct digits']:.3f}, with a repeated digit {by_key['repeated digit']:.3f}", flush=True)
    record["complete"] = True
    save()
    plot(record, args.out / f"{results}.png")
    return record


if __name__ == "__main__":
    main()
