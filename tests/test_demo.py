"""The CPU demo (`nsa_hf.demo.run_demo`) and the `nsa-hf` command line, with tiny settings."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nsa_hf import NsaForCausalLM, __version__
from nsa_hf.cli import main
from nsa_hf.demo import DemoResult, run_demo


@pytest.fixture(scope="module")
def demo_result(tmp_path_factory) -> DemoResult:
    output_dir = tmp_path_factory.mktemp("demo")
    # seq_len 128 still exceeds the 64-token window and spans 4 selection blocks of 32. One thread: tiny
    # matrices gain nothing from two, and OpenMP threads slow down badly when other processes share the cores.
    return run_demo(
        output_dir,
        steps=3,
        seq_len=128,
        batch_size=2,
        eval_chunks=2,
        tokenizer_chars=200_000,
        max_new_tokens=12,
        num_threads=1,
        verbose=False,
    )


def test_demo_saves_model_and_tokenizer(demo_result: DemoResult):
    files = {path.name for path in demo_result.output_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files


def test_demo_reload_gives_identical_logits(demo_result: DemoResult):
    # run_demo itself raises unless the reloaded model reproduces the trained logits bit for bit.
    model = AutoModelForCausalLM.from_pretrained(demo_result.output_dir)
    assert isinstance(model, NsaForCausalLM)
    tokenizer = AutoTokenizer.from_pretrained(demo_result.output_dir)
    assert tokenizer.eos_token is not None and tokenizer.pad_token is not None
    again = AutoModelForCausalLM.from_pretrained(demo_result.output_dir)
    ids = tokenizer("It was a fine morning in Highbury, and Emma had", return_tensors="pt")["input_ids"]
    ids = ids.repeat(1, 8)[:, :96]  # longer than the window, so every NSA branch is used
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def test_demo_losses_and_text(demo_result: DemoResult):
    assert math.isfinite(demo_result.loss_before)
    assert math.isfinite(demo_result.loss_after)
    assert demo_result.loss_after < demo_result.loss_before + 0.5
    assert demo_result.text.strip()
    assert demo_result.seconds > 0


def test_cli_demo_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(["demo", "--help"])
    assert excinfo.value.code == 0
    out = capsys.readouterr().out
    for option in ("--max-steps", "--output-dir", "--seq-len", "--seed", "--prompt", "--threads"):
        assert option in out


def test_cli_demo_flags_match_the_examples_and_keep_steps():
    from nsa_hf.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["demo", "--steps", "7"]).max_steps == 7  # the earlier spelling still works
    args = parser.parse_args(["demo", "--max-steps", "7", "--threads", "1"])
    assert (args.max_steps, args.threads) == (7, 1)


def test_cli_version(capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(["--version"])
    assert excinfo.value.code == 0
    assert __version__ in capsys.readouterr().out
