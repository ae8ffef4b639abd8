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

Nothing in a bundle is a pickle: weights are safetensors, the rest JSON, YAML (read with ``safe_load``) and
LightGBM's own text format. :func:`load_bundle` refuses a file that looks like a pickle or a torch zip, a file that
does not parse as what it should be, and a file whose checksum differs from ``bundle.json``.

The stackers of a bundle are refitted on **all** OOF rows of the base models (the stack stage's test predictions
average its level-2 fold models instead); the blend weights are the stack stage's own, fitted on all OOF rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from rsna19.constants import CLASSES, WINDOWS
from rsna19.errors import UserError
from rsna19.utils.atomic import atomic_path

#: Bumped when the layout changes; :func:`load_bundle` refuses other versions.
BUNDLE_VERSION = 1
BUNDLE_FORMAT = "rsna19-bundle"
#: Leading bytes of a pickle (protocol 2+) and of torch's zip checkpoint format.
_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, allow_nan=False) + "\n", encoding="utf-8")


def _versions() -> dict[str, str]:
    import lightgbm
    import safetensors
    import timm
    import torch

    import rsna19

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


def _stack_config(work: Path, pipeline: Any) -> Any:
    from rsna19.config import load_config
    from rsna19.stacking.config import StackConfig

    stem = Path(pipeline.stack).stem if pipeline is not None else None
    cands = sorted((work / "stack").glob("*/config.yaml"))
    if stem:
        cands = [c for c in cands if c.parent.name == stem] or cands
    if not cands:
        raise UserError(f"no finished stack under {work / 'stack'}: run `rsna19 run` to the end first")
    return load_config(StackConfig, cands[0])


def _export_stacker(scfg: Any, which: str, models: list[str], dest: Path) -> tuple[dict[str, Any], Any, Any]:
    """Refit the method's stackers on all OOF rows, write them under ``dest``; returns (stacker.json, l2, preds)."""
    from rsna19.stacking.inputs import load_base_inputs
    from rsna19.stacking.lgbm import LgbmStacker, _Constant
    from rsna19.stacking.run import fit_stackers, make_stackers, prepare_level2

    inputs = load_base_inputs(scfg.runs, models, scfg.folds_csv, list(scfg.folds))
    l2 = prepare_level2(inputs, scfg.features.offsets, tuple(scfg.features.windows))
    factories = make_stackers(scfg)
    info: dict[str, Any] = {
        "method": which,
        "models": models,
        "features": {"offsets": scfg.features.offsets, "windows": list(scfg.features.windows)},
        "feature_names": list(l2.oof.feature_names),
        "postprocess": dataclasses.asdict(scfg.postprocess),
        "members": [],
    }
    if which == "mean":
        return info, l2, None
    if which == "blend":
        members = list(scfg.blend.members) or list(factories)
        weights_path = Path(scfg.out) / scfg.name / "weights.json"
        saved = json.loads(weights_path.read_text()) if weights_path.is_file() else {}
        if saved.get("base_models") == models and "blend" in saved and saved["blend"]["members"] == members:
            blend_w = np.asarray(saved["blend"]["weights"], dtype=np.float64)
        else:  # another model subset than the stack's: the blend weights need their own level-2 CV
            _, blend = fit_stackers(
                dataclasses.replace(scfg, blend=dataclasses.replace(scfg.blend, members=members)), l2
            )
            blend_w = np.asarray(blend.weights, dtype=np.float64)
        info["blend_weights"] = blend_w.tolist()
    elif which in factories:
        members = [which]
    else:
        raise UserError(f"stack method {which!r} is not available; enabled: mean, blend, {', '.join(factories)}")
    info["members"] = members
    fitted = {}
    for name in members:
        if name not in factories:
            raise UserError(f"blend member {name!r} is not an enabled stacker ({', '.join(factories)})")
        st = factories[name]()
        st.fit(l2.oof, l2.y)
        fitted[name] = st
        if name == "lgbm":
            assert isinstance(st, LgbmStacker)
            boosters = []
            for c, b in zip(CLASSES, st.boosters):
                if isinstance(b, _Constant):
                    boosters.append({"class": c, "constant": float(b.p)})
                else:
                    fname = f"lgbm_{c}.txt"
                    # num_iteration=None: the best iteration when early stopping found one.
                    (dest / fname).write_text(b.model_to_string(), encoding="utf-8")
                    boosters.append({"class": c, "file": fname})
            info["lgbm"] = boosters
        elif name == "mlp":
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in st.net.state_dict().items()}, str(dest / "mlp.safetensors"))
            _write_json(
                {
                    "hidden": list(st.cfg.hidden),
                    "dropout": st.cfg.dropout,
                    "mean": st.mean.tolist(),
                    "std": st.std.tolist(),
                    "prob_mask": st.prob_mask.tolist(),
                },
                dest / "mlp.json",
            )
        elif name == "convex":
            _write_json({"per_class": st.per_class, "weights": np.asarray(st.weights).tolist()}, dest / "convex.json")
    stacker = _LoadedStacker(info, fitted)
    return info, l2, stacker.predict(l2.test)


