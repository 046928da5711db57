"""Sharing on the Hub: generated remote code, auto_map, loading without nsa-hf, model cards, push_to_hub."""

from __future__ import annotations

import ast
import configparser
import graphlib
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import EntryNotFoundError
from packaging.requirements import InvalidRequirement, Requirement
from safetensors.torch import load as load_safetensors
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.dynamic_module_utils import get_imports, get_relative_import_files

from nsa_hf import NsaForCausalLM
from nsa_hf.cli import main
from nsa_hf.model_card import model_card_template, render_model_card
from nsa_hf.remote_code import AUTO_MAP, HEADER, REQUIRED_PACKAGES, _rewrite, remote_code_files, write_remote_code

from .factories import make_model, tiny_config

REPO_ROOT = Path(__file__).resolve().parents[1]
REGENERATE = "run `nsa-hf export-remote-code` in the repository root (it rewrites modeling/ from src/nsa_hf)"
TRAINING = {"dataset": "Jane Austen novels", "tokens": 245_760, "steps": 120, "loss": 3.21}


def test_modeling_folder_matches_the_package(tmp_path):
    assert main(["export-remote-code", str(tmp_path)]) == 0
    committed = {p.name: p.read_bytes() for p in (REPO_ROOT / "modeling").iterdir()}
    fresh = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert sorted(committed) == sorted(fresh), f"modeling/ has other files than the generator writes: {REGENERATE}"
    stale = sorted(name for name in fresh if committed[name] != fresh[name])
    assert not stale, f"modeling/ is stale ({', '.join(stale)}): {REGENERATE}"


def test_remote_code_is_flat_and_needs_only_torch_and_transformers(tmp_path):
    paths = {path.name: path for path in write_remote_code(tmp_path)}
    kernels = {"nsa_ops_triton.py", "nsa_ops_triton_common.py", "nsa_ops_triton_interval.py"}
    assert {"configuration_nsa.py", "modeling_nsa.py", *kernels} <= set(paths)
    for name, path in paths.items():
        text = path.read_text(encoding="utf-8")
        assert text.startswith(HEADER)
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                assert all(alias.name.split(".")[0] != "nsa_hf" for alias in node.names), name
            elif isinstance(node, ast.ImportFrom):
                assert node.level in (0, 1) and node.module, f"{name}: {ast.unparse(node)}"
                assert node.level == 1 or node.module.split(".")[0] != "nsa_hf", f"{name}: {ast.unparse(node)}"
                if node.level == 1:
                    assert f"{node.module}.py" in paths, f"{name}: {ast.unparse(node)}"
        # What transformers' check_imports demands on the loading machine (it skips try blocks).
        third_party = set(get_imports(path)) - set(sys.stdlib_module_names)
        assert third_party <= REQUIRED_PACKAGES, f"{name} needs {sorted(third_party - REQUIRED_PACKAGES)}"
    text = paths["nsa_ops_triton_interval.py"].read_text(encoding="utf-8")
    assert "try:" in text and "    import triton\n" in text  # guarded, not dropped
    # transformers copies the files it can reach through `from .x import`: all of them, kernels included.
    roots = {f"{reference.split('.')[0]}.py" for reference in AUTO_MAP.values()}
    reached = {Path(f).name for root in roots for f in get_relative_import_files(paths[root])}
    assert reached | roots == set(paths)


