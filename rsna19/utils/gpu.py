"""Facts about the visible GPUs that decide how a model runs (mixed precision, device assignment)."""

from __future__ import annotations

import torch

#: Compute capability from which bfloat16 matmuls run natively (Ampere). Below it (V100: 7.0, T4: 7.5)
#: ``torch.cuda.is_bf16_supported()`` can still say True, but bf16 is emulated and slower than fp32.
BF16_MIN_CAPABILITY: tuple[int, int] = (8, 0)


def bf16_native(device: torch.device) -> bool:
    """True when ``device`` runs bf16 natively: a GPU of compute capability ≥ 8.0 (CPUs: False)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return tuple(torch.cuda.get_device_capability(index)) >= BF16_MIN_CAPABILITY
