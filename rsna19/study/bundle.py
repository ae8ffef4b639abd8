"""Inference bundles: a finished ``rsna19 run`` folder → one self-contained folder for ``rsna19 predict-study``.

Layout::

    BUNDLE/bundle.json                         format, versions, classes, windows, conversion, TTA, models, stacker,
                                               and the SHA-256 of every other file
    BUNDLE/models/<name>/config.yaml           the run's resolved training config (also config.json)
    BUNDLE/models/<name>/fold_<k>.safetensors  the fold's best weights
    BUNDLE/models/<name>/fold_<k>.json         model name and arguments, HU mapping (windows, CDF knots), epoch
    BUNDLE/stacker/stacker.json                features, feature names, method, blend weights, post-processing
    BUNDLE/stacker/lgbm_<class>.txt            LightGBM boosters as their text dump (``model_to_string``)
    BUNDLE/stacker/mlp.safetensors, mlp.json   MLP weights; its layer sizes and scaler statistics
    BUNDLE/stacker/convex.json                 convex weights
    BUNDLE/study_model.json                    study-level calibration and operating points (rsna19.core.calibration),
                                               fitted on the stack's OOF predictions of the bundled method

Nothing in a bundle is a pickle: weights are safetensors, the rest JSON, YAML (read with ``safe_load``) and
LightGBM's own text format. :func:`load_bundle` refuses a file that looks like a pickle or a torch zip, a file that
does not parse as what it should be, and a file whose checksum differs from ``bundle.json``.

The stackers of a bundle are refitted on **all** OOF rows of the base models (the stack stage's test predictions
average its level-2 fold models instead); the blend weights are the stack stage's own, fitted on all OOF rows.
The study model is fitted on the level-2 OOF predictions of the bundled method (the stack's ``oof.parquet`` when
the bundle has the stack's models, else a level-2 CV of the chosen subset), so its calibration and thresholds
come from studies no model of the bundle saw when it predicted them. :func:`write_recalibrated_bundle` copies a
bundle with a study model refitted on a site's studies (``rsna19 validate --recalibrate``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

import rsna19
from rsna19.conversion.series import CONVERSION_VERSION, read_meta
from rsna19.core.atomic import atomic_path
from rsna19.core.calibration import check_study_model, fit_study_model
from rsna19.core.config import from_dict, load_config, to_dict
from rsna19.core.constants import CLASSES, WINDOWS
from rsna19.core.digest import sha256_file
from rsna19.core.errors import UserError
from rsna19.engine.checkpoint import load_checkpoint
from rsna19.engine.config import TrainConfig
from rsna19.engine.predictor import Predictor
from rsna19.engine.runtime import parse_tta, resolve_device
from rsna19.engine.tasks import get_task
from rsna19.monitor.reference import training_reference
from rsna19.nets import get_model_spec
from rsna19.nets.registry import PLUGINS_ENV
from rsna19.pipeline.config import PipelineConfig
from rsna19.stacking.base import save_json
from rsna19.stacking.bundled import export_stacker, load_stacker
from rsna19.stacking.config import StackConfig
from rsna19.stacking.run import fit_stackers, predictions_frame, score_stack

#: Bumped when the layout changes; :func:`load_bundle` refuses other versions.
BUNDLE_VERSION = 1
BUNDLE_FORMAT = "rsna19-bundle"
#: The study model's file in a bundle (:mod:`rsna19.core.calibration`).
STUDY_MODEL_FILE = "study_model.json"
#: Leading bytes of a pickle (protocol 2+) and of torch's zip checkpoint format.
_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")


def _versions() -> dict[str, str]:
    import lightgbm
    import safetensors
    import timm
    import torch

    return {
        "rsna19": rsna19.__version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "lightgbm": lightgbm.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
    }


# --------------------------------------------------------------------------------------------------- export
@dataclass
class ExportResult:
    """What :func:`export_bundle` wrote, and the in-memory stackers' predictions for checking a round trip.

    Attributes:
        path: the bundle folder.
        models: base model names; folds: the folds bundled.
        stacker_test: (N_test, 6) the fitted stacker's predictions on the work folder's test features, before
            anything was written (None when the method is ``mean``).
        level2: the level-2 problem the stackers were fitted on (:class:`rsna19.stacking.run.Level2Set`).
    """

    path: Path
    models: list[str]
    folds: list[int]
    stacker_test: np.ndarray | None = None
    level2: Any = None
    study_model: dict[str, Any] | None = None


def _stack_config(work: Path, pipeline: PipelineConfig | None) -> StackConfig:
    stem = Path(pipeline.stack).stem if pipeline is not None else None
    cands = sorted((work / "stack").glob("*/config.yaml"))
    if stem:
        cands = [c for c in cands if c.parent.name == stem] or cands
    if not cands:
        raise UserError(f"no finished stack under {work / 'stack'}: run `rsna19 run` to the end first")
    return load_config(StackConfig, cands[0])


def _run_config(work: Path, name: str, fold: int) -> TrainConfig:
    """The resolved training config of run ``name`` fold ``fold`` (its ``config.yaml``)."""
    path = work / "runs" / name / f"fold_{fold}" / "config.yaml"
    if not path.is_file():
        raise UserError(f"{path} is missing: train {name} fold {fold} first")
    return load_config(TrainConfig, path)


def check_servable(work: Path, models: list[str], folds: list[int]) -> None:
    """Refuse, before anything is written, a model that ``predict-study`` could not run from the bundle.

    Every family is served; what can be missing is an input a model reads from another run: a sequence model
    needs its image model (``data.embeddings``) in the same bundle, with the same folds, because on a new series
    fold k's image model computes the embeddings for fold k's sequence model.

    Raises:
        UserError: the reason, naming the model and what to add.
    """
    for name in models:
        cfg = _run_config(work, name, folds[0])
        task = get_task(cfg)  # also refuses an unknown family or a layout it does not take
        if task.reads_cache:
            continue
        upstream = cfg.data.embeddings
        if upstream not in models:
            raise UserError(
                f"model {name!r} ({cfg.model.name}) reads the embeddings of {upstream!r}, which is not in the bundle: "
                f"add it (--models {' '.join([*models, str(upstream)])}) or leave {name!r} out"
            )
        if not get_task(_run_config(work, str(upstream), folds[0])).can_embed:
            raise UserError(f"model {name!r} reads embeddings of {upstream!r}, a family that gives none")
        for k in folds:
            info = work / "runs" / str(upstream) / f"fold_{k}" / "embeddings_oof.json"
            if not info.is_file():
                raise UserError(f"{info} is missing: the embed stage of {upstream!r} fold {k} has not run")


def _export_model(work: Path, name: str, folds: list[int], mdir: Path) -> dict[str, Any]:
    """Write one base model's folds (safetensors + json) and config into ``mdir``; returns its bundle.json entry."""
    from safetensors.torch import save_file

    mdir.mkdir(parents=True)
    cfg_dict: dict[str, Any] | None = None
    for k in folds:
        fold_dir = work / "runs" / name / f"fold_{k}"
        state = load_checkpoint(fold_dir / "best.pt")
        save_file({n: t.contiguous() for n, t in state["model"].items()}, str(mdir / f"fold_{k}.safetensors"))
        meta = {
            "model_name": state["model_name"],
            "model_kwargs": state["model_kwargs"],
            "hu_mapping": state["hu_mapping"],
            "fold": k,
            "epoch": int(state["epoch"]),
            "best_wll": float(state["best_wll"]),
        }
        spec = get_model_spec(state["model_name"])
        embeddings = state["config"]["data"].get("embeddings") if spec.reads_embeddings else None
        if embeddings:
            # The views the training embeddings were averaged over: new series must be embedded the same way.
            info = json.loads((work / "runs" / embeddings / f"fold_{k}" / "embeddings_oof.json").read_text())
            meta["embeddings"] = {"model": embeddings, "tta": list(info["tta"])}
        save_json(meta, mdir / f"fold_{k}.json")
        cfg_dict = cfg_dict or state["config"]
    assert cfg_dict is not None
    # Paths of the training machine mean nothing to a bundle user.
    cfg_dict = {**cfg_dict, "runs": None, "data": {**cfg_dict["data"], "cache": None, "folds": None, "masks": None}}
    (mdir / "config.yaml").write_text(yaml.safe_dump(cfg_dict, sort_keys=False), encoding="utf-8")
    save_json(cfg_dict, mdir / "config.json")
    d = cfg_dict["data"]
    return {
        "name": name,
        "family": spec.family,
        "task": spec.task,
        # A plugin's .py file by its name only: the training machine's folders mean nothing to a bundle user.
        "plugin": Path(spec.plugin).name if spec.plugin and spec.plugin.endswith(".py") else spec.plugin,
        "model_name": cfg_dict["model"]["name"],
        "backbone": cfg_dict["model"]["backbone"],
        "folds": folds,
        "windows": d["windows"],
        "slices": d["slices"],
        "layout": d["layout"],
        "resize": d["resize"],
        "crop": d["crop"],
        "embeddings": d.get("embeddings") if spec.reads_embeddings else None,
    }


