"""The Celery application and its configuration; task modules import ``app`` from here.

The broker (also the result backend) comes from $RINGFLOW_BROKER_URL in workers, or from
:func:`configure` in the client. Policy, and the risk each setting guards against:
- JSON only: a pickle payload from anyone who can write to Redis would run code.
- acks_late + reject_on_worker_lost: a file whose worker dies is redelivered, not lost.
- prefetch 1: a long file task never sits reserved behind another on a busy process.
- queues consumed in priority order: a GPU worker takes a scan's assembly (its fallback
  queue) only when its own queue is empty.
- visibility_timeout > task_time_limit: Redis would otherwise redeliver a running task.
- publishing retried for ~40 s: a broker restarting must not make a file task's retry fail.
- a worker's result-backend commands retried for ~40 s too (:func:`patient_backend`):
  Celery's chord bookkeeping (a Lua script per finished file) has no retry of its own, and a
  file finishing while the broker restarts would fail its scan's chord.
- results expire with the job's records (``[queue] job_ttl_days``): a callback result gone
  before the registry would make a written scan look unfinished. Workers get it from the
  job script ($RINGFLOW_RESULT_EXPIRES), the client from :func:`configure`.
- optional message signing (``[queue] security_*``, :class:`Signing`): on a shared broker,
  anyone with its password could otherwise enqueue any task with any arguments. Workers get
  the paths from the job script and set it up at import, before consuming; they sign too
  (the last file of a scan sends its assembly).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

from celery import Celery
from celery.signals import after_setup_logger, worker_init

BROKER_ENV = "RINGFLOW_BROKER_URL"
BROKER_FILE_ENV = "RINGFLOW_BROKER_URL_FILE"  # SLURM jobs: the URL's only home is a 0600 file
TIME_LIMIT_ENV = "RINGFLOW_TASK_TIME_LIMIT"
DEFAULT_TIME_LIMIT = 7200
RESULT_EXPIRES_ENV = "RINGFLOW_RESULT_EXPIRES"
DEFAULT_RESULT_EXPIRES = 7 * 24 * 3600  # [queue] job_ttl_days' default
SECURITY_ENV = {  # the job script's names for the worker's signing files
    "key": "RINGFLOW_SECURITY_KEY",
    "certificate": "RINGFLOW_SECURITY_CERTIFICATE",
    "cert_store": "RINGFLOW_SECURITY_CERT_STORE",
}

app = Celery("ringflow", include=["tasks.integrate", "tasks.assemble", "tasks.node"])


def _settings(broker_url: str | None, time_limit: int, result_expires: int) -> dict:
    transport = {
        "visibility_timeout": 2 * time_limit + 600,
        "socket_connect_timeout": 10,
    }
    # a worker's queues in its -Q order: a GPU worker's own before the assembly fallback
    consume = {"queue_order_strategy": "priority"}
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
        broker_transport_options=transport | consume,
        result_backend_transport_options=transport,
        redis_socket_connect_timeout=10,
        redis_socket_timeout=30,
        broker_connection_retry_on_startup=True,
        # a retry (or chord body) published while the broker restarts waits for it, ~40 s,
        # instead of kombu's default 0.6 s: a file would be rejected for a broker back in 3 s
        task_publish_retry_policy={
            "max_retries": 12,
            "interval_start": 0.2,
            "interval_step": 0.5,
            "interval_max": 5,
        },
        broker_connection_timeout=10,
        result_expires=result_expires,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        task_track_started=True,
        task_send_sent_event=False,  # one more publish per task; workers report "received"
        worker_send_task_events=True,
        worker_proc_alive_timeout=60,
    )


@dataclass(frozen=True)
class Signing:
    """Celery's ``auth`` serializer: this process signs with ``key`` (its ``certificate``)
    and accepts only task and control messages signed by a certificate of ``cert_store``."""

    key: str
    certificate: str
    cert_store: str

    @classmethod
    def of(cls, queue) -> Signing | None:
        """From a configuration's [queue] section; None when signing is off."""
        if not queue.security_key:
            return None
        return cls(queue.security_key, queue.security_certificate, queue.security_cert_store)

    @classmethod
    def from_env(cls) -> Signing | None:
        values = {name: os.environ.get(env, "") for name, env in SECURITY_ENV.items()}
        return cls(**values) if values["key"] else None

    def env(self) -> dict[str, str]:
        return {env: getattr(self, name) for name, env in SECURITY_ENV.items()}

    @staticmethod
    def env_names() -> tuple[str, ...]:
        return tuple(SECURITY_ENV.values())


