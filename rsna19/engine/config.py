"""The training config schema: one YAML file per base-model experiment (``configs/``), dotted overrides on top.

Paths (cache, folds, runs) are not part of the experiment: they come from ``--cache/--folds/--runs`` or the
environment (``RSNA19_CACHE``, ``RSNA19_FOLDS``, ``RSNA19_RUNS``) and are recorded in the resolved config.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

from rsna19.core.config import to_dict
from rsna19.core.errors import UserError
from rsna19.data.augment import AugmentConfig


@dataclass
class DataConfig:
    """What a sample is: slices, windows, layout, image size and augmentation."""

    cache: str | None = None
    folds: str | None = None
    windows: list[str] = field(default_factory=lambda: ["brain", "subdural", "bone"])
    slices: int = 1  # neighbours per sample (2D/2.5D), or the slab length S (layout "slab")
    layout: Literal["channels", "stack", "slab", "sequence"] = "channels"
    resize: int | None = None
    crop: int | None = None
    # images from the loader: float32, or uint8 decoded on the device (4× less to write, collate and transfer)
    image_dtype: Literal["float32", "uint8"] = "float32"
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # "brain": shift each series' HU so its brain parenchyma reads rsna19.data.reference.BRAIN_HU before the windows
    # (invariant to a scanner's HU offset by construction); "none": absolute HU
    hu_reference: Literal["none", "brain"] = "none"
    # σ (pixels of the network's input) of a Gaussian on each HU slice before the windows: sharper and smoother
    # reconstruction kernels, and doses, reach the network alike (rsna19.data.transforms.MultiWindow); 0: none
    smooth_px: float = 0.0
    samples_per_epoch: int | None = None
    # training order (rsna19/data/sampler.py): "random" shuffles all slices; "blocked" shuffles blocks of
    # block_slices slices of one series, so one read of a volume serves several samples of a batch (a cache larger
    # than the page cache; docs/benchmarks.md, "Loader, cold page cache")
    sampler: Literal["random", "blocked"] = "random"
    block_slices: int = 8  # blocked: slices drawn from one series per visit
    block_contiguous: bool = True  # blocked: neighbouring slices of the series (True) or random ones (False)
    num_workers: int = 0
    cdf_series: int = 16
    slab_stride: int | None = None  # slab: prediction stride (default slices // 2)
    label_slices: int | None = None  # slab: the middle positions that count in the training loss (None: all)
    masks: str | None = None  # families that learn from masks: the masks/ folder (--masks, $RSNA19_MASKS); None: none
    embeddings: str | None = None  # sequence: the image run under RUNS whose fold-k embeddings are read
    # sequence: training embeddings of fold k are "oof" (each fold j≠k's OOF embeddings, by fold j's image model)
    # or "fold" (fold k's image model's own training patients: in-sample, but one feature space; see SequenceTask)
    embedding_source: Literal["oof", "fold"] = "oof"
    # sequence with model.args.logit_skip and embedding_source "fold": the base logits of the training series are
    # "embedding" (fold k's image model's, in-sample like the embeddings) or "oof" (each training patient's held-out
    # logits, from the image fold that did not train on it: as confident as what validation and test series carry)
    train_logits: Literal["embedding", "oof"] = "embedding"


@dataclass
class LossConfig:
    """Weights of the auxiliary loss terms (segmentation-aided models)."""

    mask_weight: float = 1.0  # λ: classification BCE + λ · mask loss
    dice_weight: float = 1.0  # mask loss = pixel BCE + dice_weight · soft Dice


@dataclass
class ModelConfig:
    """A registered model (``rsna19 models``) and its arguments."""

    name: str = "clf2d"
    backbone: str = "resnet18"
    pretrained: bool = False
    weights: str | None = None
    drop_rate: float = 0.0
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    """Optimiser and gradient clipping.

    Under DDP (``torchrun --nproc_per_node N``) every process takes ``train.batch_size`` samples a step, so a step
    averages the gradient over ``N × batch_size`` samples. ``lr_scaling`` says what ``lr`` means then: ``none``
    (default) uses ``lr`` as written whatever N is (tune it for the global batch you run); ``linear`` multiplies it
    by N (the linear scaling rule: ``lr`` is then the rate of one process's batch, as tuned on one GPU).
    """

    name: Literal["adamw", "radam"] = "adamw"
    lr: float = 3e-4
    lr_scaling: Literal["none", "linear"] = "none"
    weight_decay: float = 1e-4
    clip_grad: float | None = 1.0


@dataclass
class SchedConfig:
    """Learning-rate schedule, stepped per batch."""

    name: Literal["cosine", "onecycle", "constant"] = "cosine"
    warmup_epochs: float = 0.5
    min_lr_ratio: float = 0.01


@dataclass
class TrainSection:
    """Loop settings and hardware."""

    epochs: int = 5
    batch_size: int = 32
    val_batch_size: int | None = None
    seed: int = 42
    device: str = "auto"
    amp: Literal["auto", "bf16", "fp16", "none"] = "auto"
    channels_last: bool = True
    freeze_backbone_epochs: int = 0
    deterministic: bool = True
    progress: bool = True
    # Validate every N epochs and always after the last one (best.pt is chosen among the validated epochs). With a
    # schedule that anneals to the end the last epoch is usually the best, and on CPU a validation pass costs a
    # quarter of an epoch: the demo validates only at the end.
    val_every: int = 1


@dataclass
class TrainConfig:
    """A base-model experiment."""

    name: str = "model"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    train: TrainSection = field(default_factory=TrainSection)
    loss: LossConfig = field(default_factory=LossConfig)
    runs: str | None = None


#: Keys that may change between a run and its resumption (where files are, how they are read, how it looks).
VOLATILE_KEYS: tuple[str, ...] = (
    "data.cache",
    "data.folds",
    "data.masks",
    "runs",
    "data.num_workers",
    "train.progress",
    "train.device",
)


def config_diff(
    a: dict[str, Any], b: dict[str, Any], prefix: str = "", defaults: dict[str, Any] | None = None
) -> list[str]:
    """Dotted keys whose values differ between two resolved configs (as nested dicts), :data:`VOLATILE_KEYS`
    left out: what makes a run directory written with ``a`` a different experiment from ``b``.

    ``a`` is the saved one: a key it lacks reads as its value in ``defaults`` (nested like ``a``; default: a
    :class:`TrainConfig` of defaults), so a run trained before a config key existed still matches a config that
    leaves that key at its default.
    """
    if defaults is None and not prefix:
        defaults = to_dict(TrainConfig())
    defaults = defaults or {}
    out = []
    for k in sorted(set(a) | set(b)):
        key = f"{prefix}{k}"
        if key in VOLATILE_KEYS:
            continue
        va, vb = a.get(k, defaults.get(k)), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            sub = defaults.get(k)
            out += config_diff(va, vb, key + ".", sub if isinstance(sub, dict) else {})
        elif va != vb:
            out.append(key)
    return out


def resolve_paths(
    cfg: TrainConfig,
    cache: str | None = None,
    folds: str | None = None,
    runs: str | None = None,
    masks: str | None = None,
) -> TrainConfig:
    """Fill the data paths from arguments, then the environment; the config's own values come last.

    ``masks`` (``$RSNA19_MASKS``) is optional: only a family registered with ``masks=True`` reads it.

    Raises:
        UserError: a path that is still unknown.
    """
    cfg.data.cache = cache or os.environ.get("RSNA19_CACHE") or cfg.data.cache
    cfg.data.masks = masks or os.environ.get("RSNA19_MASKS") or cfg.data.masks
    cfg.data.folds = folds or os.environ.get("RSNA19_FOLDS") or cfg.data.folds
    cfg.runs = runs or os.environ.get("RSNA19_RUNS") or cfg.runs
    for key, value, flag, env in (
        ("cache", cfg.data.cache, "--cache", "RSNA19_CACHE"),
        ("folds", cfg.data.folds, "--folds", "RSNA19_FOLDS"),
        ("runs", cfg.runs, "--runs", "RSNA19_RUNS"),
    ):
        if not value:
            raise UserError(f"no {key} path: pass {flag} or set {env}")
    return cfg


def model_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """The keyword arguments of :func:`rsna19.nets.build_model` for this config."""
    return {
        "backbone": cfg.model.backbone,
        "n_windows": len(cfg.data.windows),
        "n_slices": cfg.data.slices,
        "pretrained": cfg.model.pretrained,
        "weights": cfg.model.weights,
        "drop_rate": cfg.model.drop_rate,
        **cfg.model.args,
    }