def test_write_remote_code_replaces_only_generated_files(tmp_path):
    (tmp_path / "nsa_ops_removed.py").write_text(HEADER + "x = 1\n", encoding="utf-8")
    (tmp_path / "handwritten.py").write_text("x = 1\n", encoding="utf-8")
    write_remote_code(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.py")) == sorted([*remote_code_files(), "handwritten.py"])
    with pytest.raises(ValueError, match="`directory`"):
        write_remote_code(tmp_path / "handwritten.py")


def test_remote_code_leaves_out_the_methods_that_import_the_hub_plumbing():
    files = remote_code_files()
    assert "def save_pretrained" not in files["configuration_nsa.py"]
    assert "def push_to_hub" not in files["modeling_nsa.py"]
    method = "class A:\n    x = 1\n\n    # Package only.\n    def push(self):\n        from .hub import push_to_hub\n"
    text, dependencies = _rewrite(method, "nsa_hf.modeling_nsa")
    assert text == HEADER + "class A:\n    x = 1\n" and dependencies == []
    with pytest.raises(ValueError, match="only inside methods"):
        _rewrite("from .hub import push_to_hub\n", "nsa_hf.modeling_nsa")


def package_modules(root: Path) -> dict[str, Path]:
    """{dotted module name: source file} of the package at `root`; a package's name maps to its __init__.py."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules that `name` imports, at module level or inside functions, as Python resolves them:
    `from pkg import x` imports the module `pkg.x` when there is one, else `pkg`."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            anchor = package.rsplit(".", node.level - 1)[0] if node.level else ""  # `..` is the parent package
            base = ".".join(part for part in (anchor, node.module) if part)
            targets.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
    # Importing `nsa_hf.ops.layout` also runs `nsa_hf/ops/__init__.py`, unless the importer is inside `nsa_hf.ops`.
    ancestors = {".".join(t.split(".")[:i]) for t in targets for i in range(1, t.count(".") + 1)}
    targets |= {a for a in ancestors if not (name == a or name.startswith(f"{a}."))}
    return targets & set(modules) - {name}


def test_package_imports_have_no_cycle_even_lazy_ones():
    modules = package_modules(REPO_ROOT / "src" / "nsa_hf")
    graph = {name: imported_modules(name, path, modules) for name, path in modules.items()}
    # The Hub plumbing sits below the classes that delegate to it, and the card renderer below it.
    assert {"nsa_hf.hub"} <= graph["nsa_hf.modeling_nsa"] & graph["nsa_hf.configuration_nsa"]
    assert graph["nsa_hf.hub"] == {"nsa_hf.model_card", "nsa_hf.remote_code"}
    assert graph["nsa_hf.model_card"] == set() and graph["nsa_hf.remote_code"] == set()
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as error:
        # The cycle comes as each module followed by one that imports it; reversed, each imports the next.
        pytest.fail(f"import cycle: {' -> '.join(reversed(error.args[1]))}")


LOAD_WITHOUT_NSA_HF = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class BlockNsaHf(importlib.abc.MetaPathFinder):
        # nsa-hf stays unimportable however it is installed (editable or not).
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] == "nsa_hf":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    sys.meta_path.insert(0, BlockNsaHf())
    try:
        import nsa_hf
        nsa_hf_importable = True
    except ModuleNotFoundError:
        nsa_hf_importable = False

    import torch
    from transformers import AutoModelForCausalLM

    model_dir, inputs_file, logits_file = sys.argv[1:]
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()
    with torch.no_grad():
        torch.save(model(torch.load(inputs_file)).logits, logits_file)
    print(json.dumps({
        "nsa_hf_importable": nsa_hf_importable,
        "nsa_hf_modules": sorted(m for m in sys.modules if m.partition(".")[0] == "nsa_hf"),
        "model_module": type(model).__module__,
    }))
    """
)


