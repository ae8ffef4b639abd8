"""The three extra families (clf3d, seg_aux, seq), their losses and data pieces, and ``rsna19 embed``.

Models are tiny (resnet10t at 32–64 px) and run on one thread; datasets read caches written by
``cachefactory``, and mask alignment goes through real tilted DICOM files converted by the converter.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from cachefactory import write_cache
from tinyfamilies import FAMILIES

from rsna19.conversion import convert_series, write_series
from rsna19.core.config import load_config
from rsna19.core.constants import CLASSES, PROB_COLUMNS, SUBTYPES, WINDOWS
from rsna19.core.errors import UserError
from rsna19.data.augment import AugmentConfig
from rsna19.data.datasets import read_cache_index
from rsna19.data.embeddings import SequenceDataset, collate_sequences, read_embeddings
from rsna19.data.masks import SegSliceDataset, series_mask, unpack_bits
from rsna19.data.slab import SlabDataset, aggregate, window_starts
from rsna19.engine.config import TrainConfig, model_kwargs
from rsna19.engine.losses import mask_loss, masked_seq_loss, seg_aux_loss, weighted_bce
from rsna19.engine.runtime import Runtime
from rsna19.io.dicom_write import SliceGeometry, write_ct_dicom
from rsna19.nets import build_model, get_model_spec, list_models

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_cache(tmp_path_factory.mktemp("cache"), n_patients=4, n_test_patients=1, size=32, slices=(5, 13))


def _all_params_have_grad(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


# ------------------------------------------------------------------------------------------------------- clf3d


def test_clf3d_forward_backward_and_identity_init():
    torch.manual_seed(0)
    model = build_model("clf3d", backbone="resnet10t", n_windows=2, n_slices=8, kernel=3, depth=2)
    assert get_model_spec("clf3d").input_layout == "slab"
    x = torch.randn(2, 8, 2, 32, 32)
    logits = model(x)
    assert logits.shape == (2, 8, len(CLASSES)) and torch.isfinite(logits).all()
    y = (torch.rand(2, 8, 6) > 0.5).float()
    masked_seq_loss(logits, y, torch.ones(2, 8, dtype=torch.bool)).backward()
    assert _all_params_have_grad(model) == []
    # The slice mixer starts as the identity: each slice's prediction is that of the slice alone.
    model.eval()
    with torch.no_grad():
        full = model(x)
        alone = torch.cat([model(x[:, s : s + 1]) for s in range(8)], dim=1)
    torch.testing.assert_close(full, alone, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------- seg_aux


def test_seg_aux_forward_backward_and_classify():
    torch.manual_seed(0)
    model = build_model(
        "seg_aux",
        backbone="tu-resnet10t",
        n_windows=2,
        n_slices=1,
        decoder_channels=[16, 16, 16, 16, 16],
        drop_rate=0.1,
    )
    x = torch.randn(3, 2, 64, 64)
    cls, masks = model(x)
    assert cls.shape == (3, 6) and masks.shape == (3, len(SUBTYPES), 64, 64)
    assert torch.isfinite(cls).all() and torch.isfinite(masks).all()
    y = (torch.rand(3, 6) > 0.5).float()
    gt = (torch.rand(3, 5, 64, 64) > 0.9).float()
    seg_aux_loss(cls, masks, y, gt, torch.tensor([True, False, True]), lam=0.5).backward()
    assert _all_params_have_grad(model) == []
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.classify(x), model(x)[0])
        assert model.features(x).shape == (3, model.num_features)


def test_seg_aux_local_weights_only(tmp_path):
    src = build_model("seg_aux", backbone="tu-resnet10t", n_windows=3, decoder_channels=[8, 8, 8, 8, 8])
    path = tmp_path / "enc.pth"
    torch.save({"state_dict": src.net.encoder.model.state_dict()}, path)
    # Weights of a 3-channel encoder load into a 2-channel one (first conv adapted), not downloaded.
    dst = build_model(
        "seg_aux", backbone="tu-resnet10t", n_windows=2, decoder_channels=[8, 8, 8, 8, 8], weights=str(path)
    )
    a, b = src.net.encoder.model.state_dict(), dst.net.encoder.model.state_dict()
    torch.testing.assert_close(a["layer1.0.conv1.weight"], b["layer1.0.conv1.weight"])
    assert b["conv1.0.weight"].shape[1] == 2
    with pytest.raises(UserError, match="not found"):
        build_model("seg_aux", backbone="tu-resnet10t", weights=str(tmp_path / "missing.pth"))


def test_seg_loss_with_and_without_masks():
    torch.manual_seed(0)
    cls = torch.randn(4, 6, requires_grad=True)
    masks = torch.randn(4, 5, 16, 16, requires_grad=True)
    y = (torch.rand(4, 6) > 0.5).float()
    gt = (torch.rand(4, 5, 16, 16) > 0.8).float()
    # The weighted BCE is the competition metric's number.
    from rsna19.core.metrics import weighted_log_loss

    p = torch.sigmoid(cls).detach().numpy().astype("float64")
    assert abs(float(weighted_bce(cls, y).detach()) - weighted_log_loss(y.numpy(), p)) < 1e-5
    # No masks: only the classification loss, and the mask logits still get a (zero) gradient.
    none = torch.zeros(4, dtype=torch.bool)
    loss = seg_aux_loss(cls, masks, y, gt, none, lam=1.0)
    torch.testing.assert_close(loss, weighted_bce(cls, y))
    loss.backward()
    assert masks.grad is not None and float(masks.grad.abs().sum()) == 0.0
    # Some masks: the mask loss counts those samples only; another sample's mask content changes nothing.
    some = torch.tensor([True, False, True, False])
    base = seg_aux_loss(cls, masks, y, gt, some, lam=0.7)
    gt2 = gt.clone()
    gt2[1] = 1 - gt2[1]
    torch.testing.assert_close(seg_aux_loss(cls, masks, y, gt2, some, lam=0.7), base)
    torch.testing.assert_close(base, weighted_bce(cls, y) + 0.7 * mask_loss(masks[some], gt[some], some[some]))
    with torch.no_grad():
        assert float(mask_loss(masks, gt, some)) > 0
        # A perfect mask prediction has a lower mask loss than a random one.
        assert float(mask_loss(gt * 40 - 20, gt, some)) < 0.05 < float(mask_loss(masks, gt, some))


# --------------------------------------------------------------------------------------------------------- seq


@pytest.mark.parametrize("rnn", ["gru", "lstm"])
def test_seq_forward_backward(rnn):
    torch.manual_seed(0)
    model = build_model("seq", in_features=12, hidden=8, rnn=rnn, drop_rate=0.1)
    x = torch.randn(3, 7, 12)
    lengths = torch.tensor([7, 3, 5])
    logits = model(x, lengths)
    assert logits.shape == (3, 7, 6) and torch.isfinite(logits).all()
    mask = torch.arange(7)[None] < lengths[:, None]
    assert float(logits.detach()[~mask].abs().sum()) == 0.0
    masked_seq_loss(logits, (torch.rand(3, 7, 6) > 0.5).float(), mask).backward()
    assert _all_params_have_grad(model) == []


def test_seq_logit_skip_starts_at_the_image_model_and_learns_a_correction():
    torch.manual_seed(0)
    model = build_model("seq", in_features=12, hidden=8, drop_rate=0.0, logit_skip=True)
    x, base = torch.randn(3, 7, 12), torch.randn(3, 7, 6)
    lengths = torch.tensor([7, 3, 5])
    mask = torch.arange(7)[None] < lengths[:, None]
    logits = model(x, lengths, base)
    # Zero-initialised correction: the output is the image model's logits at the real positions, zero elsewhere.
    torch.testing.assert_close(logits[mask], base[mask])
    assert float(logits.detach()[~mask].abs().sum()) == 0.0
    masked_seq_loss(logits, (torch.rand(3, 7, 6) > 0.5).float(), mask).backward()
    assert model.head.weight.grad is not None and float(model.head.weight.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="base"):
        model(x, lengths)  # logit_skip without its base logits
    with pytest.raises(ValueError, match="base"):
        build_model("seq", in_features=12, hidden=8)(x, lengths, base)  # base logits given to a model without it


def test_seq_padding_never_leaks():
    torch.manual_seed(0)
    model = build_model("seq", in_features=10, hidden=8, layers=2).eval()
    lengths = torch.tensor([6, 2, 4])
    real = [torch.randn(int(n), 10) for n in lengths]

    def batch(t: int, fill: float) -> torch.Tensor:
        x = torch.full((3, t, 10), fill)
        x[:, :, ::3] = float("nan")  # garbage of the worst kind
        for i, r in enumerate(real):
            x[i, : len(r)] = r
        return x

    with torch.no_grad():
        a = model(batch(6, 0.0), lengths)
        b = model(batch(16, 1e6), lengths)
    for i, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(a[i, :n], b[i, :n], atol=1e-6, rtol=1e-6)
        # And the same series alone in a batch of one.
        with torch.no_grad():
            alone = model(real[i][None], torch.tensor([n]))
        torch.testing.assert_close(a[i, :n], alone[0], atol=1e-5, rtol=1e-5)


def test_masked_seq_loss_counts_only_masked_labelled_slices():
    logits = torch.randn(2, 4, 6)
    y = (torch.rand(2, 4, 6) > 0.5).float()
    y[0, 3] = float("nan")  # unlabelled: never counts
    mask = torch.tensor([[True, True, False, True], [True, False, False, False]])
    keep = [(0, 0), (0, 1), (1, 0)]
    want = torch.stack([weighted_bce(logits[i, t][None], y[i, t][None]) for i, t in keep]).mean()
    torch.testing.assert_close(masked_seq_loss(logits, y, mask), want)
    empty = masked_seq_loss(logits.requires_grad_(), y, torch.zeros(2, 4, dtype=torch.bool))
    assert float(empty.detach()) == 0.0 and empty.requires_grad


# -------------------------------------------------------------------------------------------------------- slab


def test_window_starts_tile_the_series():
    assert window_starts(20, 8, 4).tolist() == [0, 4, 8, 12]
    assert window_starts(21, 8, 4).tolist() == [0, 4, 8, 12, 13]
    assert window_starts(5, 8, 4).tolist() == [0]


def test_slab_prediction_aggregates_every_slice_exactly_once(cache):
    index = read_cache_index(cache)
    frame = index[index["split"] == "train"].sample(frac=1.0, random_state=0)  # any row order
    ds = SlabDataset(cache, frame, ["brain", "bone"], slab=8, stride=3)
    rows = ds.window_rows()
    assert rows.shape == (len(ds), 8)
    # Every frame row is shown by at least one window; every (window, position) shows a real slice or padding.
    assert set(rows[rows >= 0].tolist()) == set(range(len(frame)))
    # Averaging the row number of each position gives back exactly one value per row: the row itself.
    values = np.repeat(rows[:, :, None].astype(np.float64), 6, axis=2)
    np.testing.assert_array_equal(ds.aggregate(values), np.repeat(np.arange(len(frame))[:, None], 6, axis=1))
    # A weighted average: each window contributes with its position weight.
    rng = np.random.default_rng(0)
    v = rng.random((len(ds), 8, 6))
    w = np.linspace(0.5, 1.0, 8)
    got = aggregate(v, rows, len(frame), w)
    r = int(rows[1, 3])
    hits = np.argwhere(rows == r)
    want = sum(v[i, s] * w[s] for i, s in hits) / sum(w[s] for _, s in hits)
    np.testing.assert_allclose(got[r], want)
    with pytest.raises(ValueError, match="in no window"):
        aggregate(v[:1], rows[:1], len(frame))


def test_slab_items_images_labels_and_padding(cache):
    index = read_cache_index(cache)
    train = index[index["split"] == "train"].reset_index(drop=True)
    short = train[train["n_slices"] < 8]["series_uid"].iloc[0]
    ds = SlabDataset(cache, train, ["brain"], slab=8, stride=4)
    i = int(np.flatnonzero(np.array([ds.series[s] for s in ds.items[:, 0]]) == short)[0])
    item = ds[i]
    n_z = int(train.loc[train["series_uid"] == short, "n_slices"].iloc[0])
    vol = np.load(cache / short / "volume.npy")
    c, w = WINDOWS["brain"]
    assert item["image"].shape == (8, 1, 32, 32)
    np.testing.assert_allclose(item["image"][:n_z, 0].numpy(), np.clip((vol - (c - w / 2)) / w, 0, 1), atol=1e-6)
    assert item["valid"].tolist() == [True] * n_z + [False] * (8 - n_z)
    assert (item["image"][n_z:] == 0).all()  # air in the brain window
    assert torch.isnan(item["target"][n_z:]).all() and (item["rows"][n_z:] == -1).all()
    rows = item["rows"][:n_z].numpy()
    np.testing.assert_array_equal(item["target"][:n_z].numpy(), train.loc[rows, list(CLASSES)].to_numpy(np.float32))
    assert item["loss_mask"].tolist() == item["valid"].tolist()


def test_slab_training_starts_and_label_slices(cache):
    index = read_cache_index(cache)
    train = index[index["split"] == "train"].reset_index(drop=True)
    ds = SlabDataset(
        cache, train, ["brain"], slab=4, label_slices=2, train=True, seed=3, size=24, augment=AugmentConfig()
    )
    n_items = sum(int(np.ceil(n / 4)) for n in train.groupby("series_uid")["n_slices"].first())
    assert len(ds) == n_items
    starts = {}
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        starts[epoch] = [ds.start_of(i) for i in range(len(ds))]
    assert starts[0] != starts[1]
    ds.set_epoch(0)
    assert [ds.start_of(i) for i in range(len(ds))] == starts[0]  # a function of (seed, epoch, index)
    for i in range(len(ds)):
        item = ds[i]
        s = int(ds.items[i, 0])
        n_z, start = len(ds.row_of_z[s]), ds.start_of(i)
        assert item["image"].shape == (4, 1, 24, 24) and 0 <= start <= max(n_z - 4, 0)
        want = [1 <= p < 3 or (p < 1 and start == 0) or (p >= 3 and start + 4 >= n_z) for p in range(4)]
        assert item["loss_mask"].tolist() == [bool(a and v) for a, v in zip(want, item["valid"].tolist())]


def test_slab_items_carry_the_device_affine(cache):
    """``affine_on_device`` for slabs: the same theta and air fill as a slice item, applied by Runtime.image."""
    index = read_cache_index(cache)
    train = index[index["split"] == "train"].reset_index(drop=True)
    aug = AugmentConfig(affine=1.0, affine_on_device=True)
    ds = SlabDataset(cache, train, ["brain", "cdf"], slab=4, train=True, seed=3, size=24, augment=aug)
    item = ds[0]
    assert item["affine"].shape == (2, 3) and not torch.equal(item["affine"], torch.eye(3)[:2])
    assert item["fill"].tolist() == [[0.0, -1.0]] * 4  # air: 0 in a window, -1 in a float CDF channel
    batch = torch.utils.data.default_collate([item, ds[1]])
    assert Runtime(torch.device("cpu")).image(batch).shape == (2, 4, 2, 24, 24)


# ------------------------------------------------------------------------------------------------------- masks


def _tilted_series(folder: Path, tilt: float, n: int = 8, shape=(64, 64), spacing=(1.0, 1.0), dz=5.0):
    """A sphere (800 HU) in air, sampled on a tilted series; returns the paths and its DICOM-frame mask."""
    t = np.deg2rad(tilt)
    iop = (1.0, 0.0, 0.0, 0.0, float(np.cos(t)), float(-np.sin(t)))
    r, c = np.asarray(iop[:3]), np.asarray(iop[3:])
    origin = np.array([-32.0, -32.0, 0.0])
    centre = np.array([6.0, -4.0, 17.5])
    paths, masks, uids = [], [], []
    folder.mkdir(parents=True)
    for k in range(n):
        ipp = origin + np.array([0.0, 0.0, k * dz])  # the table moves along z, the planes are tilted
        i, j = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
        pts = ipp + (j * spacing[1])[..., None] * r + (i * spacing[0])[..., None] * c
        inside = np.linalg.norm(pts - centre, axis=-1) < 14.0
        hu = np.where(inside, 800.0, -1000.0)
        hu[24:40, 4:10] = 40.0  # a bit of "head" elsewhere, so the crop centre is not the sphere's
        uid = f"ID_m{k:03d}"
        path = folder / f"f{(k * 5) % n}.dcm"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            write_ct_dicom(
                path,
                hu,
                SliceGeometry(tuple(ipp), iop, spacing),
                sop_uid=uid,
                series_uid="ID_mser",
                study_uid="ID_mst",
                patient_id="ID_mpt",
                instance_number=n - k,
            )
        paths.append(path)
        masks.append(inside.astype(np.uint8) << 1)  # bit 1: intraparenchymal
        uids.append(uid)
    return paths, np.stack(masks), uids


def test_mask_lands_on_the_object_in_the_cache_frame(tmp_path):
    paths, mask, uids = _tilted_series(tmp_path / "dcm", tilt=25.0)
    volume, meta = convert_series(paths, crop=48)
    assert meta["tilt_corrected"] and meta["crop_box"] != [0, 0, 64, 64]
    cache = tmp_path / "cache"
    write_series(volume, meta, cache, preview=False)
    masks_dir = tmp_path / "masks"
    masks_dir.mkdir()
    order = np.random.default_rng(0).permutation(len(uids))  # file order need not be spatial
    np.savez_compressed(masks_dir / "ID_mser.npz", mask=mask[order], sop_uids=np.array(uids)[order])
    stored = json.loads((cache / "ID_mser" / "meta.json").read_text())
    got = series_mask(masks_dir, "ID_mser", stored)
    assert got.shape == volume.shape
    bit = unpack_bits(got)[:, 1].astype(bool)
    assert not unpack_bits(got)[:, [0, 2, 3, 4]].any()
    sphere = volume > 400  # the converted object
    iou = (bit & sphere).sum() / (bit | sphere).sum()
    assert bit.sum() > 200 and iou > 0.9, iou
    # Without the tilt shift (the raw DICOM mask, cropped) the mask would miss the object by a lot.
    y0, x0, y1, x1 = meta["crop_box"]
    raw = np.zeros_like(bit)
    ys, xs = slice(max(y0, 0), min(y1, 64)), slice(max(x0, 0), min(x1, 64))
    raw[:, ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0] = (mask[:, ys, xs] >> 1) & 1
    assert (raw & sphere).sum() / (raw | sphere).sum() < iou - 0.2
    assert series_mask(masks_dir, "ID_other", stored) is None

    # Through the dataset: the sample's mask sits on the bright object of the sample's image, also augmented.
    frame = pd.DataFrame(
        {
            "sop_uid": meta["sop_uids"],
            "series_uid": "ID_mser",
            "study_uid": "ID_mst",
            "patient_id": "ID_mpt",
            "split": "train",
            "z": np.arange(len(volume)),
            "n_slices": len(volume),
        }
    )
    rt = Runtime(torch.device("cpu"))
    for train, on_device in ((False, False), (True, False), (True, True)):
        ds = SegSliceDataset(
            cache,
            frame,
            ["bone"],
            slices=3,
            size=40,
            augment=AugmentConfig(affine=1.0, affine_on_device=on_device),
            train=train,
            seed=1,
            masks_dir=masks_dir,
        )
        inside, outside = [], []
        for i in range(len(ds)):
            item = ds[i]
            assert item["has_mask"] and item["mask"].shape == (5, 40, 40) and item["image"].shape == (3, 40, 40)
            assert ("affine" in item) == on_device
            # The trainer's view of the sample (Runtime.image / .mask apply a device-side affine).
            batch = torch.utils.data.default_collate([item])
            image, mask = rt.image(batch)[0], rt.mask(batch)[0]
            m = mask[1].bool()
            bright = image[1] > 0.45  # the centre slice, bone window: the sphere (800 HU) ≈ 0.5
            inside.append(int((m & bright).sum()))
            outside.append(int((m ^ bright).sum()))
        assert sum(inside) > 300 and sum(outside) < 0.15 * sum(inside), (train, sum(inside), sum(outside))


def test_seg_dataset_without_masks(cache):
    index = read_cache_index(cache)
    ds = SegSliceDataset(cache, index.head(3), ["brain"], slices=1, masks_dir=None)
    item = ds[0]
    assert item["has_mask"] is False and item["mask"].shape == (5, 32, 32) and float(item["mask"].sum()) == 0
    batch = torch.utils.data.default_collate([ds[0], ds[1]])
    assert batch["has_mask"].tolist() == [False, False]


def test_bad_mask_file_names_the_file(tmp_path, cache):
    index = read_cache_index(cache)
    uid = index["series_uid"].iloc[0]
    (tmp_path / f"{uid}.npz").write_bytes(b"not an npz")
    ds = SegSliceDataset(cache, index.head(1), ["brain"], masks_dir=tmp_path)
    with pytest.raises(UserError, match=f"{uid}.npz"):
        ds[0]


# ----------------------------------------------------------------------------------------------- configs


#: Every base-model config of the repository (not the stack and pipeline configs).
MODEL_CONFIGS = sorted(p for p in CONFIGS.glob("*/*.yaml") if p.parent.name not in ("stack", "pipelines"))


@pytest.mark.parametrize("path", MODEL_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_model_configs_build_their_models(path):
    """Each model config's model section builds with the arguments the trainer passes (``model_kwargs``)."""
    cfg = load_config(TrainConfig, path)
    spec = get_model_spec(cfg.model.name)
    assert spec.input_layout == cfg.data.layout
    kwargs = {**model_kwargs(cfg), "pretrained": False, "weights": None}  # weights: tests/test_weights.py
    if spec.reads_embeddings:
        kwargs["in_features"] = 16  # the trainer reads it from the embedding files
    assert build_model(cfg.model.name, **kwargs) is not None


