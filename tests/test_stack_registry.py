"""Stackers as plug-ins: every registered stacker saves and loads itself; a new one is one class + a config section."""

from __future__ import annotations

import dataclasses
import json
import logging
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from predfactory import make_work_dir

import rsna19.stacking  # noqa: F401  (registers the built-in stackers)
from rsna19.core.config import load_config
from rsna19.core.errors import UserError
from rsna19.stacking import registry
from rsna19.stacking.base import Reader, read_json, save_json
from rsna19.stacking.bundled import INFO_FILE, export_stacker, load_member, load_stacker, save_member
from rsna19.stacking.config import StackConfig
from rsna19.stacking.features import Level2Data
from rsna19.stacking.registry import (
    build_stacker,
    get_stacker_spec,
    list_stackers,
    make_stackers,
    register_stacker,
)
from rsna19.stacking.run import run_stack

TINY = Path(__file__).resolve().parents[1] / "configs" / "stack" / "tiny.yaml"
BUILT_IN = ["convex", "lgbm", "mlp"]
#: Smaller settings for the round trip, applied where a stacker's config has the field (others keep defaults).
FAST: dict[str, Any] = {
    "num_boost_round": 30,
    "early_stopping_rounds": 5,
    "num_leaves": 7,
    "min_data_in_leaf": 10,
    "hidden": (16,),
    "epochs": 3,
    "batch_size": 64,
    "num_threads": 1,
}


def _problem(n: int = 300, seed: int = 0) -> tuple[Level2Data, np.ndarray]:
    """Two noisy members around the truth, 30 patients, no epidural at all (a constant class)."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 6)) < 0.2).astype(float)
    y[:, 0] = 0
    y[:, 5] = y[:, :5].max(axis=1)
    logit = 3 * (2 * y - 1)
    good = 1 / (1 + np.exp(-(logit + rng.normal(0, 1.5, y.shape))))
    bad = 1 / (1 + np.exp(-(0.3 * logit + rng.normal(0, 2.0, y.shape))))
    base = np.stack([good, bad], axis=1).astype(np.float32)
    X = np.concatenate([good, bad, rng.random((n, 2))], axis=1).astype(np.float32)
    prob_mask = np.array([True] * 12 + [False] * 2)
    groups = np.repeat([f"P{i:03d}" for i in range(30)], n // 30)
    return Level2Data(X, [f"f{i}" for i in range(14)], prob_mask, base, groups), y


def _reader(folder: Path) -> Reader:
    """Reads files of a saved stacker folder, refusing names outside it (the bundle adds checksums)."""

    def read(rel: str) -> bytes:
        path = (folder / rel).resolve()
        assert path.is_relative_to(folder.resolve()), rel
        return path.read_bytes()

    return read


def _fast_section(spec: registry.StackerSpec) -> Any:
    section = spec.config()
    return dataclasses.replace(section, **{k: v for k, v in FAST.items() if hasattr(section, k)})


# ------------------------------------------------------------------------------------- every registered stacker
def test_built_ins_are_registered_in_run_order():
    assert [s.name for s in list_stackers()][:3] == BUILT_IN
    assert list(make_stackers(StackConfig())) == BUILT_IN
    assert get_stacker_spec("lgbm").cls.__name__ == "LgbmStacker"
    assert get_stacker_spec("mlp").description


@pytest.mark.parametrize("name", [s.name for s in list_stackers()])
def test_every_stacker_has_its_stack_config_section(name):
    """A stacker is configured by the ``StackConfig`` field of its name, typed with its registered config."""
    spec = get_stacker_spec(name)
    assert typing.get_type_hints(StackConfig)[name] is spec.config
    assert isinstance(getattr(StackConfig(), name).enabled, bool)
    assert type(build_stacker(name, StackConfig())) is spec.cls


@pytest.mark.parametrize("name", [s.name for s in list_stackers()])
def test_every_stacker_round_trips_through_its_files(name, tmp_path):
    spec = get_stacker_spec(name)
    data, y = _problem()
    st = spec.cls.from_config(_fast_section(spec), 0)
    assert st.name == name
    st.fit(data, y)
    want = st.predict(data)

    info = json.loads(json.dumps(save_member(name, st, tmp_path)))  # as stacker.json keeps it
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    for p in files:
        assert not p.read_bytes().startswith((b"\x80", b"PK")), p
    loaded = load_member(name, info, _reader(tmp_path))
    assert type(loaded) is spec.cls
    got = loaded.predict(data)
    assert got.shape == (len(y), 6)
    np.testing.assert_array_equal(got, want)

    for p in files:  # a damaged file is a UserError naming the problem, never a crash
        p.write_bytes(b"garbage\n")
        with pytest.raises(UserError):
            load_member(name, info, _reader(tmp_path))


# --------------------------------------------------------------------------------------- a stacker plug-in
@dataclass
class ToyConfig:
    """The ``toy:`` section."""

    enabled: bool = True
    #: Weight of the training prevalence against the mean of the base models.
    shrink: float = 0.5


@dataclass
class ToyStackConfig(StackConfig):
    """StackConfig with the one field a new stacker adds."""

    toy: ToyConfig = field(default_factory=ToyConfig)


@pytest.fixture
def toy(monkeypatch):
    """Register the toy stacker for one test (the registry is restored afterwards)."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @register_stacker("toy", config=ToyConfig)
    class ToyStacker:
        """Mean of the base models, shrunk towards the training prevalence."""

        def __init__(self, shrink: float) -> None:
            self.shrink = shrink
            self.prior: np.ndarray | None = None

        @classmethod
        def from_config(cls, cfg: ToyConfig, seed: int) -> ToyStacker:
            return cls(cfg.shrink)

        def fit(self, data: Level2Data, y: np.ndarray) -> None:
            self.prior = y.mean(axis=0)

        def predict(self, data: Level2Data) -> np.ndarray:
            return (1 - self.shrink) * data.base.mean(axis=1, dtype=np.float64) + self.shrink * self.prior

        def save(self, dest: Path) -> dict[str, Any]:
            save_json({"shrink": self.shrink, "prior": self.prior.tolist()}, dest / "toy.json")
            return {"file": "toy.json"}

        @classmethod
        def load(cls, info: dict[str, Any], read: Reader) -> ToyStacker:
            d = read_json(read, info["file"])
            st = cls(float(d["shrink"]))
            st.prior = np.asarray(d["prior"], dtype=np.float64)
            return st

    return ToyStacker


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return make_work_dir(tmp_path_factory.mktemp("registry") / "work", n_patients=20, n_test_patients=4, n_folds=4)