def test_saved_model_loads_with_trust_remote_code_where_nsa_hf_is_not_installed(tmp_path):
    model = make_model(tiny_config())
    model_dir = tmp_path / "tiny-nsa"
    model.save_pretrained(model_dir)
    assert json.loads((model_dir / "config.json").read_text())["auto_map"] == AUTO_MAP
    for name, text in remote_code_files().items():
        assert (model_dir / name).read_text(encoding="utf-8") == text
    # Where nsa-hf is imported, its own classes load the folder; auto_map does not take over.
    assert type(AutoModelForCausalLM.from_pretrained(model_dir)) is NsaForCausalLM

    input_ids = torch.arange(5, 69).remainder(model.config.vocab_size)[None]
    with torch.no_grad():
        expected = model(input_ids).logits
    torch.save(input_ids, tmp_path / "input_ids.pt")
    hf_dirs = {"HF_HOME": str(tmp_path / "hf"), "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    arguments = [str(model_dir), str(tmp_path / "input_ids.pt"), str(tmp_path / "logits.pt")]
    result = subprocess.run(
        [sys.executable, "-I", "-c", LOAD_WITHOUT_NSA_HF, *arguments],
        check=False, capture_output=True, text=True, env={**os.environ, **hf_dirs}, cwd=tmp_path, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["nsa_hf_importable"] is False and report["nsa_hf_modules"] == []
    assert report["model_module"].startswith("transformers_modules.")  # the dynamic module of remote code
    assert report["model_module"].endswith(".modeling_nsa")
    logits = torch.load(tmp_path / "logits.pt")
    assert logits.dtype == torch.float32 and logits.shape == expected.shape
    assert torch.allclose(logits, expected, atol=1e-5), (logits - expected).abs().max()


def test_model_card_states_the_config_and_training():
    config = tiny_config()
    text = render_model_card(config, training=TRAINING, repo_id="user/tiny-nsa")
    card = ModelCard(text)
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert card.data.license == "apache-2.0" and {"nsa", "sparse-attention"} <= set(card.data.tags)
    parameters = make_model(config).num_parameters()
    for row in (
        "| layers | 2 |", "| hidden size | 48 |", "| attention heads | 4 |", "| key/value heads | 2 |",
        "| head dim | 8 |", "| vocabulary | 97 |", f"| parameters | {parameters:,} ",
        "| `compress_block_size` | l | 8 |", "| `compress_stride` | d | 4 |", "| `select_block_size` | l' | 16 |",
        "| `num_selected_blocks` | n | 3 |", "| `num_init_blocks` | - | 1 |", "| `num_local_blocks` | - | 1 |",
        "| `window_size` | w | 12 |", "| `compression_type` | phi | mlp |", "| `branch_kv` | - | independent |",
        "| dataset | Jane Austen novels |", "| tokens seen | 245,760 |", "| optimizer steps | 120 |",
        "| final training loss | 3.2100 |", "# tiny-nsa", 'pip install "torch>=2.11" "transformers>=5.17"',
        'from_pretrained("user/tiny-nsa", trust_remote_code=True)', "`pip install -e .`",
    ):
        assert row in text, row
    assert "No training details" in render_model_card(config)
    with pytest.raises(ValueError, match="`config` must be an NSA config"):
        render_model_card(LlamaConfig())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"training": {"epochs": 3}}, r"`training` takes the keys .*'epochs'"),
        ({"training": {"steps": "120"}}, r"`training\['steps'\]` must be int"),
        ({"training": {"loss": True}}, r"`training\['loss'\]` must be int or float"),
    ],
)
def test_model_card_rejects_bad_training_metadata(kwargs, match):
    with pytest.raises(ValueError, match=match):
        render_model_card(tiny_config(), **kwargs)


def test_model_card_template_copy_matches_the_package():
    committed = (REPO_ROOT / "model_cards" / "TEMPLATE.md").read_text(encoding="utf-8")
    assert committed == model_card_template(), (
        "model_cards/TEMPLATE.md differs from the template the package reads: edit "
        "src/nsa_hf/model_card_template.md, then `cp src/nsa_hf/model_card_template.md model_cards/TEMPLATE.md`"
    )


def index_installs_of_nsa_hf(text: str) -> list[str]:
    """The `pip install` commands in `text` that ask the package index for nsa-hf, which it does not have
    (an editable install, a path or a `nsa-hf @ URL` direct reference is fine), stripped."""
    found = []
    for command in re.findall(r"pip install ([^`\n;&|]*)", text):  # up to the end of the command
        try:
            args = shlex.split(command)
        except ValueError:  # an unbalanced quote in prose
            args = command.split()
        args = [re.sub(r"^['\"(]+|['\").,:]+$", "", arg) for arg in args]  # prose and quotes around the command
        for index, arg in enumerate(args):
            if arg.startswith("-") or args[index - 1] in ("-e", "--editable") or args[index + 1 : index + 2] == ["@"]:
                continue
            try:
                requirement = Requirement(arg)
            except InvalidRequirement:  # ".", ".[triton]", a URL
                continue
            if requirement.url is None and requirement.name.lower().replace("_", "-") == "nsa-hf":
                found.append(f"pip install {command}".strip())
    return found


def test_index_installs_of_nsa_hf_finds_registry_installs_only():
    assert index_installs_of_nsa_hf("run `pip install nsa-hf` or\npip install -U 'nsa_hf[triton]>=0.1'") == [
        "pip install nsa-hf",
        "pip install -U 'nsa_hf[triton]>=0.1'",
    ]
    prose = "needs triton (pip install 'nsa-hf[triton]')."
    assert index_installs_of_nsa_hf(prose) == ["pip install 'nsa-hf[triton]')."]
    fine = 'pip install -e . && pip install -e ".[triton]" torch\npip install "nsa-hf @ git+https://x/nsa-hf"'
    assert index_installs_of_nsa_hf(fine) == []


