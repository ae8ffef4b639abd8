"""Bundles: same predictions before and after bundling; nothing is unpickled; a changed file is refused."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from tinyfamilies import EMBEDDINGS, FAMILIES, MODELS

from rsna19.cli import main
from rsna19.core.constants import PROB_COLUMNS
from rsna19.core.errors import UserError
from rsna19.study.bundle import export_bundle, load_bundle


@pytest.fixture(scope="module")
def bundled(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "b"
    return export_bundle(tiny_run, out)


def test_bundle_layout_has_no_pickle(bundled):
    root = bundled.path
    manifest = json.loads((root / "bundle.json").read_text())
    assert manifest["classes"][-1] == "any" and manifest["convert"]["crop"] == 48
    assert [m["name"] for m in manifest["models"]] == MODELS
    assert {m["name"]: m["family"] for m in manifest["models"]} == FAMILIES
    assert {m["name"]: m["embeddings"] for m in manifest["models"] if m["embeddings"]} == EMBEDDINGS
    assert all(m["plugin"] is None for m in manifest["models"])  # every tiny family is one of the package's
    assert manifest["stacker"]["method"] == "blend"
    assert set(manifest["versions"]) >= {"rsna19", "torch", "lightgbm"}
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert sorted(manifest["files"]) == [f for f in files if f != "bundle.json"]
    assert {p.rsplit(".", 1)[-1] for p in files} <= {"json", "yaml", "safetensors", "txt"}
    for p in root.rglob("*"):
        if p.is_file():
            assert not p.read_bytes().startswith((b"\x80", b"PK")), p


def test_base_models_predict_the_same_after_bundling(bundled, tiny_run):
    """Each bundled fold model reproduces the run's own test.parquet (same dataset, mapping and TTA)."""
    bundle = load_bundle(bundled.path)
    cache = tiny_run / "cache"
    index = pd.read_parquet(cache / "cache_index.parquet")
    rows = index[index["split"] == "test"].reset_index(drop=True)
    for predictor in bundle.models:
        per_fold = predictor.predict_cache(cache, rows, per_member=True)
        for k, got in per_fold.items():
            want = pd.read_parquet(tiny_run / "runs" / predictor.name / f"fold_{k}" / "test.parquet")
            np.testing.assert_allclose(got, want[list(PROB_COLUMNS)].to_numpy(), rtol=1e-5, atol=1e-6)


def test_stacker_predicts_the_same_after_bundling(bundled):
    bundle = load_bundle(bundled.path)
    after = bundle.stacker.predict(bundled.level2.test_sets)  # per base fold, as at export
    assert after.shape == bundled.stacker_test.shape
    np.testing.assert_allclose(after, bundled.stacker_test, rtol=1e-9, atol=1e-12)
    assert np.all((after > 0) & (after < 1))
    # New slices are stacked per base fold, like the stack's test rows; a bundle written before that setting
    # existed (no key) stacks the fold-averaged predictions, as it did then.
    assert bundle.stacker.per_fold and bundle.stacker.info["test_per_fold"] is True
    old = dict(bundle.stacker.info)
    del old["test_per_fold"]
    assert not type(bundle.stacker)(old, bundle.stacker.members).per_fold


def _rehash(root, rel):
    manifest = json.loads((root / "bundle.json").read_text())
    manifest["files"][rel] = hashlib.sha256((root / rel).read_bytes()).hexdigest()
    (root / "bundle.json").write_text(json.dumps(manifest))


def test_tampered_bundle_is_refused(bundled, tmp_path):
    root = shutil.copytree(bundled.path, tmp_path / "t")
    rel = "models/clf2d/fold_0.safetensors"
    state = load_bundle(bundled.path).models[0].members[0].net.state_dict()
    torch.save(state, root / rel)  # a pickle where weights should be
    with pytest.raises(UserError, match="pickle"):
        load_bundle(root)
    _rehash(root, rel)  # even with a matching checksum
    with pytest.raises(UserError, match="pickle"):
        load_bundle(root)

    root2 = shutil.copytree(bundled.path, tmp_path / "t2")
    meta = root2 / "models" / "clf2d" / "fold_1.json"
    meta.write_text(meta.read_text().replace('"fold": 1', '"fold": 7'))
    with pytest.raises(UserError, match="checksum"):
        load_bundle(root2)

    root3 = shutil.copytree(bundled.path, tmp_path / "t3")
    (root3 / "stacker" / "extra.pkl").write_bytes(b"\x80\x04junk")
    with pytest.raises(UserError, match="not listed"):
        load_bundle(root3)


def test_bundle_cli_and_errors(tiny_run, tmp_path, capsys):
    out = tmp_path / "b1"
    args = ["bundle", str(tiny_run), "--out", str(out), "--models", "clf2d", "clf2dc_5c", "--folds", "1"]
    assert main([*args, "--which", "convex", "--sensitivity", "0.9", "any=0.8", "--study-score", "top3_mean"]) == 0
    printed = capsys.readouterr().out
    assert "clf2d, clf2dc_5c" in printed and "study operating points" in printed
    b = load_bundle(out)
    assert [m.name for m in b.models] == ["clf2d", "clf2dc_5c"] and b.models[0].folds == [1]
    assert b.stacker.info["method"] == "convex"
    # Another model subset than the stack's: the study model is calibrated on that subset's own level-2 CV.
    sm = b.study_model
    assert sm["source"]["oof"] == "level-2 CV of the bundled models" and sm["score"] == "top3_mean"
    assert sm["classes"]["any"]["target_sensitivity"] == 0.8 and sm["classes"]["subdural"]["target_sensitivity"] == 0.9
    assert main(args) == 1  # exists, no --force
    assert "exists" in capsys.readouterr().err
    with pytest.raises(UserError, match="unknown model"):
        export_bundle(tiny_run, tmp_path / "b2", models=["nope"])
    # A model reading embeddings without its image model could not embed a new series: refused now, with the reason.
    reader, image = next(iter(EMBEDDINGS.items()))
    with pytest.raises(UserError, match=f"reads the embeddings of '{image}', which is not in the bundle"):
        export_bundle(tiny_run, tmp_path / "b3", models=["clf2dc_5c", reader])
    assert not (tmp_path / "b3").exists()
    with pytest.raises(UserError, match="not an rsna19 bundle"):
        load_bundle(tmp_path)