def test_every_family_of_the_package_runs_in_the_tiny_pipeline():
    """Every family of the package (plugins aside) has a model in configs/pipelines/tiny.yaml, so the pipeline,
    bundle and predict-study tests run it."""
    assert set(FAMILIES.values()) == {s.family for s in list_models() if s.plugin is None}


# ---------------------------------------------------------------------------------------- embeddings + seq e2e


def test_embed_a_trained_run_and_train_seq_on_it(tmp_path, caplog):
    from rsna19.cli import main
    from rsna19.core.config import load_config
    from rsna19.data.folds import make_folds
    from rsna19.engine.config import TrainConfig, resolve_paths
    from rsna19.training.trainer import train

    cache = write_cache(tmp_path / "cache", n_patients=6, n_test_patients=1, size=32, slices=(5, 9))
    index = read_cache_index(cache)
    make_folds(index, n_folds=2, seed=0).to_csv(tmp_path / "folds.csv", index=False)
    cfg = load_config(TrainConfig, CONFIGS / "tiny" / "clf2d.yaml", ["train.epochs=1", "data.samples_per_epoch=16"])
    run = train(resolve_paths(cfg, str(cache), str(tmp_path / "folds.csv"), str(tmp_path / "runs")), 0)

    # TTA "none" first: the stored logits are then exactly the logits behind `rsna19 predict`'s OOF probabilities.
    # Predict first (a forward pass: no embeddings yet), then embed.
    assert main(["predict", str(run.parent), "--fold", "0", "--split", "oof", "--tta", "none", "--device", "cpu"]) == 0
    forward = pd.read_parquet(run / "oof.parquet")
    assert main(["embed", str(run.parent), "--fold", "0", "--splits", "oof", "--tta", "none", "--device", "cpu"]) == 0
    frame, _, info = read_embeddings(run, "oof")
    assert info["logits"] is True
    oof = forward.set_index("sop_uid")
    got = 1 / (1 + np.exp(-frame[[f"logit_{c}" for c in CLASSES]].to_numpy(dtype=np.float64)))
    np.testing.assert_allclose(got, oof.loc[frame["sop_uid"], [f"p_{c}" for c in CLASSES]].to_numpy(), atol=1e-5)
    # Now the embeddings are current: predict writes their sigmoid without a second pass, the same table.
    (run / "oof.parquet").unlink()
    with caplog.at_level(logging.INFO, logger="rsna19.inference.predict"):
        assert main(["predict", str(run.parent), "--fold", "0", "--split", "oof", "--tta", "none"]) == 0
    assert "from the logits of the fold's oof embeddings" in caplog.text
    reused = pd.read_parquet(run / "oof.parquet")
    pd.testing.assert_frame_equal(reused.drop(columns=list(PROB_COLUMNS)), forward.drop(columns=list(PROB_COLUMNS)))
    np.testing.assert_allclose(reused[list(PROB_COLUMNS)].to_numpy(), forward[list(PROB_COLUMNS)].to_numpy(), atol=1e-6)
    # Two TTA views are not reused (a prediction averages probabilities, an embedding logits): a forward pass.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rsna19.inference.predict"):
        assert main(["predict", str(run.parent), "--fold", "0", "--split", "oof", "--tta", "none", "hflip"]) == 0
    assert "embeddings" not in caplog.text and "TTA none,hflip" in caplog.text
    assert (
        main(["embed", str(run.parent), "--fold", "0", "--tta", "none", "hflip", "--device", "cpu", "--overwrite"]) == 0
    )
    folds = pd.read_csv(tmp_path / "folds.csv", dtype={"patient_id": str})
    held_out = set(folds.loc[folds["fold"] == 0, "patient_id"])
    sizes = {}
    for split in ("train", "oof", "test"):
        frame, feats, info = read_embeddings(run, split)
        assert feats.shape == (len(frame), info["dim"]) and np.isfinite(feats).all()
        assert info["tta"] == ["none", "hflip"] and (frame["fold"] == 0).all() and info["epoch"] == 0
        sizes[split] = len(frame)
        if split == "oof":
            assert set(frame["patient_id"]) == held_out  # OOF: fold 0's own held-out patients, fold 0's model
        elif split == "train":
            assert not set(frame["patient_id"]) & held_out
    assert sizes["train"] + sizes["oof"] == int((index["split"] == "train").sum())
    assert sizes["test"] == int((index["split"] == "test").sum())
    mtime = (run / "embeddings_oof.npy").stat().st_mtime_ns
    assert main(["embed", str(run), "--fold", "0", "--splits", "oof", "--device", "cpu"]) == 0
    assert (run / "embeddings_oof.npy").stat().st_mtime_ns == mtime  # complete: skipped

    # The sequence model reads whole series of them, in slice order, and trains a step.
    frame, feats, info = read_embeddings(run, "train")
    ds = SequenceDataset(frame, feats)
    assert len(ds) == frame["series_uid"].nunique()
    item = ds[0]
    assert item["x"].shape == (len(item["rows"]), info["dim"])
    assert np.all(np.diff(frame.loc[item["rows"].numpy(), "slice_idx"].to_numpy()) > 0)
    batch = collate_sequences([ds[i] for i in range(len(ds))])
    model = build_model("seq", in_features=info["dim"], hidden=8)
    logits = model(batch["x"], batch["lengths"])
    loss = masked_seq_loss(logits, batch["target"], batch["mask"])
    loss.backward()
    assert torch.isfinite(loss) and _all_params_have_grad(model) == []
    # With the image model's logits: the batch carries them padded like x, and a logit-skip model reads them.
    with_logits = SequenceDataset(frame, feats, with_logits=True)
    lbatch = collate_sequences([with_logits[i] for i in range(len(with_logits))])
    assert lbatch["base"].shape == (*lbatch["mask"].shape, 6)
    assert float(lbatch["base"][~lbatch["mask"]].abs().sum()) == 0.0
    skip = build_model("seq", in_features=info["dim"], hidden=8, logit_skip=True)
    torch.testing.assert_close(skip(lbatch["x"], lbatch["lengths"], lbatch["base"]), lbatch["base"])
    with pytest.raises(UserError, match="no image-model logits"):
        SequenceDataset(frame.drop(columns=["logit_any"]), feats, with_logits=True)
    probs = torch.sigmoid(logits).detach().numpy()
    rows = batch["rows"].numpy()
    per_row = aggregate(probs, rows, len(frame))  # every slice exactly one prediction
    assert per_row.shape == (len(frame), 6)


