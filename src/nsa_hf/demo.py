"""End-to-end CPU demo: train a tiny Native Sparse Attention language model on Jane Austen.

`run_demo` walks the whole Hugging Face workflow in a few minutes on a laptop CPU:

1. train a byte-level BPE tokenizer (``tokenizers``) on part of the bundled corpus and wrap it as a
   `transformers.PreTrainedTokenizerFast`;
2. build a tiny `NsaForCausalLM` whose sequence length is well above the sliding window and spans
   many selection blocks, so all three NSA branches (compressed, selected, window) are exercised;
3. train it with the `transformers.Trainer` on fixed-length chunks of the corpus, measuring the loss
   on a held-out split before and after;
4. `save_pretrained` model and tokenizer, reload both through `AutoModelForCausalLM` /
   `AutoTokenizer`, check the reloaded model reproduces the logits bit for bit, and `generate()` a
   continuation of a prompt.

Run it from the command line with ``nsa-hf demo`` (see `nsa_hf.cli`).
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .configuration_nsa import NsaConfig
from .data import load_demo_corpus
from .modeling_nsa import NsaForCausalLM
from .ops.backends import backend_names

__all__ = [
    "DemoResult",
    "add_nsa_backend_argument",
    "add_threads_argument",
    "build_model",
    "build_tokenizer",
    "evaluate_loss",
    "format_report",
    "load_model",
    "run_demo",
    "set_threads",
]

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
DEFAULT_PROMPT = "It is a truth universally acknowledged, that"


@dataclass
class DemoResult:
    """What `run_demo` measured and produced.

    Attributes:
        loss_before: mean cross-entropy (nats per token) on the held-out split before training.
        loss_after: the same after training (and, identically, for the reloaded model).
        text: the generated continuation of the prompt (prompt not included).
        output_dir: where the model and tokenizer were saved.
        seconds: wall-clock time of the whole demo.
        prompt: the prompt given to `generate()`.
        num_parameters: number of model parameters.
        tokens_trained: number of tokens the Trainer consumed (steps * batch size * sequence length).
    """

    loss_before: float
    loss_after: float
    text: str
    output_dir: Path
    seconds: float
    prompt: str = ""
    num_parameters: int = 0
    tokens_trained: int = 0


class _ChunkDataset(Dataset):
    """Fixed-length chunks of token ids as causal-LM examples (labels are the inputs; the model shifts)."""

    def __init__(self, chunks: Tensor):
        self.chunks = chunks

    def __len__(self) -> int:
        return self.chunks.shape[0]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        ids = self.chunks[index]
        return {"input_ids": ids, "labels": ids}


def _paragraphs(text: str) -> list[str]:
    """Split `text` into pieces at blank lines, keeping every character (the pieces concatenate to `text`)."""
    pieces = text.split("\n\n")
    return [piece + "\n\n" for piece in pieces[:-1]] + [pieces[-1]]


def build_tokenizer(text: str, vocab_size: int = 1024):
    """Train a byte-level BPE tokenizer on `text` and wrap it for transformers.

    Args:
        text: training text.
        vocab_size: target vocabulary size, the 256 byte symbols and the special tokens included.

    Returns:
        A `transformers.PreTrainedTokenizerFast` with ``<|endoftext|>`` as BOS/EOS and ``<|pad|>`` as PAD;
        it round-trips through `save_pretrained` / `AutoTokenizer.from_pretrained`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_paragraphs(text), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=1 << 30,
    )


def build_model(tokenizer, seq_len: int, num_layers: int = 2, seed: int = 0) -> NsaForCausalLM:
    """A tiny NSA causal LM (about 1M parameters) for `tokenizer`.

    NSA geometry: compressed blocks of l=16 tokens every d=8, selection blocks of l'=32 with n=4 selected
    (the first block and the query's own block forced, 2 chosen by score), sliding window w=64. At the
    demo's sequence lengths (256-512) a query sees the window, plus a sparse subset of the earlier blocks.
    """
    config = NsaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=max(seq_len, 2048),
        compress_block_size=16,
        compress_stride=8,
        select_block_size=32,
        num_selected_blocks=4,
        num_init_blocks=1,
        num_local_blocks=1,
        window_size=64,
        compression_type="mlp",
        nsa_backend="auto",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return NsaForCausalLM(config)


