"""``rsna19 doctor``: is this machine ready for a pipeline? Python, torch and its CUDA build, NVIDIA driver, GPUs,
disk, memory, DICOM decoders and pretrained weights, each an ok / warn / fail with what to do when not ok.

:func:`run_checks` is the preflight of ``rsna19 run``: it stops a run before its first stage when a check fails
(e.g. ``device: cuda`` with no GPU visible, missing pretrained weights, a disk too small for the cache). Nothing
here uses the network or allocates GPU memory.

Example:
    >>> report = run_checks(load_pipeline("rsna2019"), work_dir="work", data_dir="data")
    >>> report.ok, [c.name for c in report.failed]
    (False, ['gpu', 'weights'])
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from rsna19.core import gpu
from rsna19.core.errors import UserError
from rsna19.io.decoders import install_hint, register
from rsna19.io.hu import decoder_problem
from rsna19.tools.weights import locate, pipeline_needs

Status = Literal["ok", "warn", "fail"]

#: Lowest NVIDIA driver (Linux) for each CUDA major version of a torch build (NVIDIA's minor version
#: compatibility table: CUDA 11.x ≥ 450, 12.x ≥ 525, 13.x ≥ 580).
MIN_DRIVER: dict[int, int] = {11: 450, 12: 525, 13: 580}
#: The torch package index of the CUDA 12 build, for drivers older than a CUDA 13 build needs.
CU12_INDEX = "https://download.pytorch.org/whl/cu126"
#: Bytes per cached voxel (int16 HU volumes).
CACHE_VOXEL_BYTES = 2
#: Margin on the voxel bytes of the cache for meta.json, preview.png and file headers (< 1 % on real series).
CACHE_MARGIN = 1.05
#: Free space wanted beyond the cache (checkpoints, predictions, stack), as a fraction of the cache.
WORK_MARGIN = 0.2
#: Transfer syntaxes whose decoders are reported: (UID, short name).
COMMON_SYNTAXES: tuple[tuple[str, str], ...] = (
    ("1.2.840.10008.1.2.1", "uncompressed (explicit VR little endian)"),
    ("1.2.840.10008.1.2", "uncompressed (implicit VR little endian)"),
    ("1.2.840.10008.1.2.2", "uncompressed (explicit VR big endian)"),
    ("1.2.840.10008.1.2.1.99", "deflated explicit VR little endian"),
    ("1.2.840.10008.1.2.5", "RLE lossless"),
    ("1.2.840.10008.1.2.4.50", "JPEG baseline (8 bit)"),
    ("1.2.840.10008.1.2.4.51", "JPEG extended (12 bit)"),
    ("1.2.840.10008.1.2.4.57", "JPEG lossless"),
    ("1.2.840.10008.1.2.4.70", "JPEG lossless SV1"),
    ("1.2.840.10008.1.2.4.80", "JPEG-LS lossless"),
    ("1.2.840.10008.1.2.4.81", "JPEG-LS near-lossless"),
    ("1.2.840.10008.1.2.4.90", "JPEG 2000 lossless"),
    ("1.2.840.10008.1.2.4.91", "JPEG 2000"),
)
#: File suffixes under a data folder that are not DICOM slices (labels, masks, summaries).
_NOT_DICOM = {".csv", ".json", ".npz", ".npy", ".parquet", ".png", ".txt", ".md", ".yaml", ".zip", ".gz"}
_GIB = 1024**3


@dataclass
class Check:
    """One check of the report.

    Attributes:
        name: short key (``gpu``, ``disk`` …).
        status: ``ok``, ``warn`` (works, with a limit worth knowing) or ``fail`` (a run would fail).
        message: one line: what was found, and when not ok, what to do.
        details: further lines for people (one GPU, one transfer syntax, one backbone a line).
        data: the facts, machine-readable (``--json``).
    """

    name: str
    status: Status
    message: str
    details: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return asdict(self)


@dataclass
class Report:
    """The checks of one :func:`run_checks`."""

    checks: list[Check]

    @property
    def failed(self) -> list[Check]:
        """The checks that failed."""
        return [c for c in self.checks if c.status == "fail"]

    @property
    def ok(self) -> bool:
        """No check failed (warnings allowed)."""
        return not self.failed

    @property
    def exit_code(self) -> int:
        """1 when a check failed, else 0."""
        return 0 if self.ok else 1

    def get(self, name: str) -> Check:
        """The check called ``name``.

        Raises:
            KeyError: no such check.
        """
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data: ``ok``, ``exit_code`` and every check."""
        return {"ok": self.ok, "exit_code": self.exit_code, "checks": [c.to_dict() for c in self.checks]}

    def format(self) -> str:
        """A table for people: status, name and message, details indented."""
        width = max(len(c.name) for c in self.checks)
        lines = []
        for c in self.checks:
            lines.append(f"{c.status:<4}  {c.name:<{width}}  {c.message}")
            lines += [f"{'':<4}  {'':<{width}}    {d}" for d in c.details]
        n_warn = sum(c.status == "warn" for c in self.checks)
        n_fail = len(self.failed)
        lines.append(f"{n_fail} failed, {n_warn} warning(s), {len(self.checks) - n_fail - n_warn} ok")
        return "\n".join(lines)


