"""The Celery application and its configuration; task modules import ``app`` from here.

The broker (also the result backend) comes from $RINGFLOW_BROKER_URL in workers, or from
:func:`configure` in the client. Policy, and the risk each setting guards against:
- JSON only: a pickle payload from anyone who can write to Redis would run code.
- acks_late + reject_on_worker_lost: a file whose worker dies is redelivered, not lost.
- prefetch 1: a long file task never sits reserved behind another on a busy process.
- visibility_timeout > task_time_limit: Redis would otherwise redeliver a running task.
"""

from __future__ import annotations

import os

from celery import Celery

BROKER_ENV = "RINGFLOW_BROKER_URL"
BROKER_FILE_ENV = "RINGFLOW_BROKER_URL_FILE"  # SLURM jobs: the URL's only home is a 0600 file
TIME_LIMIT_ENV = "RINGFLOW_TASK_TIME_LIMIT"
DEFAULT_TIME_LIMIT = 7200

app = Celery("ringflow", include=["tasks.integrate", "tasks.assemble", "tasks.node"])


def _settings(broker_url: str | None, time_limit: int) -> dict:
    transport = {"visibility_timeout": 2 * time_limit + 600, "socket_connect_timeout": 10}
    return dict(
        broker_url=broker_url,
        result_backend=broker_url,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_time_limit=time_limit,
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        redis_socket_connect_timeout=10,
        redis_socket_timeout=30,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=10,
        result_expires=7 * 24 * 3600,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        task_track_started=True,
        task_send_sent_event=False,  # one more publish per task; workers report "received"
        worker_send_task_events=True,
        worker_proc_alive_timeout=60,
    )


def configure(broker_url: str, time_limit: int = DEFAULT_TIME_LIMIT) -> Celery:
    """Point the client-side app at ``broker_url``."""
    app.conf.update(_settings(broker_url, time_limit))
    return app


def broker_from_env() -> str | None:
    """The worker's broker URL: from $RINGFLOW_BROKER_URL, or the file $RINGFLOW_BROKER_URL_FILE."""
    path = os.environ.get(BROKER_FILE_ENV)
    if path:
        with open(path, encoding="utf-8") as fh:
            return fh.read().strip()
    return os.environ.get(BROKER_ENV) or None


app.conf.update(
    _settings(
        broker_from_env(),
        int(os.environ.get(TIME_LIMIT_ENV, DEFAULT_TIME_LIMIT)),
    )
)
