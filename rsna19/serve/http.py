"""The worklist page, the JSON API, health and metrics over HTTP (stdlib ``ThreadingHTTPServer``).

Routes (docs/serve.md, "HTTP API"): ``GET /`` the worklist, ``GET /api/studies[?flagged=1]``,
``GET /api/studies/<uid>``, ``POST /api/studies/<uid>/{rerun,acknowledge,dismiss,reopen}``,
``GET /studies/<uid>/report.png``, ``GET /studies/<uid>/viewer`` (a redirect to the PACS viewer), ``GET /health``,
``GET /metrics``. With tokens configured (named: one per user or system) every request must carry one of them,
``Authorization: Bearer TOKEN`` or ``?token=TOKEN`` (401 otherwise); a token is required when the server is bound
to anything but loopback (:meth:`ServeConfig.check`). The token's name is logged with every study view, re-run and
review, and patient name, ID and accession number are served only to a request that carries a token. With
``http_tls_cert`` the port speaks HTTPS only.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import json
import logging
import re
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from rsna19.core.constants import CLASSES, SHORT_NAMES
from rsna19.monitor.drift import worklist_banner
from rsna19.serve.config import ServeConfig
from rsna19.serve.db import REVIEWS, ServeDB
from rsna19.serve.metrics import node_drift, render_metrics
from rsna19.serve.spool import Spool
from rsna19.serve.tls import http_server_context
from rsna19.serve.worker import HOOK_FIELDS
from rsna19.serve.worklist_page import PAGE

log = logging.getLogger("rsna19.serve.http")


ANONYMOUS = "anonymous"
_TOKEN_IN_URL = re.compile(r"(token=)[^&\s]*")


def identify(tokens: Mapping[str, str], authorization: str | None, query_token: str | None) -> str | None:
    """Who sends a request: the name of the token it carries, :data:`ANONYMOUS` when no token is configured, None
    when it must be refused (a token is configured and the request has none of them).

    Args:
        tokens: the configured tokens, ``{name: secret}`` (empty: no check).
        authorization: the request's ``Authorization`` header (``Bearer TOKEN``).
        query_token: the request's ``?token=`` value.
    """
    if not tokens:
        return ANONYMOUS
    given = None
    if authorization and authorization.lower().startswith("bearer "):
        given = authorization[7:].strip()
    elif query_token:
        given = query_token
    if given is None:
        return None
    found = None
    for name, secret in tokens.items():  # compare with every token (constant time each): no early exit
        if hmac.compare_digest(given.encode(), str(secret).encode()):
            found = name
    return found


def authorized(token: str | Mapping[str, str] | None, authorization: str | None, query_token: str | None) -> bool:
    """Whether a request may pass: always without a configured token, else only with one of the tokens."""
    tokens = dict(token) if isinstance(token, Mapping) else ({"token": token} if token else {})
    return identify(tokens, authorization, query_token) is not None


def orthanc_study_id(patient_id: str | None, study_uid: str) -> str:
    """Orthanc's ID of a study: the SHA-1 of ``PatientID|StudyInstanceUID`` in five groups of eight hex digits."""
    digest = hashlib.sha1(f"{patient_id or ''}|{study_uid}".encode()).hexdigest()  # noqa: S324 - Orthanc's scheme
    return "-".join(digest[i : i + 8] for i in range(0, 40, 8))


def viewer_link(template: str | None, row: Mapping[str, Any]) -> str | None:
    """The PACS viewer URL of a study from ``viewer_url`` (``{study_uid}``, ``{accession}``, ``{orthanc_id}``)."""
    if not template:
        return None
    values = {
        "study_uid": quote(str(row["study_uid"]), safe=""),
        "accession": quote(str(row.get("accession") or ""), safe=""),
        "orthanc_id": orthanc_study_id(row.get("patient_id"), str(row["study_uid"])),
    }
    return template.format(**values)