def _gib(n: float) -> str:
    """A size in GiB, or in MiB under 1 GiB."""
    return f"{n / _GIB:.1f} GiB" if n >= _GIB else f"{n / 1024**2:.1f} MiB"


def _needs_gpu(pipeline_cfg: Any | None) -> bool:
    return pipeline_cfg is not None and str(pipeline_cfg.device).startswith("cuda")


def check_python() -> Check:
    """The interpreter (the package itself requires Python ≥ 3.10)."""
    version = platform.python_version()
    data = {"version": version, "executable": sys.executable}
    return Check("python", "ok", f"Python {version} ({sys.executable})", data=data)


def check_torch() -> Check:
    """torch, torchvision and the CUDA version torch was built for."""
    import torch

    try:
        tv: str | None = importlib.metadata.version("torchvision")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - a dependency
        tv = None
    cuda = torch.version.cuda
    cudnn = torch.backends.cudnn.version() if cuda else None
    data = {"version": torch.__version__, "torchvision": tv, "cuda_build": cuda, "cudnn": cudnn}
    build = f"CUDA {cuda} build" if cuda else "CPU-only build"
    return Check("torch", "ok", f"torch {torch.__version__} ({build}), torchvision {tv}", data=data)


def _driver_major(version: str | None) -> int | None:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return None


def _driver_advice(cuda_build: str | None, driver: str | None) -> str | None:
    """Why the driver cannot run torch's CUDA build and what to do, or None when it can (or is unknown)."""
    build_major = _driver_major(cuda_build)
    major = _driver_major(driver)
    if build_major is None or major is None or build_major not in MIN_DRIVER:
        return None
    need = MIN_DRIVER[build_major]
    if major >= need:
        return None
    advice = (
        f"NVIDIA driver {driver} is too old for torch's CUDA {cuda_build} build (needs ≥ {need}): update the driver"
    )
    if build_major > 12 and major >= MIN_DRIVER[12]:
        advice += (
            f", or install the CUDA 12 torch build (`rm -rf .venv && make venv TORCH_INDEX={CU12_INDEX}`, driver ≥ 525)"
        )
    return advice + "; see README 'Install for any GPU'"


def check_driver(pipeline_cfg: Any | None = None) -> Check:
    """The NVIDIA driver (``nvidia-smi``) against the driver torch's CUDA build needs."""
    import torch

    driver = gpu.nvidia_driver_version()
    api = gpu.cuda_driver_api_version()
    cuda = torch.version.cuda
    data = {"driver": driver, "driver_cuda": api, "torch_cuda_build": cuda}
    if cuda and _driver_major(cuda) in MIN_DRIVER:
        data["min_driver"] = MIN_DRIVER[_driver_major(cuda)]  # type: ignore[index]
    if driver is None:
        if api:
            return Check("driver", "ok", f"nvidia-smi not found; the driver supports CUDA {api}", data=data)
        return Check("driver", "ok", "no NVIDIA driver found (nvidia-smi missing): CPU only", data=data)
    advice = _driver_advice(cuda, driver)
    if advice:
        return Check("driver", "fail" if _needs_gpu(pipeline_cfg) else "warn", advice, data=data)
    tail = f", supports CUDA {api}" if api else ""
    return Check("driver", "ok", f"NVIDIA driver {driver}{tail}", data=data)


