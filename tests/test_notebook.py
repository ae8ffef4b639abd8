"""notebooks/second_level.ipynb runs top to bottom (nbclient, kernel ``python3`` of this interpreter)."""

from __future__ import annotations

from pathlib import Path

import pytest
from predfactory import make_work_dir

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "second_level.ipynb"


def test_notebook_outputs_are_stripped():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


def test_notebook_runs(tmp_path, monkeypatch):
    # The input is a finished run directory; here fake base-model predictions stand in for a tiny-preset run.
    work = make_work_dir(tmp_path / "work", n_patients=25, n_test_patients=5)
    monkeypatch.setenv("RSNA19_WORK", str(work.root))
    monkeypatch.setenv("RSNA19_STACK_CONFIG", str(ROOT / "configs" / "stack" / "tiny.yaml"))
    monkeypatch.setenv("RSNA19_STACK_OVERRIDES", "mlp.epochs=5 lgbm.num_boost_round=30")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    for var in ("RSNA19_RUNS", "RSNA19_FOLDS", "RSNA19_TEST_LABELS"):
        monkeypatch.delenv(var, raising=False)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()
    text = "\n".join(
        out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
    )
    assert "wll_oof" in text and "blend" in text
    images = [out for cell in nb.cells for out in cell.get("outputs", []) if "image/png" in out.get("data", {})]
    assert len(images) == 2  # the per-class loss bars and the slices of a positive series
