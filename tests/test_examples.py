"""The example scripts in examples/, each run in-process through its `main(argv)` at its smallest size.

One tiny model is pretrained once (module fixture) and then fine-tuned, evaluated and sampled, so the whole
chain pretrain -> save_pretrained -> load works as the examples' README describes it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shlex
from pathlib import Path
from types import ModuleType

import pytest
import torch
from transformers import AutoModelForCausalLM

from nsa_hf.data import load_demo_corpus

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = ("pretrain", "finetune_lora", "generate_long", "evaluate_model", "convert_and_finetune")
ALL_SCRIPTS = (*SCRIPTS, "distributed_pretrain")


def load_example(name: str) -> ModuleType:
    """Import examples/<name>.py (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f"nsa_examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny matrices gain nothing from more threads, and OpenMP threads crawl when other processes share the cores.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def thread_calls(monkeypatch) -> list[int]:
    """The values passed to torch.set_num_threads while the test runs (the call still goes through)."""
    calls: list[int] = []
    set_num_threads = torch.set_num_threads

    def record(threads: int) -> None:
        calls.append(threads)
        set_num_threads(threads)

    monkeypatch.setattr(torch, "set_num_threads", record)
    return calls


def example_commands(text: str) -> list[tuple[str, list[str]]]:
    """(script name, its arguments) of each `python examples/X.py ...` or `accelerate launch ... examples/X.py ...`
    command line of `text`, continuation lines joined and `$NAME` replaced by an earlier `NAME="..."`."""
    variables: dict[str, list[str]] = {}
    commands = []
    for line in text.replace("\\\n", " ").splitlines():
        if not re.match(r"(python|accelerate|[A-Z_]+=)", line.strip()):  # prose, comments
            continue
        words = shlex.split(line, comments=True)
        if len(words) == 1 and "=" in words[0]:  # NAME="..."
            name, value = words[0].split("=", 1)
            variables[name] = shlex.split(value)
            continue
        scripts = [i for i, word in enumerate(words) if re.fullmatch(r"examples/\w+\.py", word)]
        if scripts:
            argv = []
            for word in words[scripts[0] + 1 :]:
                argv += variables[word[1:]] if word.startswith("$") else [word]
            commands.append((Path(words[scripts[0]]).stem, argv))
    return commands


@pytest.fixture(scope="module")
def text_files(tmp_path_factory) -> tuple[list[str], list[str]]:
    """Three small training documents and one held-out document."""
    directory = tmp_path_factory.mktemp("text")
    corpus = load_demo_corpus()
    paths = []
    for index, start in enumerate((0, 700_000, 1_600_000, 3_600_000)):
        path = directory / f"doc_{index}.txt"
        path.write_text(corpus[start : start + 20_000], encoding="utf-8")
        paths.append(str(path))
    return paths[:3], paths[3:]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, text_files) -> tuple[Path, dict]:
    """A 2-step pretraining run with padding-free packing; returns the output dir and the eval metrics."""
    output_dir = tmp_path_factory.mktemp("pretrained")
    train, validation = text_files
    metrics = load_example("pretrain").main(
        ["--train-files", *train, "--validation-files", *validation, "--output-dir", str(output_dir)]
        + ["--vocab-size", "384", "--tokenizer-chars", "40000", "--seq-len", "128", "--batch-size", "2"]
        + ["--max-steps", "2", "--max-eval-samples", "2", "--num-layers", "1"]
    )
    return output_dir, metrics


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_exits_zero(name: str, capsys):
    with pytest.raises(SystemExit) as excinfo:
        load_example(name).main(["--help"])
    assert excinfo.value.code == 0
    out = capsys.readouterr().out
    assert f"python examples/{name}.py" in out  # the epilog's example commands
    assert "--bf16" in out and "--nsa-backend" in out and "--threads" in out


def test_example_commands_reads_continuations_and_variables():
    text = 'x\nARGS="--num-layers 2 --seq-len 64"\npython examples/pretrain.py $ARGS \\\n    --bf16  # GPU\n'
    text += "  accelerate launch --config_file a.yaml examples/distributed_pretrain.py --batch-size 4\n"
    assert example_commands(text) == [
        ("pretrain", ["--num-layers", "2", "--seq-len", "64", "--bf16"]),
        ("distributed_pretrain", ["--batch-size", "4"]),
    ]


