"""The proof of docs/extending.md: a family written as one module and one config, outside the package, runs through
``rsna19 run`` (the tiny pipeline's settings), ``rsna19 bundle`` and ``rsna19 predict-study``.

The module and the config are the worked example of docs/extending.md, copied from its code blocks into a
temporary folder: if the example stops working, this test fails. The module is found as a plugin
(``$RSNA19_PLUGINS``); no file of the repository names it. The registry is restored after the module, so the
rest of the session never sees the plugin.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import yaml
from tinyfamilies import PIPELINE, ROOT

from rsna19.cli import main
from rsna19.core.constants import PROB_COLUMNS
from rsna19.core.errors import UserError
from rsna19.nets import registry
from rsna19.study.bundle import load_bundle

EXTENDING = ROOT / "docs" / "extending.md"
NAME = "clf2d_gem"
#: The demo-size example config shrunk to the tiny pipeline's sizes (the pipeline's `model_overrides`).
TINY_SIZE = [
    "model.backbone=test_resnet",
    "data.resize=null",
    "data.crop=32",
    "data.samples_per_epoch=16",
    "train.batch_size=8",
    "train.val_batch_size=32",
]


def example_blocks() -> tuple[str, str]:
    """The worked example's module (first python block) and config (first yaml block) in docs/extending.md."""
    text = EXTENDING.read_text(encoding="utf-8")
    section = text[text.index("### Worked example: 2D with GeM pooling") :]
    module = re.search(r"```python\n(.*?)```", section, re.S)
    config = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert module and config, "the worked example lost its module or config block"
    return module.group(1), config.group(1)


@pytest.fixture(scope="module")
def plugin_run(tiny_dataset, tmp_path_factory):
    """The example written to a folder, the tiny pipeline run on it, bundled, and predict-study on the test DICOMs."""
    root = tmp_path_factory.mktemp("plugin_family")
    module, config = example_blocks()
    (root / "family").mkdir()
    (root / "family" / f"{NAME}.py").write_text(module, encoding="utf-8")
    (root / "family" / f"{NAME}.yaml").write_text(config, encoding="utf-8")
    pipeline = yaml.safe_load(PIPELINE.read_text(encoding="utf-8"))
    pipeline["models"] = [f"{NAME}.yaml"]
    pipeline["stack"] = str((PIPELINE.parent / pipeline["stack"]).resolve())
    pipeline["model_overrides"] = {NAME: TINY_SIZE}
    (root / "family" / "pipeline.yaml").write_text(yaml.safe_dump(pipeline), encoding="utf-8")
    work, bundle, out = root / "work", root / "bundle", root / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # the plugin's registration ends with the module
        mp.setattr(registry, "_PLUGINS", {})
        mp.setenv(registry.PLUGINS_ENV, str(root / "family" / f"{NAME}.py"))
        run = [
            "run",
            "--data",
            str(tiny_dataset),
            "--out",
            str(work),
            "--pipeline",
            str(root / "family" / "pipeline.yaml"),
        ]
        assert main(run) == 0
        assert main(["bundle", str(work), "--out", str(bundle)]) == 0
        test_dir = tiny_dataset / "stage_2_test"
        assert main(["predict-study", str(test_dir), "--bundle", str(bundle), "--out", str(out)]) == 0
        yield {"root": root, "work": work, "bundle": bundle, "out": out}


def test_the_plugin_family_trains_predicts_and_stacks(plugin_run):
    work = plugin_run["work"]
    scores = pd.read_csv(work / "scores.csv")
    assert list(scores.loc[scores["kind"] == "base", "name"]) == [NAME]
    assert scores["wll_oof"].notna().all()
    for k in range(2):
        state = yaml.safe_load((work / "runs" / NAME / f"fold_{k}" / "config.yaml").read_text())
        assert state["model"]["name"] == NAME and state["model"]["backbone"] == "test_resnet"
        assert (
            pd.read_parquet(work / "runs" / NAME / f"fold_{k}" / "test.parquet")[list(PROB_COLUMNS)].notna().all().all()
        )


def test_the_bundle_records_the_plugin_and_predict_study_serves_it(plugin_run):
    manifest = json.loads((plugin_run["bundle"] / "bundle.json").read_text())
    (entry,) = manifest["models"]
    assert (entry["name"], entry["family"], entry["task"]) == (NAME, NAME, "slice")
    assert entry["plugin"] == f"{NAME}.py"  # the file's name, not the training machine's folder
    got = pd.read_csv(plugin_run["out"] / "models.csv").set_index("sop_uid")
    assert (got["model"] == NAME).all() and (got["family"] == NAME).all()
    folds = [pd.read_parquet(plugin_run["work"] / "runs" / NAME / f"fold_{k}" / "test.parquet") for k in range(2)]
    want = pd.concat(folds).groupby("sop_uid")[list(PROB_COLUMNS)].mean()
    assert set(want.index) == set(got.index)
    np.testing.assert_allclose(got.loc[want.index, list(PROB_COLUMNS)].to_numpy(), want.to_numpy(), atol=1e-4)
    summary = json.loads((plugin_run["out"] / "studies.json").read_text())
    assert summary["n_ok"] == summary["n_studies"] > 0
    for study in summary["studies"]:  # the report with its Grad-CAM panel (the backbone is found by its name)
        assert (plugin_run["out"] / study["report"]).read_bytes().startswith(b"\x89PNG")


def test_a_bundle_never_imports_its_plugin(plugin_run):
    """Without the plugin named, loading the bundle is refused with the plugin's name (the manifest names it; it
    is not imported from there)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(registry, "_REGISTRY", {k: s for k, s in registry._REGISTRY.items() if s.plugin is None})
        mp.delenv(registry.PLUGINS_ENV)
        with pytest.raises(
            UserError, match=rf"of plugin '{NAME}\.py', which is not loaded: name the plugin in \$RSNA19"
        ):
            load_bundle(plugin_run["bundle"])
        assert NAME not in {s.name for s in registry.list_models()}
