"""Prefect flows: partition, train, evaluate and the whole pipeline.

Importing this package sets quiet, offline-friendly Prefect defaults (the user's own environment
variables win): no telemetry, and per-client task runs log only warnings, so the per-round
progress lines stay readable.
"""

import os

for _key, _value in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL": "WARNING",
    # the temporary server starts in ~8 s on an idle 2-core machine, but can take 20+ s on a loaded one
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}.items():
    os.environ.setdefault(_key, _value)