def training_geometry(cache: Path, index: Path | None = None) -> dict[str, Any] | None:
    """Slice spacing, slice thickness and pixel spacing of the training series of a conversion cache.

    ``predict-study`` reformats much thinner series to ``slice_spacing_mm`` and, for a bundle converted at the
    scanner's pixel spacing, resamples series outside ``pixel_spacing_range_mm`` to ``pixel_spacing_mm``.

    Args:
        cache: the run's conversion cache (``cache_index.parquet`` and ``<series>/meta.json``).
        index: the run's ``index.parquet`` (SliceThickness of every slice); without it the thickness is the spacing.

    Returns:
        ``{"slice_spacing_mm", "slice_spacing_range_mm", "slice_thickness_mm", "pixel_spacing_mm",
        "pixel_spacing_range_mm", "z_extent_mm", "z_extent_range_mm", "n_series", "source"}`` (medians; ranges are
        the 5th and 95th percentiles over the train series; the z extent is first to last position plus one
        spacing), or None when the cache has no train series to measure.
    """
    import pandas as pd

    cache_index = cache / "cache_index.parquet"
    if not cache_index.is_file():
        return None
    rows = pd.read_parquet(cache_index, columns=["series_uid", "split"])
    uids = sorted(rows.loc[rows["split"] == "train", "series_uid"].astype(str).unique())
    dz, thick, px, extent = [], [], [], []
    for uid in uids:
        meta = read_meta(cache / uid)
        if meta is None:
            continue
        dz.append(float(meta["spacing"][0]))
        positions = meta.get("positions") or [0.0]
        extent.append(float(max(positions) - min(positions)) + dz[-1])  # the not-assessable gate's coverage
        px.append(float(meta.get("pixel_spacing_in", meta["spacing"][1:])[0]))
    if not dz:
        return None
    if index is not None and index.is_file():
        headers = pd.read_parquet(index, columns=["series_uid", "split", "slice_thickness"])
        per_series = headers[headers["split"] == "train"].groupby("series_uid")["slice_thickness"].median()
        thick = [float(t) for t in per_series.dropna() if t > 0]

    def r(v: float) -> float:
        return round(float(v), 4)

    return {
        "slice_spacing_mm": r(np.median(dz)),
        "slice_spacing_range_mm": [r(np.percentile(dz, 5)), r(np.percentile(dz, 95))],
        "slice_thickness_mm": r(np.median(thick)) if thick else r(np.median(dz)),
        "pixel_spacing_mm": r(np.median(px)),
        "pixel_spacing_range_mm": [r(np.percentile(px, 5)), r(np.percentile(px, 95))],
        "z_extent_mm": r(np.median(extent)),
        "z_extent_range_mm": [r(np.percentile(extent, 5)), r(np.percentile(extent, 95))],
        "n_series": len(dz),
        "source": "train series of the conversion cache",
    }