def _no_gpu_reason() -> str:
    """Why torch sees no GPU, with what to do."""
    import torch

    if not torch.version.cuda:
        return (
            f"this torch ({torch.__version__}) is a CPU-only build: install a CUDA build (`rm -rf .venv && make venv "
            f"TORCH_INDEX={CU12_INDEX}` for the CUDA 12 build), see README 'Install for any GPU'"
        )
    driver = gpu.nvidia_driver_version()
    if driver is None:
        return (
            "no NVIDIA driver found (nvidia-smi missing): install the driver (≥ "
            f"{MIN_DRIVER.get(_driver_major(torch.version.cuda) or 0, 525)} for torch's CUDA {torch.version.cuda} "
            f"build), or the CUDA 12 torch build for an older one: `make venv TORCH_INDEX={CU12_INDEX}`, "
            "see README 'Install for any GPU'"
        )
    advice = _driver_advice(torch.version.cuda, driver)
    if advice:
        return advice
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    hint = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
    return (
        f"driver {driver} is installed but torch sees no GPU{hint}: check `nvidia-smi` and CUDA_VISIBLE_DEVICES, "
        "see README 'Install for any GPU'"
    )


def check_gpu(pipeline_cfg: Any | None = None) -> Check:
    """The visible GPUs (name, memory, compute capability, native bf16) against the pipeline's device."""
    facts = gpu.gpu_facts()
    device = str(pipeline_cfg.device) if pipeline_cfg is not None else None
    data: dict[str, Any] = {"device": device, "gpus": [f.to_dict() for f in facts]}
    details = []
    for f in facts:
        bf16 = "bf16 native" if f.bf16_native else "bf16 emulated: train.amp bf16/auto run as fp16"
        cc = ".".join(map(str, f.capability))
        details.append(f"cuda:{f.index} {f.name}, {_gib(f.memory_bytes)}, compute capability {cc}, {bf16}")
    if not facts:
        if _needs_gpu(pipeline_cfg):
            return Check(
                "gpu", "fail", f"no GPU visible but the pipeline's device is {device}: {_no_gpu_reason()}", data=data
            )
        tail = f" (pipeline device {device})" if device else ""
        return Check("gpu", "ok", f"no GPU visible: training and prediction run on the CPU{tail}", data=data)
    names = sorted({f.name for f in facts})
    message = f"{len(facts)} GPU(s): {', '.join(names)}"
    if device == "cpu":
        return Check("gpu", "ok", message + "; unused: the pipeline's device is cpu", details, data)
    per_job = int(getattr(pipeline_cfg, "gpus_per_job", 1) or 1) if pipeline_cfg is not None else 1
    if per_job > len(facts):
        return Check(
            "gpu",
            "fail",
            f"gpus_per_job is {per_job} but {len(facts)} GPU(s) are visible: set gpus_per_job ≤ {len(facts)}",
            details,
            data,
        )
    return Check("gpu", "ok", message, details, data)


def _existing_parent(path: Path) -> Path:
    path = path.expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


@dataclass
class CacheEstimate:
    """Bytes the convert stage's cache will take, and the rule that gave them.

    Attributes:
        bytes: estimated size of ``CACHE/``.
        slices: slices counted (DICOM files, or index rows).
        rule: the rule, in words.
    """

    bytes: int
    slices: int
    rule: str


def _dicom_files(data_dir: Path) -> tuple[int, int]:
    """Number and total bytes of the files under ``data_dir`` that can be DICOM slices (not csv, npz …)."""
    n, size = 0, 0
    stack = [data_dir]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for e in it:
                    if e.is_dir(follow_symlinks=False):
                        if e.name != "masks":
                            stack.append(Path(e.path))
                    elif e.is_file() and os.path.splitext(e.name)[1].lower() not in _NOT_DICOM:
                        n += 1
                        size += e.stat().st_size
        except OSError:
            continue
    return n, size


