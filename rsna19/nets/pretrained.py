"""timm backbones with pretrained weights from local files only (no network at run time).

``pretrained=True`` looks for the weights of the backbone's default pretrained tag in the folders of
``$RSNA19_WEIGHTS_DIR`` (each laid out like a Hugging Face cache; ``rsna19 weights fetch --dir D`` writes one),
then in the local Hugging Face cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``)
and then in the torch hub checkpoint folder; ``weights=PATH`` names a file directly. Either is handed to timm as
``pretrained_cfg_overlay=dict(file=...)`` (timm adapts the first convolution to ``in_chans`` and drops the
classifier). While building, ``HF_HUB_OFFLINE`` is set, so nothing is ever downloaded; when no file is found the
error says where to put one (``rsna19 weights fetch`` downloads them, on a machine with network).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from rsna19.core.errors import UserError

#: File names a timm Hugging Face repository stores its weights under, in the order timm tries them.
_HF_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Forbid Hugging Face Hub downloads inside the block (env var and the already-imported constant)."""
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants as hf_constants

        old_const = hf_constants.HF_HUB_OFFLINE
        hf_constants.HF_HUB_OFFLINE = True
    except (ImportError, AttributeError):  # pragma: no cover - hub missing or reorganised
        hf_constants, old_const = None, None
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old
        if hf_constants is not None:
            hf_constants.HF_HUB_OFFLINE = old_const


#: Folders (``os.pathsep``-separated) searched before the Hugging Face cache, each laid out like one.
WEIGHTS_DIR_ENV = "RSNA19_WEIGHTS_DIR"


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (same precedence as ``huggingface_hub``)."""
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return Path(env).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def weights_dirs() -> list[Path]:
    """The folders of ``$RSNA19_WEIGHTS_DIR``, in order (empty when unset)."""
    raw = os.environ.get(WEIGHTS_DIR_ENV, "")
    return [Path(p).expanduser() for p in raw.split(os.pathsep) if p.strip()]


@dataclass(frozen=True)
class WeightSource:
    """Where timm's pretrained weights of one backbone come from.

    Attributes:
        name: the backbone as the config names it (``resnet34``).
        tag_name: architecture and pretrained tag (``resnet34.a1_in1k``).
        hf_repo: Hugging Face hub repository (``timm/resnet34.a1_in1k``), or None.
        hf_revision: a revision pinned by timm (``repo@revision``), or None for ``main``.
        hf_files: file names the repository may store the weights under, in the order timm tries them.
        url: timm's legacy download URL (torch hub checkpoint folder), or ``""``.
        file: a local file timm's config names, or ``""``.
    """

    name: str
    tag_name: str
    hf_repo: str | None
    hf_revision: str | None
    hf_files: tuple[str, ...]
    url: str
    file: str


def weight_source(name: str) -> WeightSource:
    """timm's pretrained-weight source of backbone ``name`` (the default tag when ``name`` has none).

    Raises:
        UserError: timm knows no pretrained weights for ``name``.
    """
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001 - timm raises different errors for unknown names across versions
        cfg = None
    if cfg is None:
        raise UserError(f"timm has no pretrained weights for {name!r}; set model.pretrained: false")
    repo, revision = None, None
    if cfg.hf_hub_id:
        repo, _, rev = cfg.hf_hub_id.partition("@")
        revision = rev or None
    tag_name = f"{cfg.architecture}.{cfg.tag}" if cfg.architecture and cfg.tag else name
    files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else _HF_FILES
    return WeightSource(name, tag_name, repo, revision, files, cfg.url or "", cfg.file or "")


def local_weight_files(name: str, extra_dirs: Iterable[Path] = ()) -> tuple[list[Path], list[str]]:
    """Existing local weight files of backbone ``name`` and the places searched (for an error message).

    Searched in order: ``extra_dirs`` and ``$RSNA19_WEIGHTS_DIR`` (Hugging Face cache layout), the Hugging Face
    cache, the torch hub checkpoint folder, a file named by timm's config. Nothing is downloaded.

    Raises:
        UserError: timm knows no pretrained weights for ``name``.
    """
    src = weight_source(name)
    found: list[Path] = []
    searched: list[str] = []
    if src.hf_repo:
        from huggingface_hub import try_to_load_from_cache

        dirs: list[Path] = []
        for d in [*extra_dirs, *weights_dirs(), hf_cache_dir()]:
            if d not in dirs:
                dirs.append(d)
        for d in dirs:
            for f in src.hf_files:
                hit = try_to_load_from_cache(repo_id=src.hf_repo, filename=f, cache_dir=d, revision=src.hf_revision)
                if isinstance(hit, str) and Path(hit).is_file():
                    found.append(Path(hit))
            searched.append(f"{d} (Hugging Face cache layout, repo {src.hf_repo}: {' or '.join(src.hf_files)})")
    if src.url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(src.url.split("?")[0])
        if path.is_file():
            found.append(path)
        searched.append(str(path))
    if src.file:
        path = Path(src.file)
        if path.is_file():
            found.append(path)
        searched.append(str(path))
    return found, searched


def weight_file(name: str, pretrained: bool, weights: str | None) -> Path | None:
    """The local file to load into backbone ``name``: ``weights``, else its cached ImageNet weights when
    ``pretrained``, else None (random initialisation).

    Raises:
        UserError: a missing weight file, or pretrained weights that are not cached locally.
    """
    if weights:
        file = Path(weights).expanduser()
        if not file.is_file():
            raise UserError(f"model.weights file not found: {file}")
        return file
    if not pretrained:
        return None
    found, searched = local_weight_files(name)
    if not found:
        raise UserError(
            f"pretrained weights for {name!r} are not available offline; looked in: {'; '.join(searched)}. "
            f"Run `rsna19 weights fetch {name}` on a machine with network (then copy the cache, or point "
            f"${WEIGHTS_DIR_ENV} at its --dir), or set model.weights: /path/to/weights.safetensors, or "
            "model.pretrained: false"
        )
    return found[0]


def create_backbone(
    name: str, in_chans: int, pretrained: bool = False, weights: str | None = None, **kwargs: Any
) -> nn.Module:
    """A timm model without classifier and pooling (``forward_features`` gives (B, F, h, w) maps).

    Args:
        name: timm model name, optionally with a pretrained tag (``resnet34.a1_in1k``).
        in_chans: input channels.
        pretrained: load ImageNet weights from the local cache (never downloads).
        weights: path of a weight file (``.safetensors``, ``.pth``, ``.bin``); implies ``pretrained``.
        kwargs: passed to :func:`timm.create_model` (e.g. ``drop_path_rate``; a zero one is left out).

    Raises:
        UserError: unknown backbone, a missing weight file, or pretrained weights that are not cached locally.
    """
    if not timm.is_model(name.split(".")[0]):
        raise UserError(f"unknown timm backbone {name!r}")
    file = weight_file(name, pretrained, weights)
    if not kwargs.get("drop_path_rate"):
        kwargs.pop("drop_path_rate", None)  # 0 means none, and timm models without stochastic depth refuse it
    args: dict[str, Any] = {"in_chans": in_chans, "num_classes": 0, "global_pool": "", **kwargs}
    with offline():
        if file is None:
            return timm.create_model(name, pretrained=False, **args)
        try:
            return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(file)}, **args)
        except (RuntimeError, OSError, ValueError, KeyError) as exc:
            raise UserError(f"cannot load weights {file} into {name}: {exc}") from exc