def test_embed_rejects_unknown_split(tmp_path):
    from rsna19.engine.embed import extract_embeddings

    with pytest.raises(UserError, match="unknown embedding split"):
        extract_embeddings(tmp_path, 0, ["val"])


# ------------------------------------------------------------------- one training step + prediction per family


def test_clf3d_and_seg_aux_train_a_step_and_predict(cache, tmp_path):
    """The loop phase 2 puts in the trainer: family batch → loss → step, and prediction → one row per slice."""
    from rsna19.inference.predict import prediction_frame

    index = read_cache_index(cache)
    train_rows = index[index["split"] == "train"].reset_index(drop=True)
    test_rows = index[index["split"] == "test"].reset_index(drop=True)
    torch.manual_seed(0)

    # clf3d: slabs with random starts, masked per-slice loss; prediction windows averaged per slice.
    model = build_model("clf3d", backbone="resnet10t", n_windows=2, n_slices=8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ds = SlabDataset(cache, train_rows, ["brain", "cdf"], slab=8, label_slices=4, train=True, size=32)
    batch = torch.utils.data.default_collate([ds[i] for i in range(2)])
    loss = masked_seq_loss(model(batch["image"]), batch["target"], batch["loss_mask"])
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    pred = SlabDataset(cache, test_rows, ["brain", "cdf"], slab=8, stride=4)
    model.eval()
    with torch.no_grad():
        probs = torch.cat([torch.sigmoid(model(b["image"])) for b in torch.utils.data.DataLoader(pred, batch_size=4)])
    df = prediction_frame(test_rows, pred.aggregate(probs.numpy()), 0, "clf3d", labels=False)
    assert len(df) == len(test_rows) and df["sop_uid"].is_unique and df.filter(like="p_").notna().all().all()

    # seg_aux: masks where a file exists (here: every other series), classification-only elsewhere.
    masks_dir = tmp_path / "masks"
    masks_dir.mkdir()
    for uid in sorted(train_rows["series_uid"].unique())[::2]:
        vol = np.load(cache / uid / "volume.npy")
        meta = json.loads((cache / uid / "meta.json").read_text())
        np.savez(masks_dir / f"{uid}.npz", mask=(vol == 75).astype(np.uint8), sop_uids=np.array(meta["sop_uids"]))
    model = build_model("seg_aux", backbone="tu-resnet10t", n_windows=2, decoder_channels=[8, 8, 8, 8, 8])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ds = SegSliceDataset(
        cache, train_rows, ["brain", "subdural"], size=32, augment=AugmentConfig(), train=True, masks_dir=masks_dir
    )
    batch = torch.utils.data.default_collate([ds[i] for i in range(0, len(ds), max(1, len(ds) // 8))])
    assert batch["has_mask"].any() and not batch["has_mask"].all()
    cls, masks = model(batch["image"])
    loss = seg_aux_loss(cls, masks, batch["target"], batch["mask"], batch["has_mask"], lam=1.0)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    model.eval()
    with torch.no_grad():
        p = torch.sigmoid(model.classify(batch["image"]))
    assert p.shape == (len(batch["image"]), 6)


def test_neighbour_deltas_are_zero_at_the_ends_and_padding():
    from rsna19.nets.seq import length_mask, neighbour_deltas

    x = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1) ** 2
    x[1, 2:] = float("nan")  # padding
    out = neighbour_deltas(x, length_mask(torch.tensor([4, 2]), 4))
    assert out[0, :, 1].tolist() == [0, 1, 3, 5] and out[0, :, 2].tolist() == [1, 3, 5, 0]
    assert out[1, :, 1].tolist() == [0, 9, 0, 0] and out[1, :, 2].tolist() == [9, 0, 0, 0]
    assert out[1, 2:].abs().sum() == 0
