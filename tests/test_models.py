"""Every registered model: forward/backward on tiny inputs and its traits; registry, combine-last init, offline weights.

Every family the registry holds is tested (timm's way: one parametrised test over every registered name), plugins
of ``$RSNA19_PLUGINS`` included. Builder arguments come from the family's config in ``configs/tiny`` when it has
one (else the builder's defaults with the test backbone); inputs come from a per-layout builder (:func:`_case`):
channels/stack (one slice), slab (a window of slices), sequence (padded embeddings).
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from rsna19.cli import main
from rsna19.core.config import load_config
from rsna19.core.constants import SUBTYPES
from rsna19.core.errors import UserError
from rsna19.engine.config import TrainConfig, model_kwargs
from rsna19.nets import build_model, get_model_spec, list_models
from rsna19.nets.registry import PRETRAINED_SOURCES

ALL = sorted(s.name for s in list_models())
#: Registered name → its test-size config (configs/tiny), for the families that have one.
TINY = {
    c.model.name: c
    for c in (load_config(TrainConfig, p) for p in sorted((Path(__file__).parents[1] / "configs" / "tiny").glob("*")))
}


@pytest.fixture(autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _kwargs(name: str) -> dict:
    """Builder arguments of a registered model: its tiny config's, else the builder's defaults and the test backbone."""
    if name in TINY:
        return {**model_kwargs(TINY[name]), "pretrained": False, "weights": None, "drop_rate": 0.1}
    defaults = {k: p.default for k, p in inspect.signature(get_model_spec(name).builder).parameters.items()}
    return {"backbone": "test_resnet", "n_windows": 2, "n_slices": defaults.get("n_slices", 3), "drop_rate": 0.1}


def _case(name: str, size: int = 32) -> tuple[dict, tuple[torch.Tensor, ...], tuple[int, ...]]:
    """Builder arguments, a batch of 2 inputs and the classification output shape of a registered model."""
    kwargs = _kwargs(name)
    s, c = kwargs["n_slices"], kwargs["n_windows"]
    layout = get_model_spec(name).input_layout
    if layout == "channels":
        return kwargs, (torch.randn(2, s * c, size, size),), (2, 6)
    if layout == "stack":
        return kwargs, (torch.randn(2, s, c, size, size),), (2, 6)
    if layout == "slab":
        return kwargs, (torch.randn(2, s, c, size, size),), (2, s, 6)
    if layout == "sequence":
        d, t = 8, 5  # embeddings of size 8; series of 5 and 3 slices (the second padded)
        kwargs = {**kwargs, "in_features": d}
        base = (torch.randn(2, t, 6),) if kwargs.get("logit_skip") else ()  # the image model's logits
        return kwargs, (torch.randn(2, t, d), torch.tensor([t, 3]), *base), (2, t, 6)
    raise AssertionError(f"{name}: no test input for layout {layout!r}; add it to _case")


def test_base_families_are_registered():
    assert {"clf2d", "clf2dc", "clf2dc_3x3", "combine_last", "clf3d", "seg_aux", "seq"} <= set(ALL)
    assert set(TINY) <= set(ALL)


@pytest.mark.parametrize("name", ALL)
def test_forward_backward_and_traits(name):
    """Forward and backward; the outputs are what the family's traits promise (masks: mask logits too)."""
    torch.manual_seed(0)
    spec = get_model_spec(name)
    assert spec.pretrained in PRETRAINED_SOURCES
    kwargs, inputs, shape = _case(name)
    model = build_model(name, **kwargs)
    out = model(*inputs)
    # A family that learns from masks also gives mask logits (B, 5, H, W); every output must reach the loss.
    assert isinstance(out, tuple) == spec.masks
    extra = out[1:] if isinstance(out, tuple) else ()
    logits = out[0] if isinstance(out, tuple) else out
    assert logits.shape == shape
    assert torch.isfinite(logits).all()
    for e in extra:
        assert e.shape == (2, len(SUBTYPES), *inputs[0].shape[-2:]) and torch.isfinite(e).all()
    (logits.sum() + sum(e.mean() for e in extra)).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    if hasattr(model, "classify"):  # prediction reads the class logits alone
        torch.testing.assert_close(model.eval().classify(*inputs), model(*inputs)[0])
    if hasattr(model, "features"):  # embeddings for the sequence model: one vector per slice
        f = model.features(*inputs)
        assert f.shape == (*shape[:-1], model.num_features)
    # Pretrained weights: a family without them refuses the request; the others look for their files (offline).
    try:
        build_model(name, **{**kwargs, "pretrained": True})
        refused = False
    except UserError as exc:
        refused = "no pretrained weights" in str(exc)
    assert refused == (spec.pretrained is None)


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


