"""Schema of a second-level (stacking) config: ``configs/stack/*.yaml``.

Example:
    >>> from rsna19.core.config import load_config
    >>> cfg = load_config(StackConfig, "configs/stack/demo.yaml", ["lgbm.num_boost_round=200"])
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FeatureConfig:
    """Which neighbour features to build from each base model (docs/architecture.md, "Second level")."""

    #: Probabilities at slice offsets −k..+k within the series.
    offsets: int = 2
    #: Centred rolling windows (odd lengths) over which mean and max are taken.
    windows: tuple[int, ...] = (3, 5)
    #: Test rows: build the features from each base fold's predictions separately, let every level-2 model predict
    #: each set and average (True), or build them once from the fold-averaged predictions (False). The stackers are
    #: fitted on OOF features, which come from one fold model each; an average of several fold models is less
    #: extreme, a shift that tree models feel (docs/architecture.md, "Second level").
    test_per_fold: bool = True


@dataclass
class LgbmConfig:
    """LightGBM stacker: one binary booster per class, early-stopped on a patient-grouped inner split."""

    enabled: bool = True
    num_boost_round: int = 2000
    early_stopping_rounds: int = 50
    learning_rate: float = 0.03
    num_leaves: int = 31
    min_data_in_leaf: int = 100
    feature_fraction: float = 0.5
    bagging_fraction: float = 0.8
    bagging_freq: int = 1
    lambda_l2: float = 1.0
    max_bin: int = 255
    #: ``auto``: the CPUs the job was given (:func:`rsna19.core.threads.resolve_threads`: the executor's share,
    #: SLURM's allocation or the machine's cores); a number only for a measurement. LightGBM's results are
    #: repeatable for a fixed thread count.
    num_threads: int | str = "auto"
    #: Fraction of the level-2 training patients held out for early stopping (``inner_folds: 1``).
    inner_val_fraction: float = 0.15
    #: Patient-grouped inner folds that choose the number of rounds (the mean of their early-stopped best
    #: iterations, 0 where no round beat the start), then one refit on all rows; 1: one inner split, its booster.
    inner_folds: int = 3
    #: ``convex``: boost from the convex blend of the base models (no rounds = that blend); ``prior``: from zero.
    start: str = "convex"
    #: ``auto``: cap the capacity by the number of training patients (``num_leaves ≤ patients / 8``, a leaf holds
    #: at least two patients' worth of slices); ``fixed``: the settings as written.
    capacity: str = "auto"


@dataclass
class MlpConfig:
    """MLP stacker over the same features (logit of probabilities, standardised), in torch on CPU."""

    enabled: bool = True
    hidden: tuple[int, ...] = (128, 64)
    dropout: float = 0.1
    epochs: int = 30
    batch_size: int = 1024
    lr: float = 1e-3
    weight_decay: float = 1e-5
    #: Epochs without improvement of the inner-validation loss before stopping.
    patience: int = 4
    inner_val_fraction: float = 0.15
    #: ``auto``: the CPUs the job was given, as for LightGBM.
    num_threads: int | str = "auto"
    #: ``convex``: the network's output is added to the logit of the convex blend of the base models (last layer
    #: zero-initialised, so an untrained network predicts that blend); ``prior``: a plain MLP.
    start: str = "convex"
    #: ``auto``: hidden widths capped at half the number of training patients (at least 8); ``fixed``: as written.
    capacity: str = "auto"


@dataclass
class ConvexConfig:
    """The seed's baseline: a convex combination (w ≥ 0, Σw = 1) of the base models' probabilities."""

    enabled: bool = True
    #: One weight vector per class (True) or one shared by all classes (False).
    per_class: bool = True


@dataclass
class BlendConfig:
    """Non-negative weights summing to one over the stackers (and the base models), fitted on level-2 OOF."""

    enabled: bool = True
    #: Stacker names to blend; empty means every enabled stacker.
    members: list[str] = field(default_factory=list)
    #: Also blend every base model's own probabilities (members ``base:<model>``): the blend's cross-fitted weights
    #: then choose between stacking and the best single models, so it never needs to lose to them.
    include_base: bool = True
    per_class: bool = True
    #: When the cross-fitted blend does not beat its best base-model member on level-2 OOF, the blend is that
    #: base model (needs ``include_base``): the second level never scores worse than its best input on OOF.
    fallback: bool = True


@dataclass
class PostprocessConfig:
    """Applied to every stacker's and the blend's output."""

    #: Raise ``any`` to at least the largest subtype probability.
    any_ge_max: bool = True
    #: Clip probabilities to [clip, 1 − clip]; 0 disables.
    clip: float = 1e-6


@dataclass
class StackConfig:
    """A second-level run: which base-model runs to stack, where they are, and the stackers' settings.

    Relative paths are taken from the current directory; the CLI options ``--runs``, ``--folds``, ``--out`` and
    ``--test-labels`` override them.
    """

    #: Output goes to ``<out>/<name>/``; defaults to the config file's stem.
    name: str = "stack"
    #: Root of the base-model runs: ``<runs>/<model>/fold_<k>/{oof,test}.parquet``.
    runs: str = "runs"
    #: Base-model config names (run directories). Empty: every run under ``runs`` that has OOF predictions.
    models: list[str] = field(default_factory=list)
    #: Folds to use. Empty: every fold in ``folds_csv``.
    folds: list[int] = field(default_factory=list)
    #: ``patient_id, fold``: the patient-grouped folds of the base models, reused for level-2 CV.
    folds_csv: str = "folds.csv"
    out: str = "stack"
    #: Optional Kaggle-format ``ID,Label`` csv with the test labels; fills ``wll_test`` in ``scores.csv``.
    test_labels: str | None = None
    seed: int = 0
    features: FeatureConfig = field(default_factory=FeatureConfig)
    lgbm: LgbmConfig = field(default_factory=LgbmConfig)
    mlp: MlpConfig = field(default_factory=MlpConfig)
    convex: ConvexConfig = field(default_factory=ConvexConfig)
    blend: BlendConfig = field(default_factory=BlendConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
