"""The package's layers import downwards only (docs/architecture.md): no cycles, and none hidden in a function.

Every ``import rsna19...`` / ``from rsna19... import`` anywhere in a module (top level or inside a function; only
``if TYPE_CHECKING:`` blocks are exempt, they never run) must name a module of the same layer or a lower one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "rsna19"

#: Layer of each module prefix (the longest matching prefix wins), lowest first.
LAYERS: dict[str, int] = {
    "rsna19": 0,  # the package's __init__ (version)
    "rsna19.core.constants": 0,
    "rsna19.core.errors": 0,
    "rsna19.core": 0,
    "rsna19.core.config": 0,
    "rsna19.core.metrics": 0,
    "rsna19.core.calibration": 0,
    "rsna19.viz.plots": 0,
    "rsna19.viz.preview": 0,
    "rsna19.viz.report": 0,
    "rsna19.io": 1,
    "rsna19.conversion": 2,
    "rsna19.synth": 2,
    "rsna19.data": 3,
    "rsna19.nets": 4,
    "rsna19.engine": 5,
    "rsna19.training": 6,
    "rsna19.inference": 6,
    "rsna19.monitor": 6,  # drift: facts (uses the gate's head test), PSI, the bundle's reference
    "rsna19.inference.submission": 6,
    "rsna19.stacking": 7,
    "rsna19.tools.weights": 8,
    "rsna19.tools.doctor": 8,
    "rsna19.pipeline": 9,
    "rsna19.study.bundle": 9,  # reads a finished pipeline's work folder
    "rsna19.study.evaluate": 9,  # reads bundles (study model) and stack / predict-study outputs
    "rsna19.study.batch": 9,  # predict-study: a bundle (models + stacker) on new studies
    "rsna19.study.predictor": 9,  # the in-memory study predictor behind predict-study, serve, validate
    "rsna19.serve": 9,  # the DICOM node: predict-study's machinery behind a Storage SCP
    "rsna19.validation": 9,  # validate: predict-study on labelled studies, metrics, recalibrated bundles
    "rsna19.commands": 10,
    "rsna19.cli": 10,
    "rsna19.__main__": 10,
}


def layer(module: str) -> int:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in LAYERS:
            return LAYERS[key]
    raise KeyError(module)


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(tree: ast.AST) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rsna19"):
            out.append((node.module, node.lineno))
        elif isinstance(node, ast.Import):
            out.extend((a.name, node.lineno) for a in node.names if a.name.startswith("rsna19"))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: _module_name(p))
def test_imports_go_down_the_layers(path):
    mod = _module_name(path)
    upward = [
        f"line {line}: {target} (layer {layer(target)})"
        for target, line in _imports(ast.parse(path.read_text(encoding="utf-8")))
        if layer(target) > layer(mod)
    ]
    assert not upward, f"{mod} (layer {layer(mod)}) imports upwards: {'; '.join(upward)}"


def test_every_module_has_a_layer():
    for path in MODULES:
        layer(_module_name(path))