@pytest.mark.parametrize("backbone", ["test_resnet", "resnet10t"])
def test_clf2dc_neighbour_init_zero_starts_as_a_centre_slice_model(backbone):
    torch.manual_seed(0)
    model = build_model("clf2dc", backbone=backbone, n_windows=2, n_slices=5, neighbour_init=0.0).eval()
    x = torch.randn(2, 10, 32, 32)
    x_other = x.clone()
    x_other[:, [0, 1, 2, 3, 6, 7, 8, 9]] = torch.randn(2, 8, 32, 32)  # every channel but the centre slice's two
    with torch.no_grad():
        torch.testing.assert_close(model(x_other), model(x))
    # The neighbours' weights are zero, not frozen: training reaches them.
    model.train()
    model(x).sum().backward()
    conv = next(m for m in model.backbone.modules() if isinstance(m, nn.Conv2d))
    assert float(conv.weight.detach()[:, :4].abs().sum()) == 0.0 and float(conv.weight.grad[:, :4].abs().sum()) > 0
    with pytest.raises(UserError, match="one-branch"):
        build_model("clf2dc", backbone=backbone, n_windows=1, n_slices=9, branches=3, neighbour_init=0.0)


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


@pytest.fixture
def clean_registry(monkeypatch):
    """The registry as the package leaves it; what a test's plugins register is gone after it."""
    from rsna19.nets import registry

    monkeypatch.setattr(registry, "_REGISTRY", {k: s for k, s in registry._REGISTRY.items() if s.plugin is None})
    monkeypatch.setattr(registry, "_PLUGINS", {})
    return registry


def test_plugins_register_their_families_and_fail_by_name(clean_registry, tmp_path, monkeypatch, capsys):
    """``$RSNA19_PLUGINS``: a module name or a .py file registers families with their traits; a broken one is an
    error naming it, on every look-up."""
    registry = clean_registry
    body = (
        "from torch import nn\nfrom rsna19.nets.registry import register_model\n\n"
        "@register_model({name!r}, masks=True, pretrained=None)\n"
        "def build(**kwargs) -> nn.Module:\n    return nn.Linear(2, 6)\n"
    )
    (tmp_path / "toy_file.py").write_text(body.format(name="toy_b"))
    monkeypatch.syspath_prepend(str(tmp_path / "pkgless"))
    (tmp_path / "pkgless").mkdir()
    (tmp_path / "pkgless" / "toy_mod.py").write_text(body.format(name="toy_a"))
    monkeypatch.setenv(registry.PLUGINS_ENV, f"toy_mod, {tmp_path / 'toy_file.py'}")
    a, b = get_model_spec("toy_a"), get_model_spec("toy_b")
    assert (a.plugin, b.plugin) == ("toy_mod", str(tmp_path / "toy_file.py"))
    assert a.masks and a.pretrained is None and not a.reads_embeddings
    assert isinstance(build_model("toy_b"), nn.Linear)
    with pytest.raises(UserError, match="'toy_b' has no pretrained weights"):  # the trait, whatever the builder takes
        build_model("toy_b", pretrained=True)
    assert main(["models"]) == 0
    assert f"[plugin {tmp_path / 'toy_file.py'}]" in capsys.readouterr().out

    monkeypatch.setenv(registry.PLUGINS_ENV, f"{tmp_path / 'missing.py'}")
    for _ in range(2):  # not only the first look-up
        with pytest.raises(UserError, match=r"plugin '.*missing\.py' \(\$RSNA19_PLUGINS\) failed to import: .*no such"):
            get_model_spec("clf2d")
    (tmp_path / "broken.py").write_text("raise RuntimeError('half written')\n")
    monkeypatch.setenv(registry.PLUGINS_ENV, str(tmp_path / "broken.py"))
    with pytest.raises(UserError, match="broken.py.*RuntimeError: half written"):
        list_models()
    monkeypatch.delenv(registry.PLUGINS_ENV)
    with pytest.raises(UserError, match=r"unknown model 'toy_c'.*\$RSNA19_PLUGINS"):
        get_model_spec("toy_c")