def _toy_cfg(work, tmp_path: Path) -> ToyStackConfig:
    """The tiny stack config plus a ``toy:`` section, read from YAML like any stack config."""
    text = TINY.read_text() + "convex:\n  per_class: false\ntoy:\n  shrink: 0.2\n"
    path = tmp_path / "toy_stack.yaml"
    path.write_text(text)
    paths = [f"runs={work.runs}", f"folds_csv={work.folds_csv}", f"out={tmp_path / 'stack'}"]
    models = f"models=[{','.join(work.models)}]"
    return load_config(ToyStackConfig, path, [*paths, models, "lgbm.enabled=false", "mlp.enabled=false"])


def test_a_new_stacker_is_one_class_and_a_config_section(toy, work, tmp_path):
    cfg = _toy_cfg(work, tmp_path)
    assert cfg.toy == ToyConfig(shrink=0.2)
    assert list(make_stackers(cfg)) == ["convex", "toy"]
    st = make_stackers(cfg)["toy"]()
    assert isinstance(st, toy) and st.shrink == 0.2 and st.name == "toy"

    # The stack stage runs it by level-2 CV and blends it.
    result = run_stack(cfg)
    assert result.scores["name"].tolist()[-3:] == ["convex", "toy", "blend"]
    assert np.isfinite(result.oof["toy"]).all()

    # The bundle functions save and load it through its own methods.
    base_members = [f"base:{m}" for m in work.models]  # blend.include_base: the base models blend too
    for which, members, stackers in (
        ("blend", ["convex", "toy", *base_members], ["convex", "toy"]),
        ("toy", ["toy"], ["toy"]),
    ):
        dest = tmp_path / f"bundle_{which}"
        dest.mkdir()
        info, l2, preds = export_stacker(cfg, which, list(work.models), dest)
        assert info["members"] == members and set(info["stackers"]) == set(stackers)
        save_json(info, dest / INFO_FILE)
        assert (dest / "toy.json").is_file()
        loaded = load_stacker(json.loads((dest / INFO_FILE).read_text()), _reader(dest))
        assert isinstance(loaded.members["toy"], toy)
        np.testing.assert_array_equal(loaded.predict(l2.test_sets), preds)  # per base fold, as exported


