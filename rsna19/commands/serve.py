"""``rsna19 serve --bundle B --spool DIR``: a DICOM node that predicts every CT study it receives."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``serve`` subcommand."""
    p = subparsers.add_parser(
        "serve",
        help="DICOM node: receive CT studies (C-STORE), predict them with a bundle, send SR + SC back; worklist",
        description=(
            "A DICOM Storage SCP for CT Image Storage and Enhanced CT (lossless transfer syntaxes) and Verification. "
            "Every instance is written to SPOOL/incoming/ and recorded in SPOOL/serve.db before it is acknowledged. "
            "A study with no new instance for --quiet-seconds is queued; workers (each with the bundle loaded once) "
            "predict it like predict-study and send the DICOM SR and Secondary Capture to every --destination with "
            "retries (then SPOOL/dead_letter/). HTTP: worklist page /, /api/studies, /health, /metrics, "
            "POST /api/studies/<uid>/rerun. Port 0 picks a free port; the ports are written to SPOOL/ports.json. "
            "SIGTERM: graceful shutdown (exit 0). Flags override the keys of --config (same names, snake_case). "
            "See docs/serve.md."
        ),
    )
    p.add_argument("--bundle", help="bundle folder written by `rsna19 bundle`")
    p.add_argument("--spool", help="spool folder: incoming instances, results, dead letters, serve.db, ports.json")
    p.add_argument("--config", help="YAML file with any of the settings below (snake_case keys); flags override it")
    p.add_argument("--port", type=int, help="DICOM port (11112; 0: a free one)")
    p.add_argument("--ae-title", help="AE title of the SCP (RSNA19)")
    p.add_argument("--host", help="interface of the DICOM port (127.0.0.1)")
    p.add_argument("--http-port", type=int, help="HTTP port (8080; 0: a free one)")
    p.add_argument("--http-host", help="interface of the HTTP port (127.0.0.1; anything else needs --token)")
    p.add_argument("--token", help="bearer token every HTTP request must carry (Authorization: Bearer or ?token=)")
    p.add_argument(
        "--destination",
        dest="destinations",
        action="append",
        metavar="AET@HOST:PORT",
        help="where the SR and SC go (repeatable); none: results stay in the spool (status done)",
    )
    p.add_argument("--quiet-seconds", type=float, help="a study is complete after this long without instances (10)")
    p.add_argument("--workers", type=int, help="prediction workers, each with its own bundle in memory (1)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), help="where the models run (auto)")
    p.add_argument("--max-instance-mb", type=float, help="refuse larger instances with 0xA700 (64)")
    p.add_argument("--max-studies-per-minute", type=int, help="refuse new studies beyond this rate (0: no limit)")
    p.add_argument("--min-free-disk-mb", type=float, help="refuse instances below this free space on the spool (500)")
    p.add_argument("--send-retries", type=int, help="C-STORE attempts per destination before dead letter (5)")
    p.add_argument("--retry-backoff-s", type=float, help="first wait between attempts, doubled each time (2)")
    p.add_argument("--shutdown-grace-s", type=float, help="on SIGTERM, how long running studies may finish (60)")
    p.add_argument("--no-cam", dest="cam", action="store_const", const=False, help="no Grad-CAM on the report")
    p.add_argument(
        "--allowed-aet",
        dest="allowed_aets",
        action="append",
        metavar="TITLE[@ADDRESS]",
        help="a calling AE title that may store, optionally only from ADDRESS (IP, CIDR or host name); repeatable; "
        "none: anyone who reaches the port",
    )
    p.add_argument("--tls-cert", help="PEM certificate: the DICOM port and the sender use DICOM TLS")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument(
        "--tls-ca", help="PEM authorities: callers must present a certificate they signed; checks destinations"
    )
    p.add_argument("--http-tls-cert", help="PEM certificate: the HTTP port serves HTTPS only")
    p.add_argument("--http-tls-key", help="PEM private key of --http-tls-cert")
    p.add_argument(
        "--user-token",
        dest="tokens",
        action="append",
        metavar="NAME=SECRET",
        help="a named bearer token (one per user or system; the name is logged with what it views); repeatable",
    )
    p.add_argument("--viewer-url", help="PACS viewer URL template: {study_uid}, {accession}, {orthanc_id}")
    p.add_argument(
        "--worker-isolation", choices=("process", "thread"), help="workers as processes (default) or threads"
    )
    p.add_argument("--study-timeout-s", type=float, help="fail a study whose prediction runs longer (600; 0: none)")
    p.add_argument(
        "--silent", action="store_const", const=True, help="predict and record every study, send nothing (site trial)"
    )
    p.add_argument("--no-seg", dest="seg", action="store_const", const=False, help="no DICOM SEG bleed map")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM / SIGINT; 0 after a graceful shutdown."""
    from dataclasses import fields

    from rsna19.serve.app import serve_forever
    from rsna19.serve.config import ServeConfig, load_config
    from rsna19.serve.logs import setup_json_logging

    # Every flag but --config is a ServeConfig field of the same name (None: not given, the file or default wins).
    flags = {f.name: getattr(args, f.name) for f in fields(ServeConfig) if hasattr(args, f.name)}
    cfg = load_config(args.config, flags)
    setup_json_logging()
    return serve_forever(cfg)