def test_model_card_and_docs_install_nothing_the_package_index_lacks():
    """nsa-hf is not on the package index: the card's install line is torch + transformers (remote code)."""
    card = render_model_card(tiny_config(), repo_id="user/tiny-nsa")
    assert index_installs_of_nsa_hf(card) == []
    docs = [REPO_ROOT / "README.md", REPO_ROOT / "examples" / "README.md", *(REPO_ROOT / "modeling").glob("*.py")]
    docs += [*(REPO_ROOT / "src" / "nsa_hf").rglob("*.py"), *(REPO_ROOT / "src" / "nsa_hf").rglob("*.md")]
    for path in docs:
        assert index_installs_of_nsa_hf(path.read_text(encoding="utf-8")) == [], path
    # The card's lower bounds are the package's own requirements.
    setup = configparser.ConfigParser()
    setup.read(REPO_ROOT / "setup.cfg", encoding="utf-8")
    requires = [Requirement(line) for line in setup["options"]["install_requires"].split()]
    bounds = {requirement.name: str(requirement.specifier) for requirement in requires}
    assert 'pip install "torch{torch}" "transformers{transformers}"'.format(**bounds) in card


def test_model_card_cli(tmp_path, capsys):
    config = tiny_config()
    config.save_pretrained(tmp_path)
    assert main(["model-card", str(tmp_path), "--repo-id", "user/tiny-nsa", "--steps", "120", "--loss", "3.21"]) == 0
    expected = render_model_card(config, training={"steps": 120, "loss": 3.21}, repo_id="user/tiny-nsa")
    assert capsys.readouterr().out == expected


@pytest.fixture
def hub(monkeypatch):
    """The Hub API, mocked at its boundary: records created repos and the files of each commit."""
    calls = SimpleNamespace(repos=[], commits=[], existing_card=None)

    def create_repo(self, repo_id, **kwargs):
        calls.repos.append(repo_id)
        return SimpleNamespace(repo_id=repo_id)

    def load_card(cls, repo_id, **kwargs):
        if calls.existing_card is None:
            raise EntryNotFoundError(f"{repo_id} has no README.md")
        return ModelCard(calls.existing_card)

    def create_commit(self, repo_id, operations, commit_message=None, **kwargs):
        files = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations}  # gone after push
        calls.commits.append(SimpleNamespace(repo_id=repo_id, message=commit_message, files=files))
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(ModelCard, "load", classmethod(load_card))
    return calls


def test_push_to_hub_uploads_weights_config_remote_code_and_card(hub):
    model = make_model(tiny_config())
    commit_info = model.push_to_hub("user/tiny-nsa", training=TRAINING, tags=["demo"], commit_message="Add tiny NSA")
    assert commit_info == "commit-info"
    assert hub.repos == ["user/tiny-nsa"] and len(hub.commits) == 1
    commit = hub.commits[0]
    assert commit.repo_id == "user/tiny-nsa" and commit.message == "Add tiny NSA"
    expected_files = {"config.json", "generation_config.json", "model.safetensors", "README.md", *remote_code_files()}
    assert set(commit.files) == expected_files
    assert json.loads(commit.files["config.json"])["auto_map"] == AUTO_MAP
    for name, text in remote_code_files().items():
        assert commit.files[name].decode("utf-8") == text
    weights = load_safetensors(commit.files["model.safetensors"])
    assert weights and all(torch.equal(tensor, model.state_dict()[name]) for name, tensor in weights.items())
    card = ModelCard(commit.files["README.md"].decode("utf-8"))
    rendered = ModelCard(render_model_card(model.config, training=TRAINING, repo_id="user/tiny-nsa"))
    assert card.text == rendered.text and card.data.tags == [*rendered.data.tags, "demo"]


def test_push_to_hub_keeps_an_existing_card(hub):
    hub.existing_card = "---\nlicense: mit\n---\n# My own card\n"
    make_model(tiny_config()).push_to_hub("user/tiny-nsa", tags="demo")
    card = ModelCard(hub.commits[0].files["README.md"].decode("utf-8"))
    assert card.text.strip() == "# My own card" and card.data.license == "mit" and card.data.tags == ["demo"]