def test_a_stacker_without_a_config_section_is_not_run(toy, caplog):
    with caplog.at_level(logging.WARNING, logger="rsna19.stacking.registry"):
        assert list(make_stackers(StackConfig())) == BUILT_IN
    assert "'toy' is registered but StackConfig has no `toy` field" in caplog.text
    with pytest.raises(UserError, match="no `toy:` section"):
        build_stacker("toy", StackConfig())


def test_registration_errors(toy):
    with pytest.raises(ValueError, match="registered twice"):
        register_stacker("toy", config=ToyConfig)(toy)
    with pytest.raises(ValueError, match="does not define save, load"):

        @register_stacker("half", config=ToyConfig)
        class Half:
            def fit(self, data, y): ...

            def predict(self, data): ...

            @classmethod
            def from_config(cls, cfg, seed): ...

    @dataclass
    class NoSwitch:
        shrink: float = 0.5

    with pytest.raises(ValueError, match="needs an `enabled: bool` field"):
        register_stacker("noswitch", config=NoSwitch)
    with pytest.raises(TypeError, match="registered with config ToyConfig"):
        make_stackers(ToyStackConfig(toy=StackConfig().convex))


# ------------------------------------------------------------------------------------------------ unknown names
def test_unknown_stacker_names_are_clear_errors(work, tmp_path):
    with pytest.raises(UserError, match=r"unknown stacker 'nope'; registered: convex, lgbm, mlp"):
        get_stacker_spec("nope")
    with pytest.raises(UserError, match="unknown stacker 'nope'"):
        build_stacker("nope", StackConfig())
    info = {"method": "nope", "models": [], "features": {"offsets": 1, "windows": []}, "feature_names": []}
    with pytest.raises(UserError, match=r"unknown stacker 'nope'; registered: convex, lgbm, mlp"):
        load_stacker({**info, "members": ["nope"], "stackers": {"nope": {}}}, _reader(tmp_path))
    with pytest.raises(UserError, match="no saved state for stacker 'convex'"):
        load_stacker({**info, "members": ["convex"]}, _reader(tmp_path))
    cfg = load_config(StackConfig, TINY, [f"runs={work.runs}", f"folds_csv={work.folds_csv}", "mlp.enabled=false"])
    with pytest.raises(UserError, match=r"stack method 'nope' is not available; enabled: mean, blend, convex, lgbm"):
        export_stacker(cfg, "nope", list(work.models), tmp_path)


class _Saver:
    """Stands in for a fitted stacker whose ``save`` breaks a bundle rule."""

    def __init__(self, files: dict[str, bytes], info: Any = None) -> None:
        self.files, self.info = files, info or {}

    def save(self, dest: Path) -> dict[str, Any]:
        for rel, data in self.files.items():
            (dest / rel).write_bytes(data)
        return self.info


@pytest.mark.parametrize(
    ("saver", "match"),
    [
        (_Saver({"x.pkl": b"\x80\x04junk"}), "wrote x.pkl"),
        (_Saver({"x.json": b"\x80\x04junk"}), "wrote a pickle"),
        (_Saver({INFO_FILE: b"{}"}), "wrote stacker.json"),
        (_Saver({"convex.json": b"{}"}), r"overwrote or removed \['convex.json'\]"),
        (_Saver({}, {"w": np.float64("nan")}), "not JSON"),
        (_Saver({}, {"w": np.zeros(2)}), "not JSON"),
    ],
)
def test_saving_keeps_the_bundle_rules(saver, match, tmp_path):
    (tmp_path / "convex.json").write_text("{}\n")  # an earlier member's file
    with pytest.raises(ValueError, match=match):
        save_member("bad", saver, tmp_path)