def study_object(row: dict[str, Any], *, phi: bool = False, viewer: bool = False, now: float | None = None) -> dict:
    """One ``/api/studies`` object from a ``studies`` row (docs/contracts.md, "Serve API objects").

    Args:
        row: the ``studies`` row.
        phi: include ``patient_name``, ``patient_id`` and ``accession`` (only for a request with a token).
        viewer: a PACS viewer is configured: ``viewer_url`` is the node's redirect to it.
        now: the time ``age_s`` is counted to (default: now).
    """
    result = json.loads(row["result"]) if row.get("result") else {}
    answered, received = row.get("answered_s"), row.get("received_s")
    first = row.get("first_received_s")
    now = time.time() if now is None else now
    uid_q = quote(row["study_uid"], safe="")
    obj: dict[str, Any] = {
        "study_uid": row["study_uid"],
        "status": row["status"],
        "p_any": row.get("p_any"),
        "flag": None if row.get("flag") is None else bool(row["flag"]),
        "probabilities": result.get("probabilities") or {},
        "flags": result.get("flags") or {},
        "positive_classes": result.get("positive_classes") or [],
        "calibrated": result.get("calibrated"),
        "n_instances": row["n_instances"],
        "first_received_s": first,
        "received_s": received,
        "age_s": None if first is None else round(now - float(first), 1),
        "queued_s": row.get("queued_s"),
        "started_s": row.get("started_s"),
        "done_s": row.get("done_s"),
        "answered_s": answered,
        "predict_s": None if row.get("predict_s") is None else round(float(row["predict_s"]), 3),
        "latency_s": None if answered is None or received is None else round(float(answered) - float(received), 3),
        "runs": row.get("runs", 0),
        "error": row.get("error"),
        "report_url": f"/studies/{uid_q}/report.png" if result.get("report") else None,
        "viewer_url": f"/studies/{uid_q}/viewer" if viewer else None,
        "sr_uid": result.get("sr_uid"),
        "sc_uid": result.get("sc_uid"),
        "review": row.get("review"),
        "review_by": row.get("review_by"),
        "review_s": row.get("review_s"),
    }
    for key in HOOK_FIELDS:  # predict-study's extra answers, when the bundle gives them
        obj[key] = result.get(key)
    if phi:
        obj.update(
            patient_name=row.get("patient_name"), patient_id=row.get("patient_id"), accession=row.get("accession")
        )
    return obj


def sorted_studies(
    rows: list[dict[str, Any]], *, phi: bool = False, viewer: bool = False, flagged_only: bool = False
) -> list[dict[str, Any]]:
    """API objects sorted by ``p_any`` descending, studies without one last, then newest first (``flagged_only``:
    the flagged ones only)."""
    now = time.time()
    objs = [study_object(r, phi=phi, viewer=viewer, now=now) for r in rows]
    if flagged_only:
        objs = [o for o in objs if o["flag"] is True]
    return sorted(objs, key=lambda o: (o["p_any"] is None, -(o["p_any"] or 0.0), -(o["received_s"] or 0.0)))


def render_page(
    studies: list[dict[str, Any]], *, user: str, phi: bool, flagged_only: bool, banner: str | None = None
) -> str:
    """The worklist page: the rows are rendered by its script, from ``studies`` at once and from ``/api/studies``
    every 2 s; ``banner`` (the drift warning, :func:`rsna19.monitor.drift.worklist_banner`) above the table."""
    data = json.dumps(studies).replace("</", "<\\/")  # inside <script>: no "</script>" from a value
    subtypes = [c for c in CLASSES if c != "any"]
    return (
        PAGE.replace("__SUBTYPES__", json.dumps(subtypes))
        .replace(
            "__SUB_HEADS__",
            "".join(f'<th class="sub" title="{html.escape(c)}">{html.escape(SHORT_NAMES[c])}</th>' for c in subtypes),
        )
        .replace("__USER__", html.escape(user))
        .replace("__PHI__", "true" if phi else "false")
        .replace("__FLAGGED_CHECKED__", " checked" if flagged_only else "")
        .replace("__BANNER__", f'<p id="drift-banner" class="drift">{html.escape(banner)}</p>' if banner else "")
        .replace("__DATA__", data)
    )


class _Server(ThreadingHTTPServer):
    """A threading HTTP server that does the TLS handshake (when configured) in each connection's own thread, under
    a timeout, so that a slow or plain-text client cannot hold the accept loop."""

    daemon_threads = True
    tls: ssl.SSLContext | None = None

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.tls is None:
            super().finish_request(request, client_address)
            return
        request.settimeout(10.0)
        try:
            conn = self.tls.wrap_socket(request, server_side=True)
        except (OSError, ValueError) as exc:
            log.warning("http_tls_refused", extra={"client": client_address[0], "reason": " ".join(str(exc).split())})
            return
        try:
            conn.settimeout(60.0)
            super().finish_request(conn, client_address)
        finally:
            conn.close()