def configure(
    broker_url: str,
    time_limit: int = DEFAULT_TIME_LIMIT,
    signing: Signing | None = None,
    result_expires: int = DEFAULT_RESULT_EXPIRES,
) -> Celery:
    """Point the client-side app at ``broker_url``; sign what it sends with ``signing``;
    what it stores in the result backend expires after ``result_expires`` seconds (the
    job's ``[queue] job_ttl_s``).

    Connections made for another URL are dropped: a process that starts the embedded broker
    twice (a failed start, then another) gets a new socket password the second time. The
    result backend is built again when the expiry changes: it reads it once, when built.
    """
    if app.conf.broker_url != broker_url:
        forget_connections()
    elif app.conf.result_expires != result_expires:
        app._local.__dict__.pop("backend", None)
    app.conf.update(_settings(broker_url, time_limit, result_expires))
    sign_messages(signing)
    return app


def configure_for(broker_url: str, queue) -> Celery:
    """:func:`configure` as a configuration's ``[queue]`` section says: its task time limit,
    its signing files and its job TTL (the one way the client configures the app)."""
    return configure(broker_url, queue.task_time_limit, Signing.of(queue), queue.job_ttl_s)


def forget_connections() -> None:
    """Drop the app's cached result backend and broker connection pools, the producers'
    included: control messages (``inspect``) go through them, and ``app.close()`` keeps them."""
    from kombu import pools

    app._local.__dict__.pop("backend", None)
    amqp = app.__dict__.get("amqp")
    if amqp is not None:
        amqp._producer_pool = None
    with contextlib.suppress(Exception):  # connections to a server that is gone
        # kombu's registry of producer and connection pools, keyed by URL: closing one
        # and leaving it there would hand a closed pool to the next user of that URL
        pools.reset()
    app.close()  # the connection pool


def sign_messages(signing: Signing | None) -> None:
    """Sign every task and control message, and refuse unsigned ones; results and events
    stay JSON (the result backend is not protected by this). Nothing when ``signing`` is None.
    """
    # the task sender and the control mailbox keep the serializer they were built with
    if "amqp" in app.__dict__:
        app.amqp.__dict__.pop("send_task_message", None)
    app.__dict__.pop("control", None)
    if signing is None:
        return
    app.conf.update(
        task_serializer="auth",
        accept_content=["auth"],
        security_key=signing.key,
        security_certificate=signing.certificate,
        security_cert_store=signing.cert_store,
    )
    from celery.exceptions import SecurityError

    try:
        app.setup_security(allowed_serializers=["json"])
    except (SecurityError, ValueError, OSError) as exc:  # not PEM, expired, mismatched...
        from .errors import ConfigError

        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(
            "queue", "security_cert_store", signing.cert_store, f"cannot sign with it: {reason}"
        ) from None


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
        int(os.environ.get(RESULT_EXPIRES_ENV, DEFAULT_RESULT_EXPIRES)),
    )
)
sign_messages(Signing.from_env())


@worker_init.connect
def patient_backend(**_) -> None:
    """Workers only (before the pool forks): the result backend's Redis connections retry a
    lost connection with backoff for ~40 s, as publishing does. Not in the client, whose
    watch notices a lost broker itself and may restart it."""
    import redis
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    retry = Retry(ExponentialBackoff(cap=5.0, base=0.2), 12)
    app.backend.connparams.update(
        retry=retry, retry_on_error=[redis.ConnectionError, redis.TimeoutError]
    )


# Loggers quieted below DEBUG: pyFAI and silx repeat INFO lines for every engine they build
# ("No sensor configuration provided", "Unable to parse ... as JSON file").
QUIET_BELOW_DEBUG = ("pyFAI", "silx")


@after_setup_logger.connect
def quiet_worker_log(loglevel=None, **_) -> None:
    """Workers' logs without pyFAI's INFO noise, unless verbosity 3 (DEBUG) asks for it."""
    import logging

    level = logging.getLevelName(loglevel) if isinstance(loglevel, str) else loglevel
    if level is None or level > logging.DEBUG:
        for name in QUIET_BELOW_DEBUG:
            logging.getLogger(name).setLevel(logging.WARNING)