def export_bundle(
    work: str | os.PathLike[str],
    out: str | os.PathLike[str],
    models: list[str] | None = None,
    folds: list[int] | None = None,
    which: str | None = None,
    force: bool = False,
    sensitivity: dict[str, float] | None = None,
    study_score: str = "max",
) -> ExportResult:
    """Write the inference bundle of a finished ``rsna19 run`` folder.

    Args:
        work: the run's work folder (``pipeline.yaml``, ``runs/``, ``stack/``, ``folds.csv``).
        out: the bundle folder to create (written atomically).
        models: base models to include (default: every model of the pipeline).
        folds: folds whose weights to include (default: all; each model's prediction averages them).
        which: stack method (default: the pipeline's ``submit``, usually ``blend``).
        force: replace an existing bundle.
        sensitivity: class → target sensitivity of the study-level operating point (default 0.95 each).
        study_score: how a study's slices are summarised before calibration (``max`` or ``top3_mean``).

    Raises:
        UserError: an unfinished work folder, an unknown model or fold, or an existing ``out`` without ``force``.
    """
    work = Path(work)
    out = Path(out)
    if out.exists() and not force:
        raise UserError(f"{out} exists; use --force to replace it")
    resolved = work / "pipeline.yaml"
    if not resolved.is_file():
        raise UserError(f"{work} is not a `rsna19 run` work folder (no pipeline.yaml)")
    pipeline = load_config(PipelineConfig, resolved)
    scfg = _stack_config(work, pipeline)
    all_models = list(scfg.models) or pipeline.model_names
    models = list(models) if models else all_models
    unknown = sorted(set(models) - set(all_models))
    if unknown:
        raise UserError(f"unknown model(s) {unknown}; the stack has {all_models}")
    all_folds = sorted(int(k) for k in scfg.folds) or list(range(pipeline.n_folds))
    folds = sorted(set(folds)) if folds else all_folds
    if set(folds) - set(all_folds):
        raise UserError(f"unknown fold(s) {sorted(set(folds) - set(all_folds))}; the run has {all_folds}")
    which = which or pipeline.submit
    check_servable(work, models, folds)

    entries = []
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        (tmp / "stacker").mkdir()
        for name in models:
            entries.append(_export_model(work, name, folds, tmp / "models" / name))
        info, l2, stacker_test = export_stacker(scfg, which, models, tmp / "stacker")
        save_json(info, tmp / "stacker" / "stacker.json")
        study_model, oof = _fit_study_model(scfg, which, models, l2, info, sensitivity, study_score)
        save_json(study_model, tmp / STUDY_MODEL_FILE)

        drift = training_reference(work / "cache", work / "index.parquet", study_model, oof)
        files = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = _manifest(work, pipeline, entries, {"method": which, "members": info["members"]}, study_model, drift)
        manifest["files"] = files
        save_json(manifest, tmp / "bundle.json")
    return ExportResult(out, models, folds, stacker_test, l2, study_model)


