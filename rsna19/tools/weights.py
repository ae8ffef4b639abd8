"""Pretrained backbone weights: which a pipeline needs, where they are, whether they are sound, and fetching them.

Training never downloads (:mod:`rsna19.nets.pretrained` reads local files only); :func:`fetch` is the one place
that uses the network, and only when ``rsna19 weights fetch`` is run. It downloads with ``huggingface_hub``
(which honours ``HF_ENDPOINT``, e.g. a mirror) into a Hugging Face cache folder that training searches: the
default cache, or a ``--dir`` that ``$RSNA19_WEIGHTS_DIR`` names. Each fetched file is verified — it loads as a
state dict whose keys and shapes are those of timm's model of that name — and its sha256 is recorded in
``rsna19_manifest.json`` in the repository's cache folder (``models--timm--<name>/``), so that :func:`verify`
later tells a damaged or replaced file from the one fetched.

Example:
    >>> needs = pipeline_needs(load_pipeline("rsna2019"))
    >>> [locate(n).present for n in needs]
    [False, False, False]
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rsna19.core.atomic import write_text
from rsna19.core.config import load_config
from rsna19.core.digest import sha256_file
from rsna19.core.errors import UserError
from rsna19.engine.config import TrainConfig
from rsna19.nets import get_model_spec
from rsna19.nets.pretrained import local_weight_files, offline, weight_source

#: The manifest a fetch writes into a repository's cache folder.
MANIFEST_NAME = "rsna19_manifest.json"


@dataclass(frozen=True)
class WeightNeed:
    """Weights that base models need.

    Attributes:
        backbone: timm backbone (``resnet34``; ``tu-`` of smp encoders stripped), or None for ``file``.
        models: the base-model configs (file stems) that need it.
        file: an explicit ``model.weights`` path instead of timm's pretrained weights.
        problem: why the config cannot have pretrained weights at all (e.g. an smp encoder without ``tu-``).
    """

    backbone: str | None
    models: tuple[str, ...] = ()
    file: str | None = None
    problem: str | None = None

    @property
    def label(self) -> str:
        """The backbone name, or the explicit file."""
        return self.backbone or str(self.file)


@dataclass
class WeightStatus:
    """What was found locally for one :class:`WeightNeed`.

    Attributes:
        need: what is needed.
        tag_name: timm architecture and pretrained tag (``resnet34.a1_in1k``), when a backbone.
        hf_repo: Hugging Face hub repository, when a backbone.
        path: the file training would load (the first found), or None.
        searched: the places looked at.
        problem: a one-line reason it cannot be used (missing, corrupt, wrong keys), or None.
        sha256: the file's sha256, once :func:`verify` computed it.
    """

    need: WeightNeed
    tag_name: str = ""
    hf_repo: str | None = None
    path: Path | None = None
    searched: list[str] = field(default_factory=list)
    problem: str | None = None
    sha256: str | None = None

    @property
    def present(self) -> bool:
        """A file was found."""
        return self.path is not None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {
            "backbone": self.need.backbone,
            "file": self.need.file,
            "models": list(self.need.models),
            "tag": self.tag_name,
            "hf_repo": self.hf_repo,
            "path": str(self.path) if self.path else None,
            "present": self.present,
            "problem": self.problem,
            "sha256": self.sha256,
        }


def backbone_name(name: str) -> str:
    """timm name of a config backbone or a command-line name (``tu-resnet34`` → ``resnet34``)."""
    return name[3:] if name.startswith("tu-") else name


def model_need(model_cfg: Any, model: str) -> WeightNeed | None:
    """The weights one base-model config needs, or None (trained from scratch).

    Args:
        model_cfg: the :class:`~rsna19.engine.config.ModelConfig` (``model:`` section).
        model: the config's name (file stem), for messages.
    """
    if model_cfg.weights:
        return WeightNeed(None, (model,), file=str(Path(model_cfg.weights).expanduser()))
    if not model_cfg.pretrained:
        return None
    spec = get_model_spec(model_cfg.name)
    backbone = str(model_cfg.backbone)
    if spec.pretrained is None:
        problem = f"model family {spec.family!r} has no pretrained weights: set pretrained: false"
        return WeightNeed(backbone, (model,), problem=problem)
    if spec.pretrained == "smp" and not backbone.startswith("tu-"):
        return WeightNeed(
            backbone,
            (model,),
            problem=f"pretrained weights of smp encoder {backbone!r} are only looked up for 'tu-' (timm) encoders: "
            f"use tu-{backbone} or set model.weights",
        )
    return WeightNeed(backbone_name(backbone), (model,))


def pipeline_needs(cfg: Any) -> list[WeightNeed]:
    """The weights the base models of a pipeline need, one entry per backbone or file (models merged).

    Each model config is loaded with the pipeline's ``train_overrides`` and its ``model_overrides``, as
    ``rsna19 run`` trains it.

    Args:
        cfg: a :class:`~rsna19.pipeline.config.PipelineConfig` (config paths resolved by ``load_pipeline``).

    Raises:
        UserError: a model config that does not load.
    """
    merged: dict[tuple[str | None, str | None, str | None], list[str]] = {}
    for path in cfg.models:
        stem = Path(path).stem
        overrides = [*cfg.train_overrides, *cfg.model_overrides.get(stem, [])]
        need = model_need(load_config(TrainConfig, path, overrides).model, stem)
        if need is not None:
            merged.setdefault((need.backbone, need.file, need.problem), []).extend(need.models)
    return [WeightNeed(b, tuple(m), file=f, problem=p) for (b, f, p), m in merged.items()]


def names_needs(names: list[str]) -> list[WeightNeed]:
    """:class:`WeightNeed` entries for backbone names given on the command line (duplicates dropped)."""
    out: list[str] = []
    for n in names:
        b = backbone_name(n)
        if b not in out:
            out.append(b)
    return [WeightNeed(b) for b in out]


def locate(need: WeightNeed, extra_dirs: list[Path] | tuple[Path, ...] = ()) -> WeightStatus:
    """Find the local file of ``need`` without reading it (fast; for ``rsna19 doctor`` and ``weights list``).

    Args:
        need: what is needed.
        extra_dirs: Hugging Face cache folders searched first (``--dir``).
    """
    status = WeightStatus(need)
    if need.problem:
        status.problem = need.problem
        return status
    if need.file:
        path = Path(need.file)
        status.searched = [str(path)]
        if path.is_file():
            status.path = path
        else:
            status.problem = f"model.weights file not found: {path}"
        return status
    assert need.backbone is not None
    try:
        src = weight_source(need.backbone)
        found, status.searched = local_weight_files(need.backbone, extra_dirs)
    except UserError as exc:
        status.problem = str(exc)
        return status
    status.tag_name, status.hf_repo = src.tag_name, src.hf_repo
    if found:
        status.path = found[0]
    else:
        status.problem = "not found locally"
    return status


def _manifest_path(path: Path) -> tuple[Path, str] | None:
    """The manifest of a file in a Hugging Face cache (``models--x--y/snapshots/<commit>/<file>``) and its key."""
    parts = path.parts
    if "snapshots" not in parts:
        return None
    i = len(parts) - 1 - parts[::-1].index("snapshots")
    if i < 1 or not parts[i - 1].startswith("models--"):
        return None
    repo_dir = Path(*parts[:i])
    return repo_dir / MANIFEST_NAME, "/".join(parts[i:])


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest entry recorded for weight file ``path`` by ``rsna19 weights fetch``, or None."""
    loc = _manifest_path(path)
    if loc is None or not loc[0].is_file():
        return None
    try:
        data = json.loads(loc[0].read_text())
    except (OSError, ValueError):
        return None
    entry = data.get("files", {}).get(loc[1]) if isinstance(data, dict) else None
    return entry if isinstance(entry, dict) else None