def test_documented_commands_use_the_scripts_flags():
    """Every example command in examples/README.md and in the scripts' --help parses with the script's flags,
    spelled with the names the scripts share."""
    readme = (EXAMPLES / "README.md").read_text(encoding="utf-8")
    texts = {"examples/README.md": "\n".join(re.findall(r"```bash\n(.*?)```", readme, re.DOTALL))}
    for name in ALL_SCRIPTS:
        module = load_example(name)
        texts[f"{name}.py --help"] = module.build_parser().format_help() + (module.__doc__ or "")
    for source, text in texts.items():
        commands = example_commands(text)
        assert commands, f"{source} shows no example command"
        for name, argv in commands:
            module = load_example(name)
            try:
                module.build_parser().parse_args(argv)
            except SystemExit:
                pytest.fail(f"{source}: `{name}.py {' '.join(argv)}` does not parse")
            old_spellings = sorted(set(argv) & set(getattr(module, "FLAG_ALIASES", {})))
            assert not old_spellings, f"{source}: `{name}.py` documented with {old_spellings}, not the shared names"
    documented = {name for text in texts.values() for name, _ in example_commands(text)}
    assert documented == set(ALL_SCRIPTS)


@pytest.mark.parametrize("name", ALL_SCRIPTS)
def test_every_script_takes_threads(name: str, capsys):
    parser = load_example(name).build_parser()
    assert parser.parse_args(["--threads", "1"]).threads == 1
    assert parser.parse_args([]).threads is None  # torch's own choice
    with pytest.raises(SystemExit) as excinfo:
        parser.parse_args(["--threads", "0"])
    assert excinfo.value.code == 2 and "argument --threads: must be >= 1" in capsys.readouterr().err


def test_distributed_pretrain_accepts_the_earlier_flag_spellings():
    parser = load_example("distributed_pretrain").build_parser()
    old = ["--steps", "3", "--per-device-batch", "5", "--layers", "4", "--heads", "8", "--kv-heads", "2"]
    new = ["--max-steps", "3", "--batch-size", "5", "--num-layers", "4", "--num-heads", "8", "--num-kv-heads", "2"]
    assert parser.parse_args(old) == parser.parse_args(new)
    assert "--layers" not in parser.format_help() and "--num-layers" in parser.format_help()


@pytest.mark.parametrize(
    ("name", "argv", "message"),
    [
        ("pretrain", ["--max-steps", "0"], "--max-steps must be >= 1"),
        ("pretrain", ["--train-files", "no/such/file.txt"], "no such file"),
        ("finetune_lora", ["--model-dir", "no/such/dir"], "holds no config.json"),
        ("generate_long", ["--context-length", "-5"], "--context-length must be >= 1"),
        ("evaluate_model", ["--depths", "1.5"], "--depths must lie in [0, 1]"),
        ("convert_and_finetune", ["--seq-len", "64", "--window-size", "64"], "must exceed --window-size"),
    ],
)
def test_bad_arguments_exit_with_a_message(name: str, argv: list[str], message: str, capsys):
    with pytest.raises(SystemExit) as excinfo:
        load_example(name).main(argv)
    assert excinfo.value.code == 2
    assert message in capsys.readouterr().err


def test_pretrain_saves_a_loadable_model(pretrained):
    output_dir, metrics = pretrained
    assert {"config.json", "model.safetensors", "tokenizer.json", "eval_results.json"} <= {
        path.name for path in output_dir.iterdir()
    }
    assert math.isfinite(metrics["eval_loss"]) and 1.0 < metrics["perplexity"] < 1e4

    from nsa_hf import NsaForCausalLM

    assert isinstance(AutoModelForCausalLM.from_pretrained(output_dir), NsaForCausalLM)


def test_pretrain_concat_packing(tmp_path, text_files, thread_calls):
    train, _ = text_files
    metrics = load_example("pretrain").main(
        ["--train-files", *train, "--output-dir", str(tmp_path), "--packing", "concat", "--max-steps", "1"]
        + ["--vocab-size", "384", "--tokenizer-chars", "40000", "--seq-len", "128", "--batch-size", "2"]
        + ["--num-layers", "1", "--threads", "1"]
    )
    assert thread_calls[:1] == [1]
    assert metrics == {}  # no validation files
    assert (tmp_path / "model.safetensors").is_file()


def test_bundled_corpus_is_written_as_one_file_per_novel(tmp_path):
    train, validation = load_example("pretrain").write_bundled_corpus(tmp_path)
    assert len(train) == 5 and len(validation) == 1
    assert Path(validation[0]).read_text(encoding="utf-8").startswith("Persuasion")


def test_finetune_lora_saves_adapter_and_merged_model(tmp_path, pretrained, thread_calls):
    model_dir, _ = pretrained
    result = load_example("finetune_lora").main(
        ["--model-dir", str(model_dir), "--output-dir", str(tmp_path), "--max-steps", "2", "--batch-size", "2"]
        + ["--seq-len", "64", "--max-train-samples", "8", "--threads", "1"]
    )
    assert thread_calls[:1] == [1]
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert {"q_proj", "compress_k_proj", "window_v_proj"} <= set(adapter_config["target_modules"])
    assert math.isfinite(result["train_loss"])
    assert result["merge_max_abs_diff"] < 1e-4


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_convert_and_finetune_converts_exactly_then_trains_past_the_window(tmp_path, thread_calls, lora):
    result = load_example("convert_and_finetune").main(
        ["--output-dir", str(tmp_path), "--max-steps", "2", "--batch-size", "2", "--seq-len", "96", "--threads", "1"]
        + (["--lora-r", "4"] if lora else [])
    )
    assert thread_calls[:1] == [1]
    assert result["conversion_max_difference"] < 1e-4
    assert math.isfinite(result["train_loss"])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert model.config.model_type == "nsa" and model.config.window_size == 64
    assert not any("lora" in name for name, _ in model.named_parameters())  # merged back into plain weights


