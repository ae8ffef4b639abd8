"""The typed configuration of ``rsna19 serve``: flags over an optional YAML file over the defaults."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from rsna19.core import config
from rsna19.core.errors import UserError

_DEST = re.compile(r"^(?P<aet>[^@\s\\]{1,16})@(?P<host>[^:\s]+):(?P<port>\d{1,5})$")
_SENDER = re.compile(r"^(?P<aet>[^@\s\\]{1,16})(?:@(?P<address>[^@\s]+))?$")
_TOKEN_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
ISOLATIONS = ("process", "thread")


@dataclass(frozen=True)
class Destination:
    """A DICOM node the results are sent to (``AET@HOST:PORT``)."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        """``"PACS@127.0.0.1:4242"`` → Destination.

        Raises:
            UserError: not of the form ``AET@HOST:PORT`` (AE title at most 16 characters, port 1-65535).
        """
        m = _DEST.match(str(text).strip())
        if not m or not 0 < int(m["port"]) < 65536:
            raise UserError(f"destination {text!r}: give AET@HOST:PORT, e.g. PACS@127.0.0.1:4242")
        return cls(m["aet"], m["host"], int(m["port"]))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class AllowedSender:
    """A calling AE title allowed to associate, optionally only from some addresses (``TITLE[@ADDRESS]``).

    ``ADDRESS`` is an IP address, a network in CIDR notation (``10.0.0.0/24``) or a host name (resolved when the
    configuration is checked, so a name that does not resolve is an error at start, not a silent refusal later).
    """

    ae_title: str
    address: str | None = None

    @classmethod
    def parse(cls, text: str) -> AllowedSender:
        """``"CT1@10.0.0.7"`` → AllowedSender("CT1", "10.0.0.7"); ``"PACS"`` → any address.

        Raises:
            UserError: not ``TITLE[@ADDRESS]`` (title 1-16 characters without blanks or a backslash).
        """
        m = _SENDER.match(str(text).strip())
        if not m:
            raise UserError(f"allowed AE title {text!r}: give TITLE or TITLE@ADDRESS, e.g. CT1@10.0.0.7 or PACS")
        return cls(m["aet"], m["address"])

    def networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        """The networks ``address`` stands for (one host network per resolved address; empty: any address).

        Raises:
            UserError: a host name that does not resolve.
        """
        if self.address is None:
            return []
        try:
            return [ipaddress.ip_network(self.address, strict=False)]
        except ValueError:
            pass
        try:
            infos = socket.getaddrinfo(self.address, None)
        except OSError as exc:
            raise UserError(f"allowed AE title {self}: cannot resolve {self.address!r} ({exc})") from None
        return sorted({ipaddress.ip_network(i[4][0]) for i in infos}, key=str)

    def __str__(self) -> str:
        return self.ae_title if self.address is None else f"{self.ae_title}@{self.address}"


class SenderPolicy:
    """Which calling AE titles may associate, and from where (an empty list: anyone who reaches the port)."""

    def __init__(self, allowed: list[AllowedSender]) -> None:
        self.allowed = list(allowed)
        self._nets = [(a.ae_title, a.networks()) for a in self.allowed]

    def check(self, ae_title: str, address: str) -> str | None:
        """None when ``ae_title`` calling from ``address`` may associate, else the reason it may not."""
        if not self._nets:
            return None
        title = str(ae_title).strip()
        entries = [nets for t, nets in self._nets if t == title]
        if not entries:
            return f"calling AE title {title!r} is not allowed"
        try:
            ip = ipaddress.ip_address(str(address).split("%")[0])
        except ValueError:
            return f"calling AE title {title!r}: address {address!r} is not an IP address"
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(not nets or any(ip in n for n in nets) for nets in entries):
            return None
        return f"calling AE title {title!r} is not allowed from {ip}"


@dataclass
class ServeConfig:
    """Every setting of ``rsna19 serve`` (the YAML keys are these names; flags are the same with dashes).

    Attributes:
        bundle: bundle folder written by ``rsna19 bundle``.
        spool: the spool folder (incoming instances, results, dead letters, ``serve.db``, ``ports.json``).
        port: DICOM port (0: a free one, written to ``ports.json``).
        ae_title: the SCP's AE title.
        http_port: HTTP port of the worklist, API and metrics (0: a free one).
        host: interface the DICOM port listens on.
        http_host: interface of the HTTP port; anything but loopback needs ``token``.
        destinations: ``AET@HOST:PORT`` nodes the SR and SC go to.
        quiet_seconds: a study is complete when no instance arrived for this long.
        workers: threads predicting studies, each with its own copy of the bundle.
        token: bearer token every HTTP request must carry (required off loopback).
        device: where the models run (``cpu``, ``cuda``, ``auto``).
        max_instance_mb: larger instances are refused (C-STORE 0xA700).
        max_studies_per_minute: new studies beyond this many a minute are refused (0: no limit).
        min_free_disk_mb: instances are refused while the spool's disk has less free space.
        send_retries: C-STORE attempts per destination before the results go to the dead-letter folder.
        retry_backoff_s: first wait between attempts; doubled each time, at most ``retry_backoff_max_s``.
        retry_backoff_max_s: longest wait between attempts.
        network_timeout_s: DICOM association / network timeout of the sender.
        shutdown_grace_s: on SIGTERM, how long running studies may take to finish before they are re-queued.
        torch_threads: intra-op threads of each worker (0: the CPU count divided by ``workers``).
        cam: draw the Grad-CAM overlay on the report picture (costs a backward pass).
        allowed_aets: calling AE titles that may associate, ``TITLE`` or ``TITLE@ADDRESS`` (IP, CIDR network or host
            name); empty: any caller that reaches the port.
        tls_cert: PEM certificate of the node: with ``tls_key`` the DICOM port speaks only TLS and the sender uses
            TLS to every destination, presenting this certificate.
        tls_key: PEM private key of ``tls_cert``.
        tls_ca: PEM certificates of the authorities the node trusts: a caller must present a certificate they signed,
            and a destination's certificate must be signed by one of them (host name checked).
        http_tls_cert: PEM certificate of the HTTP port (with ``http_tls_key``: HTTPS only); may be ``tls_cert``.
        http_tls_key: PEM private key of ``http_tls_cert``.
        tokens: named bearer tokens ``{name: secret}`` (one per user or system); the name is logged with every study
            it views, re-runs, acknowledges or dismisses. ``token`` counts as one named ``token``.
        viewer_url: URL template of the PACS viewer for one study: ``{study_uid}``, ``{accession}`` and
            ``{orthanc_id}`` (Orthanc's study ID) are filled in, e.g.
            ``http://pacs:8042/ui/app/#/filtered-studies?StudyInstanceUID={study_uid}``.
        worker_isolation: ``process``: each worker is a child process (a crash or a hang ends only that study);
            ``thread``: workers are threads of the node (no time limit; for embedding and tests).
        study_timeout_s: a study whose prediction runs longer is failed with the reason and its worker process is
            replaced (0: no limit; process isolation only).
        silent: predict and record every study, send nothing (a site's trial period).
        seg: write each positive study's bleed map as a DICOM SEG and send it with the SR and SC
            (:mod:`rsna19.inference.seg_out`); ``--no-seg`` leaves it out.
    """

    #: YAML keys that stand for a field (the flag's name ``--destination`` adds to ``destinations``).
    config_aliases: ClassVar[dict[str, str]] = {"destination": "destinations", "allowed_aet": "allowed_aets"}

    bundle: str = ""
    spool: str = ""
    port: int = 11112
    ae_title: str = "RSNA19"
    http_port: int = 8080
    host: str = "127.0.0.1"
    http_host: str = "127.0.0.1"
    destinations: list[str] = field(default_factory=list)
    quiet_seconds: float = 10.0
    workers: int = 1
    token: str | None = None
    device: str = "auto"
    max_instance_mb: float = 64.0
    max_studies_per_minute: int = 0
    min_free_disk_mb: float = 500.0
    send_retries: int = 5
    retry_backoff_s: float = 2.0
    retry_backoff_max_s: float = 300.0
    network_timeout_s: float = 30.0
    shutdown_grace_s: float = 60.0
    torch_threads: int = 0
    cam: bool = True
    allowed_aets: list[str] = field(default_factory=list)
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    http_tls_cert: str | None = None
    http_tls_key: str | None = None
    tokens: dict[str, str] = field(default_factory=dict)
    viewer_url: str | None = None
    worker_isolation: str = "process"
    study_timeout_s: float = 600.0
    silent: bool = False

    @property
    def sender_policy(self) -> SenderPolicy:
        """The parsed :attr:`allowed_aets`."""
        return SenderPolicy([AllowedSender.parse(a) for a in self.allowed_aets])

    @property
    def dicom_tls(self) -> bool:
        """Whether the DICOM port and the sender use TLS."""
        return bool(self.tls_cert)

    @property
    def named_tokens(self) -> dict[str, str]:
        """Every bearer token by name (``token`` as the one named ``token``)."""
        out = dict(self.tokens)
        if self.token:
            out.setdefault("token", self.token)
        return out

    seg: bool = True

    @property
    def destination_nodes(self) -> list[Destination]:
        """The parsed :attr:`destinations`."""
        return [Destination.parse(d) for d in self.destinations]

    def check(self) -> None:
        """Raise :class:`UserError` for a setting that cannot work (named, with the fix)."""
        if not self.bundle:
            raise UserError("serve: --bundle is required (a folder written by `rsna19 bundle`)")
        if not self.spool:
            raise UserError("serve: --spool is required (a folder for the incoming instances, results and serve.db)")
        if not 1 <= len(self.ae_title) <= 16:
            raise UserError(f"serve: --ae-title {self.ae_title!r}: 1 to 16 characters")
        for name in ("port", "http_port"):
            if not 0 <= int(getattr(self, name)) < 65536:
                raise UserError(f"serve: {name} {getattr(self, name)} is not a port (0-65535; 0 picks a free one)")
        if self.workers < 1:
            raise UserError(f"serve: --workers {self.workers}: at least 1")
        if self.quiet_seconds < 0 or self.send_retries < 1:
            raise UserError("serve: quiet_seconds must be >= 0 and send_retries >= 1")
        if self.device not in ("cpu", "cuda", "auto"):
            raise UserError(f"serve: --device {self.device!r}: cpu, cuda or auto")
        self.destination_nodes  # noqa: B018 - parses (raises on a bad one)
        self.sender_policy  # noqa: B018 - parses and resolves (raises on a bad one)
        for name, secret in self.tokens.items():
            if not _TOKEN_NAME.match(str(name)):
                raise UserError(f"serve: token name {name!r}: 1-64 letters, digits, '.', '_' or '-'")
            if len(str(secret)) < 8:
                raise UserError(f"serve: token {name!r} is shorter than 8 characters")
        if len(set(self.named_tokens.values())) != len(self.named_tokens):
            raise UserError("serve: two token names share one secret: give each user or system its own")
        for cert, key, what in (("tls_cert", "tls_key", "DICOM"), ("http_tls_cert", "http_tls_key", "HTTP")):
            if bool(getattr(self, cert)) != bool(getattr(self, key)):
                raise UserError(
                    f"serve: {what} TLS needs both --{cert.replace('_', '-')} and --{key.replace('_', '-')}"
                )
        if self.tls_ca and not self.tls_cert:
            raise UserError("serve: --tls-ca needs --tls-cert and --tls-key (the node's own certificate)")
        for name in ("tls_cert", "tls_key", "tls_ca", "http_tls_cert", "http_tls_key"):
            value = getattr(self, name)
            if value and not Path(value).is_file():
                raise UserError(f"serve: {name} {value}: no such file")
        if self.worker_isolation not in ISOLATIONS:
            raise UserError(f"serve: worker_isolation {self.worker_isolation!r}: process or thread")
        if self.study_timeout_s < 0:
            raise UserError("serve: study_timeout_s must be >= 0 (0: no limit)")
        if not is_loopback(self.http_host) and not self.named_tokens:
            raise UserError(
                f"serve: --http-host {self.http_host} is not loopback: give --token TOKEN (every request then sends "
                "`Authorization: Bearer TOKEN`)"
            )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["token"]:
            d["token"] = "***"  # the resolved config is written to the spool: never the secret
        d["tokens"] = {name: "***" for name in d["tokens"]}
        return d


def _mapping(value: Any) -> dict[str, str]:
    """A ``{name: secret}`` mapping from a YAML mapping or from ``NAME=SECRET`` strings (the flag's form).

    Raises:
        ValueError: neither.
    """
    if isinstance(value, Mapping):
        return {str(k): str(v) for k, v in value.items()}
    out: dict[str, str] = {}
    for item in value if isinstance(value, list | tuple) else [value]:
        name, sep, secret = str(item).partition("=")
        if not sep or not name or not secret:
            raise ValueError(f"{item!r} is not NAME=SECRET")
        out[name] = secret
    return out


def is_loopback(host: str) -> bool:
    """Whether ``host`` only listens on this machine (127.0.0.0/8, ::1, ``localhost``)."""
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_config(path: str | None, overrides: Mapping[str, Any]) -> ServeConfig:
    """Defaults, then the YAML file ``path``, then ``overrides`` that are not None (the flags), checked.

    The one config loader (:func:`rsna19.core.config.load_config`): keys as :class:`ServeConfig`, dashes may stand for
    underscores, ``destination`` (the flag's name) adds to ``destinations``.

    Raises:
        UserError: an unreadable file, an unknown key, a value of the wrong type or a setting that cannot work.
    """
    flags = dict(overrides)
    if flags.get("tokens") is not None:  # the flag's form: NAME=SECRET strings
        try:
            flags["tokens"] = _mapping(flags["tokens"])
        except ValueError as exc:
            raise UserError(f"serve config: tokens: {exc} (give NAME=SECRET, or a YAML mapping)") from None
    cfg = config.load_config(ServeConfig, path, flags=flags)
    cfg.check()
    return cfg
