"""``rsna19 doctor`` and :func:`rsna19.tools.doctor.run_checks` (the preflight of ``rsna19 run``).

GPUs and the NVIDIA driver are faked (``rsna19.core.gpu`` functions monkeypatched: a V100 of compute capability
7.0, an A100 of 8.0, none); weights, disk and data are real files under ``tmp_path``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import timm
import torch
from safetensors.torch import save_file

from rsna19.cli import main
from rsna19.core import gpu
from rsna19.core.gpu import GpuFacts
from rsna19.pipeline.config import load_pipeline
from rsna19.tools import doctor
from rsna19.tools.doctor import estimate_cache, run_checks

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
V100 = GpuFacts(0, "Tesla V100-SXM2-32GB", 32 * 1024**3, (7, 0))
A100 = GpuFacts(0, "NVIDIA A100-SXM4-80GB", 80 * 1024**3, (8, 0))
SCRATCH = "model: {name: clf2d, backbone: test_resnet}\n"
PRETRAINED = "model: {name: clf2d, backbone: test_resnet, pretrained: true}\n"


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Callable[..., None]:
    """Fake the GPUs, the driver and torch's CUDA build; empty, private weight caches."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("RSNA19_WEIGHTS_DIR", raising=False)

    def fake(gpus: list[GpuFacts], driver: str | None = "580.65.06", cuda: str | None = "13.0") -> None:
        monkeypatch.setattr(gpu, "gpu_facts", lambda: list(gpus))
        monkeypatch.setattr(gpu, "nvidia_driver_version", lambda timeout=10.0: driver)
        monkeypatch.setattr(gpu, "cuda_driver_api_version", lambda: None)
        monkeypatch.setattr(torch.version, "cuda", cuda)

    fake([])
    return fake


def _pipeline(tmp_path: Path, device: str = "cpu", models: dict[str, str] | None = None, **extra: object) -> Path:
    """A pipeline YAML of small model configs (JSON is YAML)."""
    paths = []
    for name, body in (models or {"m": SCRATCH}).items():
        (tmp_path / f"{name}.yaml").write_text(body)
        paths.append(str(tmp_path / f"{name}.yaml"))
    body = {"models": paths, "stack": str(CONFIGS / "stack" / "tiny.yaml"), "n_folds": 2, "device": device, **extra}
    path = tmp_path / f"pipe_{device}.yaml"
    path.write_text(json.dumps(body))
    return path


@pytest.mark.parametrize(("card", "native"), [(V100, False), (A100, True)])
def test_gpu_facts_and_bf16(machine, tmp_path: Path, card: GpuFacts, native: bool) -> None:
    machine([card])
    check = doctor.check_gpu(load_pipeline(_pipeline(tmp_path, "cuda")))
    assert check.status == "ok" and card.name in check.message
    (info,) = check.data["gpus"]
    assert info["capability"] == list(card.capability) and info["bf16_native"] is native
    assert info["memory_bytes"] == card.memory_bytes
    assert ("bf16 native" if native else "run as fp16") in check.details[0]
    assert f"compute capability {card.capability[0]}.{card.capability[1]}" in check.details[0]


def test_cuda_pipeline_without_gpu_fails_cpu_and_auto_do_not(machine, tmp_path: Path, capsys) -> None:
    work = str(tmp_path / "work")
    assert main(["doctor", "--pipeline", str(_pipeline(tmp_path, "cuda")), "--work", work]) == 1
    out = capsys.readouterr().out
    assert "fail  gpu" in out and "no GPU visible but the pipeline's device is cuda" in out
    assert "README 'Install for any GPU'" in out and "nvidia-smi missing" not in out
    for device in ("cpu", "auto"):
        assert main(["doctor", "--pipeline", str(_pipeline(tmp_path, device)), "--work", work]) == 0
        assert "ok    gpu      no GPU visible: training and prediction run on the CPU" in capsys.readouterr().out
    # The reason names the cause: no driver, or a CPU-only torch.
    machine([], driver=None)
    msg = doctor.check_gpu(load_pipeline(_pipeline(tmp_path, "cuda"))).message
    assert "no NVIDIA driver found" in msg and "≥ 580" in msg
    machine([], cuda=None)
    msg = doctor.check_gpu(load_pipeline(_pipeline(tmp_path, "cuda"))).message
    assert "CPU-only build" in msg and "TORCH_INDEX=https://download.pytorch.org/whl/cu126" in msg


def test_driver_too_old_for_the_torch_build(machine, tmp_path: Path) -> None:
    machine([], driver="535.104.05", cuda="13.0")
    check = doctor.check_driver()
    assert check.status == "warn" and check.data["min_driver"] == 580
    assert "too old for torch's CUDA 13.0 build (needs ≥ 580)" in check.message
    assert "make venv TORCH_INDEX=https://download.pytorch.org/whl/cu126" in check.message
    cuda = load_pipeline(_pipeline(tmp_path, "cuda"))
    assert doctor.check_driver(cuda).status == "fail"
    assert "TORCH_INDEX" in doctor.check_gpu(cuda).message
    machine([], driver="470.82.01", cuda="12.6")
    check = doctor.check_driver(cuda)
    assert check.status == "fail" and "needs ≥ 525" in check.message and "TORCH_INDEX" not in check.message
    machine([A100], driver="580.65.06", cuda="13.0")
    assert doctor.check_driver(cuda).status == "ok"


