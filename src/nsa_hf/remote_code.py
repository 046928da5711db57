"""Remote code for the Hub: the package's model files, flattened for `trust_remote_code=True`.

transformers loads remote code from one flat folder: it copies the file named in `auto_map` and,
recursively, the files it imports with `from .x import y` (subpackages, `..` and `from . import x` are
invisible to it), and it refuses to load a file whose top-level imports are not installed unless they sit
in a try block. So the files are generated from the package, deterministically:

- the modules that `configuration_nsa` and `modeling_nsa` import, recursively, become sibling files
  (`nsa_hf.ops.layout` -> `nsa_ops_layout.py`, a subpackage's `__init__` `nsa_hf.ops.triton` -> `nsa_ops_triton.py`;
  top-level modules keep their names, which `auto_map` uses);
- their imports become flat relative imports; `from . import module` becomes an import of the names used
  (`module.name` -> `module_name`), which transformers can follow;
- optional third-party imports (triton) are wrapped in try blocks that re-raise, so nothing
  changes at run time but transformers' `check_imports` does not demand them;
- the methods that import `hub` (the package's Hub plumbing: remote code, model cards, uploads) are left
  out: transformers saves and pushes remote-code classes itself (copying their own files, writing `auto_map`).

`modeling/` at the repository root holds these files; regenerate it with `nsa-hf export-remote-code`.
"""

from __future__ import annotations

import ast
import functools
import importlib.resources
import os
import re
import sys
from pathlib import Path

__all__ = ["AUTO_MAP", "HEADER", "remote_code_files", "write_remote_code"]

PACKAGE = __name__.rpartition(".")[0]
HEADER = "# Generated from src/nsa_hf by `nsa-hf export-remote-code` (nsa_hf/remote_code.py); do not edit.\n"
ROOT_MODULES = (f"{PACKAGE}.configuration_nsa", f"{PACKAGE}.modeling_nsa")
AUTO_MAP = {
    "AutoConfig": "configuration_nsa.NsaConfig",
    "AutoModel": "modeling_nsa.NsaModel",
    "AutoModelForCausalLM": "modeling_nsa.NsaForCausalLM",
}
# The Hub plumbing: the methods that import it are package only, and the remote code never imports it.
HUB_MODULE = f"{PACKAGE}.hub"
# Installed wherever transformers runs; any other third-party import is optional.
REQUIRED_PACKAGES = frozenset({"torch", "transformers", "huggingface_hub"})
OPTIONAL_IMPORT_COMMENT = "optional package: in a try block, transformers' check_imports does not require it"
MAX_LINE = 120
FROM_CLAUSE = re.compile(rb"from\s+[\w.]+\s+")


def _flat_name(module: str) -> str:
    parts = module.split(".")[1:]
    return parts[0] if len(parts) == 1 else "_".join(["nsa", *parts])


def _source_file(module: str) -> importlib.resources.abc.Traversable:
    """The module's file: `name.py`, or a subpackage's `name/__init__.py`."""
    *packages, name = module.split(".")[1:]
    file = importlib.resources.files(PACKAGE).joinpath(*packages, f"{name}.py")
    return file if file.is_file() else importlib.resources.files(PACKAGE).joinpath(*packages, name, "__init__.py")


def _is_package(module: str) -> bool:
    return _source_file(module).name == "__init__.py"


def _is_module(module: str) -> bool:
    return module.startswith(f"{PACKAGE}.") and _source_file(module).is_file()


def _line_offsets(source: bytes) -> list[int]:
    """Byte offset of the start of each line (1-based line numbers index it directly)."""
    offsets = [0, 0]
    for line in source.splitlines(keepends=True):
        offsets.append(offsets[-1] + len(line))
    return offsets


def _apply(source: str, edits: list[tuple[int, int, str]]) -> str:
    """Replaces byte ranges [start, end) of the UTF-8 source (ast offsets are in bytes)."""
    data = source.encode("utf-8")
    for start, end, text in sorted(edits, reverse=True):
        data = data[:start] + text.encode("utf-8") + data[end:]
    return data.decode("utf-8")