def export_bundle(
    work: str | os.PathLike[str],
    out: str | os.PathLike[str],
    models: list[str] | None = None,
    folds: list[int] | None = None,
    which: str | None = None,
    force: bool = False,
) -> ExportResult:
    """Write the inference bundle of a finished ``rsna19 run`` folder.

    Args:
        work: the run's work folder (``pipeline.yaml``, ``runs/``, ``stack/``, ``folds.csv``).
        out: the bundle folder to create (written atomically).
        models: base models to include (default: every model of the pipeline).
        folds: folds whose weights to include (default: all; each model's prediction averages them).
        which: stack method (default: the pipeline's ``submit``, usually ``blend``).
        force: replace an existing bundle.

    Raises:
        UserError: an unfinished work folder, an unknown model or fold, or an existing ``out`` without ``force``.
    """
    from safetensors.torch import save_file

    from rsna19.config import load_config, to_dict
    from rsna19.conversion.series import CONVERSION_VERSION
    from rsna19.pipeline.config import PipelineConfig
    from rsna19.training.checkpoint import load_checkpoint

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

    entries = []
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        (tmp / "stacker").mkdir()
        for name in models:
            mdir = tmp / "models" / name
            mdir.mkdir(parents=True)
            cfg_dict = None
            for k in folds:
                state = load_checkpoint(work / "runs" / name / f"fold_{k}" / "best.pt")
                save_file({n: t.contiguous() for n, t in state["model"].items()}, str(mdir / f"fold_{k}.safetensors"))
                _write_json(
                    {
                        "model_name": state["model_name"],
                        "model_kwargs": state["model_kwargs"],
                        "hu_mapping": state["hu_mapping"],
                        "fold": k,
                        "epoch": int(state["epoch"]),
                        "best_wll": float(state["best_wll"]),
                    },
                    mdir / f"fold_{k}.json",
                )
                cfg_dict = cfg_dict or state["config"]
            # Paths of the training machine mean nothing to a bundle user.
            cfg_dict = {**cfg_dict, "runs": None, "data": {**cfg_dict["data"], "cache": None, "folds": None}}
            (mdir / "config.yaml").write_text(yaml.safe_dump(cfg_dict, sort_keys=False), encoding="utf-8")
            _write_json(cfg_dict, mdir / "config.json")
            d = cfg_dict["data"]
            entries.append(
                {
                    "name": name,
                    "model_name": cfg_dict["model"]["name"],
                    "backbone": cfg_dict["model"]["backbone"],
                    "folds": folds,
                    "windows": d["windows"],
                    "slices": d["slices"],
                    "layout": d["layout"],
                    "resize": d["resize"],
                    "crop": d["crop"],
                }
            )
        info, l2, stacker_test = _export_stacker(scfg, which, models, tmp / "stacker")
        _write_json(info, tmp / "stacker" / "stacker.json")
        files = {p.relative_to(tmp).as_posix(): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        c = pipeline.convert
        names = sorted({w for e in entries for w in e["windows"]})
        manifest = {
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
            "pipeline": to_dict(pipeline)["name"],
            "models": entries,
            "stacker": {"method": which, "members": info["members"], "file": "stacker/stacker.json"},
            "files": files,
        }
        _write_json(manifest, tmp / "bundle.json")
    return ExportResult(out, models, folds, stacker_test, l2)


# ----------------------------------------------------------------------------------------------------- load
@dataclass
class BundleModel:
    """One base model of a bundle: its config and one (net, HU mapping state) per fold."""

    name: str
    cfg: Any  # TrainConfig
    nets: list[Any] = field(default_factory=list)  # torch modules, eval mode
    hu_mappings: list[dict[str, Any]] = field(default_factory=list)
    folds: list[int] = field(default_factory=list)


@dataclass
class Bundle:
    """A loaded bundle, ready for :mod:`rsna19.inference.study`."""

    path: Path
    manifest: dict[str, Any]
    models: list[BundleModel]
    stacker: _LoadedStacker
    device: Any

    @property
    def convert(self) -> dict[str, Any]:
        """Conversion options of the training cache (crop, spacing, tilt correction)."""
        return self.manifest["convert"]

    @property
    def tta(self) -> list[str]:
        return list(self.manifest["tta"])


class _LoadedStacker:
    """The bundle's second level: its members' predictions, post-processed, blended (or the plain mean)."""

    def __init__(self, info: dict[str, Any], members: dict[str, Any]) -> None:
        self.info = info
        self.members = members
        self.models = list(info["models"])
        self.offsets = int(info["features"]["offsets"])
        self.windows = tuple(int(w) for w in info["features"]["windows"])
        self.feature_names = list(info["feature_names"])

    def predict(self, data: Any) -> np.ndarray:
        """(N, 6) stacked probabilities of a :class:`rsna19.stacking.features.Level2Data`."""
        from rsna19.stacking.convex import combine
        from rsna19.stacking.postprocess import postprocess

        if list(data.feature_names) != self.feature_names:
            raise UserError("the level-2 features differ from the ones the bundle's stacker was trained on")
        pp = self.info["postprocess"]
        method = self.info["method"]
        if method == "mean":
            return data.base.mean(axis=1, dtype=np.float64)
        preds = {n: postprocess(self.members[n].predict(data), pp["any_ge_max"], pp["clip"]) for n in self.members}
        if method != "blend":
            return preds[method]
        P = np.stack([preds[m] for m in self.info["members"]], axis=1)
        return postprocess(combine(P, np.asarray(self.info["blend_weights"])), pp["any_ge_max"], pp["clip"])


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


def load_bundle(path: str | os.PathLike[str], device: str = "cpu") -> Bundle:
    """Load a bundle written by :func:`export_bundle`; nothing is unpickled.

    Args:
        path: the bundle folder.
        device: ``cpu``, ``cuda`` or ``auto`` for the base models.

    Raises:
        UserError: not a bundle, another bundle version, a missing or changed file, or a file that is a pickle or
            does not parse.
    """
    import lightgbm as lgb
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load

    from rsna19.config import from_dict
    from rsna19.inference.predict import model_from_state
    from rsna19.stacking.config import MlpConfig
    from rsna19.stacking.convex import ConvexStacker
    from rsna19.stacking.lgbm import LgbmStacker, _Constant
    from rsna19.stacking.mlp import MlpStacker, _mlp
    from rsna19.training.config import TrainConfig
    from rsna19.training.distributed import resolve_device

    root = Path(path)
    mpath = root / "bundle.json"
    if not mpath.is_file():
        raise UserError(f"{root} is not an rsna19 bundle (no bundle.json)")
    try:
        manifest = json.loads(_read_checked(mpath, None))
    except ValueError as exc:
        raise UserError(f"{mpath}: not valid JSON: {exc}") from None
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

    def read(rel: str) -> bytes:
        return _read_checked(root / rel, files.get(rel, ""))

    def read_json(rel: str) -> Any:
        try:
            return json.loads(read(rel))
        except ValueError as exc:
            raise UserError(f"{root / rel}: not valid JSON: {exc}") from None

    def read_tensors(rel: str) -> dict[str, torch.Tensor]:
        try:
            return load(read(rel))
        except (SafetensorError, ValueError, RuntimeError) as exc:
            raise UserError(f"{root / rel}: not a safetensors file: {exc}") from None

    dev = resolve_device(device)
    models = []
    for entry in manifest["models"]:
        name = entry["name"]
        cfg_dict = yaml.safe_load(read(f"models/{name}/config.yaml"))
        bm = BundleModel(name, from_dict(TrainConfig, cfg_dict))
        for k in entry["folds"]:
            meta = read_json(f"models/{name}/fold_{k}.json")
            weights = read_tensors(f"models/{name}/fold_{k}.safetensors")
            try:
                net = model_from_state(meta["model_name"], meta["model_kwargs"], weights, dev)
            except RuntimeError as exc:  # state dict does not fit the architecture
                raise UserError(f"{root}/models/{name}/fold_{k}.safetensors does not fit its model: {exc}") from None
            bm.nets.append(net)
            bm.hu_mappings.append(meta["hu_mapping"])
            bm.folds.append(int(k))
        models.append(bm)

    info = read_json("stacker/stacker.json")
    members: dict[str, Any] = {}
    for name in info["members"]:
        if name == "lgbm":
            st = LgbmStacker()
            for b in info["lgbm"]:
                if "constant" in b:
                    st.boosters.append(_Constant(float(b["constant"])))
                else:
                    text = read(f"stacker/{b['file']}").decode("utf-8")
                    try:
                        st.boosters.append(lgb.Booster(model_str=text))
                    except lgb.basic.LightGBMError as exc:
                        raise UserError(f"{root}/stacker/{b['file']}: not a LightGBM model: {exc}") from None
            members[name] = st
        elif name == "mlp":
            m = read_json("stacker/mlp.json")
            st = MlpStacker(MlpConfig(hidden=tuple(m["hidden"]), dropout=float(m["dropout"])))
            st.mean = np.asarray(m["mean"], dtype=np.float32)
            st.std = np.asarray(m["std"], dtype=np.float32)
            st.prob_mask = np.asarray(m["prob_mask"], dtype=bool)
            net = _mlp(len(st.mean), tuple(m["hidden"]), float(m["dropout"]))
            net.load_state_dict(read_tensors("stacker/mlp.safetensors"))
            st.net = net.eval()
            members[name] = st
        elif name == "convex":
            c = read_json("stacker/convex.json")
            st = ConvexStacker(bool(c["per_class"]))
            st.weights = np.asarray(c["weights"], dtype=np.float64)
            members[name] = st
        else:
            raise UserError(f"{root}: unknown stacker {name!r} in stacker.json")
    return Bundle(root, manifest, models, _LoadedStacker(info, members), dev)