def test_more_gpus_per_job_than_visible(machine, tmp_path: Path) -> None:
    machine([A100])
    check = doctor.check_gpu(load_pipeline(_pipeline(tmp_path, "cuda", gpus_per_job=2)))
    assert check.status == "fail" and "gpus_per_job is 2 but 1 GPU(s)" in check.message


def _put_weights(hf: Path, commit: str = "a" * 40) -> Path:
    """test_resnet's weights in a Hugging Face cache layout, as a download leaves them."""
    repo = hf / "models--timm--test_resnet.r160_in1k"
    file = repo / "snapshots" / commit / "model.safetensors"
    file.parent.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    state = timm.create_model("test_resnet", pretrained=False).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(file))
    return file


def test_weights_missing_then_present(machine, tmp_path: Path, capsys) -> None:
    pipe = _pipeline(tmp_path, "cpu", {"a": PRETRAINED, "b": SCRATCH, "c": PRETRAINED})
    assert main(["doctor", "--pipeline", str(pipe), "--work", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "fail  weights  missing weights for test_resnet: run `rsna19 weights fetch test_resnet`" in out
    assert "test_resnet (a, c): not found locally" in out
    file = _put_weights(tmp_path / "hf")
    assert main(["doctor", "--pipeline", str(pipe), "--work", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "ok    weights  1 weight file(s) present" in out and str(file) in out
    # A sequence model cannot be pretrained; an explicit weights file must exist.
    missing = tmp_path / "nope.safetensors"
    seq = "model: {name: seq, pretrained: true}\ndata: {layout: sequence, embeddings: a}\n"
    explicit = f"model: {{name: clf2d, backbone: test_resnet, weights: {missing}}}\n"
    bad = _pipeline(tmp_path, "cpu", {"s": seq, "w": explicit})
    check = doctor.check_weights(load_pipeline(bad))
    assert check.status == "fail"
    assert "family 'seq' has no pretrained weights" in check.message and "nope.safetensors" in check.message


def _fake_data(root: Path, n: int, size: int) -> Path:
    (root / "stage_2_train").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        (root / "stage_2_train" / f"ID_{i}.dcm").write_bytes(b"\0" * size)
    (root / "stage_2_train.csv").write_text("ID,Label\n")
    (root / "masks" / "x.npz").write_bytes(b"\0" * 10_000)
    return root


def test_cache_estimate_rules(tmp_path: Path) -> None:
    data = _fake_data(tmp_path / "data", 3, 1000)
    est = estimate_cache(data, crop=100)
    assert est is not None and est.slices == 3 and est.bytes == int(3 * 100 * 100 * 2 * 1.05)
    assert estimate_cache(data, crop=None).bytes == int(3000 * 1.05)  # DICOM bytes, csv and masks left out
    index = tmp_path / "index.parquet"
    pd.DataFrame(
        {"rows": [512, 512], "cols": [512, 256], "pixel_spacing_row": [0.5, 0.5], "pixel_spacing_col": [0.5, 1.0]}
    ).to_parquet(index)
    assert estimate_cache(data, index, crop=400).bytes == int(2 * 400 * 400 * 2 * 1.05)  # the index wins
    resampled = estimate_cache(None, index, crop=None, spacing=1.0)
    assert resampled.bytes == int((256 * 256 + 256 * 256) * 2 * 1.05)
    assert estimate_cache(None, None) is None


def test_cache_estimate_matches_a_real_cache(tiny_dataset: Path, tmp_path: Path) -> None:
    # The rule against what `rsna19 index` + `rsna19 convert` write for the tiny synthetic preset.
    from rsna19.conversion.run import run_convert
    from rsna19.io.index import build_index

    index = tmp_path / "index.parquet"
    build_index([tiny_dataset / "stage_2_train", tiny_dataset / "stage_2_test"], out=index, progress=False)
    for crop in (400, None):
        cache = tmp_path / f"cache_{crop}"
        run_convert(index, cache, crop=crop, progress=False)
        volumes = sum(p.stat().st_size for p in cache.glob("*/volume.npy"))
        actual = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
        for est in (estimate_cache(None, index, crop=crop), estimate_cache(tiny_dataset, crop=crop)):
            if crop:  # 64² frames padded to 400²: within 10 % (measured +5 % from the index, +7 % from the files)
                assert est.bytes == pytest.approx(actual, rel=0.1)
            else:  # whole 64² frames: the volumes are counted, the previews and meta.json (a third here) are not
                assert volumes <= est.bytes <= actual


def test_disk_check_on_a_real_folder(machine, tmp_path: Path) -> None:
    data = _fake_data(tmp_path / "data", 3, 1000)
    work = tmp_path / "work" / "not" / "yet"
    check = doctor.check_disk(load_pipeline(_pipeline(tmp_path, "cpu")), work, data)
    assert check.status == "ok" and Path(check.data["path"]) == tmp_path
    assert check.data["free_bytes"] == pytest.approx(shutil.disk_usage(tmp_path).free, rel=0.05)
    assert check.data["needed_bytes"] == int(3 * 400 * 400 * 2 * 1.05)  # default crop 400
    assert "3 DICOM files × 400² px × 2 B" in check.details[0]
    # A crop whose cache cannot fit on this disk.
    huge = load_pipeline(_pipeline(tmp_path, "cpu"), ["convert.crop=2000000"])
    check = doctor.check_disk(huge, work, data)
    assert check.status == "fail" and "pick a --out on a larger disk" in check.message
    # A finished cache needs nothing more.
    (tmp_path / "work" / "cache").mkdir(parents=True)
    (tmp_path / "work" / "cache" / "cache_index.parquet").write_bytes(b"")
    check = doctor.check_disk(huge, tmp_path / "work", data)
    assert check.status == "ok" and "already built" in check.message


def test_json_report_and_exit_codes(machine, tmp_path: Path, capsys) -> None:
    assert main(["doctor", "--json", "--work", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    names = [c["name"] for c in report["checks"]]
    assert names == ["python", "torch", "driver", "gpu", "disk", "ram", "dicom", "weights"]
    assert report["ok"] is True and report["exit_code"] == 0
    assert all(c["status"] in ("ok", "warn", "fail") for c in report["checks"])
    by = {c["name"]: c for c in report["checks"]}
    assert by["torch"]["data"]["version"] == torch.__version__
    assert by["gpu"]["data"]["gpus"] == []
    syntaxes = {s["uid"]: s for s in by["dicom"]["data"]["syntaxes"]}
    assert syntaxes["1.2.840.10008.1.2.1"]["available"] is True
    assert {"1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70"} <= set(
        syntaxes
    )
    assert {
        "1.2.840.10008.1.2.4.80",
        "1.2.840.10008.1.2.4.81",
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.4.91",
    } <= set(syntaxes)
    assert by["ram"]["data"]["total_bytes"] > 0
    machine([])
    assert main(["doctor", "--json", "--pipeline", str(_pipeline(tmp_path, "cuda")), "--work", str(tmp_path)]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["exit_code"] == 1
    assert [c["name"] for c in report["checks"] if c["status"] == "fail"] == ["gpu"]
    assert main(["doctor", "--pipeline", str(tmp_path / "missing.yaml")]) == 1  # a UserError: exit 1, no traceback
    assert "pipeline config not found" in capsys.readouterr().err


def test_run_checks_is_the_preflight(machine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The call `rsna19 run` makes: (pipeline, work, data) → Report whose failed checks have a name and a message.
    data = _fake_data(tmp_path / "data", 2, 100)
    report = run_checks(load_pipeline(_pipeline(tmp_path, "cuda")), tmp_path / "work", data)
    assert not report.ok and [c.name for c in report.failed] == ["gpu"]
    assert report.failed[0].message.startswith("no GPU visible but the pipeline's device is cuda")
    machine([A100])
    assert run_checks(load_pipeline(_pipeline(tmp_path, "cuda")), tmp_path / "work", data).ok
    # A check that breaks is a warning, not a crash and not a failure.
    monkeypatch.setattr(doctor, "check_ram", lambda: 1 / 0)
    report = run_checks(None, tmp_path, None)
    assert report.ok and report.get("ram").status == "warn" and "ZeroDivisionError" in report.get("ram").message


def test_dicom_syntax_without_decoder_in_the_index(machine, tmp_path: Path, monkeypatch) -> None:
    index = tmp_path / "index.parquet"
    pd.DataFrame(
        {
            "transfer_syntax": ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.80"],
            "rows": [64] * 3,
            "cols": [64] * 3,
            "pixel_spacing_row": [1.0] * 3,
            "pixel_spacing_col": [1.0] * 3,
        }
    ).to_parquet(index)
    monkeypatch.setattr(
        doctor, "decoder_problem", lambda ts: "no decoder installed for JPEG-LS" if "4.80" in ts else None
    )
    check = doctor.check_dicom(index)
    assert check.status == "fail" and "2 slices: no decoder installed for JPEG-LS" in check.message
    assert check.data["index_syntaxes"] == {"1.2.840.10008.1.2.4.80": 2, "1.2.840.10008.1.2.1": 1}
    monkeypatch.setattr(doctor, "decoder_problem", lambda ts: None)
    assert doctor.check_dicom(index).status in ("ok", "warn")  # warn: a common syntax without a plugin here


@pytest.mark.parametrize("name", ["tiny", "demo"])
def test_the_shipped_cpu_pipelines_pass_the_preflight(machine, tiny_dataset: Path, tmp_path: Path, name: str) -> None:
    # `rsna19 run` (and the tests that run it) must not be stopped on a CPU machine with the default caches.
    report = run_checks(load_pipeline(name), tmp_path / "work", tiny_dataset)
    assert report.ok, report.format()
    assert report.get("disk").data["needed_bytes"] > 0