def _manifest(
    work: Path,
    pipeline: Any,
    entries: list[dict[str, Any]],
    stacker: dict[str, Any],
    study_model: dict[str, Any],
    drift: dict[str, Any],
) -> dict[str, Any]:
    """``bundle.json`` of :func:`export_bundle` less its ``files``: the versions, inputs, models, stacker (method and
    members), study model and drift reference."""
    c = pipeline.convert
    names = sorted({w for e in entries for w in e["windows"]})
    return {
        "format": BUNDLE_FORMAT,
        "bundle_version": BUNDLE_VERSION,
        "versions": _versions(),
        "classes": list(CLASSES),
        "windows": {w: list(WINDOWS[w]) if w in WINDOWS else "cdf (knots in models/*/fold_*.json)" for w in names},
        "convert": {
            "crop": c.crop,
            "spacing": c.spacing,
            "correct_tilt": c.correct_tilt,
            "conversion_version": CONVERSION_VERSION,
        },
        "tta": list(pipeline.tta),
        "training_geometry": training_geometry(work / "cache", work / "index.parquet"),
        "drift_reference": drift,
        "pipeline": to_dict(pipeline)["name"],
        "models": entries,
        "stacker": {**stacker, "file": "stacker/stacker.json"},
        "study_model": {
            "file": STUDY_MODEL_FILE,
            "method": study_model["method"],
            "score": study_model["score"],
            "operating_points": {
                c: {k: e[k] for k in ("threshold", "target_sensitivity", "oof_sensitivity", "oof_specificity")}
                for c, e in study_model["classes"].items()
            },
        },
    }


