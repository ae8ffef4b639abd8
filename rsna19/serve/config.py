"""The typed configuration of ``rsna19 serve``: flags over an optional YAML file over the defaults."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from rsna19 import config
from rsna19.errors import UserError

_DEST = re.compile(r"^(?P<aet>[^@\s\\]{1,16})@(?P<host>[^:\s]+):(?P<port>\d{1,5})$")


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
        seg: write each positive study's bleed map as a DICOM SEG and send it with the SR and SC
            (:mod:`rsna19.inference.seg_out`); ``--no-seg`` leaves it out.
    """

    #: YAML keys that stand for a field (the flag's name ``--destination`` adds to ``destinations``).
    config_aliases: ClassVar[dict[str, str]] = {"destination": "destinations"}

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
        if not is_loopback(self.http_host) and not self.token:
            raise UserError(
                f"serve: --http-host {self.http_host} is not loopback: give --token TOKEN (every request then sends "
                "`Authorization: Bearer TOKEN`)"
            )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["token"]:
            d["token"] = "***"  # the resolved config is written to the spool: never the secret
        return d


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

    The one config loader (:func:`rsna19.config.load_config`): keys as :class:`ServeConfig`, dashes may stand for
    underscores, ``destination`` (the flag's name) adds to ``destinations``.

    Raises:
        UserError: an unreadable file, an unknown key, a value of the wrong type or a setting that cannot work.
    """
    cfg = config.load_config(ServeConfig, path, flags=overrides)
    cfg.check()
    return cfg