def write_manifest(path: Path, entry: dict[str, Any]) -> Path | None:
    """Record ``entry`` (sha256, size, source) for weight file ``path``; returns the manifest written."""
    loc = _manifest_path(path)
    if loc is None:
        return None
    manifest, key = loc
    data: dict[str, Any] = {"files": {}}
    if manifest.is_file():
        try:
            data = json.loads(manifest.read_text())
        except (OSError, ValueError):
            data = {"files": {}}
    data.setdefault("files", {})[key] = entry
    write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", manifest)
    return manifest


def _read_tensors(path: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors of a ``.safetensors`` / ``.pth`` / ``.bin`` file.

    Raises:
        ValueError: the file does not parse as either, or holds no state dict.
    """
    import torch

    if path.suffix == ".safetensors" or _looks_like_safetensors(path):
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - not a dict
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for bad files
            raise ValueError(f"not a valid safetensors file ({exc})") from exc
    try:
        try:  # zip checkpoints map without reading; weights_only: a pickled payload never runs
            state: Any = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # a legacy (pre-zip) checkpoint cannot be mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for bad files
        raise ValueError(f"not a loadable state dict ({exc})") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError("not a state dict")
    return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}


def _looks_like_safetensors(path: Path) -> bool:
    """A safetensors file starts with an 8-byte header length and a JSON header (``{``)."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{"


def _model_shapes(tag_name: str) -> dict[str, tuple[int, ...]]:
    """State-dict shapes of timm's model ``tag_name`` built without weights (on the meta device: no memory)."""
    import timm
    import torch

    with offline():
        try:
            with torch.device("meta"):
                model = timm.create_model(tag_name, pretrained=False)
        except Exception:  # noqa: BLE001 - a model whose init needs real tensors: build it on the CPU
            model = timm.create_model(tag_name, pretrained=False)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def key_problem(file_shapes: dict[str, tuple[int, ...]], model_shapes: dict[str, tuple[int, ...]]) -> str | None:
    """Why a state dict does not fit a model (missing, unexpected or mis-shaped tensors), or None."""
    ignore = ("num_batches_tracked",)
    missing = sorted(k for k in model_shapes if k not in file_shapes and not k.endswith(ignore))
    unexpected = sorted(k for k in file_shapes if k not in model_shapes and not k.endswith(ignore))
    shaped = sorted(k for k in file_shapes if k in model_shapes and file_shapes[k] != model_shapes[k])
    parts = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", shaped)):
        if keys:
            parts.append(f"{len(keys)} tensor(s) {what} (e.g. {', '.join(keys[:3])})")
    return "; ".join(parts) or None


def verify(status: WeightStatus, use_manifest: bool = True) -> WeightStatus:
    """Check the file of a located need and set ``status.problem`` (None when sound) and ``status.sha256``.

    Checks, offline: the sha256 against the one the fetch manifest recorded (``use_manifest``) and against the
    Hugging Face cache's content address (a blob of an LFS file is named by its sha256); then that the file parses
    as a state dict and, for a backbone, that its tensor names and shapes are those of timm's model. A need that
    was not found keeps its problem.
    """
    if status.path is None:
        return status
    path = status.path
    try:
        status.sha256 = sha256_file(path)
    except OSError as exc:
        status.problem = f"cannot read {path}: {exc}"
        return status
    fix = f"run `rsna19 weights fetch --force {status.need.backbone}`" if status.need.backbone else "replace it"
    entry = read_manifest(path) if use_manifest else None
    if entry and entry.get("sha256") and entry["sha256"] != status.sha256:
        status.problem = (
            f"{path} is damaged or was replaced: sha256 {status.sha256[:12]}… differs from {entry['sha256'][:12]}… "
            f"recorded when it was fetched; {fix}"
        )
        return status
    blob = path.resolve().name  # a Hugging Face cache blob of an LFS file is named by its sha256
    if len(blob) == 64 and all(c in "0123456789abcdef" for c in blob) and blob != status.sha256:
        status.problem = (
            f"{path} is damaged: its sha256 {status.sha256[:12]}… differs from the {blob[:12]}… the hub published; "
            f"{fix}"
        )
        return status
    try:
        shapes = _read_tensors(path)
    except ValueError as exc:
        status.problem = f"{path} is damaged: {exc}; {fix}"
        return status
    if status.need.backbone and status.tag_name:
        problem = key_problem(shapes, _model_shapes(status.tag_name))
        if problem:
            status.problem = f"{path} does not fit timm's {status.tag_name}: {problem}; {fix}"
            return status
    status.problem = None
    return status


def _endpoint() -> str | None:
    """The hub endpoint from ``HF_ENDPOINT`` as set now (None: huggingface_hub's default)."""
    return (os.environ.get("HF_ENDPOINT") or "").rstrip("/") or None


def fetch(need: WeightNeed, target: Path, force: bool = False) -> WeightStatus:
    """Download the weights of ``need`` into Hugging Face cache folder ``target``, verify them and record them.

    Uses the network (``HF_ENDPOINT`` is honoured). An already present, sound file is kept unless ``force``.

    Raises:
        UserError: offline mode, no hub repository, the hub unreachable, no weight file in the repository, or a
            downloaded file that fails verification.
    """
    if need.problem or need.file or need.backbone is None:
        raise UserError(f"{need.label}: nothing to fetch ({need.problem or 'an explicit model.weights file'})")
    src = weight_source(need.backbone)
    if not src.hf_repo:
        raise UserError(
            f"{need.backbone}: timm's weights are not on the Hugging Face hub; download {src.url} into "
            "the torch hub checkpoint folder (`python -c 'import torch; print(torch.hub.get_dir())'`/checkpoints)"
        )
    import huggingface_hub.constants as hf_constants
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    if hf_constants.HF_HUB_OFFLINE:
        raise UserError("HF_HUB_OFFLINE is set: run `HF_HUB_OFFLINE=0 rsna19 weights fetch ...` to allow the download")
    endpoint = _endpoint()
    where = endpoint or hf_constants.ENDPOINT
    path: str | None = None
    tried = []
    for filename in src.hf_files:
        tried.append(filename)
        try:
            path = hf_hub_download(
                src.hf_repo,
                filename,
                revision=src.hf_revision,
                cache_dir=str(target),
                endpoint=endpoint,
                force_download=force,
            )
            break
        except LocalEntryNotFoundError as exc:  # the hub could not be reached (and nothing is cached)
            raise UserError(f"{need.backbone}: cannot reach {where} to download {src.hf_repo}: {exc}") from exc
        except EntryNotFoundError:
            continue
        except Exception as exc:  # noqa: BLE001 - network, HTTP and file errors of many kinds
            raise UserError(
                f"{need.backbone}: download of {src.hf_repo}/{filename} from {where} failed: {exc}"
            ) from exc
    if path is None:
        raise UserError(f"{need.backbone}: {src.hf_repo} on {where} has none of {', '.join(tried)}")
    status = WeightStatus(need, src.tag_name, src.hf_repo, Path(path), [str(target)])
    verify(status, use_manifest=not force)  # a forced fetch replaces the record: the old sha256 no longer applies
    if status.problem:
        raise UserError(f"{need.backbone}: the downloaded file fails verification: {status.problem}")
    write_manifest(
        status.path,
        {
            "backbone": need.backbone,
            "tag": src.tag_name,
            "repo": src.hf_repo,
            "revision": src.hf_revision or "main",
            "filename": status.path.name,
            "sha256": status.sha256,
            "size": status.path.stat().st_size,
            "endpoint": where,
            "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    )
    return status
