"""A throw-away certificate authority for the DICOM TLS and HTTPS tests, made with the ``openssl`` command line.

:func:`make_pki` writes, under one folder, a CA and one key + certificate per name, each valid for ``localhost`` and
``127.0.0.1`` and signed by the CA (ECDSA P-256, SHA-256, one day). A second, unrelated CA (``rogue``) signs a
certificate the tests use as an untrusted caller.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pair:
    """A certificate and its private key (PEM files)."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class PKI:
    """The CA certificate, the pairs it signed by name, and one pair signed by an unrelated CA (``rogue``)."""

    ca: Path
    pairs: dict[str, Pair]
    rogue: Pair

    def __getitem__(self, name: str) -> Pair:
        return self.pairs[name]


#: Key type of every certificate: ECDSA P-256 (made in milliseconds; RSA 2048 takes seconds on a busy machine).
KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1")


def openssl_available() -> str | None:
    """None when the ``openssl`` command exists, else the reason the TLS tests cannot run."""
    return None if shutil.which("openssl") else "the openssl command is not installed (apt-get install -y openssl)"


def _run(*args: str) -> None:
    proc = subprocess.run(["openssl", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args[:2])} failed: {proc.stderr[-800:]}")


def _make_ca(folder: Path, name: str) -> Pair:
    pair = Pair(folder / f"{name}.pem", folder / f"{name}.key")
    _run(
        "req",
        "-x509",
        *KEY,
        "-nodes",
        "-sha256",
        "-days",
        "1",
        "-subj",
        f"/CN={name}",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        "-keyout",
        str(pair.key),
        "-out",
        str(pair.cert),
    )
    return pair


def _leaf(folder: Path, name: str, ca: Pair) -> Pair:
    pair = Pair(folder / f"{name}.pem", folder / f"{name}.key")
    csr = folder / f"{name}.csr"
    ext = folder / f"{name}.ext"
    ext.write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
        "basicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth,clientAuth\n",
        encoding="utf-8",
    )
    _run("req", *KEY, "-nodes", "-sha256", "-subj", f"/CN={name}", "-keyout", str(pair.key),
         "-out", str(csr))  # fmt: skip
    _run("x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key), "-CAcreateserial", "-days",
         "1", "-sha256", "-extfile", str(ext), "-out", str(pair.cert))  # fmt: skip
    return pair


def make_pki(folder: Path, names: tuple[str, ...] = ("node", "pacs", "modality")) -> PKI:
    """A CA under ``folder`` and a key + certificate it signed for each of ``names`` (plus an untrusted ``rogue``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ca = _make_ca(folder, "ca")
    pairs = {name: _leaf(folder, name, ca) for name in names}
    rogue_ca = _make_ca(folder, "rogue_ca")
    return PKI(ca.cert, pairs, _leaf(folder, "rogue", rogue_ca))