def test_generate_long_reports_times_and_cache_memory(tmp_path, thread_calls):
    report_path = tmp_path / "report.json"
    report = load_example("generate_long").main(
        ["--context-length", "200", "--max-new-tokens", "3", "--no-warmup", "--output-json", str(report_path)]
        + ["--threads", "1"]
    )
    assert thread_calls[:1] == [1]
    assert json.loads(report_path.read_text()) == report
    assert report["new_tokens"] == 3
    assert report["prefill_seconds"] > 0 and report["decode_seconds_per_token_mean"] > 0
    assert report["nsa_cache_bytes"] > 0 and report["dense_kv_cache_bytes"] > 0
    assert 0 < report["nsa_keys_per_query"] <= report["dense_keys_per_query"] == 202


def test_evaluate_model_writes_results_and_heatmap(tmp_path, pretrained, thread_calls):
    model_dir, _ = pretrained
    results = load_example("evaluate_model").main(
        ["--model-dir", str(model_dir), "--output-dir", str(tmp_path), "--ppl-seq-len", "64"]
        + ["--ppl-max-chunks", "2", "--context-lengths", "160", "200", "--depths", "0", "1", "--samples", "1"]
        + ["--threads", "1"]
    )
    assert thread_calls[:1] == [1]
    assert json.loads((tmp_path / "results.json").read_text())["model"] == str(model_dir)
    assert (tmp_path / "passkey_retrieval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert math.isfinite(results["perplexity"]["loss"]) and results["perplexity"]["perplexity"] > 1.0
    passkey = results["passkey_retrieval"]
    assert passkey["num_samples"] == 4 and 0.0 <= passkey["accuracy"] <= 1.0
    assert set(passkey["by_context_length"]) == {160, 200} and set(passkey["by_depth"]) == {0.0, 1.0}
    assert len(passkey["by_context_length_and_depth"]) == 4


def test_evaluate_model_rejects_a_context_too_short_for_the_prompt(tmp_path):
    with pytest.raises(SystemExit, match="too short"):
        load_example("evaluate_model").main(["--output-dir", str(tmp_path), "--context-lengths", "50"])


def test_passkey_metric_scores_the_first_number():
    import evaluate

    metric = evaluate.load(str(EXAMPLES / "metrics" / "passkey_retrieval"))
    result = metric.compute(
        predictions=[" 12345. Remember", "The key is 999", "no digits", " 4242"],
        references=["12345", "12345", "777", "4242"],
        context_lengths=[100, 100, 200, 200],
        depths=[0.0, 1.0, 0.0, 1.0],
    )
    assert result["accuracy"] == 0.5
    assert result["by_context_length"] == {100: 0.5, 200: 0.5}
    assert result["by_depth"] == {0.0: 0.5, 1.0: 0.5}
    assert {(c["context_length"], c["depth"]): c["accuracy"] for c in result["by_context_length_and_depth"]} == {
        (100, 0.0): 1.0,
        (100, 1.0): 0.0,
        (200, 0.0): 0.0,
        (200, 1.0): 1.0,
    }


def test_distributed_pretrain_runs_agree_and_compare_reports_them(tmp_path, thread_calls):
    """Two runs with the same global batch log the same losses; --compare reports their difference and speedup."""
    script = load_example("distributed_pretrain")
    tiny = ["--max-steps", "2", "--seq-len", "64", "--hidden-size", "32", "--intermediate-size", "64"]
    tiny += ["--num-layers", "1", "--num-heads", "2", "--num-kv-heads", "1", "--window-size", "32"]
    tiny += ["--num-selected-blocks", "3", "--vocab-size", "300", "--threads", "1"]
    for name in ("a", "b"):
        script.main([*tiny, "--output-dir", str(tmp_path / name)])
    assert thread_calls[:1] == [1]
    record = json.loads((tmp_path / "a" / "losses.json").read_text())
    assert record["global_batch"] == 2 and len(record["losses"]) == 2 and all(math.isfinite(x) for x in record["losses"])
    report = script.compare([tmp_path / "a", tmp_path / "b"])
    assert report["runs"][0]["max_abs_loss_diff"] < 1e-5
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--help"])
    assert exit_info.value.code == 0