def _fit_study_model(
    scfg: Any,
    which: str,
    models: list[str],
    l2: Any,
    info: dict[str, Any],
    sensitivity: dict[str, float] | None,
    study_score: str,
) -> tuple[dict[str, Any], Any]:
    """The study model of the bundled method, fitted on its level-2 OOF slice predictions, and those predictions."""
    import dataclasses

    import pandas as pd

    stack = Path(scfg.out) / scfg.name
    weights = stack / "weights.json"
    oof = None
    same_models = weights.is_file() and json.loads(weights.read_text()).get("base_models") == list(models)
    if same_models and (stack / "oof.parquet").is_file():
        frame = pd.read_parquet(stack / "oof.parquet")
        oof = frame[frame["model"] == which]
        origin = f"{stack.name}/oof.parquet"
    if oof is None or oof.empty:
        # Another model subset than the stack's: its own level-2 CV gives the OOF predictions to calibrate.
        blend = dataclasses.replace(scfg.blend, members=list(info["members"]) or list(scfg.blend.members))
        stackers, bl = fit_stackers(dataclasses.replace(scfg, blend=blend), l2)
        _, preds, _ = score_stack(l2, stackers, bl)
        if which not in preds:
            raise UserError(f"no OOF predictions of stack method {which!r} to calibrate the study model on")
        oof = predictions_frame(l2.oof_features, {which: preds[which]}, l2.folds, l2.y)
        origin = "level-2 CV of the bundled models"
    source = {"stack": scfg.name, "method": which, "models": list(models), "oof": origin}
    try:
        return fit_study_model(oof, sensitivity, study_score, source=source), oof
    except ValueError as exc:
        raise UserError(f"study model: {exc}") from None


# ----------------------------------------------------------------------------------------------------- load
@dataclass
class Bundle:
    """A loaded bundle, ready for :mod:`rsna19.study.batch`.

    Attributes:
        path: the bundle folder.
        manifest: ``bundle.json``.
        models: one :class:`~rsna19.engine.predictor.Predictor` per base model (all its bundled folds), in
            ``bundle.json`` order; a sequence model's predictor holds its image model's as ``upstream``.
        stacker: the second level.
        device: where the models run.
        study_model: the study-level calibration and operating points (``study_model.json``), None for a bundle
            written before they existed.
        sha256: SHA-256 of ``bundle.json``, which lists the checksum of every other file: the bundle's identity.
    """

    path: Path
    manifest: dict[str, Any]
    models: list[Any]  # rsna19.engine.predictor.Predictor
    stacker: Any  # rsna19.stacking.bundled.LoadedStacker
    device: Any
    study_model: dict[str, Any] | None = None
    sha256: str = ""

    @property
    def convert(self) -> dict[str, Any]:
        """Conversion options of the training cache (crop, spacing, tilt correction)."""
        return self.manifest["convert"]

    @property
    def families(self) -> dict[str, str]:
        """Base model name → its family (``clf2d``, ``clf3d``, ``seq`` ...), from ``bundle.json``."""
        return {m["name"]: m.get("family", "") for m in self.manifest["models"]}

    @property
    def tta(self) -> list[str]:
        """The TTA views the models run (the bundle's, or those asked for at load time)."""
        return list(self.models[0].views) if self.models else list(self.manifest["tta"])

    @property
    def folds(self) -> list[int]:
        """The folds whose networks are loaded (all bundled ones, or those asked for at load time)."""
        return sorted({k for p in self.models for k in p.folds})

    @property
    def drift_reference(self) -> dict[str, Any] | None:
        """Input facts of the training series and OOF outputs (:mod:`rsna19.monitor.drift`); None for older bundles."""
        return self.manifest.get("drift_reference")

    @property
    def training_geometry(self) -> dict[str, Any] | None:
        """Slice / pixel spacing of the training series (:func:`training_geometry`); None for older bundles."""
        return self.manifest.get("training_geometry")


