"""Run a job on this machine: broker (embedded unless configured), local workers, submit, watch."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tasks import registry
from tasks.app import configure
from tasks.config import Config
from tasks.jobs import JobPlan, submit

from .broker import check_broker, write_url_file
from .local import LocalWorkers, start_local_workers
from .redis_server import start_embedded_redis
from .watch import JobSummary, new_summary, summarise, watch


@contextmanager
def local_services(config: Config, workspace: str) -> Iterator[tuple[object, LocalWorkers]]:
    """The Celery app on a reachable broker, and local workers; all stopped on exit."""
    server = None
    url = config.broker_url()
    if not url:
        server = start_embedded_redis(os.path.join(workspace, "broker"))
        url = server.url
    workers = None
    try:
        check_broker(url)
        app = configure(url, config.queue.task_time_limit)
        url_file = write_url_file(os.path.join(workspace, "broker"), url)
        workers = start_local_workers(config, url_file, os.path.join(workspace, "logs"))
        yield app, workers
    finally:
        with uninterruptible():  # a second Ctrl-C must not leave orphans behind
            if workers is not None:
                workers.stop()
            if server is not None:
                server.stop()


@contextmanager
def uninterruptible():
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: nothing to protect
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def run_plan(
    config: Config, plan: JobPlan, on_progress: Callable[[registry.Progress, float], None]
) -> JobSummary:
    """Integrate every scan of ``plan`` on local workers and wait for the outputs."""
    start = time.monotonic()
    summary = new_summary(plan)
    if plan.scans:
        with local_services(config, plan.workspace) as (app, workers):
            callbacks = submit(app, plan)
            hint = f"worker logs in {os.path.join(plan.workspace, 'logs')}"
            outcomes = watch(app, plan, callbacks, workers, on_progress, hint)
            summarise(summary, app, plan, outcomes)
    summary.seconds = time.monotonic() - start
    return summary
