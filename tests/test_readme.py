"""README.md's code blocks: every ```python block runs as written, and the ```bash blocks are the known commands.

Each ```python block runs in a fresh namespace, with a temporary folder as the working directory (so files it
writes, such as "my-nsa", land there) and one torch thread. A block that cannot run here (it needs a GPU, a Hub
login, ...) says so on the line before its fence, `<!-- no-run: the reason -->`; it is then only compiled. Keep
such blocks rare. The ```bash blocks install packages, so they are not run: they must be the known commands,
and what they name (extras, the pinned torch, the console script, the tests folder) must exist.
"""

from __future__ import annotations

import configparser
import contextlib
import io
import math
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"

# The README's first two blocks, in this order: what a newcomer runs first.
KNOWN_BASH_BLOCKS = [
    'pip install torch==2.13.0 && pip install -e ".[demo]" && nsa-hf demo',
    'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest tests -q -n auto',
]

FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
NO_RUN = re.compile(r"<!--\s*no-run:(.*?)-->")


@dataclass(frozen=True)
class Block:
    language: str
    code: str
    line: int  # line number of the opening fence
    section: str  # the last "## " heading above the block
    no_run: str | None  # the reason given by a `<!-- no-run: ... -->` line just above the fence


def code_blocks(markdown: str) -> list[Block]:
    """The fenced code blocks of `markdown`, in order."""
    blocks = []
    for match in FENCE.finditer(markdown):
        before = markdown[: match.start()]
        previous_lines = [line.strip() for line in before.splitlines() if line.strip()]
        marker = NO_RUN.fullmatch(previous_lines[-1]) if previous_lines else None
        headings = re.findall(r"^## (.+)$", before, re.MULTILINE)
        blocks.append(
            Block(
                language=match[1],
                code=match[2],
                line=before.count("\n") + 1,
                section=headings[-1].strip() if headings else "",
                no_run=marker[1].strip() if marker else None,
            )
        )
    return blocks


BLOCKS = code_blocks(README.read_text(encoding="utf-8"))
PYTHON_BLOCKS = [block for block in BLOCKS if block.language == "python"]
RUNNABLE = [block for block in PYTHON_BLOCKS if block.no_run is None]


@dataclass
class Run:
    namespace: dict
    stdout: str
    cwd: Path


@pytest.fixture(scope="module")
def run_block(tmp_path_factory):
    """Runs a README block once (later calls reuse the result) and returns its namespace, stdout and folder."""
    runs: dict[int, Run] = {}

    def run(block: Block) -> Run:
        if block.line not in runs:
            cwd = tmp_path_factory.mktemp(f"readme_line{block.line}")
            # Leading newlines make tracebacks name the README's own line numbers.
            code = compile("\n" * block.line + block.code, str(README), "exec")
            namespace = {"__name__": "__main__"}
            stdout = io.StringIO()
            previous_dir, previous_threads = os.getcwd(), torch.get_num_threads()
            # One thread: the README's small sizes gain nothing from more, and OpenMP threads crawl on busy cores.
            torch.set_num_threads(1)
            os.chdir(cwd)
            try:
                with contextlib.redirect_stdout(stdout):
                    exec(code, namespace)
            finally:
                os.chdir(previous_dir)
                torch.set_num_threads(previous_threads)
            runs[block.line] = Run(namespace, stdout.getvalue(), cwd)
        return runs[block.line]

    return run


def only_block(section: str, contains: str) -> Block:
    """The one runnable block of `section` whose code contains `contains`."""
    found = [block for block in RUNNABLE if block.section == section and contains in block.code]
    assert len(found) == 1, f"expected one runnable ```python block in '## {section}' with {contains!r}, got {found}"
    return found[0]


def test_code_blocks_reads_language_line_section_and_no_run_marker():
    markdown = (
        "# Title\n\n```bash\necho hi\n```\n\n## Usage\n\ntext\n\n"
        "<!-- no-run: needs a GPU -->\n```python\nimport triton\n```\n\n```python\nx = 1\n```\n"
    )
    assert code_blocks(markdown) == [
        Block("bash", "echo hi\n", 3, "", None),
        Block("python", "import triton\n", 12, "Usage", "needs a GPU"),
        Block("python", "x = 1\n", 16, "Usage", None),
    ]


def test_readme_python_blocks_are_runnable_or_say_why_not():
    assert len(RUNNABLE) >= 2, "the README's quickstart has runnable ```python blocks"
    for block in PYTHON_BLOCKS:
        if block.no_run is not None:
            assert block.no_run, f"README.md:{block.line}: a no-run marker must give its reason"
            compile(block.code, f"README.md:{block.line}", "exec")
    untested = sorted({block.language for block in BLOCKS} - {"python", "bash"})
    assert not untested, f"README blocks this file does not check: {untested} (tag every fence python or bash)"


