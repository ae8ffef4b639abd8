"""``SPOOL/serve.db``: the studies, their instances, their deliveries; the state that survives a kill.

One SQLite file in WAL mode with ``synchronous=FULL``: a committed row is on disk, so an instance recorded here
before its C-STORE response is never lost. Every status change is one transaction; the statuses are
``receiving → queued → running → done → sent`` (``failed`` from running or sending; a re-run or a late instance
sends a study back). See docs/contracts.md, "serve.db".
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

STATUSES: tuple[str, ...] = ("receiving", "queued", "running", "done", "failed", "sent")

SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
    folder TEXT NOT NULL,
    status TEXT NOT NULL,
    n_instances INTEGER NOT NULL DEFAULT 0,
    first_received_s REAL,
    received_s REAL,
    queued_s REAL,
    started_s REAL,
    done_s REAL,
    answered_s REAL,
    predict_s REAL,
    runs INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    p_any REAL,
    flag INTEGER,
    result TEXT,
    next_send_s REAL
);
CREATE INDEX IF NOT EXISTS studies_status ON studies(status);
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    series_uid TEXT,
    sop_class_uid TEXT,
    transfer_syntax TEXT,
    path TEXT NOT NULL,
    size INTEGER,
    received_s REAL,
    calling_ae TEXT,
    PRIMARY KEY (study_uid, sop_uid)
);
CREATE TABLE IF NOT EXISTS deliveries (
    study_uid TEXT NOT NULL,
    destination TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    sent_s REAL,
    error TEXT,
    PRIMARY KEY (study_uid, destination)
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""

#: Columns added to ``studies`` after its first version (added to an older serve.db when it is opened): the patient
#: fields (shown only to token holders) and the review of a flag (acknowledged or dismissed, by whom, when).
ADDED_COLUMNS: tuple[tuple[str, str], ...] = (
    ("patient_name", "TEXT"),
    ("patient_id", "TEXT"),
    ("accession", "TEXT"),
    ("review", "TEXT"),
    ("review_by", "TEXT"),
    ("review_s", "REAL"),
)
REVIEWS: tuple[str, ...] = ("acknowledged", "dismissed")


class ServeDB:
    """Thread-safe access to ``serve.db`` (one connection, one lock: the writes are small and few)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.executescript(SCHEMA)
            have = {r[1] for r in self._conn.execute("PRAGMA table_info(studies)").fetchall()}
            for name, sql_type in ADDED_COLUMNS:
                if name not in have:
                    self._conn.execute(f"ALTER TABLE studies ADD COLUMN {name} {sql_type}")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE … COMMIT, rolled back on an exception)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self._conn.execute(sql, args).fetchall()]

    # ------------------------------------------------------------------------------------------------ receiving
    def known_study(self, study_uid: str) -> bool:
        return bool(self.query("SELECT 1 FROM studies WHERE study_uid=?", (study_uid,)))

    def add_instance(
        self,
        study_uid: str,
        folder: str,
        sop_uid: str,
        *,
        series_uid: str,
        sop_class_uid: str,
        transfer_syntax: str,
        path: str,
        size: int,
        calling_ae: str,
        patient: dict[str, str] | None = None,
        now: float | None = None,
    ) -> bool:
        """Record an instance already on disk; its study becomes (or stays) ``receiving``.

        A study that was queued, done, sent or failed goes back to ``receiving`` (it will be predicted again with
        the new instance); a running one keeps running and is re-queued when it ends (its ``received_s`` is then
        later than its ``started_s``). ``patient``: ``patient_name``, ``patient_id``, ``accession`` of the instance
        (the study keeps the first non-empty value of each). Returns whether the study is new. The long keyword list
        must stay: it is the instance row (one column each), named at the one call site so no column is swapped.
        """
        p = {k: (patient or {}).get(k) or None for k in ("patient_name", "patient_id", "accession")}
        now = time.time() if now is None else now
        with self.tx() as c:
            row = c.execute("SELECT status FROM studies WHERE study_uid=?", (study_uid,)).fetchone()
            c.execute(
                "INSERT OR REPLACE INTO instances VALUES (?,?,?,?,?,?,?,?,?)",
                (sop_uid, study_uid, series_uid, sop_class_uid, transfer_syntax, path, size, now, calling_ae),
            )
            n = c.execute("SELECT COUNT(*) FROM instances WHERE study_uid=?", (study_uid,)).fetchone()[0]
            if row is None:
                c.execute(
                    "INSERT INTO studies (study_uid, folder, status, n_instances, first_received_s, received_s, "
                    "patient_name, patient_id, accession) VALUES (?,?,?,?,?,?,?,?,?)",
                    (study_uid, folder, "receiving", n, now, now, p["patient_name"], p["patient_id"], p["accession"]),
                )
            else:
                status = row["status"] if row["status"] == "running" else "receiving"
                c.execute(
                    "UPDATE studies SET status=?, n_instances=?, received_s=?, patient_name=COALESCE(patient_name, ?), "
                    "patient_id=COALESCE(patient_id, ?), accession=COALESCE(accession, ?) WHERE study_uid=?",
                    (status, n, now, p["patient_name"], p["patient_id"], p["accession"], study_uid),
                )
            c.execute(
                "INSERT INTO counters VALUES ('instances_received', 1) "
                "ON CONFLICT(name) DO UPDATE SET value = value + 1"
            )
        return row is None

    def bump(self, name: str, by: int = 1) -> None:
        """Add to a persistent counter (``instances_refused`` ...)."""
        with self.tx() as c:
            c.execute(
                "INSERT INTO counters VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = value + ?", (name, by, by)
            )

    def counter(self, name: str) -> int:
        rows = self.query("SELECT value FROM counters WHERE name=?", (name,))
        return int(rows[0]["value"]) if rows else 0

    def studies_started_since(self, t: float) -> int:
        return int(self.query("SELECT COUNT(*) AS n FROM studies WHERE first_received_s >= ?", (t,))[0]["n"])

    # ------------------------------------------------------------------------------------------------ the queue
    def queue_quiet(self, quiet_seconds: float, now: float | None = None) -> list[str]:
        """Queue every ``receiving`` study whose last instance is older than ``quiet_seconds``; returns their UIDs."""
        now = time.time() if now is None else now
        with self.tx() as c:
            uids = [
                r[0]
                for r in c.execute(
                    "SELECT study_uid FROM studies WHERE status='receiving' AND received_s <= ?", (now - quiet_seconds,)
                ).fetchall()
            ]
            for uid in uids:
                c.execute("UPDATE studies SET status='queued', queued_s=? WHERE study_uid=?", (now, uid))
        return uids

    def claim(self) -> dict[str, Any] | None:
        """Move the oldest queued study to ``running`` and return its row (None when the queue is empty)."""
        now = time.time()
        with self.tx() as c:
            row = c.execute(
                "SELECT * FROM studies WHERE status='queued' ORDER BY queued_s, received_s LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            c.execute(
                "UPDATE studies SET status='running', started_s=?, runs=runs+1, error=NULL WHERE study_uid=?",
                (now, row["study_uid"]),
            )
            return {**dict(row), "status": "running", "started_s": now}

    def requeue_running(self) -> list[str]:
        """``running`` → ``queued`` (at start after a kill, and for work a shutdown did not finish)."""
        with self.tx() as c:
            uids = [r[0] for r in c.execute("SELECT study_uid FROM studies WHERE status='running'").fetchall()]
            c.execute("UPDATE studies SET status='queued', queued_s=? WHERE status='running'", (time.time(),))
        return uids

    def finish(
        self,
        study_uid: str,
        *,
        started_s: float,
        result: dict[str, Any] | None,
        error: str | None,
        destinations: list[str],
    ) -> str:
        """Store the outcome of a run; returns the new status.

        ``done`` with a result (its deliveries reset to pending, one a destination), ``failed`` with an error;
        ``receiving`` again when an instance arrived while it ran (it is predicted again once quiet). A study that
        is no longer ``running`` (re-queued by a shutdown meanwhile) keeps its status and the result is dropped.
        """
        now = time.time()
        with self.tx() as c:
            row = c.execute("SELECT status, received_s FROM studies WHERE study_uid=?", (study_uid,)).fetchone()
            if row is None or row["status"] != "running":
                # Re-queued meanwhile (a shutdown's grace period ended): the queued run will answer, not this one.
                return "stale" if row is None else str(row["status"])
            if row is not None and row["received_s"] is not None and row["received_s"] > started_s:
                c.execute("UPDATE studies SET status='receiving' WHERE study_uid=?", (study_uid,))
                return "receiving"
            if error is not None or result is None:
                c.execute(
                    "UPDATE studies SET status='failed', error=?, done_s=?, predict_s=? WHERE study_uid=?",
                    (error or "no result", now, now - started_s, study_uid),
                )
                return "failed"
            c.execute("DELETE FROM deliveries WHERE study_uid=?", (study_uid,))
            for d in destinations:
                c.execute("INSERT INTO deliveries VALUES (?, ?, 'pending', 0, NULL, NULL)", (study_uid, d))
            c.execute(  # a new result: the review of the previous one no longer applies
                "UPDATE studies SET status='done', error=NULL, done_s=?, predict_s=?, p_any=?, flag=?, result=?, "
                "answered_s=?, next_send_s=?, review=NULL, review_by=NULL, review_s=NULL WHERE study_uid=?",
                (
                    now,
                    now - started_s,
                    result.get("p_any"),
                    None if result.get("flag") is None else int(bool(result["flag"])),
                    json.dumps(result),
                    None if destinations else now,  # nothing to deliver: answered when written
                    now,
                    study_uid,
                ),
            )
            return "done"

    # ------------------------------------------------------------------------------------------------ sending
    def due_for_sending(self, now: float | None = None) -> list[dict[str, Any]]:
        """``done`` studies with pending deliveries whose next attempt is due."""
        now = time.time() if now is None else now
        return self.query(
            "SELECT * FROM studies WHERE status='done' AND next_send_s IS NOT NULL AND next_send_s <= ? "
            "AND EXISTS (SELECT 1 FROM deliveries d WHERE d.study_uid=studies.study_uid AND d.status='pending') "
            "ORDER BY next_send_s",
            (now,),
        )

    def deliveries(self, study_uid: str) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM deliveries WHERE study_uid=? ORDER BY destination", (study_uid,))

    def delivered(self, study_uid: str, destination: str) -> str:
        """One destination has the results; returns the study's status (``sent`` when it was the last)."""
        now = time.time()
        with self.tx() as c:
            c.execute(
                "UPDATE deliveries SET status='sent', attempts=attempts+1, sent_s=?, error=NULL "
                "WHERE study_uid=? AND destination=?",
                (now, study_uid, destination),
            )
            left = c.execute(
                "SELECT COUNT(*) FROM deliveries WHERE study_uid=? AND status!='sent'", (study_uid,)
            ).fetchone()[0]
            if left == 0:
                c.execute(
                    "UPDATE studies SET status='sent', answered_s=?, next_send_s=NULL WHERE study_uid=? "
                    "AND status='done'",
                    (now, study_uid),
                )
            return "sent" if left == 0 else "done"

    def delivery_failed(self, study_uid: str, destination: str, error: str, next_send_s: float | None) -> int:
        """Count a failed attempt; ``next_send_s`` None gives up (the study is ``failed``). Returns the attempts."""
        with self.tx() as c:
            c.execute(
                "UPDATE deliveries SET attempts=attempts+1, error=?, status=? WHERE study_uid=? AND destination=?",
                (error, "pending" if next_send_s is not None else "failed", study_uid, destination),
            )
            if next_send_s is None:
                c.execute(
                    "UPDATE studies SET status='failed', error=?, next_send_s=NULL WHERE study_uid=?",
                    (f"delivery to {destination} failed: {error}", study_uid),
                )
            else:
                c.execute("UPDATE studies SET next_send_s=? WHERE study_uid=?", (next_send_s, study_uid))
            return int(
                c.execute(
                    "SELECT attempts FROM deliveries WHERE study_uid=? AND destination=?", (study_uid, destination)
                ).fetchone()[0]
            )

    # ------------------------------------------------------------------------------------------------ reading
    def study(self, study_uid: str) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM studies WHERE study_uid=?", (study_uid,))
        return rows[0] if rows else None

    def studies(self) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM studies")

    def instances(self, study_uid: str) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM instances WHERE study_uid=? ORDER BY sop_uid", (study_uid,))

    def counts(self) -> dict[str, int]:
        """Studies per status (every status present, zeros included)."""
        rows = self.query("SELECT status, COUNT(*) AS n FROM studies GROUP BY status")
        return {s: 0 for s in STATUSES} | {r["status"]: int(r["n"]) for r in rows}

    def review(self, study_uid: str, review: str | None, by: str, now: float | None = None) -> bool:
        """Record that ``by`` acknowledged or dismissed the study's result (``review`` None: undo); False when the
        study is unknown."""
        if review is not None and review not in REVIEWS:
            raise ValueError(f"review {review!r}: one of {', '.join(REVIEWS)} or None")
        now = time.time() if now is None else now
        with self.tx() as c:
            cur = c.execute(
                "UPDATE studies SET review=?, review_by=?, review_s=? WHERE study_uid=?",
                (review, by if review else None, now if review else None, study_uid),
            )
            return cur.rowcount > 0

    def rerun(self, study_uid: str) -> str | None:
        """Queue a study again (not while it runs); returns its new status, None when unknown."""
        with self.tx() as c:
            row = c.execute("SELECT status FROM studies WHERE study_uid=?", (study_uid,)).fetchone()
            if row is None:
                return None
            if row["status"] == "running":
                return "running"
            c.execute(
                "UPDATE studies SET status='queued', queued_s=?, error=NULL, next_send_s=NULL WHERE study_uid=?",
                (time.time(), study_uid),
            )
            return "queued"
