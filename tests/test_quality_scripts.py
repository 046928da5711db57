"""The quality benchmark scripts (run at real size on the GPU), at their smallest size on CPU: the synthetic
passkey data, the window-only ablation, and one whole run writing its JSON and heatmap."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    if str(BENCHMARKS) not in sys.path:  # the scripts import quality_common, as they do when run from the root
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"nsa_bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


TINY = ["--lengths", "48", "64", "--train-lengths", "32", "64", "--short-lengths", "16", "--short-steps", "1",
        "--depths", "0", "0.9", "--window", "16", "--block", "8", "--selected", "3",
        "--hidden", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--vocab", "64", "--digits", "2",
        "--steps", "2", "--tokens-per-step", "128", "--samples", "2", "--nsa-backend", "reference"]


def test_passkey_batches_hide_the_key_at_the_depth_and_ask_for_it_at_the_end():
    retrieval = _load("quality_retrieval")
    generator = torch.Generator().manual_seed(0)
    ids, labels = retrieval.make_batch(3, 40, 3, 64, generator, depths=torch.tensor([0.0, 0.5, 1.0]))
    key = ids[:, -3:]
    assert (ids[:, -4] == retrieval.QUERY).all() and (labels[:, -3:] == key).all() and (labels[:, :-3] == -100).all()
    for row, start in enumerate((0, (40 - 8 - 1) // 2, 40 - 8 - 1)):
        assert ids[row, start] == retrieval.KEY and torch.equal(ids[row, start + 1 : start + 4], key[row])
    assert ((key >= retrieval.FIRST_DIGIT) & (key < retrieval.FIRST_DIGIT + 10)).all()


def test_training_starts_with_short_rows_only_then_draws_from_the_training_lengths():
    retrieval = _load("quality_retrieval")
    args = retrieval.build_parser().parse_args([*TINY, "--short-steps", "3"])
    stream = retrieval.passkey_batches(args, args.train_lengths, args.short_steps)(torch.Generator().manual_seed(0))
    lengths = [next(stream)[0].shape[1] for _ in range(40)]
    assert lengths[:3] == [16, 16, 16] and set(lengths[3:]) == {32, 64}


def test_label_weighted_sampling_gives_every_training_length_about_as_many_answers():
    """--length-sampling labels draws a length as often as it is long, so long rows (few per step) give as many
    answers as short ones; the default draws every length equally often (short rows then give most answers); mixed
    lies between."""
    retrieval = _load("quality_retrieval")
    counts = {}
    for sampling in ("steps", "labels", "mixed"):
        args = retrieval.build_parser().parse_args([*TINY, "--short-steps", "0", "--train-lengths", "16", "64",
                                                    "--length-sampling", sampling])
        stream = retrieval.passkey_batches(args, args.train_lengths)(torch.Generator().manual_seed(0))
        answers = {16: 0, 64: 0}
        for _ in range(400):
            ids, _ = next(stream)
            answers[ids.shape[1]] += ids.shape[0]
        counts[sampling] = answers
    assert 3 < counts["steps"][16] / counts["steps"][64] < 5  # 8 rows of 16 per step against 2 of 64
    assert 0.75 < counts["labels"][16] / counts["labels"][64] < 1.33
    # mixed: a 64-token step 13/20 of the time (half of 1/2 and half of 4/5); 8 answers per 16-token step, 2 per 64
    assert 1.6 < counts["mixed"][16] / counts["mixed"][64] < 3.2


def test_the_nsa_model_from_scratch_takes_the_branch_kv_and_compression_asked_for():
    retrieval = _load("quality_retrieval")
    default = retrieval.build("nsa", retrieval.build_parser().parse_args(TINY)).config
    assert (default.branch_kv, default.compression_type) == ("independent", "mlp")
    args = retrieval.build_parser().parse_args([*TINY, "--branch-kv", "shared", "--compression", "mean"])
    config = retrieval.build("nsa", args).config
    assert (config.branch_kv, config.compression_type) == ("shared", "mean")


def test_window_only_zeroes_the_compressed_and_selection_gates_then_restores_them():
    retrieval = _load("quality_retrieval")
    args = retrieval.build_parser().parse_args(TINY)
    model = retrieval.build("nsa", args)
    gate = model.model.layers[0].self_attn.branch_gate
    projected = gate.input_projection(torch.randn(1, 5, 32))
    with retrieval.window_only(model):
        masked = gate.from_projection(projected)
    assert (masked[..., :2] == 0).all() and (masked[..., 2] > 0).all()
    torch.testing.assert_close(gate.from_projection(projected)[..., 2], masked[..., 2])
    assert (gate.from_projection(projected)[..., :2] > 0).all()


def test_retrieval_benchmark_runs_and_writes_its_results(tmp_path):
    record = _load("quality_retrieval").main([*TINY, "--out", str(tmp_path), "--commit", "test"])
    saved = json.loads((tmp_path / "retrieval.json").read_text())
    assert (tmp_path / "retrieval.png").stat().st_size > 0 and saved["complete"] is True
    assert set(saved["accuracy"]) == {"nsa", "llama", "nsa window only"} == set(record["accuracy"])
    for accuracy in saved["accuracy"].values():
        assert set(accuracy) == {"48/0.0", "48/0.9", "64/0.0", "64/0.9"}
    assert set(saved["by_key"]) == set(saved["accuracy"])
    assert all(len(by_key["by digit"]) == 2 for by_key in saved["by_key"].values())


@pytest.mark.parametrize(("wrong_last_digit", "expected"), [(False, 1.0), (True, 0.0)])
def test_retrieval_score_counts_a_sample_right_only_when_every_digit_is(wrong_last_digit, expected):
    """accuracy_by_cell(predict()) is the share of samples whose answer digits are all predicted: a model that
    predicts each next token scores 1 everywhere, and one that misses only the last digit scores 0 (a per-digit mean
    would give 1/2)."""
    retrieval = _load("quality_retrieval")
    args = retrieval.build_parser().parse_args(TINY)

    class NextToken(torch.nn.Module):
        def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> SimpleNamespace:
            logits = torch.nn.functional.one_hot(input_ids.roll(-1, dims=1), args.vocab).float()
            if wrong_last_digit:
                logits[:, -2] = logits[:, -2].roll(1, dims=-1)
            return SimpleNamespace(logits=logits)

    accuracy = retrieval.accuracy_by_cell(retrieval.predict(NextToken(), args, "cpu"))
    assert set(accuracy) == {"48/0.0", "48/0.9", "64/0.0", "64/0.9"}
    assert all(value == expected for value in accuracy.values())


def test_retrieval_models_option_trains_only_the_named_model(tmp_path):
    record = _load("quality_retrieval").main([*TINY, "--models", "llama", "--out", str(tmp_path)])
    assert set(record["accuracy"]) == {"llama"} and set(record["losses"]) == {"llama"}
    with pytest.raises(SystemExit, match="--models"):
        _load("quality_retrieval").main([*TINY, "--conversion", "--models", "nsa", "--out", str(tmp_path)])


def test_a_retrieval_run_cut_short_keeps_the_models_it_finished(tmp_path, monkeypatch):
    """A GPU run stopped by its time limit during the second model still leaves the first model's results."""
    retrieval = _load("quality_retrieval")
    train, calls = retrieval.quality_common.train, []

    def train_then_stop(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # what a time limit's signal leaves behind
        return train(*args, **kwargs)

    monkeypatch.setattr(retrieval.quality_common, "train", train_then_stop)
    try:
        retrieval.main([*TINY, "--out", str(tmp_path)])
    except KeyboardInterrupt:
        pass
    saved = json.loads((tmp_path / "retrieval.json").read_text())
    assert saved["complete"] is False and set(saved["accuracy"]) == {"nsa", "nsa window only"}


def test_retrieval_conversion_mode_trains_short_dense_then_compares_converted_and_continued(tmp_path):
    record = _load("quality_retrieval").main(
        [*TINY, "--conversion", "--short-lengths", "16", "--conversion-steps", "2", "--out", str(tmp_path)]
    )
    assert set(record["accuracy"]) == {"converted nsa", "converted nsa window only", "continued dense"}
    assert set(record["losses"]) == {"dense short", "converted nsa", "continued dense"}
    assert (tmp_path / "retrieval_conversion.json").is_file() and (tmp_path / "retrieval_conversion.png").is_file()


def test_lm_eval_loss_of_a_uniform_predictor_is_log_vocab():
    """eval_loss is the mean next-token cross entropy over the rows, in batches (the last one short): a model with
    zero logits predicts every token with 1/V, so ln V, whatever the rows."""
    from transformers import LlamaConfig, LlamaForCausalLM

    lm = _load("quality_lm")
    vocab = 50
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    torch.nn.init.zeros_(model.lm_head.weight)
    rows = torch.randint(0, vocab, (5, 12))
    assert lm.eval_loss(model, rows, batch=2, device="cpu") == pytest.approx(math.log(vocab), rel=1e-5)


def test_lm_benchmark_trains_both_models_on_the_same_data_and_reports_eval_losses(tmp_path):
    record = _load("quality_lm").main(
        ["--seq-len", "64", "--window", "16", "--block", "8", "--selected", "3", "--hidden", "32", "--layers", "1",
         "--heads", "2", "--kv-heads", "1", "--vocab", "300", "--steps", "2", "--batch-size", "2",
         "--max-eval-rows", "2", "--corpus-chars", "40000", "--nsa-backend", "reference", "--out", str(tmp_path)]
    )
    assert set(record["eval_loss"]) == {"nsa", "llama"}
    assert record["nsa_over_dense"] == record["eval_loss"]["nsa"] / record["eval_loss"]["llama"]
    assert (tmp_path / "lm.json").is_file() and (tmp_path / "lm.png").is_file()


def test_lm_benchmark_counts_training_in_epochs_unless_steps_are_given(tmp_path):
    lm = _load("quality_lm")
    tiny = ["--seq-len", "64", "--window", "16", "--block", "8", "--selected", "3", "--hidden", "32", "--layers", "1",
            "--heads", "2", "--kv-heads", "1", "--vocab", "300", "--batch-size", "4", "--max-eval-rows", "2",
            "--corpus-chars", "20000", "--nsa-backend", "reference", "--out", str(tmp_path)]
    record = lm.main([*tiny, "--epochs", "0.5"])
    assert record["train_rows"] > 8 and record["args"]["steps"] == round(0.5 * record["train_rows"] / 4)
    assert record["train_tokens"] == record["args"]["steps"] * 4 * 64
    assert lm.main([*tiny, "--epochs", "0.5", "--steps", "3"])["args"]["steps"] == 3


def test_retrieval_benchmark_refuses_more_short_steps_than_steps_by_name(tmp_path):
    retrieval = _load("quality_retrieval")
    with pytest.raises(SystemExit, match="--short-steps"):
        retrieval.main([*TINY, "--short-steps", "5", "--out", str(tmp_path)])
    assert not (tmp_path / "retrieval.json").exists()


def test_retrieval_benchmark_builds_the_nsa_model_with_the_branch_kv_it_is_given():
    retrieval = _load("quality_retrieval")
    for mode in ("independent", "shared"):
        model = retrieval.build("nsa", retrieval.build_parser().parse_args([*TINY, "--branch-kv", mode]))
        assert model.config.branch_kv == mode and model.config.window_size == 16


def test_accuracy_by_key_splits_keys_with_a_repeated_digit_and_scores_each_digit():
    """Two cells, four samples: distinct keys right and wrong once, repeated keys right once and wrong once. The
    split counts a sample by whether any digit of its key repeats (not only neighbours), and each digit's accuracy
    is over every sample."""
    retrieval = _load("quality_retrieval")
    keys = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 3], [3, 4, 3, 6], [5, 5, 6, 7]])
    predicted = keys.clone()
    predicted[1, 3] = 4  # a distinct key, last digit wrong
    predicted[3, 1:3] = 9  # a repeated key, second and third digits wrong
    cells = {"64/0.0": (keys[:2], predicted[:2]), "64/0.9": (keys[2:], predicted[2:])}
    by_key = retrieval.accuracy_by_key(cells)
    assert by_key["distinct digits"] == 0.5 and by_key["repeated digit"] == 0.5 and by_key["share repeated"] == 0.5
    assert by_key["by digit"] == [1.0, 0.75, 0.75, 0.75]  # by sample it would be [1, 0.75, 1, 0.5]
    assert retrieval.accuracy_by_cell(cells) == {"64/0.0": 0.5, "64/0.9": 0.5}