def _imports_hub(module: str, function: ast.FunctionDef) -> bool:
    """Whether `function` (in `module`) imports the Hub plumbing anywhere in its body."""
    return any(
        isinstance(node, ast.ImportFrom) and _resolve(module, node) == HUB_MODULE for node in ast.walk(function)
    )


def _drop_methods(source: str, module: str) -> str:
    """Removes the package-only methods of `module` (those importing `hub`), with the lines above them."""
    tree = ast.parse(source)
    lines = source.encode("utf-8").splitlines(keepends=True)  # ast's line breaks, unlike str.splitlines
    spans = []
    for body in (node.body for node in tree.body if isinstance(node, ast.ClassDef)):
        for index, node in enumerate(body):
            if isinstance(node, ast.FunctionDef) and _imports_hub(module, node):
                # From the end of the previous statement: the blank lines and comments above go too.
                first = body[index - 1].end_lineno + 1 if index else min(d.lineno for d in [node, *node.decorator_list])
                spans.append((first, node.end_lineno))
    for first, last in sorted(spans, reverse=True):
        del lines[first - 1 : last]
    return b"".join(lines).decode("utf-8")


def _resolve(module: str, node: ast.ImportFrom) -> str | None:
    """The package module a `from ... import` statement reads from, or None for other packages."""
    if node.level == 0:
        name = node.module or ""
        return name if name == PACKAGE or name.startswith(f"{PACKAGE}.") else None
    parts = module.split(".")
    base = parts[: len(parts) - node.level + _is_package(module)]  # a package's `.` is the package itself
    return ".".join(base + ([node.module] if node.module else []))


def _is_optional_import(node: ast.stmt) -> bool:
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        names = [node.module]
    else:
        return False
    tops = {name.split(".")[0] for name in names}
    return bool(tops - REQUIRED_PACKAGES - sys.stdlib_module_names - {PACKAGE})


def _optional_import_runs(tree: ast.Module) -> list[list[ast.stmt]]:
    """Runs of consecutive optional-import statements outside try blocks, in every statement list."""
    runs = []

    def visit(body: list[ast.stmt]) -> None:
        run: list[ast.stmt] = []
        for node in [*body, None]:
            if node is not None and _is_optional_import(node):
                run.append(node)
                continue
            if run:
                runs.append(run)
                run = []
            if node is None or isinstance(node, ast.Try):  # transformers skips try blocks
                continue
            for field in ("body", "orelse", "finalbody"):
                if isinstance(getattr(node, field, None), list):
                    visit(getattr(node, field))

    visit(tree.body)
    return runs


def _flatten_module_import(
    tree: ast.Module, node: ast.ImportFrom, target: str, offsets: list[int], source: bytes
) -> list[tuple[int, int, str]]:
    """`from . import module` -> `from .flat import name as module_name`, and every `module.name` use."""
    uses: dict[str, set[str]] = {alias.asname or alias.name: set() for alias in node.names}
    parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
    edits = []
    for name_node in ast.walk(tree):
        if not (isinstance(name_node, ast.Name) and name_node.id in uses):
            continue
        parent = parents[name_node]
        if not isinstance(parent, ast.Attribute) or parent.value is not name_node:
            raise ValueError(f"{target}: only `{name_node.id}.attr` flattens, not `{name_node.id}` as an object.")
        if re.search(rf"\b{name_node.id}_{parent.attr}\b".encode(), source):
            raise ValueError(f"{target}: the flat name `{name_node.id}_{parent.attr}` is taken.")
        uses[name_node.id].add(parent.attr)
        start = offsets[parent.lineno] + parent.col_offset
        edits.append((start, offsets[parent.end_lineno] + parent.end_col_offset, f"{name_node.id}_{parent.attr}"))
    indent = " " * node.col_offset
    statements = []
    for alias in node.names:
        submodule, bound = f"{target}.{alias.name}", alias.asname or alias.name
        if not _is_module(submodule):
            raise ValueError(f"`from {target} import {alias.name}`: import names from their defining module.")
        names = [f"{attr} as {bound}_{attr}" for attr in sorted(uses[bound])]
        statement = f"from .{_flat_name(submodule)} import {', '.join(names)}"
        if len(indent) + len(statement) > MAX_LINE:
            inner = "".join(f"{indent}    {name},\n" for name in names)
            statement = f"from .{_flat_name(submodule)} import (\n{inner}{indent})"
        statements.append(statement)
    start = offsets[node.lineno] + node.col_offset
    edits.append((start, offsets[node.end_lineno] + node.end_col_offset, f"\n{indent}".join(statements)))
    return edits


