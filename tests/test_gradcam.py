"""Tests for rsna19.inference.gradcam on a tiny timm ResNet and a hand-built model with a known answer."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from torch import nn

from rsna19.inference.gradcam import grad_cam


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class _QuadrantMask(nn.Module):
    """Multiplies a feature map by a fixed mask: only one quadrant reaches the head."""

    def __init__(self, size: int, quadrant: str) -> None:
        super().__init__()
        mask = torch.zeros(1, 1, size, size)
        h = size // 2
        rows = slice(0, h) if quadrant[0] == "t" else slice(h, size)
        cols = slice(0, h) if quadrant[1] == "l" else slice(h, size)
        mask[..., rows, cols] = 1.0
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask


class _QuadrantNet(nn.Module):
    """Conv features → quadrant mask → global average → linear: the logits see one quadrant only."""

    def __init__(self, size: int, quadrant: str) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
        )
        self.mask = _QuadrantMask(size, quadrant)
        self.head = nn.Linear(8, 6)
        with torch.no_grad():
            self.head.weight.abs_()  # evidence for every class is positive, so the CAM is not all zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mask(self.features(x)).mean(dim=(2, 3)))


@pytest.mark.parametrize("quadrant", ["tl", "br", "tr"])
def test_cam_peaks_in_the_quadrant_the_logit_sees(quadrant):
    torch.manual_seed(0)
    size = 32
    model = _QuadrantNet(size, quadrant)
    x = torch.rand(1, 3, size, size)
    cam = grad_cam(model, x, class_idx=2, target_layer="mask")
    assert cam.shape == (size, size) and cam.dtype == np.float32
    h = size // 2
    rows = slice(0, h) if quadrant[0] == "t" else slice(h, size)
    cols = slice(0, h) if quadrant[1] == "l" else slice(h, size)
    inside = np.zeros((size, size), dtype=bool)
    inside[rows, cols] = True
    peak = np.unravel_index(np.argmax(cam), cam.shape)
    assert inside[peak]
    assert cam.max() == pytest.approx(1.0)
    assert cam[~inside].max() == 0.0  # same resolution, no upsampling blur: nothing outside the quadrant
    assert cam[inside].mean() > 0.2


def test_target_layer_as_module_equals_name():
    torch.manual_seed(1)
    model = _QuadrantNet(16, "tl")
    x = torch.rand(1, 3, 16, 16)
    np.testing.assert_array_equal(grad_cam(model, x, 0, "mask"), grad_cam(model, x, 0, model.mask))


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return timm.create_model("resnet10t", pretrained=False, num_classes=6, in_chans=3)


@pytest.mark.parametrize("target", [None, "layer3"])
def test_timm_resnet_map_shape_and_range(resnet, target):
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 48)
    cam = grad_cam(resnet, x, class_idx=5, target_layer=target)
    assert cam.shape == (64, 48)
    assert np.isfinite(cam).all()
    assert cam.min() >= 0.0 and cam.max() <= 1.0
    assert cam.max() in (0.0, pytest.approx(1.0))


def test_works_under_no_grad_with_frozen_weights_and_keeps_mode(resnet):
    resnet.train()
    for p in resnet.parameters():
        p.requires_grad_(False)
    try:
        x = torch.randn(1, 3, 32, 32)
        with torch.no_grad():
            cam = grad_cam(resnet, x, class_idx=0)
        assert cam.shape == (32, 32) and np.isfinite(cam).all()
        assert resnet.training  # mode restored
        assert all(p.grad is None for p in resnet.parameters())
    finally:
        for p in resnet.parameters():
            p.requires_grad_(True)
        resnet.eval()


def test_bad_arguments(resnet):
    with pytest.raises(ValueError, match=r"\(1, C, H, W\)"):
        grad_cam(resnet, torch.randn(2, 3, 32, 32), 0)
    with pytest.raises(ValueError, match="no sub-module"):
        grad_cam(resnet, torch.randn(1, 3, 32, 32), 0, target_layer="nope")
    with pytest.raises(ValueError, match="forward_features"):
        grad_cam(nn.Sequential(nn.Conv2d(3, 2, 1), nn.Flatten()), torch.randn(1, 3, 4, 4), 0)
    with pytest.raises(ValueError, match="feature map must be"):
        grad_cam(resnet, torch.randn(1, 3, 32, 32), 0, target_layer="fc")