@pytest.mark.parametrize("block", RUNNABLE, ids=[f"README.md:{block.line}" for block in RUNNABLE])
def test_readme_python_block_runs_and_prints(block: Block, run_block):
    run = run_block(block)
    assert run.stdout.strip(), f"README.md:{block.line} prints nothing: show the reader what to expect"


def test_quickstart_block_trains_generates_and_reloads(run_block):
    block = only_block("Quickstart", "NsaForCausalLM(config)")
    run = run_block(block)
    ns = run.namespace
    model, config = ns["model"], ns["config"]
    # An untrained model predicts about uniformly, and the loss reaches every parameter.
    assert abs(ns["loss"].item() - math.log(config.vocab_size)) < 0.5
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    # generate() ran and appended 20 tokens to the prompt (shapes only: what they are is tests/test_generate.py's).
    out, prompt = ns["out"], ns["prompt"]
    assert out.dtype == torch.long and out.shape == (1, prompt.shape[1] + 20)
    assert torch.equal(out[:, : prompt.shape[1]], prompt)
    assert (run.cwd / "my-nsa" / "config.json").is_file()
    assert type(ns["reloaded"]) is type(model) and ns["same"] is True
    assert f"loss {ns['loss'].item():.2f}" in run.stdout and "identical logits: True" in run.stdout


def test_operator_block_shapes_and_packing(run_block):
    run = run_block(only_block("Quickstart", "from nsa_hf.ops import"))
    ns = run.namespace
    B, T, HQ, H, D = ns["B"], ns["T"], ns["HQ"], ns["H"], ns["D"]
    assert ns["k_cmp"].shape == (B, (T - 32) // 16 + 1, H, D)
    assert ns["block_indices"].shape == (B, T, H, 4)
    for name in ("o_cmp", "o_slc", "o_win", "o"):
        assert ns[name].shape == (B, T, HQ, D), name
    # Packed: each document has its own complete blocks (200 tokens: 11; 312 tokens: 18).
    assert ns["k1_cmp"].shape == (1, 11 + 18, H, D)
    assert "second document packed == alone: True" in run.stdout


def test_readme_bash_blocks_are_the_known_commands():
    bash = [block.code.strip() for block in BLOCKS if block.language == "bash"]
    assert bash == KNOWN_BASH_BLOCKS
    assert [block.code.strip() for block in BLOCKS[:2]] == KNOWN_BASH_BLOCKS, "install + demo, install + tests first"


@pytest.mark.parametrize("command", KNOWN_BASH_BLOCKS)
def test_readme_bash_commands_name_what_the_repository_has(command: str):
    """The extras, the pinned torch, the console script and its arguments, the tests folder all exist."""
    setup = configparser.ConfigParser()
    setup.read(REPO_ROOT / "setup.cfg", encoding="utf-8")
    extras = set(setup["options.extras_require"])
    requires = {Requirement(line).name: Requirement(line) for line in setup["options"]["install_requires"].split()}
    console_scripts = setup["options.entry_points"]["console_scripts"].splitlines()
    scripts = dict(line.replace(" ", "").split("=") for line in console_scripts if line)
    for part in command.split("&&"):
        argv = shlex.split(part)
        if argv[:3] == ["pip", "install", "-e"]:
            extra = re.fullmatch(r"\.\[(\w+)\]", argv[3])
            assert extra and extra[1] in extras, argv
        elif argv[:2] == ["pip", "install"]:
            for requirement in map(Requirement, argv[2:]):
                assert requirement.name in requires, requirement
                pinned = next(iter(requirement.specifier)).version
                assert requires[requirement.name].specifier.contains(pinned), (requirement, requires[requirement.name])
        elif argv[0] == "nsa-hf":
            assert scripts["nsa-hf"] == "nsa_hf.cli:main"
            from nsa_hf.cli import build_parser

            assert build_parser().parse_args(argv[1:]).command == argv[1]
        elif argv[:3] == ["python", "-m", "pytest"]:
            test_extra = setup["options.extras_require"]["test"]
            assert (REPO_ROOT / argv[3]).is_dir() and "pytest" in test_extra
            assert "-n" not in argv or "pytest-xdist" in test_extra  # the workers' option is pytest-xdist's
        else:
            pytest.fail(f"unexpected command in a README bash block: {part!r}")
