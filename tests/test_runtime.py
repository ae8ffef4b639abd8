"""The runtime rules every forward shares: device choice, AMP by GPU capability, TTA names."""

from __future__ import annotations

import pytest
import torch

from rsna19.core import gpu
from rsna19.core.errors import UserError
from rsna19.engine import runtime
from rsna19.engine.runtime import Runtime, parse_tta, resolve_amp, resolve_device


@pytest.mark.parametrize(
    ("capability", "asked", "expected"),
    [
        ((7, 0), "auto", "fp16"),  # V100: bf16 emulated, fp16 + GradScaler
        ((7, 5), "auto", "fp16"),  # T4
        ((7, 5), "bf16", "fp16"),  # asked for, but not native: fp16 with a warning
        ((8, 0), "auto", "bf16"),  # A100
        ((9, 0), "bf16", "bf16"),  # H100
        ((8, 6), "fp16", "fp16"),
        ((8, 0), "none", "none"),
    ],
)
def test_amp_follows_the_gpu_capability(monkeypatch, capability, asked, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    assert gpu.bf16_native(torch.device("cuda", 0)) == (capability >= (8, 0))
    assert resolve_amp(asked, torch.device("cuda", 0)) == expected


@pytest.mark.parametrize("native", [True, False])
def test_amp_on_cpu(monkeypatch, native):
    monkeypatch.setattr(gpu, "cpu_bf16_native", lambda: native)
    cpu = torch.device("cpu")
    assert resolve_amp("auto", cpu) == "none"  # float32 unless asked for
    assert resolve_amp("bf16", cpu) == ("bf16" if native else "none")  # emulated bf16 is slower than float32
    with pytest.raises(UserError, match="fp16 needs a GPU"):
        resolve_amp("fp16", cpu)
    rt = Runtime.for_config(cpu, "auto", channels_last=True)
    assert rt.amp == "none" and not rt.channels_last  # channels-last only pays on GPUs


def test_device_and_tta_names(monkeypatch):
    assert resolve_device("cpu").type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(UserError, match="no GPU is visible"):
        resolve_device("cuda")
    assert parse_tta(["identity", "hflip", "none"]) == ["none", "hflip"]
    with pytest.raises(UserError, match="unknown TTA"):
        parse_tta(["rot45"])
    x = torch.arange(6.0).reshape(1, 2, 3)
    for name, view in runtime.TTA.items():
        torch.testing.assert_close(view(view(x)), x, msg=name)  # each view is its own inverse
