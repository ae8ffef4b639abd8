"""Where and how a network runs: the device, mixed precision, memory format and the test-time views.

Everything that turns "a config and a device preference" into concrete torch settings lives here, so that training,
``rsna19 predict``, ``rsna19 embed``, bundles and ``predict-study`` make the same choices:

* :func:`resolve_device`: ``auto`` → the (local rank's) GPU if one is visible, else the CPU;
* :func:`resolve_amp`: bf16 only where the GPU runs it natively (compute capability ≥ 8.0), fp16 with a
  ``GradScaler`` on older GPUs (V100, T4: bf16 is emulated there and slower than fp32); on the CPU nothing unless
  ``bf16`` is asked for and the CPU has bf16 instructions (AMX / AVX512-BF16: 1.7× faster ResNet-10t training
  steps on the demo's Xeon), else float32;
* :class:`Runtime`: moves a batch onto the device (uint8 windows decoded there, a loader-drawn affine applied
  there, channels-last for 4D images) and opens the autocast context;
* :data:`TTA`: the deterministic test-time views, each its own inverse.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from rsna19.core.errors import UserError
from rsna19.core.gpu import bf16_native
from rsna19.data.augment import device_affine
from rsna19.data.transforms import decode_image

log = logging.getLogger(__name__)

Batch = dict[str, Any]

#: Test-time views: each maps a batch (..., H, W) to a batch of the same shape, and each is its own inverse.
TTA: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "none": lambda x: x,
    "hflip": lambda x: x.flip(-1),
    "vflip": lambda x: x.flip(-2),
    "transpose": lambda x: x.transpose(-1, -2),
}
_TTA_ALIASES = {"identity": "none"}


def parse_tta(names: Sequence[str]) -> list[str]:
    """Check TTA names (``identity`` is an alias of ``none``); the order is kept, duplicates dropped.

    Raises:
        UserError: an unknown name, or no name at all.
    """
    out: list[str] = []
    for n in names:
        n = _TTA_ALIASES.get(n, n)
        if n not in TTA:
            raise UserError(f"unknown TTA {n!r}; known: {', '.join(TTA)}")
        if n not in out:
            out.append(n)
    if not out:
        raise UserError("at least one TTA view is needed (use 'none' for no TTA)")
    return out


def resolve_device(pref: str, local_rank: int = 0) -> torch.device:
    """``auto`` → the local GPU if there is one, else CPU; ``cuda`` takes the local rank's GPU.

    Raises:
        UserError: ``cuda`` asked for without a GPU.
    """
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(pref)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {pref!r} asked for but no GPU is visible (see `rsna19 doctor`)")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def resolve_amp(amp: str, device: torch.device) -> str:
    """The autocast mode a config's ``train.amp`` means on ``device``.

    * ``auto``: bf16 on a GPU that runs it natively, fp16 on an older GPU, none on the CPU;
    * ``bf16`` on a GPU without native bf16 becomes fp16 (with a warning): emulated bf16 is slower than fp32;
    * ``fp16`` needs a GPU (CPU autocast has no fp16 kernels worth using);
    * on the CPU, ``auto`` is float32 and ``bf16`` is kept only where the CPU has bf16 instructions.

    Raises:
        UserError: fp16 asked for on the CPU.
    """
    if device.type == "cuda":
        native = bf16_native(device)
        if amp == "auto":
            return "bf16" if native else "fp16"
        if amp == "bf16" and not native:
            log.warning("bf16 is not native on %s (compute capability < 8.0): using fp16 with a GradScaler", device)
            return "fp16"
        return amp
    if amp == "auto":
        return "none"  # CPU results stay float32 unless bf16 is asked for
    if amp == "fp16":
        raise UserError("train.amp fp16 needs a GPU; use bf16 or none on CPU")
    if amp == "bf16" and not bf16_native(device):
        log.info("this CPU has no AMX / AVX512-BF16: bf16 would be emulated (slower than float32); using float32")
        return "none"
    return amp


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager[None]:
    """``torch.autocast`` for ``amp`` in ``bf16``/``fp16``, or a no-op for ``none``."""
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def barrier() -> None:
    """Wait for every process of a torchrun job (no-op outside a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@dataclass(frozen=True)
class Runtime:
    """Where and how tensors run: the device, the autocast mode and the memory format of 4D images."""

    device: torch.device
    amp: str = "none"
    channels_last: bool = False

    @classmethod
    def for_config(cls, device: torch.device, amp: str, channels_last: bool) -> Runtime:
        """The runtime of a run's ``train.amp`` / ``train.channels_last`` on ``device`` (channels-last on GPUs)."""
        return cls(device, resolve_amp(amp, device), channels_last and device.type == "cuda")

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """Autocast context of ``amp`` on the device."""
        return autocast(self.device, self.amp)

    def to(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` on the device (channels-last when it is a (B, C, H, W) image and that is asked for)."""
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.ndim == 4 and x.is_floating_point():
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def image(self, batch: Batch) -> torch.Tensor:
        """The batch's images on the device as float: uint8 images are decoded there (after the 4× smaller copy),
        and a shift-scale-rotate drawn by the loader for the device (``augment.affine_on_device``) is applied."""
        x = decode_image(batch["image"].to(self.device, non_blocking=True))
        if "affine" in batch:
            x = device_affine(x, batch["affine"], batch["fill"])
        return self.to(x)

    def mask(self, batch: Batch) -> torch.Tensor:
        """The batch's subtype masks on the device, warped like :meth:`image` (bilinear, thresholded at 0.5)."""
        m = self.to(batch["mask"])
        if "affine" in batch:
            m = (device_affine(m, batch["affine"]) > 0.5).to(m.dtype)
        return m