def estimate_cache(
    data_dir: str | os.PathLike[str] | None = None,
    index: str | os.PathLike[str] | None = None,
    crop: int | None = 400,
    spacing: float | None = None,
) -> CacheEstimate | None:
    """Estimate the size of the int16 cache ``rsna19 convert`` writes.

    Rules (the convert stage writes one int16 voxel per output pixel; a crop pads small frames, so its side is
    the output size whatever the scanner's): with ``crop``: slices × crop² × 2 B; without, from an index:
    Σ rows × cols × 2 B (scaled by (pixel spacing / ``spacing``)² when resampling); without an index:
    DICOM bytes × 1 (an uncompressed 16-bit slice is its pixels plus a ~1 KB header; compressed files need more).
    Each gets 5 % for meta.json, previews and headers. Slices are index rows, else the files under ``data_dir``
    that are not csv/json/npz/… (``masks/`` skipped). On the RSNA data (512² uncompressed) crop 400 makes the
    cache about 0.6 × the DICOM bytes; on the ``tiny`` synthetic preset (64² frames padded to 400²) about 36 ×.

    Args:
        data_dir: RSNA-layout data folder.
        index: ``index.parquet`` (preferred when given and present).
        crop: the convert stage's crop (None or 0: whole frames).
        spacing: the convert stage's resampling (mm), or None.

    Returns:
        The estimate, or None when neither an index nor a data folder is given.
    """
    import pandas as pd

    crop = int(crop) if crop else None
    if index is not None and Path(index).is_file():
        cols = ["rows", "cols", "pixel_spacing_row", "pixel_spacing_col"]
        df = pd.read_parquet(index, columns=cols)
        n = len(df)
        if crop:
            voxels = n * crop * crop
            rule = f"{n} index slices × {crop}² px × {CACHE_VOXEL_BYTES} B + 5 %"
        else:
            scale = 1.0
            if spacing:
                scale = (df["pixel_spacing_row"].fillna(spacing) / spacing) * (
                    df["pixel_spacing_col"].fillna(spacing) / spacing
                )
            voxels = int((df["rows"] * df["cols"] * scale).sum())
            rule = f"Σ rows × cols of {n} index slices × {CACHE_VOXEL_BYTES} B + 5 %"
        return CacheEstimate(int(voxels * CACHE_VOXEL_BYTES * CACHE_MARGIN), n, rule)
    if data_dir is None or not Path(data_dir).is_dir():
        return None
    n, size = _dicom_files(Path(data_dir))
    if crop:
        rule = f"{n} DICOM files × {crop}² px × {CACHE_VOXEL_BYTES} B + 5 %"
        return CacheEstimate(int(n * crop * crop * CACHE_VOXEL_BYTES * CACHE_MARGIN), n, rule)
    rule = f"{_gib(size)} of {n} DICOM files × 1 (uncompressed) + 5 %"
    return CacheEstimate(int(size * CACHE_MARGIN), n, rule)


def _dir_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                continue
    return total


