"""The worklist page, the JSON API, health and metrics over HTTP (stdlib ``ThreadingHTTPServer``).

Routes (docs/serve.md, "HTTP API"): ``GET /`` the worklist, ``GET /api/studies``, ``GET /api/studies/<uid>``,
``POST /api/studies/<uid>/rerun``, ``GET /studies/<uid>/report.png``, ``GET /health``, ``GET /metrics``. With a
token configured every request must carry ``Authorization: Bearer TOKEN`` or ``?token=TOKEN`` (401 otherwise); a
token is required when the server is bound to anything but loopback (:meth:`ServeConfig.check`).
"""

from __future__ import annotations

import hmac
import html
import json
import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from rsna19.constants import CLASSES
from rsna19.serve.db import ServeDB
from rsna19.serve.metrics import render_metrics
from rsna19.serve.spool import Spool

log = logging.getLogger("rsna19.serve.http")


def authorized(token: str | None, authorization: str | None, query_token: str | None) -> bool:
    """Whether a request may pass: always without a configured token, else only with that exact token.

    Args:
        token: the configured token (None or empty: no check).
        authorization: the request's ``Authorization`` header (``Bearer TOKEN``).
        query_token: the request's ``?token=`` value.
    """
    if not token:
        return True
    given = None
    if authorization and authorization.lower().startswith("bearer "):
        given = authorization[7:].strip()
    elif query_token:
        given = query_token
    return given is not None and hmac.compare_digest(given.encode(), token.encode())


def study_object(row: dict[str, Any]) -> dict[str, Any]:
    """One ``/api/studies`` object from a ``studies`` row (docs/contracts.md, "Serve API objects")."""
    result = json.loads(row["result"]) if row.get("result") else {}
    answered, received = row.get("answered_s"), row.get("received_s")
    return {
        "study_uid": row["study_uid"],
        "status": row["status"],
        "p_any": row.get("p_any"),
        "flag": None if row.get("flag") is None else bool(row["flag"]),
        "probabilities": result.get("probabilities") or {},
        "flags": result.get("flags") or {},
        "positive_classes": result.get("positive_classes") or [],
        "calibrated": result.get("calibrated"),
        "n_instances": row["n_instances"],
        "first_received_s": row.get("first_received_s"),
        "received_s": received,
        "queued_s": row.get("queued_s"),
        "started_s": row.get("started_s"),
        "done_s": row.get("done_s"),
        "answered_s": answered,
        "predict_s": None if row.get("predict_s") is None else round(float(row["predict_s"]), 3),
        "latency_s": None if answered is None or received is None else round(float(answered) - float(received), 3),
        "runs": row.get("runs", 0),
        "error": row.get("error"),
        "report_url": f"/studies/{quote(row['study_uid'], safe='')}/report.png" if result.get("report") else None,
        "sr_uid": result.get("sr_uid"),
        "sc_uid": result.get("sc_uid"),
    }


