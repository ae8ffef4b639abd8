"""The second level of an inference bundle: refit, save and load the stackers through their own methods.

``BUNDLE/stacker/`` holds ``stacker.json`` and the files each member stacker's ``save`` wrote (built-ins:
``convex.json``; ``lgbm_<class>.txt``; ``mlp.safetensors`` and ``mlp.json``). ``stacker.json``::

    method          mean | blend | a stacker name
    models          base model names (order of the model axis of the level-2 features)
    features        {"offsets": k, "windows": [...]}; feature_names: the level-2 feature names
    postprocess     {"any_ge_max": ..., "clip": ...}: the config's post-processing (bundles before
                    ``postprocess_steps`` applied it to every output)
    postprocess_steps  output name (each stacker member, ``blend``) → {"any_ge_max": bool, "clip": margin or 0}:
                    the steps that output keeps, chosen on the level-2 OOF rows (``weights.json`` of the stack)
    members         the stackers used (the blend's members, or the one stacker); ``base:<model>`` is a base model's
                    own probabilities (no saved state)
    stackers        member name → the info its ``save`` returned (what its ``load`` gets back)
    blend_weights   (K, 6) blend weights when method is blend

No stacker is special-cased here: :func:`export_stacker` calls ``save`` and :func:`load_stacker` the registered
class's ``load`` of each member (:mod:`rsna19.stacking.registry`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rsna19.core.digest import sha256_file
from rsna19.core.errors import UserError
from rsna19.stacking.base import Reader
from rsna19.stacking.blend import BASE_PREFIX
from rsna19.stacking.config import StackConfig
from rsna19.stacking.convex import combine
from rsna19.stacking.features import Level2Data
from rsna19.stacking.inputs import load_base_inputs
from rsna19.stacking.postprocess import postprocess
from rsna19.stacking.registry import get_stacker_spec
from rsna19.stacking.run import blend_members, fit_stackers, make_stackers, postprocess_decisions, prepare_level2

#: The only kinds of file a stacker may save into a bundle (JSON, LightGBM text dumps, safetensors).
ALLOWED_SUFFIXES = (".json", ".txt", ".safetensors")
#: Written by :func:`rsna19.study.bundle.export_bundle`, not by a stacker.
INFO_FILE = "stacker.json"
#: Leading bytes of a pickle (protocol 2+) and of torch's zip checkpoint format.
_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")


class LoadedStacker:
    """A bundle's second level: its members' predictions, post-processed, blended (or the plain mean).

    Attributes:
        info: the content of ``stacker.json``.
        members: member name → fitted stacker.
        models: base model names; offsets, windows: the level-2 feature settings; feature_names: the features the
            members were fitted on; per_fold: new slices are stacked from each base fold's predictions separately
            (``features.test_per_fold``; False for bundles written before it).
    """

    def __init__(self, info: dict[str, Any], members: dict[str, Any]) -> None:
        self.info = info
        self.members = members
        self.models = list(info["models"])
        self.offsets = int(info["features"]["offsets"])
        self.windows = tuple(int(w) for w in info["features"]["windows"])
        self.feature_names = list(info["feature_names"])
        self.per_fold = bool(info.get("test_per_fold", False))

    def predict(self, data: Level2Data | Sequence[Level2Data]) -> np.ndarray:
        """(N, 6) stacked probabilities of level-2 features ``data``: one set, or one set per base fold (each member
        predicts every set and its predictions are averaged, as in the stack's test predictions).

        Raises:
            UserError: ``data`` has other features than the stackers were fitted on.
        """
        sets = [data] if isinstance(data, Level2Data) else list(data)
        if any(list(d.feature_names) != self.feature_names for d in sets):
            raise UserError("the level-2 features differ from the ones the bundle's stacker was trained on")
        method = self.info["method"]
        base = np.mean([d.base.astype(np.float64) for d in sets], axis=0)  # (N, M, 6)
        if method == "mean":
            return base.mean(axis=1)

        def post(name: str, p: np.ndarray) -> np.ndarray:
            steps = self.info.get("postprocess_steps", {}).get(name, self.info["postprocess"])
            return postprocess(p, bool(steps["any_ge_max"]), float(steps["clip"]))

        preds = {n: post(n, np.mean([m.predict(d) for d in sets], axis=0)) for n, m in self.members.items()}
        if method != "blend":
            return preds[method]
        for name in self.info["members"]:  # base-model members: the model's own probabilities at the slice
            if name.startswith(BASE_PREFIX):
                preds[name] = base[:, self.models.index(name.removeprefix(BASE_PREFIX))]
        P = np.stack([preds[m] for m in self.info["members"]], axis=1)
        return post("blend", combine(P, np.asarray(self.info["blend_weights"])))


def _digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def save_member(name: str, stacker: Any, dest: Path) -> dict[str, Any]:
    """Save a fitted stacker into the bundle's stacker folder through its own ``save``, with the bundle's rules.

    Args:
        name: the stacker's registered name (for messages).
        stacker: the fitted stacker.
        dest: the stacker folder (shared by all members).

    Returns:
        The JSON-able info its ``save`` returned.

    Raises:
        ValueError: the stacker wrote a file of a kind bundles do not hold, a pickle, ``stacker.json``, or changed
            a file another stacker wrote, or returned info that is not JSON.
    """
    before = _digests(dest)
    info = stacker.save(dest)
    after = _digests(dest)
    changed = sorted(rel for rel, digest in before.items() if after.get(rel) != digest)
    if changed:
        raise ValueError(f"stacker {name!r} overwrote or removed {changed}: prefix its files with its name")
    for rel in sorted(set(after) - set(before)):
        if rel == INFO_FILE or not rel.endswith(ALLOWED_SUFFIXES):
            raise ValueError(f"stacker {name!r} wrote {rel}; bundle stacker files are {', '.join(ALLOWED_SUFFIXES)}")
        with (dest / rel).open("rb") as fh:
            if fh.read(4).startswith(_PICKLE_MAGIC):
                raise ValueError(f"stacker {name!r} wrote a pickle ({rel}); bundles hold no pickles")
    try:
        json.dumps(info, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"stacker {name!r}: save returned info that is not JSON: {exc}") from None
    return info


def load_member(name: str, info: dict[str, Any], read: Reader) -> Any:
    """Load one member stacker of a bundle through its registered class's ``load``.

    Raises:
        UserError: an unknown stacker, or files that are missing, changed or do not parse (any error of the
            stacker's ``load`` is reported as one, naming the stacker).
    """
    spec = get_stacker_spec(name)
    try:
        return spec.cls.load(info, read)
    except UserError:
        raise
    except Exception as exc:  # a plug-in's parse error on untrusted bytes: report, never crash with a trace
        raise UserError(f"bundle stacker {name!r} could not be loaded: {type(exc).__name__}: {exc}") from None


def export_stacker(
    scfg: StackConfig, which: str, models: list[str], dest: Path
) -> tuple[dict[str, Any], Any, np.ndarray | None]:
    """Refit the method's stackers on all OOF rows of ``models`` and save them under ``dest``.

    Args:
        scfg: the stack config of the work folder (paths resolved).
        which: ``mean``, ``blend`` or an enabled stacker's name.
        models: base models the stackers use.
        dest: the bundle's stacker folder (exists; ``stacker.json`` is written by the caller).

    Returns:
        (the content of ``stacker.json``, the level-2 problem (:class:`rsna19.stacking.run.Level2Set`), the
        in-memory stacker's (N_test, 6) predictions on its test features, or None for ``mean``).

    Raises:
        UserError: ``which`` or a blend member is not an enabled stacker.
    """
    inputs = load_base_inputs(scfg.runs, models, scfg.folds_csv, list(scfg.folds))
    l2 = prepare_level2(inputs, scfg.features.offsets, tuple(scfg.features.windows), scfg.features.test_per_fold)
    factories = make_stackers(scfg)
    info: dict[str, Any] = {
        "method": which,
        "models": models,
        "features": {"offsets": scfg.features.offsets, "windows": list(scfg.features.windows)},
        "test_per_fold": bool(scfg.features.test_per_fold),
        "feature_names": list(l2.oof.feature_names),
        "postprocess": dataclasses.asdict(scfg.postprocess),
        "members": [],
        "stackers": {},
    }
    if which == "mean":
        return info, l2, None
    weights_path = Path(scfg.out) / scfg.name / "weights.json"
    saved = json.loads(weights_path.read_text()) if weights_path.is_file() else {}
    same_stack = saved.get("base_models") == models and "postprocess" in saved
    if which == "blend":
        members = blend_members(scfg, list(factories), models)
        same_stack = same_stack and "blend" in saved and saved["blend"]["members"] == members
    elif which in factories:
        members = [which]
    else:
        raise UserError(f"stack method {which!r} is not available; enabled: mean, blend, {', '.join(factories)}")
    if same_stack:
        steps = saved["postprocess"]
        blend_w = np.asarray(saved["blend"]["weights"], dtype=np.float64) if which == "blend" else None
    else:  # another model subset than the stack's: weights and post-processing need their own level-2 CV
        stacker_members = [m for m in members if not m.startswith(BASE_PREFIX)]
        cv_cfg = dataclasses.replace(scfg, blend=dataclasses.replace(scfg.blend, members=stacker_members))
        results, blend = fit_stackers(cv_cfg, l2)
        steps = postprocess_decisions(results, blend)
        blend_w = np.asarray(blend.weights, dtype=np.float64) if which == "blend" and blend is not None else None
    if blend_w is not None:
        info["blend_weights"] = blend_w.tolist()
    info["postprocess_steps"] = {m: steps[m] for m in [*members, "blend"] if m in steps}
    info["members"] = members
    fitted = {}
    for name in members:
        if name.startswith(BASE_PREFIX):
            if name.removeprefix(BASE_PREFIX) not in models:
                raise UserError(f"blend member {name!r} is not one of the bundled models ({', '.join(models)})")
            continue
        if name not in factories:
            raise UserError(f"blend member {name!r} is not an enabled stacker ({', '.join(factories)})")
        st = factories[name]()
        st.fit(l2.oof, l2.y)
        fitted[name] = st
        info["stackers"][name] = save_member(name, st, dest)
    return info, l2, LoadedStacker(info, fitted).predict(l2.test_sets)


def load_stacker(info: dict[str, Any], read: Reader) -> LoadedStacker:
    """The bundle's second level from ``stacker.json``'s content and the stacker folder's files.

    Args:
        info: the parsed ``stacker.json``.
        read: reads a file of the stacker folder by its relative name, after the bundle's checks (listed,
            checksum, not a pickle).

    Raises:
        UserError: an unknown member stacker, a member without saved info, or files that do not load.
    """
    saved = info.get("stackers") or {}
    members: dict[str, Any] = {}
    for name in info["members"]:
        if name.startswith(BASE_PREFIX):  # a base model's own probabilities: nothing to load
            continue
        if name not in saved:
            raise UserError(f"{INFO_FILE} has no saved state for stacker {name!r} (re-export the bundle)")
        members[name] = load_member(name, saved[name], read)
    return LoadedStacker(info, members)