def _read_manifest(root: Path) -> tuple[dict[str, Any], bytes]:
    """The parsed ``bundle.json`` of ``root`` and its bytes (for its checksum).

    Raises:
        UserError: no ``bundle.json``, or not valid JSON.
    """
    mpath = root / "bundle.json"
    if not mpath.is_file():
        raise UserError(f"{root} is not an rsna19 bundle (no bundle.json)")
    raw = _read_checked(mpath, None)
    try:
        return json.loads(raw), raw
    except ValueError as exc:
        raise UserError(f"{mpath}: not valid JSON: {exc}") from None


def _read_checked(path: Path, digest: str | None) -> bytes:
    """The bytes of a bundle file, after the no-pickle and checksum checks."""
    if not path.is_file():
        raise UserError(f"bundle file missing: {path}")
    data = path.read_bytes()
    if data.startswith(_PICKLE_MAGIC):
        raise UserError(f"refusing to load {path}: it is a pickle/torch checkpoint, bundles hold safetensors only")
    if digest is not None and hashlib.sha256(data).hexdigest() != digest:
        raise UserError(f"refusing to load {path}: its checksum differs from bundle.json (the file was changed)")
    return data


def parse_folds(text: str | None) -> list[int] | None:
    """``"0,1"`` → ``[0, 1]``; None or ``"all"`` → None (every bundled fold).

    Raises:
        UserError: not a comma-separated list of integers.
    """
    if text is None or text.strip().lower() in ("", "all"):
        return None
    try:
        return sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise UserError(f"--folds {text!r}: give fold numbers separated by commas (e.g. 0,1) or 'all'") from None


def load_bundle(
    path: str | os.PathLike[str],
    device: str = "auto",
    folds: list[int] | None = None,
    tta: list[str] | None = None,
) -> Bundle:
    """Load a bundle written by :func:`export_bundle`; nothing is unpickled.

    Args:
        path: the bundle folder.
        device: ``cpu``, ``cuda`` or ``auto`` (the GPU when one is visible) for the base models.
        folds: load only these of the bundled folds (every model averages over them; a sequence model's image
            model gets the same ones); None loads all. Fewer folds: proportionally less model time.
        tta: test-time views to run instead of the bundle's (``none``, ``hflip``, ...); None keeps the bundle's.
            A sequence model's embeddings keep the views its training embeddings were made with.

    Raises:
        UserError: not a bundle, another bundle version, a missing or changed file, a file that is a pickle or
            does not parse, a fold some model does not have, or an unknown TTA view.
    """

    root = Path(path)
    mpath = root / "bundle.json"
    manifest, raw = _read_manifest(root)
    if manifest.get("format") != BUNDLE_FORMAT or manifest.get("bundle_version") != BUNDLE_VERSION:
        raise UserError(f"{mpath}: not an rsna19 bundle of version {BUNDLE_VERSION}")
    files: dict[str, str] = manifest["files"]
    extra = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and p.name != "bundle.json" and p.relative_to(root).as_posix() not in files
    )
    if extra:
        raise UserError(f"{root}: file(s) not listed in bundle.json: {', '.join(extra[:5])}")
    reader = _CheckedFiles(root, files)
    dev = resolve_device(device)
    views = parse_tta(tta) if tta is not None else manifest["tta"]
    if folds is not None:
        for entry in manifest["models"]:
            missing = sorted(set(folds) - {int(k) for k in entry["folds"]})
            if missing or not folds:
                raise UserError(f"{root}: model {entry['name']!r} has folds {entry['folds']}, not {missing or folds}")
    models = _load_models(reader, manifest["models"], folds, dev, views)
    info = reader.json("stacker/stacker.json")
    stacker = load_stacker(info, lambda rel: reader.read(f"stacker/{rel}"))
    study_model = _study_model(root, manifest, reader.json)
    return Bundle(root, manifest, list(models.values()), stacker, dev, study_model, hashlib.sha256(raw).hexdigest())


