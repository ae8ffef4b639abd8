"""Untrusted files: loading a checkpoint, weights, a config or an archive never runs code nor writes outside.

Each hostile file carries a pickle whose ``__reduce__`` would create a marker file when unpickled; the tests check
the marker is never created and the loader says clearly why it refuses.

Covered elsewhere (not repeated here): bundles refusing pickles, changed or unlisted files
(tests/test_bundle.py::test_tampered_bundle_is_refused); zip members with ``..``, absolute paths, drive letters,
symbolic links, too many members, too many bytes, a high compression ratio
(tests/test_study_inputs.py::test_malicious_zip_rejected).
"""

from __future__ import annotations

import io
import json
import pickle
import stat
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from rsna19.core.config import read_yaml
from rsna19.core.errors import UserError
from rsna19.data.datasets import VolumeCache
from rsna19.data.embeddings import embedding_paths, read_embeddings
from rsna19.data.masks import read_mask_file
from rsna19.engine.checkpoint import load_checkpoint, save_checkpoint
from rsna19.inference.inputs import UnsafeArchiveError, ZipLimits, collect_studies, safe_extract_zip


class _Payload:
    """Unpickling this calls ``Path(marker).touch()``: code execution, made visible."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def marker(tmp_path) -> Path:
    m = tmp_path / "PWNED"
    assert not m.exists()
    return m


def _sanity_check_payload(marker: Path) -> None:
    """The payload does run when unpickled by a naive loader (so the tests below prove something)."""
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()
    marker.unlink()


@pytest.mark.parametrize("fmt", ["torch-zip", "torch-legacy", "raw-pickle"])
def test_checkpoint_with_code_is_refused(tmp_path, marker, fmt):
    _sanity_check_payload(marker)
    path = tmp_path / "last.pt"
    state = {"version": 1, "model": {"w": torch.zeros(2)}, "extra": _Payload(marker)}
    if fmt == "torch-zip":
        torch.save(state, path)
    elif fmt == "torch-legacy":
        torch.save(state, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(state, protocol=2))
    with pytest.raises(UserError, match=f"cannot read checkpoint {path}"):
        load_checkpoint(path)
    assert not marker.exists()


def test_plain_checkpoint_still_loads(tmp_path):
    path = save_checkpoint({"model": {"w": torch.ones(3)}, "epoch": 2, "config": {"a": [1, "x"]}}, tmp_path / "c.pt")
    state = load_checkpoint(path)
    assert state["epoch"] == 2 and torch.equal(state["model"]["w"], torch.ones(3))


def test_pretrained_weights_file_with_code_is_refused(tmp_path, marker):
    """``model.weights: FILE`` goes through timm's loader; a pickle payload in it must not run."""
    from rsna19.nets.pretrained import create_backbone

    path = tmp_path / "weights.pth"
    torch.save({"conv1.weight": torch.zeros(1), "x": _Payload(marker)}, path)
    with pytest.raises((UserError, RuntimeError, pickle.UnpicklingError)):
        create_backbone("resnet10t", in_chans=3, weights=str(path))
    assert not marker.exists()


def test_yaml_config_cannot_construct_objects(tmp_path, marker):
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(
        f"model: !!python/object/apply:pathlib.Path.touch [!!python/object/apply:pathlib.Path ['{marker}']]\n"
    )
    with pytest.raises(UserError):
        read_yaml(cfg)
    assert not marker.exists()


def _object_array(marker: Path) -> np.ndarray:
    return np.array([_Payload(marker)], dtype=object)


def _read_volume(tmp_path: Path, marker: Path) -> Path:
    path = tmp_path / "cache" / "S1" / "volume.npy"
    path.parent.mkdir(parents=True)
    np.save(path, _object_array(marker), allow_pickle=True)
    VolumeCache(tmp_path / "cache")("S1")
    return path


