"""TLS contexts of the node: the DICOM port (server), the sender (client) and the HTTP port.

DICOM TLS (PS3.15 Annex B.1, the "basic TLS secure transport connection profile"): with ``tls_cert`` and ``tls_key``
the Storage SCP accepts TLS connections only, and with ``tls_ca`` it asks every caller for a certificate signed by
one of those authorities (a caller without one is refused during the handshake). The sender then opens TLS
connections to every destination, presents the node's certificate and checks the destination's against
``tls_ca`` (and its host name). TLS 1.2 is the oldest version either side accepts.
"""

from __future__ import annotations

import ssl

from rsna19.core.errors import UserError
from rsna19.serve.config import ServeConfig


def _load_chain(ctx: ssl.SSLContext, cert: str, key: str) -> None:
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise UserError(f"serve: cannot load the TLS certificate {cert} with key {key}: {exc}") from None


def _load_ca(ctx: ssl.SSLContext, ca: str) -> None:
    try:
        ctx.load_verify_locations(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise UserError(f"serve: cannot load the trusted certificates {ca}: {exc}") from None


def dicom_server_context(cfg: ServeConfig) -> ssl.SSLContext | None:
    """The SCP's context (None without ``tls_cert``): the node's certificate; callers' certificates are required
    and checked against ``tls_ca`` when it is given.

    Raises:
        UserError: a certificate, key or CA file that cannot be loaded (named, with the reason).
    """
    if not cfg.dicom_tls:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, str(cfg.tls_cert), str(cfg.tls_key))
    if cfg.tls_ca:
        _load_ca(ctx, cfg.tls_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def dicom_client_context(cfg: ServeConfig) -> ssl.SSLContext | None:
    """The sender's context (None without ``tls_cert``): presents the node's certificate, checks the destination's
    against ``tls_ca`` (the system's authorities without it) and its host name.

    Raises:
        UserError: a certificate, key or CA file that cannot be loaded.
    """
    if not cfg.dicom_tls:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cfg.tls_ca:
        _load_ca(ctx, cfg.tls_ca)
    else:
        ctx.load_default_certs()
    _load_chain(ctx, str(cfg.tls_cert), str(cfg.tls_key))
    return ctx


def http_server_context(cfg: ServeConfig) -> ssl.SSLContext | None:
    """The HTTP port's context (None without ``http_tls_cert``): HTTPS only, no client certificate asked.

    Raises:
        UserError: a certificate or key that cannot be loaded.
    """
    if not cfg.http_tls_cert:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, str(cfg.http_tls_cert), str(cfg.http_tls_key))
    return ctx