class _CheckedFiles:
    """Reads the files of a bundle, each checked against its SHA-256 in ``bundle.json``."""

    def __init__(self, root: Path, files: dict[str, str]) -> None:
        self.root = root
        self.files = files

    def read(self, rel: str) -> bytes:
        return _read_checked(self.root / rel, self.files.get(rel, ""))

    def json(self, rel: str) -> Any:
        try:
            return json.loads(self.read(rel))
        except ValueError as exc:
            raise UserError(f"{self.root / rel}: not valid JSON: {exc}") from None

    def tensors(self, rel: str) -> dict[str, Any]:
        from safetensors import SafetensorError
        from safetensors.torch import load

        try:
            return load(self.read(rel))
        except (SafetensorError, ValueError, RuntimeError) as exc:
            raise UserError(f"{self.root / rel}: not a safetensors file: {exc}") from None


def _load_models(
    reader: _CheckedFiles, entries: list[dict[str, Any]], folds: list[int] | None, dev: Any, views: list[str]
) -> dict[str, Any]:
    """The bundled models (``folds`` of each, all when None) as predictors by name, sequence models linked to
    their image models."""
    root = reader.root
    models: dict[str, Predictor] = {}
    embed_views: dict[str, list[str]] = {}
    for entry in entries:
        name = entry["name"]
        cfg = _bundled_config(root, entry, reader.read)
        weights, meta = [], {}
        for k in entry["folds"] if folds is None else [k for k in entry["folds"] if int(k) in folds]:
            meta = reader.json(f"models/{name}/fold_{k}.json")
            tensors = reader.tensors(f"models/{name}/fold_{k}.safetensors")
            weights.append((int(k), tensors, meta["hu_mapping"], int(meta.get("epoch", -1))))
        try:
            models[name] = Predictor.create(
                cfg, meta["model_name"], meta["model_kwargs"], weights, dev, views, name=name
            )
        except UserError as exc:  # state dict does not fit the architecture
            raise UserError(f"{root}/models/{name}: {exc}") from None
        if "embeddings" in meta:
            embed_views[name] = list(meta["embeddings"]["tta"])
    for name, upstream_views in embed_views.items():
        upstream = models[name].cfg.data.embeddings
        if upstream not in models:
            raise UserError(f"{root}: model {name!r} reads the embeddings of {upstream!r}, which is not bundled")
        models[name].upstream = models[upstream]
        models[name].embed_views = upstream_views
    return models


def _bundled_config(root: Path, entry: dict[str, Any], read: Callable[[str], bytes]) -> TrainConfig:
    """The training config of a bundled model, once its family is known to be registered here.

    A bundle never imports code: a family from a plugin loads only when the user names that plugin.

    Raises:
        UserError: the model's registry name is unknown (also after the ``$RSNA19_PLUGINS`` plugins): the message
            names the plugin it came from.
    """
    try:
        get_model_spec(entry["model_name"])
    except UserError as exc:
        plugin = entry.get("plugin")
        if not plugin:
            raise UserError(f"{root}/models/{entry['name']}: {exc}") from None
        raise UserError(
            f"{root}: model {entry['name']!r} is a {entry['model_name']!r} model of plugin {plugin!r}, which is not "
            f"loaded: name the plugin in ${PLUGINS_ENV} (a bundle never imports code itself)"
        ) from None
    return from_dict(TrainConfig, yaml.safe_load(read(f"models/{entry['name']}/config.yaml")))


