"""The package's layers import downwards only (docs/architecture.md): no cycles, and none hidden in a function.

Every ``import rsna19...`` / ``from rsna19... import`` anywhere in a module (top level or inside a function; only
``if TYPE_CHECKING:`` blocks are exempt, they never run) must name a module of the same layer or a lower one. A
library module imports ``rsna19`` at its top only; the command line (``rsna19.cli``, ``rsna19.commands``) imports
inside its functions so that ``rsna19 --help`` stays fast.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "rsna19"

#: Layer of each top-level package (of the package itself for ``rsna19``), lowest first: docs/architecture.md draws
#: the same tree.
LAYERS: dict[str, int] = {
    "rsna19": 0,  # the package's __init__ (version, class names)
    "rsna19.core": 0,  # names and numbers, errors, configs, atomic writes, metrics, calibration
    "rsna19.io": 1,
    "rsna19.viz": 1,  # pictures: run plots, conversion previews, study reports
    "rsna19.conversion": 2,
    "rsna19.synth": 2,
    "rsna19.data": 3,
    "rsna19.nets": 4,
    "rsna19.engine": 5,
    "rsna19.training": 6,
    "rsna19.inference": 6,  # predict, study inputs and results, the gate, DICOM writers, submissions
    "rsna19.monitor": 6,  # drift: facts (uses the gate's head test), PSI, the bundle's reference
    "rsna19.stacking": 7,
    "rsna19.tools": 8,  # pretrained weights on disk, machine checks
    "rsna19.pipeline": 9,
    "rsna19.study": 10,  # bundles of a finished run, the study predictor, predict-study, evaluate
    "rsna19.serve": 11,  # the DICOM node: the study predictor behind a Storage SCP
    "rsna19.validation": 11,  # validate: the study predictor on labelled studies, metrics, recalibrated bundles
    "rsna19.commands": 12,
    "rsna19.cli": 12,
    "rsna19.__main__": 12,
}
#: Modules allowed to import inside functions: the command line stays lazy so that ``rsna19 --help`` is fast.
LAZY = ("rsna19.cli", "rsna19.commands", "rsna19.__main__")


def layer(module: str) -> int:
    """The layer of ``module``: its top-level package's (``rsna19`` itself only for the package's __init__)."""
    parts = module.split(".")
    return LAYERS[".".join(parts[:2])]


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(tree: ast.AST) -> list[tuple[str, int, bool]]:
    """Every ``rsna19`` import outside ``if TYPE_CHECKING:``: (module, line, whether it sits in a function)."""
    out: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child, in_function)
            return
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rsna19"):
            out.append((node.module, node.lineno, in_function))
        elif isinstance(node, ast.Import):
            out.extend((a.name, node.lineno, in_function) for a in node.names if a.name.startswith("rsna19"))
        in_function = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, in_function)

    visit(tree, False)
    return out


MODULES = sorted(PACKAGE.rglob("*.py"))


def _read(path: Path) -> ast.AST:
    return ast.parse(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: _module_name(p))
def test_imports_go_down_the_layers(path):
    mod = _module_name(path)
    upward = [
        f"line {line}: {target} (layer {layer(target)})"
        for target, line, _ in _imports(_read(path))
        if layer(target) > layer(mod)
    ]
    assert not upward, f"{mod} (layer {layer(mod)}) imports upwards: {'; '.join(upward)}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: _module_name(p))
def test_library_modules_import_at_the_top(path):
    """A function-local import hides an edge of the graph (and often a cycle): only the command line is lazy."""
    mod = _module_name(path)
    if mod.startswith(LAZY):
        return
    hidden = [f"line {line}: {target}" for target, line, in_function in _imports(_read(path)) if in_function]
    assert not hidden, f"{mod} imports rsna19 inside a function (move it to the top): {'; '.join(hidden)}"


def test_every_module_has_a_layer():
    for path in MODULES:
        layer(_module_name(path))


def test_the_root_holds_only_the_entry_points():
    loose = {p.name for p in PACKAGE.iterdir() if p.is_file()} - {"__init__.py", "__main__.py", "cli.py", "py.typed"}
    assert not loose, f"modules beside the packages: {sorted(loose)} (each belongs in its layer's package)"