def _rewrite(source: str, module: str) -> tuple[str, list[str]]:
    """The flat file for `module` and the package modules it imports."""
    source = _drop_methods(source, module)
    tree = ast.parse(source)
    data = source.encode("utf-8")
    offsets = _line_offsets(data)
    edits, dependencies = [], []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == PACKAGE for a in node.names):
            raise ValueError(f"{module} line {node.lineno}: use `from ... import`, not `import {PACKAGE}...`.")
        if not isinstance(node, ast.ImportFrom) or (target := _resolve(module, node)) is None:
            continue
        if node.module and _is_module(target):  # `from .x import name`; `from . import x` imports modules
            dependencies.append(target)
            start = offsets[node.lineno] + node.col_offset
            end = FROM_CLAUSE.match(data, start).end()
            edits.append((start, end, f"from .{_flat_name(target)} "))
        else:
            dependencies.extend(f"{target}.{alias.name}" for alias in node.names)
            edits.extend(_flatten_module_import(tree, node, target, offsets, data))
    if HUB_MODULE in dependencies:  # it would drag the Hub plumbing (model cards, uploads) into the remote code
        raise ValueError(f"{module}: import {HUB_MODULE} only inside methods, which the remote code leaves out.")
    for run in _optional_import_runs(tree):
        indent = " " * run[0].col_offset
        start, end = offsets[run[0].lineno], offsets[run[-1].end_lineno + 1]
        body = "".join(f"    {line}" if line.strip() else line for line in data[start:end].decode().splitlines(True))
        guarded = f"{indent}try:  # {OPTIONAL_IMPORT_COMMENT}\n{body}{indent}except ImportError:\n{indent}    raise\n"
        edits.append((start, end, guarded))
    return HEADER + _apply(source, edits), dependencies


@functools.cache
def _generate() -> tuple[tuple[str, str], ...]:
    files, pending = {}, list(ROOT_MODULES)
    while pending:
        module = pending.pop()
        if _flat_name(module) + ".py" in files:
            continue
        text, dependencies = _rewrite(_source_file(module).read_text(encoding="utf-8"), module)
        compile(text, _flat_name(module) + ".py", "exec")  # a rewrite must never produce broken code
        files[_flat_name(module) + ".py"] = text
        pending.extend(dependencies)
    return tuple(sorted(files.items()))


def remote_code_files() -> dict[str, str]:
    """The remote-code files, {file name: contents}, generated from the installed package."""
    return dict(_generate())


def write_remote_code(directory: str | os.PathLike) -> list[Path]:
    """
    Writes the remote-code files into `directory` (created if missing) and returns their paths.

    Files an earlier version generated (recognized by their header line) that the package no longer produces
    are removed, so the folder always holds exactly the current set. `NsaConfig.save_pretrained` (and so
    `model.save_pretrained` and `push_to_hub`) calls this; call it directly for a folder saved some other way.
    """
    directory = Path(directory)
    if directory.is_file():
        raise ValueError(f"`directory` must be a folder, got the file {directory}.")
    directory.mkdir(parents=True, exist_ok=True)
    files = remote_code_files()
    for path in sorted(directory.glob("*.py")):
        if path.name not in files and path.read_bytes().startswith(HEADER.encode("utf-8")):
            path.unlink()
    paths = []
    for name, text in files.items():
        path = directory / name
        path.write_text(text, encoding="utf-8", newline="\n")
        paths.append(path)
    return paths