def check_disk(
    pipeline_cfg: Any | None = None,
    work_dir: str | os.PathLike[str] | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    index: str | os.PathLike[str] | None = None,
) -> Check:
    """Free space at the work folder against the estimated cache size (:func:`estimate_cache`).

    The cache is ``WORK/cache``; a finished one (``cache_index.parquet``) needs nothing more, a partial one the
    rest. ``fail`` when the cache does not fit, ``warn`` when less than 20 % of it is left over for the runs.
    """
    work = Path(work_dir) if work_dir is not None else Path.cwd()
    where = _existing_parent(work)
    free = shutil.disk_usage(where).free
    convert = getattr(pipeline_cfg, "convert", None)
    crop = convert.crop if convert is not None else 400
    spacing = convert.spacing if convert is not None else None
    if index is None and work_dir is not None and (work / "index.parquet").is_file():
        index = work / "index.parquet"
    data: dict[str, Any] = {"path": str(where), "free_bytes": free, "needed_bytes": None, "rule": None}
    cache = work / "cache" if work_dir is not None else None
    if cache is not None and (cache / "cache_index.parquet").is_file():
        data["needed_bytes"] = 0
        return Check("disk", "ok", f"{_gib(free)} free at {where}; the cache {cache} is already built", data=data)
    est = estimate_cache(data_dir, index, crop, spacing)
    if est is None:
        msg = f"{_gib(free)} free at {where}"
        if free < _GIB:
            return Check("disk", "warn", msg + ": less than 1 GiB", data=data)
        return Check("disk", "ok", msg + " (pass --data or --index to estimate the cache)", data=data)
    done = _dir_bytes(cache) if cache is not None and cache.is_dir() else 0
    need = max(est.bytes - done, 0)
    data.update(needed_bytes=need, estimated_cache_bytes=est.bytes, slices=est.slices, rule=est.rule)
    details = [f"cache estimate {_gib(est.bytes)}: {est.rule}"]
    if done:
        details.append(f"{_gib(done)} of it already in {cache}")
    msg = f"{_gib(free)} free at {where}, the cache needs {_gib(need)}"
    if free < need:
        return Check(
            "disk", "fail", msg + f": free {_gib(need - free)} or pick a --out on a larger disk", details, data
        )
    if free < need * (1 + WORK_MARGIN):
        return Check("disk", "warn", msg + ": little room left for checkpoints and predictions", details, data)
    return Check("disk", "ok", msg, details, data)


def _meminfo() -> tuple[int | None, int | None]:
    """Total and available RAM in bytes (Linux ``/proc/meminfo``, else ``sysconf``; None where unknown)."""
    total = avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("MemTotal", "MemAvailable"):
                    value = int(rest.split()[0]) * 1024
                    total, avail = (value, avail) if key == "MemTotal" else (total, value)
    except (OSError, ValueError):
        pass
    if total is None:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            total = None
    return total, avail


def check_ram() -> Check:
    """Total and available memory (``warn`` under 4 GiB available)."""
    total, avail = _meminfo()
    data = {"total_bytes": total, "available_bytes": avail}
    if total is None:
        return Check("ram", "warn", "cannot read the memory size", data=data)
    msg = f"{_gib(total)} total" + (f", {_gib(avail)} available" if avail is not None else "")
    if avail is not None and avail < 4 * _GIB:
        return Check("ram", "warn", msg + ": lower data.num_workers or the pipeline's jobs", data=data)
    return Check("ram", "ok", msg, data=data)


def check_dicom(index: str | os.PathLike[str] | None = None) -> Check:
    """pydicom's pixel decoders per common transfer syntax; ``fail`` when the index holds a syntax without one."""
    import pydicom
    from pydicom.pixels.decoders.base import get_decoder
    from pydicom.uid import UID

    register()  # the project's JPEG plugin, as every decoding process has it
    rows = []
    missing: list[str] = []
    hints: list[str] = []
    for uid, name in COMMON_SYNTAXES:
        try:
            dec = get_decoder(UID(uid))
            available, plugins, lacks = dec.is_available, list(dec.available_plugins), list(dec.missing_dependencies)
        except NotImplementedError:
            available, plugins, lacks = False, [], ["no decoder in pydicom"]
        rows.append({"uid": uid, "name": name, "available": available, "plugins": plugins, "missing": lacks})
        if not available:
            missing.append(f"{name} (.{uid.rsplit('.', 1)[1]})")
            hint = install_hint(uid)
            if hint and f"pip install {hint}" not in hints:
                hints.append(f"pip install {hint}")
    details = []
    for r in rows:
        how = "native" if not UID(r["uid"]).is_compressed else ", ".join(r["plugins"])
        details.append(f"{r['uid']:<24} {r['name']:<42} {'yes: ' + how if r['available'] else 'NO'}")
    data: dict[str, Any] = {"pydicom": pydicom.__version__, "syntaxes": rows}
    if index is not None and Path(index).is_file():
        import pandas as pd

        counts = pd.read_parquet(index, columns=["transfer_syntax"])["transfer_syntax"].value_counts()
        data["index_syntaxes"] = {str(k): int(v) for k, v in counts.items()}
        bad = [(str(ts), int(n), decoder_problem(ts)) for ts, n in counts.items() if ts and UID(str(ts)).is_compressed]
        bad = [b for b in bad if b[2]]
        if bad:
            what = "; ".join(f"{n} slices: {p}" for _ts, n, p in bad)
            return Check(
                "dicom",
                "fail",
                f"the index holds slices no installed decoder reads ({what}): install the package named "
                "(docs/dicom.md lists which package decodes which syntax)",
                details,
                data,
            )
    if missing:
        return Check(
            "dicom",
            "warn",
            f"no decoder for {', '.join(missing)}: such files are skipped as errors; {'; '.join(hints)} "
            "(docs/dicom.md)",
            details,
            data,
        )
    return Check("dicom", "ok", f"pydicom {pydicom.__version__}: every common transfer syntax decodes", details, data)


