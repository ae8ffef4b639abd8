"""The models of the tiny pipeline and their registered families, read from the configs and the registry.

Tests that run the tiny pipeline (``configs/pipelines/tiny.yaml``) take their model lists from here, so adding a
config to that pipeline (docs/extending.md) is all a new family needs to be covered by them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rsna19.core.config import load_config
from rsna19.engine.config import TrainConfig
from rsna19.nets import get_model_spec
from rsna19.nets.registry import ModelSpec
from rsna19.pipeline.config import load_pipeline

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "configs" / "pipelines" / "tiny.yaml"


@dataclass(frozen=True)
class TinyModel:
    """One model of the tiny pipeline: its run name (config stem), config and registered spec."""

    name: str
    config: TrainConfig
    spec: ModelSpec


def tiny_models(pipeline: Path = PIPELINE) -> list[TinyModel]:
    """The pipeline's models in its order (the order of ``scores.csv``, the bundle and ``pipeline_summary.json``)."""
    out = []
    for path in load_pipeline(pipeline).models:
        cfg = load_config(TrainConfig, path)
        out.append(TinyModel(Path(path).stem, cfg, get_model_spec(cfg.model.name)))
    return out


MODELS: list[str] = [m.name for m in tiny_models()]
#: Run name → family, as the bundle manifest and ``models.csv`` give them.
FAMILIES: dict[str, str] = {m.name: m.spec.family for m in tiny_models()}
#: Run name → the run whose embeddings it reads, for the models that read embeddings.
EMBEDDINGS: dict[str, str] = {m.name: str(m.config.data.embeddings) for m in tiny_models() if m.spec.reads_embeddings}
