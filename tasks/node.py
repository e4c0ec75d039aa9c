"""This worker's identity in Redis while it lives: slot, queue, GPU grant and SLURM job.

``ringflow workers list`` joins it with SLURM's view, and tests use it to check that each
worker saw its own GPU. Liveness itself comes from Celery's ping, not from this record.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time

from celery.signals import worker_ready, worker_shutdown

from . import keys
from .app import app
from .gpu import gpu_environment

log = logging.getLogger(__name__)
PREFIX_ENV = "RINGFLOW_QUEUE_PREFIX"
ROLE_ENV = "RINGFLOW_ROLE"
SLOT_ENV = "RINGFLOW_SLOT"


def node_info() -> dict:
    """What this worker process is, from its environment."""
    slot = os.environ.get(SLOT_ENV, "")
    return {
        "role": os.environ.get(ROLE_ENV, ""),
        "slot": int(slot) if slot.isdigit() else None,
        "gpus": gpu_environment(),
        "slurm_job": os.environ.get("SLURM_JOB_ID", ""),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.time(),
    }


@worker_ready.connect
def _register(sender=None, **_) -> None:
    prefix = os.environ.get(PREFIX_ENV)
    if not prefix or sender is None:
        return
    info = node_info() | {
        "queues": sorted(q.name for q in sender.task_consumer.queues),
        "concurrency": getattr(sender.pool, "limit", None),  # the pool's processes
    }
    app.backend.client.hset(keys.workers(prefix), sender.hostname, json.dumps(info))
    log.info("ringflow worker %s ready: %s", sender.hostname, info)


@worker_shutdown.connect
def _unregister(sender=None, **_) -> None:
    prefix = os.environ.get(PREFIX_ENV)
    if not prefix or sender is None:
        return
    try:
        app.backend.client.hdel(keys.workers(prefix), sender.hostname)
    except Exception:  # the broker may be gone first; the record is advisory
        log.warning("could not unregister %s", sender.hostname)
