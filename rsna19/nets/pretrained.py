"""timm backbones with pretrained weights from local files only (DESIGN §5: no network at run time).

``pretrained=True`` looks for the weights of the backbone's default pretrained tag in the local Hugging Face
cache and then in the torch hub checkpoint folder; ``weights=PATH`` names a file directly. Either is handed
to timm as ``pretrained_cfg_overlay=dict(file=...)`` (timm adapts the first convolution to ``in_chans`` and
drops the classifier). While building, ``HF_HUB_OFFLINE`` is set, so nothing is ever downloaded; when no file
is found the error says where to put one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from rsna19.errors import UserError

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


def _candidates(name: str) -> tuple[list[Path], list[str]]:
    """Existing local weight files for ``name`` and the places that were searched (for the error)."""
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001 - timm raises different errors for unknown names across versions
        cfg = None
    if cfg is None:
        raise UserError(f"timm has no pretrained weights for {name!r}; set model.pretrained: false")
    found: list[Path] = []
    searched: list[str] = []
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.constants import HF_HUB_CACHE

        repo, _, revision = cfg.hf_hub_id.partition("@")
        files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else _HF_FILES
        for f in files:
            hit = try_to_load_from_cache(repo_id=repo, filename=f, revision=revision or None)
            if isinstance(hit, str):
                found.append(Path(hit))
        searched.append(f"the Hugging Face cache {HF_HUB_CACHE} (repo {repo}: {' or '.join(files)})")
    if cfg.url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url.split("?")[0])
        if path.is_file():
            found.append(path)
        searched.append(str(path))
    if cfg.file:
        path = Path(cfg.file)
        if path.is_file():
            found.append(path)
        searched.append(str(path))
    return found, searched


def create_backbone(
    name: str, in_chans: int, pretrained: bool = False, weights: str | None = None, **kwargs: Any
) -> nn.Module:
    """A timm model without classifier and pooling (``forward_features`` gives (B, F, h, w) maps).

    Args:
        name: timm model name, optionally with a pretrained tag (``resnet34.a1_in1k``).
        in_chans: input channels.
        pretrained: load ImageNet weights from the local cache (never downloads).
        weights: path of a weight file (``.safetensors``, ``.pth``, ``.bin``); implies ``pretrained``.
        kwargs: passed to :func:`timm.create_model` (e.g. ``drop_path_rate``).

    Raises:
        UserError: unknown backbone, a missing weight file, or pretrained weights that are not cached locally.
    """
    if not timm.is_model(name.split(".")[0]):
        raise UserError(f"unknown timm backbone {name!r}")
    file: Path | None = None
    if weights:
        file = Path(weights).expanduser()
        if not file.is_file():
            raise UserError(f"model.weights file not found: {file}")
    elif pretrained:
        found, searched = _candidates(name)
        if not found:
            raise UserError(
                f"pretrained weights for {name!r} are not available offline; looked in: {'; '.join(searched)}. "
                "Put the file there (e.g. `huggingface-cli download REPO` on a machine with network, then copy the "
                "cache), or set model.weights: /path/to/weights.safetensors, or model.pretrained: false"
            )
        file = found[0]
    args: dict[str, Any] = {"in_chans": in_chans, "num_classes": 0, "global_pool": "", **kwargs}
    with offline():
        if file is None:
            return timm.create_model(name, pretrained=False, **args)
        try:
            return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(file)}, **args)
        except (RuntimeError, OSError, ValueError, KeyError) as exc:
            raise UserError(f"cannot load weights {file} into {name}: {exc}") from exc
