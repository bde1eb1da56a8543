"""The package's layers: each module imports only modules of the layers below it, every import of the package
(and of its required dependencies) sits at module top, and so there can be no import cycle."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "nanogpt_jax"

# Lowest first. A module may import from the layers before its own, never from its own or a later one.
LAYERS = [
    {"config", "kernels"},
    {"model", "helptext"},
    {"assets", "tracking", "memory", "peers"},
    {"tokenizers"},
    {"optim", "step", "data", "parallel", "checkpoint", "pretrained", "generate", "mfu"},
    {"load", "corpora", "textdata", "control", "hellaswag"},
    {"program"},
    {"saving", "evaluate", "convert", "sample", "plot", "compile_check"},
    {"run", "step_log"},
    {"train"},
    {"cli"},
    {"__init__"},
]
# Optional, heavy dependencies: imported where used, so that the package works without them.
LAZY_OK = {"torch", "transformers", "matplotlib", "wandb", "datasets", "sentencepiece"}


def layer_of(name: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if name in layer)


def package_imports(node: ast.AST) -> set[str]:
    """The package modules an import statement names (`from . import a, b`, `from .a import x`)."""
    if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("nanogpt_jax")):
        module = (node.module or "").removeprefix("nanogpt_jax").lstrip(".")
        if node.level > 1:  # a subpackage's `from ..config import x`
            return {module.split(".")[0]}
        return {module.split(".")[0]} if module else {alias.name for alias in node.names}
    if isinstance(node, ast.Import):
        return {a.name.split(".")[1] for a in node.names if a.name.startswith("nanogpt_jax.")}
    return set()


def modules():
    files = {p.stem: p for p in PACKAGE.glob("*.py")} | {p.parent.name: p for p in PACKAGE.glob("*/__init__.py")}
    return {name: ast.parse(p.read_text(encoding="utf-8")) for name, p in sorted(files.items())}


def test_every_module_has_a_layer():
    assert set(modules()) == set().union(*LAYERS)


def test_imports_go_down_the_layers_only():
    wrong = []
    for name, tree in modules().items():
        for node in tree.body:
            for target in package_imports(node):
                if layer_of(target) >= layer_of(name):
                    wrong.append(f"{name} imports {target}")
    assert wrong == []


def test_no_import_inside_a_function():
    inside = []
    for name, tree in modules().items():
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if isinstance(node, ast.Import):
                    names = {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom):
                    names = {"nanogpt_jax"} if node.level else {(node.module or "").split(".")[0]}
                else:
                    continue
                if names - LAZY_OK:
                    inside.append(f"{name}.{func.name} imports {sorted(names - LAZY_OK)}")
    assert inside == []


def test_the_check_sees_a_cycle_and_a_late_import():
    """The rules above catch what they are for: a module importing an upper layer, a function-level import."""
    tree = ast.parse("from .train import Run\nfrom . import cli\n\ndef f():\n    from .load import load_run\n")
    assert {t for node in tree.body for t in package_imports(node)} == {"train", "cli"}
    assert layer_of("train") > layer_of("checkpoint") and layer_of("cli") > layer_of("checkpoint")
    func = tree.body[-1]
    assert [package_imports(n) for n in ast.walk(func) if isinstance(n, ast.ImportFrom)] == [{"load"}]
