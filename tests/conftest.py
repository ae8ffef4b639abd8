"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Each pytest(-xdist) worker is one job with one CPU: the stackers' `num_threads: auto` use that share
# (rsna19.core.threads), as under the pipeline's executors; LightGBM's threads would otherwise spin against each other.
os.environ.setdefault("RSNA19_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``tiny`` synthetic RSNA dataset (seed 0), generated once per test session (per xdist worker).

    Layout: see docs/contracts.md ("RSNA layout") and ``synth_summary.json`` in the returned folder. Treat it as
    read-only: tests that modify data must copy it first (``shutil.copytree``).

    Returns:
        Path of the dataset root (holds ``stage_2_train/``, ``stage_2_train.csv``, ``masks/`` ...).
    """
    from rsna19.synth import generate_dataset

    root = tmp_path_factory.mktemp("synth_tiny") / "data"
    generate_dataset(root, preset="tiny", seed=0, workers=1, progress=False)
    return root


@pytest.fixture(scope="session")
def tiny_run(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``rsna19 run`` of ``configs/pipelines/tiny.yaml`` on :func:`tiny_dataset` (3 families × 2 folds + stack).

    Generated once per test session (per xdist worker); treat it as read-only.

    Returns:
        The work folder (``pipeline.yaml``, ``cache/``, ``folds.csv``, ``runs/``, ``stack/``, ``submission.csv``).
    """
    from rsna19.pipeline.config import load_pipeline
    from rsna19.pipeline.run import run_pipeline

    config = Path(__file__).resolve().parents[1] / "configs" / "pipelines" / "tiny.yaml"
    work = tmp_path_factory.mktemp("tiny_run") / "work"
    run_pipeline(tiny_dataset, work, load_pipeline(config), say=lambda _line: None)
    return work
