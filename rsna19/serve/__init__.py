"""``rsna19 serve``: a DICOM node for the reading room.

A Storage SCP (:mod:`rsna19.serve.scp`; only ``allowed_aets``, DICOM TLS with :mod:`rsna19.serve.tls`) writes
every incoming CT instance to a spool on disk (:mod:`rsna19.serve.spool`) and records it in SQLite
(:mod:`rsna19.serve.db`) before it acknowledges it; a study that has been quiet for ``quiet_seconds`` is queued,
predicted with a bundle loaded once per worker (:mod:`rsna19.serve.worker`; each worker a process,
:mod:`rsna19.serve.procs`, with a per-study time limit), and its DICOM SR and Secondary Capture are sent to the
destinations with retries and a dead-letter folder (:mod:`rsna19.serve.sender`). A worklist page, a JSON API and
Prometheus metrics are served over HTTP (:mod:`rsna19.serve.http`, :mod:`rsna19.serve.worklist_page`,
:mod:`rsna19.serve.metrics`; named tokens, HTTPS); :mod:`rsna19.serve.app` wires them together and shuts them down
gracefully. See docs/serve.md.
"""