def check_weights(pipeline_cfg: Any | None = None) -> Check:
    """Whether every pretrained weight file the pipeline's models need is present locally (not read)."""
    if pipeline_cfg is None:
        return Check("weights", "ok", "not checked: no pipeline given (--pipeline)")
    statuses = [locate(n) for n in pipeline_needs(pipeline_cfg)]
    data = {"weights": [s.to_dict() for s in statuses]}
    if not statuses:
        return Check("weights", "ok", "no pretrained weights needed (every model trains from scratch)", data=data)
    details = []
    for s in statuses:
        where = str(s.path) if s.path else s.problem
        details.append(f"{s.need.label} ({', '.join(s.need.models)}): {where}")
    missing = [s for s in statuses if s.path is None and s.need.backbone and not s.need.problem]
    other = [s for s in statuses if s.path is None and s not in missing]
    problems = []
    if missing:
        names = " ".join(s.need.backbone for s in missing if s.need.backbone)
        problems.append(
            f"missing weights for {', '.join(s.need.label for s in missing)}: run `rsna19 weights fetch {names}` on a "
            "machine with network (README 'Pretrained weights'), or set model.pretrained: false"
        )
    problems += [f"{s.need.label} ({', '.join(s.need.models)}): {s.problem}" for s in other]
    if problems:
        return Check("weights", "fail", "; ".join(problems), details, data)
    return Check("weights", "ok", f"{len(statuses)} weight file(s) present", details, data)


def run_checks(
    pipeline_cfg: Any | None = None,
    work_dir: str | os.PathLike[str] | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    index: str | os.PathLike[str] | None = None,
) -> Report:
    """Every check, for a pipeline when one is given. The preflight of ``rsna19 run``.

    Args:
        pipeline_cfg: a :class:`~rsna19.pipeline.config.PipelineConfig` (its device, convert settings and model
            configs), or None for the machine alone.
        work_dir: the work folder (disk space; ``WORK/index.parquet`` and ``WORK/cache`` when present).
        data_dir: the RSNA-layout data folder (cache size estimate when there is no index yet).
        index: an ``index.parquet`` for the estimate and the transfer syntaxes in use.

    Returns:
        The report: ``report.ok`` is False when a check failed (``report.failed`` says which, each message says
        what to do).
    """
    if index is None and work_dir is not None and (Path(work_dir) / "index.parquet").is_file():
        index = Path(work_dir) / "index.parquet"
    steps: list[tuple[str, Callable[[], Check]]] = [
        ("python", check_python),
        ("torch", check_torch),
        ("driver", lambda: check_driver(pipeline_cfg)),
        ("gpu", lambda: check_gpu(pipeline_cfg)),
        ("disk", lambda: check_disk(pipeline_cfg, work_dir, data_dir, index)),
        ("ram", check_ram),
        ("dicom", lambda: check_dicom(index)),
        ("weights", lambda: check_weights(pipeline_cfg)),
    ]
    checks = []
    for name, step in steps:
        try:
            checks.append(step())
        except UserError as exc:
            checks.append(Check(name, "fail", str(exc)))
        except Exception as exc:  # noqa: BLE001 - a broken check must not hide the others
            checks.append(Check(name, "warn", f"could not check: {type(exc).__name__}: {exc}"))
    return Report(checks)
