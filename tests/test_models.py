"""Every registered model: forward/backward on tiny inputs; registry, combine-last init, offline weights."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from rsna19.cli import main
from rsna19.errors import UserError
from rsna19.nets import build_model, get_model_spec, list_models

#: Slices per sample of each model family built here; other registered families default to 3.
SLICES = {"clf2d": 1, "clf2dc": 3, "clf2dc_3x3": 9, "combine_last": 3}
ALL = sorted(s.name for s in list_models())


@pytest.fixture(autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _input(name: str, n_windows: int = 2, size: int = 32) -> torch.Tensor:
    s = SLICES.get(name, 3)
    layout = get_model_spec(name).input_layout
    if layout == "stack":
        return torch.randn(2, s, n_windows, size, size)
    if layout != "channels":
        pytest.skip(f"{name}: layout {layout!r} is exercised by its own family's tests")
    return torch.randn(2, s * n_windows, size, size)


def test_base_families_are_registered():
    assert set(SLICES) <= set(ALL)


@pytest.mark.parametrize("name", ALL)
def test_forward_backward(name):
    torch.manual_seed(0)
    x = _input(name)
    model = build_model(name, backbone="test_resnet", n_windows=2, n_slices=SLICES.get(name, 3), drop_rate=0.1)
    out = model(x)
    assert out.shape == (2, 6)
    assert torch.isfinite(out).all()
    out.sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.features(x).shape == (2, model.num_features)


def test_combine_last_starts_as_the_centre_slice_model():
    torch.manual_seed(0)
    model = build_model("combine_last", backbone="test_resnet", n_windows=2, n_slices=3).eval()
    x = torch.randn(2, 3, 2, 32, 32)
    with torch.no_grad():
        centre = model.backbone.forward_features(x[:, 1])
        expected = torch.cat([centre.mean((-2, -1)), centre.amax((-2, -1))], dim=1)
        x_other = x.clone()
        x_other[:, [0, 2]] = torch.randn_like(x_other[:, [0, 2]])  # neighbours do not matter at init
        torch.testing.assert_close(model.features(x), expected)
        torch.testing.assert_close(model(x_other), model(x))


def test_3x3_branches_share_the_encoder():
    model = build_model("clf2dc_3x3", backbone="test_resnet", n_windows=1).eval()
    assert next(m for m in model.backbone.modules() if isinstance(m, nn.Conv2d)).in_channels == 3
    x = torch.randn(1, 9, 32, 32)
    with torch.no_grad():
        f = model.features(x)
        parts = [model.pool(model.backbone.forward_features(x[:, 3 * g : 3 * g + 3])) for g in range(3)]
    torch.testing.assert_close(f, torch.cat(parts, dim=1))


def test_registry_errors_and_cli(capsys):
    with pytest.raises(UserError, match="unknown model"):
        build_model("nope")
    with pytest.raises(UserError, match="does not take"):
        build_model("clf2d", backbone="test_resnet", colour=3)
    with pytest.raises(UserError, match="unknown timm backbone"):
        build_model("clf2d", backbone="resnet_does_not_exist")
    with pytest.raises(UserError, match="clf2dc"):
        build_model("clf2d", backbone="test_resnet", n_slices=3)
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for s in list_models():
        assert s.name in out


def test_pretrained_without_local_weights_is_a_clear_error(tmp_path, monkeypatch):
    # Empty caches: the error names where the file should go; nothing is downloaded.
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch"))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(UserError, match="not available offline") as err:
        build_model("clf2d", backbone="resnet18", pretrained=True)
    assert str(tmp_path / "torch" / "checkpoints") in str(err.value)
    with pytest.raises(UserError, match="not found"):
        build_model("clf2d", backbone="resnet18", weights=str(tmp_path / "missing.safetensors"))


def test_weights_file_is_loaded_and_adapted(tmp_path, monkeypatch):
    # A weights file as timm would ship it (3 input channels, with classifier): loaded offline, conv adapted.
    src = timm.create_model("test_resnet", num_classes=1000)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = build_model("clf2d", backbone="test_resnet", n_windows=3, weights=str(path))
    name = next(k for k in src.state_dict() if k.endswith("weight") and src.state_dict()[k].ndim == 4)
    torch.testing.assert_close(model.backbone.state_dict()[name], src.state_dict()[name])
    five = build_model("clf2dc", backbone="test_resnet", n_windows=1, n_slices=5, weights=str(path))
    assert five.backbone.state_dict()[name].shape[1] == 5
    # Loading kept the environment as it was.
    import os

    assert os.environ["HF_HUB_OFFLINE"] == "1"
