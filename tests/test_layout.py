"""The layout's rules, checked on the source: data flows one way and nothing dodges it.

- ``common`` imports nothing from the stages; ``data_shards`` nothing from ``pretrain`` or
  ``finetune``; ``pretrain`` nothing from ``finetune``.
- No import cycles between the project's modules (module-level imports, the ones Python runs at
  import time), and no project import hidden inside a function to dodge one.
- No module imports another package's private (``_name``) helpers.
- The public names of DESIGN.md's contracts import from where DESIGN says.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "data_shards", "pretrain", "finetune")
# Which stages a package may import (data flows forward only).
ALLOWED = {
    "common": set(),
    "data_shards": {"common"},
    "pretrain": {"common", "data_shards"},
    "finetune": {"common", "data_shards", "pretrain"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, tuple[Path, ast.Module]]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            out[_module_name(path)] = (path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return out


SOURCES = _sources()


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    is_package = SOURCES[module][0].name == "__init__.py"
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, tree: ast.AST) -> list[tuple[str, list[str], ast.stmt]]:
    """(imported module, names, node) of every import statement in ``tree`` that targets the project."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    found.append((alias.name, [], node))
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            if target.split(".")[0] in PACKAGES:
                found.append((target, [a.name for a in node.names], node))
    return found


def _top_level_imports(module: str, tree: ast.Module) -> list[tuple[str, list[str]]]:
    """Imports Python runs when the module is imported (module body, incl. if/try blocks; not functions)."""
    out = []

    def visit(statements):
        for node in statements:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                out.extend((target, names) for target, names, _ in _imports(module, node))
            for block in ("body", "orelse", "finalbody", "handlers"):
                visit(getattr(node, block, []) or [])

    visit(tree.body)
    return out


def _known(target: str) -> str | None:
    """The project module an import target names (a module, or a package whose attribute is imported)."""
    while target and target not in SOURCES:
        target = target.rpartition(".")[0]
    return target or None


def test_stages_import_only_upstream():
    bad = []
    for module, (path, tree) in SOURCES.items():
        package = module.split(".")[0]
        for target, _, node in _imports(module, tree):
            other = target.split(".")[0]
            if other != package and other not in ALLOWED[package]:
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {target}")
    assert not bad, "imports against the flow common -> data_shards -> pretrain -> finetune:\n" + "\n".join(bad)


def test_no_project_imports_inside_functions():
    bad = []
    for module, (path, tree) in SOURCES.items():
        for function in ast.walk(tree):
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for target, _, node in _imports(module, function):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} {function.name}() imports {target}")
    assert not bad, (
        "project imports inside functions (import at module level; a cycle means a module to split):\n"
        + "\n".join(sorted(set(bad)))
    )


def test_no_import_cycles():
    graph: dict[str, set[str]] = {m: set() for m in SOURCES}
    for module, (_, tree) in SOURCES.items():
        for target, names in _top_level_imports(module, tree):
            for name in names or [""]:
                # `from pkg import mod` imports the submodule pkg.mod; `from mod import name` the module.
                candidate = _known(f"{target}.{name}" if name and f"{target}.{name}" in SOURCES else target)
                if candidate and candidate != module:
                    graph[module].add(candidate)
    # A submodule importing names back from its own package's __init__ (which imports the
    # submodule) is a cycle too: it works only while the __init__ happens to import it first.
    cycles, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_private_imports_across_packages():
    bad = []
    for module, (path, tree) in SOURCES.items():
        for target, names, node in _imports(module, tree):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and target.split(".")[:2] != module.split(".")[:2]:
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {private} from {target}")
    assert not bad, "private helpers imported from another package:\n" + "\n".join(bad)


DESIGN_CONTRACTS = {
    "data_shards.xenium": ["read_xenium"],
    "data_shards.register": ["fit_transform", "read_explorer_keypoints", "read_explorer_alignment"],
    "data_shards.tokenize": ["rank_tokens", "Vocabulary"],
    "data_shards.synthetic": ["make_bundle"],
    "data_shards.sample": ["SAMPLE_KEYS", "encode_sample", "decode_sample", "decode_cell_arrays"],
    "pretrain.loss": ["similarity_adjusted_loss"],
    "pretrain.export": ["load_image_encoder", "load_cell_encoder", "export_checkpoint"],
    "finetune.metrics": ["concordance_index", "ipcw_concordance_index", "psnr", "ssim", "h_score", "pearson_per_gene"],
    "common.config": ["load_config", "apply_schema"],
    "common.errors": ["InputError"],
}


@pytest.mark.parametrize("module", sorted(DESIGN_CONTRACTS))
def test_design_contract_names_import(module):
    imported = importlib.import_module(module)
    missing = [name for name in DESIGN_CONTRACTS[module] if not hasattr(imported, name)]
    assert not missing, f"{module} lacks {missing}"


def test_vocabulary_from_file_and_token_id():
    from data_shards.tokenize import Vocabulary

    assert callable(Vocabulary.from_file) and callable(Vocabulary.token_id)


def test_entry_scripts_are_thin():
    """launch/*.py: imports, argument parsing and one call; no logic (no loops, no classes)."""
    bad = []
    for path in sorted((ROOT / "launch").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.For, ast.While, ast.ClassDef, ast.With, ast.Try)):
                bad.append(f"{path.name}:{node.lineno} {type(node).__name__}")
        functions = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
        if len(functions) > 2:
            bad.append(f"{path.name}: {len(functions)} functions (argument parsing + main at most)")
    assert not bad, "logic in entry scripts (move it into a package):\n" + "\n".join(bad)
