"""Facts about the visible GPUs that decide how a model runs (mixed precision, device assignment)."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import asdict, dataclass
from typing import Any

import torch

#: Compute capability from which bfloat16 matmuls run natively (Ampere). Below it (V100: 7.0, T4: 7.5)
#: ``torch.cuda.is_bf16_supported()`` can still say True, but bf16 is emulated and slower than fp32.
BF16_MIN_CAPABILITY: tuple[int, int] = (8, 0)


def cpu_bf16_native() -> bool:
    """True when this CPU has bf16 matrix instructions (AMX tiles or AVX512-BF16); elsewhere CPU bf16 is emulated."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, p, lambda: False)()) for p in probes)


def bf16_native(device: torch.device) -> bool:
    """True when ``device`` runs bf16 natively: a GPU of compute capability ≥ 8.0, or a CPU with AMX / AVX512-BF16."""
    if device.type == "cpu":
        return cpu_bf16_native()
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return tuple(torch.cuda.get_device_capability(index)) >= BF16_MIN_CAPABILITY


@dataclass(frozen=True)
class GpuFacts:
    """One visible GPU as torch sees it.

    Attributes:
        index: torch device index (``cuda:index``), after ``CUDA_VISIBLE_DEVICES``.
        name: marketing name (``NVIDIA A100-SXM4-80GB``).
        memory_bytes: total device memory.
        capability: compute capability (major, minor).
    """

    index: int
    name: str
    memory_bytes: int
    capability: tuple[int, int]

    @property
    def bf16_native(self) -> bool:
        """Compute capability ≥ :data:`BF16_MIN_CAPABILITY` (Ampere and newer)."""
        return tuple(self.capability) >= BF16_MIN_CAPABILITY

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields, ``bf16_native`` included."""
        return {**asdict(self), "capability": list(self.capability), "bf16_native": self.bf16_native}


def gpu_facts() -> list[GpuFacts]:
    """Every GPU torch can use here (empty on a CPU-only machine or build).

    Reads device properties only: no tensor is allocated on the devices.
    """
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        out.append(GpuFacts(i, str(props.name), int(props.total_memory), (int(props.major), int(props.minor))))
    return out


def nvidia_driver_version(timeout: float = 10.0) -> str | None:
    """The NVIDIA driver version (``580.65.06``) from ``nvidia-smi``, or None without a driver or the tool."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    return lines[0] if out.returncode == 0 and lines else None


def cuda_driver_api_version() -> str | None:
    """The CUDA version the installed driver supports (``13.0``), as torch reads it; None without a GPU."""
    get = getattr(torch._C, "_cuda_getDriverVersion", None)
    if get is None or not torch.cuda.is_available():
        return None
    try:
        v = int(get())
    except (RuntimeError, TypeError, ValueError):  # pragma: no cover - driver trouble
        return None
    return f"{v // 1000}.{v % 1000 // 10}" if v > 0 else None