class ServeHTTP:
    """The HTTP server of the node (background thread): HTTPS when ``cfg.http_tls_cert`` is set.

    Args:
        host, port: where it listens (port 0: a free one).
        db, spool: the node's state.
        tokens: ``{name: secret}`` (a plain string: one token named ``token``; empty or None: no check).
        health: ``/health``'s answer.
        cfg: the node's configuration (``viewer_url``, HTTP TLS); None: the defaults.
        drift_reference: the bundle's ``drift_reference``: ``/metrics`` and the worklist compare the stored results
            with it (None: a bundle without one; the drift lines read NaN and the worklist shows no banner).
    """

    def __init__(
        self,
        host: str,
        port: int,
        db: ServeDB,
        spool: Spool,
        tokens: Mapping[str, str] | str | None,
        health: Callable[[], dict[str, Any]],
        cfg: ServeConfig | None = None,
        drift_reference: Mapping[str, Any] | None = None,
    ) -> None:
        self.db = db
        self.drift_reference = drift_reference
        self.spool = spool
        self.tokens: dict[str, str] = (
            dict(tokens) if isinstance(tokens, Mapping) else ({"token": tokens} if tokens else {})
        )
        self.health = health
        self.cfg = cfg or ServeConfig()
        self.on_rerun: Callable[[str], None] | None = None
        self._listed: dict[str, float] = {}  # user → when its list view was last logged
        handler = type("Handler", (_Handler,), {"app": self})
        self.server = _Server((host, int(port)), handler)
        self.server.tls = http_server_context(self.cfg)
        self.thread = threading.Thread(target=self.server.serve_forever, name="rsna19-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    @property
    def scheme(self) -> str:
        return "https" if self.server.tls is not None else "http"

    def start(self) -> int:
        self.thread.start()
        return self.port

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def log_list_view(self, user: str, n: int) -> None:
        """Log that ``user`` saw the list (once a user every 5 minutes: the page polls every 2 s)."""
        now = time.time()
        if now - self._listed.get(user, 0.0) >= 300.0:
            self._listed[user] = now
            log.info("worklist_viewed", extra={"user": user, "studies": n})


class _Handler(BaseHTTPRequestHandler):
    app: ServeHTTP
    server_version = "rsna19-serve"
    user: str = ANONYMOUS

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's signature
        request = _TOKEN_IN_URL.sub(r"\1***", format % args)  # never a token in the log
        log.debug("http", extra={"client": self.client_address[0], "request": request})

    def _send(self, code: int, body: bytes | str, ctype: str = "application/json", headers: dict | None = None) -> None:
        data = body.encode("utf-8") if isinstance(body, str) else body
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Referrer-Policy", "no-referrer")  # the ?token= of a page never leaves in a Referer
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _json(self, code: int, obj: Any) -> None:
        self._send(code, json.dumps(obj) + "\n")

    def _route(self) -> tuple[str, dict[str, list[str]]] | None:
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        user = identify(self.app.tokens, self.headers.get("Authorization"), (query.get("token") or [None])[0])
        if user is None:
            self.send_response(401)
            self.send_header("WWW-Authenticate", "Bearer")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        self.user = user
        return parts.path, query

    @property
    def phi(self) -> bool:
        """Patient fields only for a request that carried a token."""
        return self.user != ANONYMOUS

    def _studies(self, query: dict[str, list[str]]) -> list[dict[str, Any]]:
        flagged = (query.get("flagged") or ["0"])[0] in ("1", "true", "yes")
        return sorted_studies(
            self.app.db.studies(), phi=self.phi, viewer=bool(self.app.cfg.viewer_url), flagged_only=flagged
        )

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        routed = self._route()
        if routed is None:
            return
        path, query = routed
        try:
            if path == "/health":
                h = self.app.health()
                self._json(200 if h.get("status") != "error" else 503, h)
            elif path == "/api/studies":
                studies = self._studies(query)
                self.app.log_list_view(self.user, len(studies))
                self._json(200, studies)
            elif path.startswith("/api/studies/"):
                row = self.app.db.study(unquote(path[len("/api/studies/") :]))
                if row is None:
                    self._json(404, {"error": "unknown study"})
                else:
                    log.info("study_viewed", extra={"user": self.user, "study_uid": row["study_uid"], "what": "api"})
                    obj = study_object(row, phi=self.phi, viewer=bool(self.app.cfg.viewer_url))
                    obj["deliveries"] = self.app.db.deliveries(row["study_uid"])
                    self._json(200, obj)
            elif path == "/metrics":
                drift = node_drift(self.app.db, self.app.drift_reference)
                metrics = render_metrics(self.app.db, workers=self.app.health().get("workers", 0), drift=drift)
                self._send(200, metrics, "text/plain; version=0.0.4")
            elif path.startswith("/studies/") and path.endswith("/report.png"):
                self._report(unquote(path[len("/studies/") : -len("/report.png")]))
            elif path.startswith("/studies/") and path.endswith("/viewer"):
                self._viewer(unquote(path[len("/studies/") : -len("/viewer")]))
            elif path in ("/", "/index.html"):
                studies = self._studies(query)
                log.info("worklist_viewed", extra={"user": self.user, "studies": len(studies)})
                self._listed_now()
                flagged = (query.get("flagged") or ["0"])[0] in ("1", "true", "yes")
                banner = worklist_banner(node_drift(self.app.db, self.app.drift_reference))
                page = render_page(studies, user=self.user, phi=self.phi, flagged_only=flagged, banner=banner)
                self._send(200, page, "text/html; charset=utf-8")
            else:
                self._json(404, {"error": f"no route {path}"})
        except BrokenPipeError:
            pass

    def _listed_now(self) -> None:
        self.app._listed[self.user] = time.time()

    def _report(self, uid: str) -> None:
        row = self.app.db.study(uid)
        result = json.loads(row["result"]) if row and row.get("result") else {}
        rel = result.get("report")
        png = (self.app.spool.root / rel) if rel else None
        if png is None or not Path(png).is_file():
            self._json(404, {"error": "no report for this study"})
            return
        log.info("study_viewed", extra={"user": self.user, "study_uid": uid, "what": "report"})
        self._send(200, Path(png).read_bytes(), "image/png")

    def _viewer(self, uid: str) -> None:
        row = self.app.db.study(uid)
        if row is None:
            self._json(404, {"error": "unknown study"})
            return
        url = viewer_link(self.app.cfg.viewer_url, row)
        if url is None:
            self._json(404, {"error": "no viewer_url configured"})
            return
        log.info("study_viewed", extra={"user": self.user, "study_uid": uid, "what": "viewer"})
        self._send(302, "", "text/plain", headers={"Location": url})

    def do_POST(self) -> None:  # noqa: N802
        routed = self._route()
        if routed is None:
            return
        path, _ = routed
        uid, _, action = (
            unquote(path[len("/api/studies/") :]).rpartition("/") if path.startswith("/api/") else ("", "", "")
        )
        if action == "rerun":
            status = self.app.db.rerun(uid)
            if status is None:
                self._json(404, {"error": "unknown study", "study_uid": uid})
            elif status == "running":
                self._json(409, {"error": "the study is running; re-run it when it ends", "study_uid": uid})
            else:
                log.info("rerun", extra={"study_uid": uid, "user": self.user})
                if self.app.on_rerun is not None:
                    self.app.on_rerun(uid)
                self._json(202, {"study_uid": uid, "status": status})
        elif action in ("acknowledge", "dismiss", "reopen"):
            review = {"acknowledge": "acknowledged", "dismiss": "dismissed", "reopen": None}[action]
            assert review is None or review in REVIEWS
            if not self.app.db.review(uid, review, self.user):
                self._json(404, {"error": "unknown study", "study_uid": uid})
                return
            log.info("review", extra={"study_uid": uid, "user": self.user, "review": review or "reopened"})
            row = self.app.db.study(uid) or {}
            self._json(
                200,
                {
                    "study_uid": uid,
                    "review": row.get("review"),
                    "review_by": row.get("review_by"),
                    "review_s": row.get("review_s"),
                },
            )
        else:
            self._json(404, {"error": f"no route {path}"})