def _study_model(root: Path, manifest: dict[str, Any], read_json: Any) -> dict[str, Any] | None:
    """The checked study model of a bundle, or None when the bundle has none (written before they existed)."""
    entry = manifest.get("study_model")
    if not entry:
        return None
    try:
        return check_study_model(read_json(entry["file"]), str(root / entry["file"]))
    except ValueError as exc:
        raise UserError(str(exc)) from None


def load_study_model(path: str | os.PathLike[str]) -> tuple[dict[str, Any] | None, dict[str, Any], str]:
    """The study model of a bundle without loading its networks (checksums checked like :func:`load_bundle`).

    Returns:
        (the study model or None, ``bundle.json``, the SHA-256 of ``bundle.json``).

    Raises:
        UserError: not a bundle, or a changed or invalid study model file.
    """
    root = Path(path)
    manifest, raw = _read_manifest(root)
    files = manifest.get("files", {})

    def read_json(rel: str) -> Any:
        try:
            return json.loads(_read_checked(root / rel, files.get(rel, "")))
        except ValueError as exc:
            raise UserError(f"{root / rel}: not valid JSON: {exc}") from None

    return _study_model(root, manifest, read_json), manifest, hashlib.sha256(raw).hexdigest()


def write_recalibrated_bundle(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    study_model: dict[str, Any],
    recalibration: dict[str, Any],
    force: bool = False,
) -> str:
    """A copy of bundle ``src`` at ``dst`` whose study model is ``study_model``; ``src`` is left untouched.

    Every other file is copied byte for byte; ``study_model.json`` is replaced, and ``bundle.json`` gets the new
    file's checksum, the new operating points and a ``recalibration`` entry (what the model was fitted on, and
    the SHA-256 of the original ``bundle.json``). The copy is written atomically and loads like any bundle.

    Returns:
        The SHA-256 of the new ``bundle.json`` (the new bundle's identity).

    Raises:
        UserError: ``src`` is not a bundle or has changed files, ``dst`` exists without ``force`` or is ``src``,
            or ``study_model`` is not a valid study model.
    """
    import shutil

    src, dst = Path(src), Path(dst)
    _, manifest, sha = load_study_model(src)  # checks bundle.json and the study model's checksum
    files = manifest.get("files", {})
    for rel, digest in files.items():  # a bundle that fails its checksums is not copied on
        _read_checked(src / rel, digest)
    if dst.resolve() == src.resolve():
        raise UserError(f"{dst}: the recalibrated bundle must not replace the original")
    if dst.exists() and not force:
        raise UserError(f"{dst} exists; use --force to replace it")
    try:
        check_study_model(study_model, "recalibrated study model")
    except ValueError as exc:
        raise UserError(str(exc)) from None
    with atomic_path(dst) as tmp:
        shutil.copytree(src, tmp)
        save_json(study_model, tmp / STUDY_MODEL_FILE)
        manifest = {**manifest, "files": {**files, STUDY_MODEL_FILE: sha256_file(tmp / STUDY_MODEL_FILE)}}
        manifest["study_model"] = {
            "file": STUDY_MODEL_FILE,
            "method": study_model["method"],
            "score": study_model["score"],
            "operating_points": {
                c: {k: e.get(k) for k in ("threshold", "target_sensitivity", "oof_sensitivity", "oof_specificity")}
                for c, e in study_model["classes"].items()
            },
        }
        manifest["recalibration"] = {**recalibration, "original_bundle_sha256": sha}
        save_json(manifest, tmp / "bundle.json")
    return hashlib.sha256((dst / "bundle.json").read_bytes()).hexdigest()