def add_nsa_backend_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The examples' `--nsa-backend` flag, with `NsaConfig.nsa_backend`'s choices."""
    parser.add_argument(
        "--nsa-backend",
        choices=backend_names(),
        default="auto",
        help="attention backend; auto = Triton on CUDA, else the PyTorch reference (default: %(default)s)",
    )


def _thread_count(value: str) -> int:
    try:
        threads = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if threads < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {threads}")
    return threads


def add_threads_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The `--threads` flag of ``nsa-hf demo`` and the examples: torch's CPU threads (see `set_threads`)."""
    parser.add_argument(
        "--threads",
        type=_thread_count,
        default=None,
        help="torch CPU threads (torch.set_num_threads); unset, torch uses one per core. Use 1 when other programs "
        "keep the cores busy: OpenMP threads waiting for a busy core make each step many times slower",
    )


def set_threads(threads: int | None) -> None:
    """`torch.set_num_threads(threads)`; `None` keeps torch's current setting."""
    if threads is not None:
        torch.set_num_threads(threads)


@torch.no_grad()
def load_model(model_dir: str | None, nsa_backend: str = "auto", bf16: bool = False):
    """The saved model and tokenizer in `model_dir` (on CUDA when available, in eval mode), or, without a
    `model_dir`, a tiny random model with a BPE tokenizer trained on the corpus: the examples' smoke runs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if bf16 else torch.float32
    if model_dir:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, nsa_backend=nsa_backend)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    else:
        tokenizer = build_tokenizer(load_demo_corpus()[:200_000], vocab_size=1024)
        model = build_model(tokenizer, seq_len=2048).to(dtype)
        model.config.nsa_backend = nsa_backend
    return model.to(device).eval(), tokenizer


def evaluate_loss(model: NsaForCausalLM, chunks: Tensor, batch_size: int) -> float:
    """Mean next-token cross-entropy (nats per predicted token) of `model` over `chunks` [N, T]."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, chunks.shape[0], batch_size):
        batch = chunks[start : start + batch_size].to(model.device)
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        predicted = batch.shape[0] * (batch.shape[1] - 1)
        total += loss.item() * predicted
        count += predicted
    model.train(was_training)
    return total / count