def _read_embeddings(mmap: bool) -> Callable[[Path, Path], Path]:
    def read(tmp_path: Path, marker: Path) -> Path:
        paths = embedding_paths(tmp_path, "oof")
        np.save(paths["npy"], _object_array(marker), allow_pickle=True)
        pd.DataFrame({"series_uid": ["S1"], "slice_idx": [0]}).to_parquet(paths["parquet"])
        paths["json"].write_text(json.dumps({"logits": True}))
        read_embeddings(tmp_path, "oof", mmap=mmap)
        return paths["npy"]

    return read


def _read_mask(tmp_path: Path, marker: Path) -> Path:
    path = tmp_path / "S1.npz"
    np.savez(path, mask=np.zeros((1, 2, 2), np.uint8), sop_uids=_object_array(marker))
    read_mask_file(path)
    return path


@pytest.mark.parametrize(
    "read",
    [_read_volume, _read_embeddings(mmap=True), _read_embeddings(mmap=False), _read_mask],
    ids=["cache-volume", "embeddings-mmap", "embeddings", "mask"],
)
def test_npy_with_objects_is_refused_by_rsna19s_readers(tmp_path, marker, read):
    """The cache volumes, embeddings and masks rsna19 reads: an object array (a pickle inside .npy / .npz) is a
    clear error naming the file, and its pickle never runs."""
    with pytest.raises(UserError, match="cannot read") as info:
        read(tmp_path, marker)
    assert "S1" in str(info.value) or "embeddings_oof.npy" in str(info.value)  # the message names the file
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------------------------
# Archives given to predict-study (what tests/test_study_inputs.py does not already cover)


def _zip(path: Path, members: list[tuple[zipfile.ZipInfo | str, bytes]], compression=zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as zf:
        for info, data in members:
            zf.writestr(info, data)
    return path


def _link(name: str, target: str) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, target.encode()


def _files_outside(root: Path, before: set[Path]) -> set[Path]:
    return {p for p in set(root.rglob("*")) - before if not p.is_dir()}


@pytest.mark.parametrize(
    "members",
    [
        [_link("out", "../../.."), ("out/evil.txt", b"pwned")],  # a relative link that climbs out, then a write
        [_link("abs", "/tmp"), ("abs/evil.txt", b"pwned")],  # an absolute link target
        [("ok/", b""), _link("ok/inner", "../../../outside")],  # a nested link
    ],
    ids=["relative-link", "absolute-link", "nested-link"],
)
def test_symlink_members_never_write_outside(tmp_path, members):
    archive = _zip(tmp_path / "links.zip", members)
    work = tmp_path / "sandbox" / "work"
    before = set(tmp_path.rglob("*"))
    with pytest.raises(UnsafeArchiveError, match="symbolic link"):
        collect_studies(archive, work)
    assert _files_outside(tmp_path, before) == set()
    assert not any(p.is_symlink() for p in tmp_path.rglob("*"))


def test_ten_thousand_member_zip_bomb_is_refused_before_extracting(tmp_path):
    """10 000 empty members with a 1 000-member limit: refused from the central directory, nothing written."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for i in range(10_000):
            zf.writestr(f"d{i // 1000}/f{i}.dcm", b"")
    archive = tmp_path / "many.zip"
    archive.write_bytes(buf.getvalue())
    work = tmp_path / "work"
    with pytest.raises(UnsafeArchiveError, match="10000 members, more than the limit of 1000"):
        collect_studies(archive, work, limits=ZipLimits(max_members=1000))
    assert not work.exists() or not any(work.iterdir())


def test_file_and_folder_name_clash_is_a_clear_error(tmp_path):
    archive = _zip(tmp_path / "clash.zip", [("a", b"file"), ("a/b.dcm", b"x")])
    work = tmp_path / "work"
    with pytest.raises(UnsafeArchiveError, match="cannot be extracted"):
        safe_extract_zip(archive, work)
    assert not any(work.glob("zip-*"))