def sorted_studies(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """API objects sorted by ``p_any`` descending, studies without one last, then newest first."""
    objs = [study_object(r) for r in rows]
    return sorted(objs, key=lambda o: (o["p_any"] is None, -(o["p_any"] or 0.0), -(o["received_s"] or 0.0)))


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>rsna19 worklist</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }}
table {{ border-collapse: collapse; width: 100%; }}
th, td {{ border: 1px solid #999; padding: 4px 6px; text-align: left; font-size: 14px; }}
tr.flagged {{ background: #c62828; color: #fff; }}
tr.flagged a {{ color: #fff; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
img.thumb {{ height: 48px; }}
#note {{ color: #555; font-size: 12px; }}
</style></head>
<body><h1>rsna19 worklist</h1>
<p id="note">Research software, not a medical device: results are not verified. Sorted by calibrated any-bleed
probability; refreshes every 2 s.</p>
<table id="worklist"><thead><tr><th>flag</th><th>p_any</th>{sub_heads}<th>status</th><th>received</th>
<th>latency (s)</th><th>report</th><th>study</th></tr></thead>
<tbody>{rows}</tbody></table>
<script>
const SUBTYPES = {subtypes};
const TOKEN = new URLSearchParams(location.search).get("token");
function fmt(p) {{ return p === null || p === undefined ? "" : p.toFixed(3); }}
function esc(s) {{ const d = document.createElement("div"); d.textContent = s === null ? "" : String(s);
  return d.innerHTML; }}
function withToken(u) {{ return TOKEN ? u + (u.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(TOKEN) : u; }}
function row(s) {{
  const flagged = s.flag === true;
  const cells = [flagged ? "BLEED" : (s.flag === false ? "" : "?"), fmt(s.p_any)]
    .concat(SUBTYPES.map(c => fmt(s.probabilities[c])));
  const when = s.received_s ? new Date(s.received_s * 1000).toLocaleTimeString() : "";
  const rep = s.report_url ? '<a href="' + withToken(s.report_url) + '"><img class="thumb" src="' +
    withToken(s.report_url) + '" alt="report"></a>' : "";
  return '<tr class="study' + (flagged ? ' flagged' : '') + '" data-study-uid="' + esc(s.study_uid) + '">' +
    cells.map((c, i) => '<td class="' + (i ? 'num' : 'flag') + '">' + esc(c) + '</td>').join("") +
    '<td class="status">' + esc(s.status) + (s.error ? ': ' + esc(s.error) : '') + '</td><td>' + esc(when) +
    '</td><td class="num">' + esc(s.latency_s === null ? "" : s.latency_s.toFixed(1)) + '</td><td>' + rep +
    '</td><td>' + esc(s.study_uid) + '</td></tr>';
}}
async function refresh() {{
  try {{
    const r = await fetch(withToken("/api/studies"));
    if (r.ok) {{ const studies = await r.json();
      document.querySelector("#worklist tbody").innerHTML = studies.map(row).join(""); }}
  }} catch (e) {{}}
}}
setInterval(refresh, 2000);
</script></body></html>
"""


def render_row(s: dict[str, Any]) -> str:
    """One ``<tr>`` of the worklist (the same markup the page's script renders)."""
    flagged = s["flag"] is True
    fmt = lambda p: "" if p is None else f"{p:.3f}"  # noqa: E731
    cells = ["BLEED" if flagged else ("" if s["flag"] is False else "?"), fmt(s["p_any"])]
    cells += [fmt(s["probabilities"].get(c)) for c in CLASSES if c != "any"]
    tds = "".join(f'<td class="{"num" if i else "flag"}">{html.escape(c)}</td>' for i, c in enumerate(cells))
    status = html.escape(s["status"] + (f": {s['error']}" if s["error"] else ""))
    latency = "" if s["latency_s"] is None else f"{s['latency_s']:.1f}"
    when = time.strftime("%H:%M:%S", time.localtime(s["received_s"])) if s["received_s"] else ""
    rep = (
        f'<a href="{s["report_url"]}"><img class="thumb" src="{s["report_url"]}" alt="report"></a>'
        if s["report_url"]
        else ""
    )
    return (
        f'<tr class="study{" flagged" if flagged else ""}" data-study-uid="{html.escape(s["study_uid"])}">{tds}'
        f'<td class="status">{status}</td><td>{when}</td><td class="num">{latency}</td><td>{rep}</td>'
        f"<td>{html.escape(s['study_uid'])}</td></tr>"
    )


def render_page(studies: list[dict[str, Any]]) -> str:
    subtypes = [c for c in CLASSES if c != "any"]
    return PAGE.format(
        sub_heads="".join(f"<th>{html.escape(c)}</th>" for c in subtypes),
        rows="".join(render_row(s) for s in studies),
        subtypes=json.dumps(subtypes),
    )


class ServeHTTP:
    """The HTTP server of the node (background thread)."""

    def __init__(
        self, host: str, port: int, db: ServeDB, spool: Spool, token: str | None, health: Callable[[], dict[str, Any]]
    ) -> None:
        self.db = db
        self.spool = spool
        self.token = token
        self.health = health
        self.on_rerun: Callable[[str], None] | None = None
        handler = type("Handler", (_Handler,), {"app": self})
        self.server = ThreadingHTTPServer((host, int(port)), handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="rsna19-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def start(self) -> int:
        self.thread.start()
        return self.port

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Handler(BaseHTTPRequestHandler):
    app: ServeHTTP
    server_version = "rsna19-serve"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's signature
        log.debug("http", extra={"client": self.client_address[0], "request": format % args})

    def _send(self, code: int, body: bytes | str, ctype: str = "application/json") -> None:
        data = body.encode("utf-8") if isinstance(body, str) else body
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def _json(self, code: int, obj: Any) -> None:
        self._send(code, json.dumps(obj) + "\n")

    def _route(self) -> tuple[str, dict[str, list[str]]] | None:
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        if not authorized(self.app.token, self.headers.get("Authorization"), (query.get("token") or [None])[0]):
            self.send_response(401)
            self.send_header("WWW-Authenticate", "Bearer")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        return parts.path, query

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        routed = self._route()
        if routed is None:
            return
        path, _ = routed
        try:
            if path == "/health":
                h = self.app.health()
                self._json(200 if h.get("status") != "error" else 503, h)
            elif path == "/api/studies":
                self._json(200, sorted_studies(self.app.db.studies()))
            elif path.startswith("/api/studies/"):
                row = self.app.db.study(unquote(path[len("/api/studies/") :]))
                if row is None:
                    self._json(404, {"error": "unknown study"})
                else:
                    obj = study_object(row)
                    obj["deliveries"] = self.app.db.deliveries(row["study_uid"])
                    self._json(200, obj)
            elif path == "/metrics":
                self._send(
                    200,
                    render_metrics(self.app.db, workers=self.app.health().get("workers", 0)),
                    "text/plain; version=0.0.4",
                )
            elif path.startswith("/studies/") and path.endswith("/report.png"):
                self._report(unquote(path[len("/studies/") : -len("/report.png")]))
            elif path in ("/", "/index.html"):
                self._send(200, render_page(sorted_studies(self.app.db.studies())), "text/html; charset=utf-8")
            else:
                self._json(404, {"error": f"no route {path}"})
        except BrokenPipeError:
            pass

    def _report(self, uid: str) -> None:
        row = self.app.db.study(uid)
        result = json.loads(row["result"]) if row and row.get("result") else {}
        rel = result.get("report")
        png = (self.app.spool.root / rel) if rel else None
        if png is None or not Path(png).is_file():
            self._json(404, {"error": "no report for this study"})
            return
        self._send(200, Path(png).read_bytes(), "image/png")

    def do_POST(self) -> None:  # noqa: N802
        routed = self._route()
        if routed is None:
            return
        path, _ = routed
        if path.startswith("/api/studies/") and path.endswith("/rerun"):
            uid = unquote(path[len("/api/studies/") : -len("/rerun")])
            status = self.app.db.rerun(uid)
            if status is None:
                self._json(404, {"error": "unknown study", "study_uid": uid})
            elif status == "running":
                self._json(409, {"error": "the study is running; re-run it when it ends", "study_uid": uid})
            else:
                log.info("rerun", extra={"study_uid": uid})
                if self.app.on_rerun is not None:
                    self.app.on_rerun(uid)
                self._json(202, {"study_uid": uid, "status": status})
        else:
            self._json(404, {"error": f"no route {path}"})
