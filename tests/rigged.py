"""A prediction rigged for the worker-process test: it hangs on one study and kills its own process on another.

``rigged_predict`` has the signature of :func:`rsna19.serve.worker.predict_one` and is what the node's workers run
(``ServeApp(cfg, predict=rigged_predict)``; a module-level function, so it reaches the spawned worker process). A
study whose UID ends in :data:`HANG` sleeps for an hour; one ending in :data:`CRASH` SIGKILLs the process that runs
it (as a segfault or the OOM killer would); any other study is predicted by the real bundle.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from rsna19.serve.worker import predict_one

HANG = ".666"
CRASH = ".999"


def rigged_predict(predictor: Any, spool: Any, row: dict[str, Any]) -> dict[str, Any]:
    uid = str(row["study_uid"])
    if uid.endswith(HANG):
        time.sleep(3600)
    if uid.endswith(CRASH):
        os.kill(os.getpid(), signal.SIGKILL)
    return predict_one(predictor, spool, row)
