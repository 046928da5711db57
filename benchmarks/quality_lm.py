"""Language modelling, NSA against dense: the same shape, data, tokens and schedule, eval loss side by side.

    python benchmarks/quality_lm.py --out benchmarks/results/quality [--seq-len 2048] [--window 512] [--epochs 4]

The bundled Austen corpus (nsa_hf.data): a byte-level BPE tokenizer trained on it, the first five novels cut into
--seq-len rows (longer than the window, so the sparse branches matter) for training, *Persuasion* held out. NSA and a
Llama with SDPA of the same shape train on the same batches (quality_common.train), then each is scored by its mean
next-token loss on the held-out rows. The training novels are about 0.9M tokens, so training is counted in epochs
(--epochs; --steps overrides): a model of tens of millions of parameters overfits them after a few. Writes lm.json
(losses, eval losses, their ratio) and lm.png (training curves).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import torch

import quality_common
from nsa_hf.data import NOVEL_SEPARATOR, load_demo_novels
from nsa_hf.demo import build_tokenizer


def corpus_rows(tokenizer, text: str, seq_len: int) -> torch.Tensor:
    ids = torch.tensor(tokenizer(text)["input_ids"])
    return ids[: ids.numel() // seq_len * seq_len].view(-1, seq_len)


@torch.no_grad()
def eval_loss(model: torch.nn.Module, rows: torch.Tensor, batch: int, device: str) -> float:
    model.eval()
    losses = []
    for start in range(0, rows.shape[0], batch):
        ids = rows[start : start + batch].to(device)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            losses.append(model(input_ids=ids, labels=ids, use_cache=False).loss.float().item())
    return sum(losses) / len(losses)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/quality"))
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--block", type=int, default=32, help="compressed block l (stride l/2, selection block 2l)")
    parser.add_argument("--selected", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--epochs", type=float, default=4.0, help="passes over the training rows")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: from --epochs)")
    parser.add_argument("--batch-size", type=int, default=4, help="rows per step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-eval-rows", type=int, default=64)
    parser.add_argument("--corpus-chars", type=int, default=None, help="use only this much of the corpus (smoke runs)")
    parser.add_argument("--nsa-backend", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--commit", default=None)
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    novels = load_demo_novels()
    train_text, held_out = NOVEL_SEPARATOR.join(novels[:-1]), novels[-1]
    if args.corpus_chars:
        train_text, held_out = train_text[: args.corpus_chars], held_out[: args.corpus_chars // 4]
    tokenizer = build_tokenizer(train_text[:2_000_000], vocab_size=args.vocab)
    train_rows, eval_rows = corpus_rows(tokenizer, train_text, args.seq_len), corpus_rows(tokenizer, held_out, args.seq_len)
    eval_rows = eval_rows[: args.max_eval_rows]
    if not len(train_rows) or not len(eval_rows):
        raise SystemExit(f"--seq-len {args.seq_len} leaves no training or held-out row")
    if args.steps is None:
        args.steps = max(1, round(args.epochs * len(train_rows) / args.batch_size))
    shape = dict(vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                 num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                 head_dim=args.hidden // args.heads, max_position_embeddings=args.seq_len)
    geometry = dict(compress_block_size=args.block, compress_stride=args.block // 2, select_block_size=2 * args.block,
                    num_selected_blocks=args.selected, num_init_blocks=1, num_local_blocks=2, window_size=args.window)

    def batches(generator: torch.Generator):
        while True:  # rows drawn with the seeded generator: every model sees the same batches
            rows = train_rows[torch.randint(len(train_rows), (args.batch_size,), generator=generator)]
            yield rows, rows

    record = {
        "gpu": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "commit": args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "train_rows": len(train_rows), "train_tokens": args.steps * args.batch_size * args.seq_len,
        "eval_tokens": eval_rows.numel(),
        "losses": {}, "eval_loss": {}, "train_seconds": {}, "complete": False,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for kind in ("nsa", "llama"):
        model = quality_common.build(kind, shape, geometry, args.nsa_backend, args.seed)
        start = time.perf_counter()
        record["losses"][kind] = quality_common.train(model, batches, args.steps, args.lr, args.seed, device)
        record["train_seconds"][kind] = time.perf_counter() - start
        record["eval_loss"][kind] = eval_loss(model, eval_rows, args.batch_size, device)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
        (args.out / "lm.json").write_text(json.dumps(record, indent=1))  # a run cut short keeps the models it finished
    record["complete"] = True
    record["nsa_over_dense"] = record["eval_loss"]["nsa"] / record["eval_loss"]["llama"]
    print(f"eval loss: NSA {record['eval_loss']['nsa']:.4f}, dense {record['eval_loss']['llama']:.4f}, "
          f"ratio {record['nsa_over_dense']:.4f}", flush=True)
    (args.out / "lm.json").write_text(json.dumps(record, indent=1))
    plot(record, args.out / "lm.png")
    return record


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, losses in record["losses"].items():
        ax.plot(range(len(losses)), losses, label=f"{kind} (eval {record['eval_loss'][kind]:.3f})")
    ax.set_xlabel("logged step (every ~5% of training)")
    ax.set_ylabel("training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
