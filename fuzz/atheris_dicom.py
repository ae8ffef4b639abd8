"""Coverage-guided fuzzing of the DICOM readers with atheris (libFuzzer for Python).

Every input is written as a file and read by the three readers that see untrusted files:
:func:`rsna19.io.dicom_header.read_header` (index, predict-study), :func:`rsna19.inference.inputs.read_identity`
(predict-study grouping) and :func:`rsna19.conversion.read.read_slice` (convert). The first two must never raise;
``read_slice`` may raise only the errors the converter reports as reasons (it catches ``Exception`` per file), so
anything else — a crash, a hang (``-timeout``), a huge allocation (``-rss_limit_mb``) — is a finding.

atheris is not a dependency of rsna19 (it needs clang/libFuzzer to build on some platforms). Install it into the
environment first::

    .venv/bin/pip install atheris

Run (the corpus folder gets the interesting inputs; it is seeded with valid slices written here)::

    .venv/bin/python fuzz/atheris_dicom.py fuzz/corpus -max_total_time=600 -timeout=5 -rss_limit_mb=2048

Without atheris the script says how to install it and exits with status 0, so ``make fuzz`` still runs the
hypothesis part.
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
from pathlib import Path

try:
    import atheris
except ImportError:  # optional tool, not a dependency
    atheris = None

_WORK = Path(tempfile.mkdtemp(prefix="rsna19-atheris-"))
_FILE = _WORK / "input.dcm"


def _seed_corpus(folder: Path) -> None:
    """Write a few valid slices (signed, unsigned, 12-bit wrap, tilted) as the starting corpus."""
    import numpy as np

    from rsna19.io.dicom_write import SliceGeometry, StorageVariant, write_ct_dicom

    folder.mkdir(parents=True, exist_ok=True)
    if any(folder.iterdir()):
        return
    variants = [StorageVariant(), StorageVariant(signed=False), StorageVariant(wrap12=True)]
    iops = [(1, 0, 0, 0, 1, 0), (1, 0, 0, 0, 0.9397, -0.3420)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k, variant in enumerate(variants):
            hu = np.full((16, 16), -1024.0)
            hu[4:12, 4:12] = 40
            write_ct_dicom(
                folder / f"seed_{k}.dcm",
                hu,
                SliceGeometry(ipp=(0.0, 0.0, 5.0 * k), iop=iops[k % 2], pixel_spacing=(0.5, 0.5)),
                sop_uid=f"ID_{k:08x}",
                series_uid="ID_series",
                study_uid="ID_study",
                patient_id="ID_patient",
                instance_number=k,
                variant=variant,
                window_center=[40.0, 40.0] if k == 1 else 40.0,
            )


def test_one_input(data: bytes) -> None:
    """The fuzz target: one input, three readers."""
    from rsna19.conversion.read import read_slice
    from rsna19.inference.inputs import read_identity
    from rsna19.io.dicom_header import read_header

    _FILE.write_bytes(data)
    header = read_header(_FILE)
    assert isinstance(header, dict) or (isinstance(header, str) and header), header
    ident = read_identity(_FILE)
    assert isinstance(ident, dict) or (isinstance(ident, str) and ident), ident
    try:
        read_slice(_FILE)
    except (ValueError, OSError, EOFError):
        pass  # reported as a reason by the converter
    except Exception as exc:  # noqa: BLE001 - caught per file by the converter too, but worth a look
        if os.environ.get("RSNA19_FUZZ_STRICT"):
            raise
        del exc


def main(argv: list[str]) -> int:
    if atheris is None:
        print(
            "atheris is not installed; it is an optional tool, not a dependency of rsna19.\n"
            "Install it with `.venv/bin/pip install atheris` (needs a C compiler; see "
            "https://github.com/google/atheris), then run:\n"
            "  .venv/bin/python fuzz/atheris_dicom.py fuzz/corpus -max_total_time=600 -timeout=5 -rss_limit_mb=2048\n"
            "Skipping the atheris target.",
            file=sys.stderr,
        )
        return 0
    corpus = next((Path(a) for a in argv[1:] if not a.startswith("-")), None)
    if corpus is not None:
        _seed_corpus(corpus)
    with atheris.instrument_imports():
        import rsna19.conversion.read  # noqa: F401
        import rsna19.inference.inputs  # noqa: F401
        import rsna19.io.dicom_header  # noqa: F401
    warnings.simplefilter("ignore")
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
