"""One config loader (``rsna19.core.config.load_config``) for pipeline, training, stack and serve configs: the same
coercion, the same errors naming the file and the key, whichever schema."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rsna19.core.config import load_config
from rsna19.core.errors import ConfigError
from rsna19.engine.config import TrainConfig
from rsna19.pipeline.config import PipelineConfig
from rsna19.serve import config as serve_config
from rsna19.serve.config import ServeConfig
from rsna19.stacking.config import StackConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _yaml(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _nested(key: str, value: object) -> str:
    """``"a.b"``, 1 → the YAML of ``{a: {b: 1}}``."""
    *parents, last = key.split(".")
    data: object = {last: value}
    for part in reversed(parents):
        data = {part: data}
    return yaml.safe_dump(data)


@pytest.mark.parametrize(
    ("cls", "key", "section"),
    [
        (PipelineConfig, "jobs", "PipelineConfig"),
        (TrainConfig, "train.seed", "TrainSection"),
        (ServeConfig, "workers", "ServeConfig"),
        (StackConfig, "lgbm.num_boost_round", "LgbmConfig"),
    ],
)
def test_every_schema_gets_the_same_errors(tmp_path, cls, key, section):
    """A wrong type and an unknown key are ConfigErrors naming the file and the key, for every kind of config."""
    bad = _yaml(tmp_path, f"bad_{section}.yaml", _nested(key, "many"))
    with pytest.raises(ConfigError, match=rf"bad_{section}\.yaml: {key}: expected int, got 'many'"):
        load_config(cls, bad)
    typo = _yaml(tmp_path, "typo.yaml", _nested(key + "x", 1))
    with pytest.raises(ConfigError, match=rf"typo\.yaml: unknown key\(s\) {key}x for {section}"):
        load_config(cls, typo)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(cls, tmp_path / "missing.yaml")


def test_same_coercion_for_training_and_serve(tmp_path):
    """Dashed keys, on/off booleans, strings for numbers and a single value for a list mean the same everywhere."""
    serve = load_config(
        ServeConfig,
        _yaml(tmp_path, "serve.yaml", "ae-title: NODE\ncam: off\nworkers: '3'\ndestinations: A@h:1\n"),
    )
    assert (serve.ae_title, serve.cam, serve.workers, serve.destinations) == ("NODE", False, 3, ["A@h:1"])
    pipe = load_config(
        PipelineConfig,
        _yaml(tmp_path, "pipe.yaml", "index-workers: '3'\nmasks: on\nmodels: configs/tiny/clf2d.yaml\n"),
    )
    assert (pipe.index_workers, pipe.masks, pipe.models) == (3, True, ["configs/tiny/clf2d.yaml"])
    assert pipe.name == "pipe"  # the file stem


def test_flags_win_over_overrides_over_the_file(tmp_path):
    """Order: defaults < file < ``a.b=value`` overrides < flags (None flags are not given)."""
    path = _yaml(tmp_path, "serve.yaml", "workers: 2\nport: 5\nquiet_seconds: 7\n")
    cfg = load_config(ServeConfig, path, ["workers=4", "port=6"], flags={"port": 9, "quiet_seconds": None})
    assert (cfg.workers, cfg.port, cfg.quiet_seconds) == (4, 9, 7.0)
    # serve's public loader is this one, checked: the alias adds to the list, a bad flag is named.
    alias = _yaml(tmp_path, "alias.yaml", "destinations: [A@h:1]\ndestination: B@h:2\n")
    assert serve_config.load_config(str(alias), {"bundle": "b", "spool": "s"}).destinations == ["A@h:1", "B@h:2"]
    with pytest.raises(ConfigError, match="ServeConfig: workers: expected int"):
        serve_config.load_config(None, {"bundle": "b", "spool": "s", "workers": "two"})


def test_the_shipped_configs_still_load():
    """Every YAML under configs/ loads with its schema (the unified coercion changed none of them)."""
    for path in sorted((CONFIGS / "pipelines").glob("*.yaml")):
        assert load_config(PipelineConfig, path).models
    for path in sorted((CONFIGS / "stack").glob("*.yaml")):
        load_config(StackConfig, path)
    for path in sorted((CONFIGS / "tiny").glob("*.yaml")):
        assert load_config(TrainConfig, path).name == path.stem