def _chunk(ids: Tensor, seq_len: int) -> Tensor:
    usable = (ids.numel() // seq_len) * seq_len
    return ids[:usable].view(-1, seq_len)


def run_demo(
    output_dir: str | Path,
    steps: int = 120,
    seq_len: int = 512,
    *,
    batch_size: int = 4,
    learning_rate: float = 3e-3,
    num_layers: int = 2,
    vocab_size: int = 1024,
    tokenizer_chars: int = 1_000_000,
    eval_chunks: int = 8,
    seed: int = 0,
    prompt: str = DEFAULT_PROMPT,
    max_new_tokens: int = 100,
    num_threads: int | None = None,
    verbose: bool = True,
) -> DemoResult:
    """Train, save, reload and sample a tiny NSA language model on the bundled Jane Austen corpus.

    Args:
        output_dir: directory that receives the model and tokenizer (`save_pretrained`).
        steps: optimizer steps (`TrainingArguments.max_steps`).
        seq_len: tokens per training example; keep it well above the window (64) so NSA is sparse.
        batch_size: examples per optimizer step.
        learning_rate: peak learning rate of the warmup + cosine schedule.
        num_layers: decoder layers of the model.
        vocab_size: BPE vocabulary size.
        tokenizer_chars: characters from the start of the corpus the tokenizer is trained on.
        eval_chunks: held-out chunks (taken from the end of the corpus) for the eval loss.
        seed: seed of the model initialization, data order and sampling.
        prompt: text to continue with `generate()`.
        max_new_tokens: tokens to generate.
        num_threads: torch intra-op threads during the demo; `None` keeps torch's current setting (one per
            core by default). Use 1 when other processes keep the cores busy: OpenMP threads that must wait
            for a busy core can make each step many times slower.
        verbose: print the progress and the final report.

    Returns:
        A `DemoResult`.

    Raises:
        RuntimeError: if the reloaded model does not reproduce the trained model's logits exactly.
    """
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        Trainer,
        TrainingArguments,
        default_data_collator,
        set_seed,
    )

    if steps < 1:
        raise ValueError(f"`steps` must be >= 1, got {steps}.")
    if seq_len < 2:
        raise ValueError(f"`seq_len` must be >= 2, got {seq_len}.")
    start_time = time.perf_counter()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    previous_threads = torch.get_num_threads()
    set_threads(num_threads)
    say = print if verbose else (lambda *args, **kwargs: None)

    try:
        set_seed(seed)
        text = load_demo_corpus()
        tokenizer_text = text[:tokenizer_chars]
        say(f"[1/5] training a byte-level BPE tokenizer (vocab {vocab_size}) on {len(tokenizer_text):,} characters")
        tokenizer = build_tokenizer(tokenizer_text, vocab_size=vocab_size)

        # Eval: the last `eval_chunks` chunks of the corpus (end of Persuasion). Training: what comes before,
        # tokenized only as far as the run needs (with margin), so short runs stay fast.
        train_tokens_needed = steps * batch_size * seq_len
        eval_text_chars = eval_chunks * seq_len * 6 + 1
        train_text_chars = min(len(text) - eval_text_chars, max(train_tokens_needed * 6, 200_000))

        def encode(part: str) -> list[int]:
            return [i for enc in tokenizer.backend_tokenizer.encode_batch(_paragraphs(part)) for i in enc.ids]

        eval_ids = torch.tensor(encode(text[-eval_text_chars:]), dtype=torch.long)
        eval_set = _chunk(eval_ids, seq_len)[-eval_chunks:]
        train_ids = torch.tensor(encode(text[:train_text_chars]), dtype=torch.long)
        train_set = _chunk(train_ids, seq_len)
        if eval_set.shape[0] == 0 or train_set.shape[0] == 0:
            raise ValueError(f"`seq_len` {seq_len} is too long for the corpus split.")
        say(
            f"      {len(tokenizer)} tokens in the vocabulary; {train_set.shape[0]} training chunks and "
            f"{eval_set.shape[0]} held-out chunks of {seq_len} tokens"
        )

        model = build_model(tokenizer, seq_len, num_layers=num_layers, seed=seed)
        num_parameters = model.num_parameters()
        cfg = model.config
        say(
            f"[2/5] NsaForCausalLM: {num_parameters:,} parameters, {cfg.num_hidden_layers} layers, hidden "
            f"{cfg.hidden_size}, {cfg.num_attention_heads} heads / {cfg.num_key_value_heads} kv heads; NSA l="
            f"{cfg.compress_block_size} d={cfg.compress_stride} l'={cfg.select_block_size} n={cfg.num_selected_blocks} "
            f"w={cfg.window_size} (a query at position {seq_len - 1} attends {cfg.num_selected_blocks} of "
            f"{seq_len // cfg.select_block_size} selection blocks and a {cfg.window_size}-token window)"
        )
        use_cpu = not torch.cuda.is_available()
        if use_cpu:
            say(f"      torch threads: {torch.get_num_threads()}")
        model.to("cpu" if use_cpu else "cuda")
        loss_before = evaluate_loss(model, eval_set, batch_size)
        say(f"      held-out loss before training: {loss_before:.3f} (perplexity {math.exp(loss_before):.1f})")

        say(f"[3/5] training {steps} steps x {batch_size} x {seq_len} tokens with the transformers Trainer")
        args = TrainingArguments(
            output_dir=str(output_dir),
            max_steps=steps,
            per_device_train_batch_size=batch_size,
            learning_rate=learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=max(1, steps // 10),
            weight_decay=0.01,
            max_grad_norm=1.0,
            logging_strategy="steps",
            logging_steps=max(1, steps // 8),
            eval_strategy="no",
            save_strategy="no",
            report_to=[],
            use_cpu=use_cpu,
            seed=seed,
            dataloader_pin_memory=not use_cpu,
            disable_tqdm=not verbose,
        )
        trainer = Trainer(
            model=model, args=args, train_dataset=_ChunkDataset(train_set), data_collator=default_data_collator
        )
        trainer.train()
        model = trainer.model
        loss_after = evaluate_loss(model, eval_set, batch_size)
        say(f"      held-out loss after training: {loss_after:.3f} (perplexity {math.exp(loss_after):.1f})")

        say(f"[4/5] save_pretrained -> {output_dir}, reload with AutoModelForCausalLM / AutoTokenizer")
        model.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
        reloaded = AutoModelForCausalLM.from_pretrained(output_dir).to(model.device)
        reloaded_tokenizer = AutoTokenizer.from_pretrained(output_dir)
        probe = eval_set[:batch_size].to(model.device)
        model.eval()
        reloaded.eval()
        with torch.no_grad():
            logits, logits_reloaded = model(input_ids=probe).logits, reloaded(input_ids=probe).logits
        if not torch.equal(logits, logits_reloaded):
            diff = (logits - logits_reloaded).abs().max().item()
            raise RuntimeError(f"the reloaded model's logits differ from the trained model's (max |diff| {diff:.3g}).")
        loss_reloaded = evaluate_loss(reloaded, eval_set, batch_size)
        if loss_reloaded != loss_after:
            raise RuntimeError(f"the reloaded model's eval loss {loss_reloaded} differs from {loss_after}.")
        if reloaded_tokenizer(prompt)["input_ids"] != tokenizer(prompt)["input_ids"]:
            raise RuntimeError("the reloaded tokenizer encodes the prompt differently.")
        say(f"      reloaded: identical logits, held-out loss {loss_reloaded:.3f}")

        say(f"[5/5] generate() {max_new_tokens} tokens (top-k 40, temperature 0.8, seed {seed})")
        inputs = reloaded_tokenizer(prompt, return_tensors="pt").to(reloaded.device)
        sampling = dict(
            max_new_tokens=max_new_tokens, do_sample=True, top_k=40, temperature=0.8,
            pad_token_id=reloaded_tokenizer.pad_token_id,
        )
        set_seed(seed)
        with torch.no_grad():
            generated = reloaded.generate(**inputs, **sampling)
            # The same draws without a cache recompute every step from the whole text: decoding through NsaCache
            # must give the same tokens, or the cache lost history (as with a transformers it cannot read).
            set_seed(seed)
            recomputed = reloaded.generate(**inputs, **sampling, use_cache=False)
        if not torch.equal(generated, recomputed):
            raise RuntimeError("generate() through NsaCache differs from cache-free recomputation of the same draws.")
        say("      decoding through NsaCache equals cache-free recomputation of the same draws")
        new_tokens = generated[0, inputs["input_ids"].shape[1] :]
        generated_text = reloaded_tokenizer.decode(new_tokens, skip_special_tokens=True)
    finally:
        torch.set_num_threads(previous_threads)

    seconds = time.perf_counter() - start_time
    tokens_trained = steps * batch_size * seq_len
    result = DemoResult(
        loss_before=loss_before,
        loss_after=loss_after,
        text=generated_text,
        output_dir=output_dir,
        seconds=seconds,
        prompt=prompt,
        num_parameters=num_parameters,
        tokens_trained=tokens_trained,
    )
    if verbose:
        print(format_report(result))
    return result


def format_report(result: DemoResult) -> str:
    """The short human-readable summary `run_demo` prints at the end."""
    lines = [
        "",
        "=" * 72,
        "NSA demo report",
        f"  parameters      {result.num_parameters:,}",
        f"  tokens trained  {result.tokens_trained:,}",
        (
            f"  held-out loss   {result.loss_before:.3f} -> {result.loss_after:.3f} nats/token "
            f"(perplexity {math.exp(result.loss_before):.1f} -> {math.exp(result.loss_after):.1f})"
        ),
        f"  time            {result.seconds:.1f} s",
        f"  saved to        {result.output_dir}  (AutoModelForCausalLM / AutoTokenizer .from_pretrained)",
        f"  prompt          {result.prompt!r}",
        "  generated:",
        "",
        result.prompt + result.text,
        "=" * 72,
    ]
    return "\n".join(lines)
