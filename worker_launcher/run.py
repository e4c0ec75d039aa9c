"""Run a job on this machine: broker (embedded unless configured), local workers, submit, watch.

Every wait is bounded: workers that die or a job that makes no progress for
``[queue] stall_timeout`` seconds end the run with an error, never a hang.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import redis

from tasks import registry
from tasks.app import configure
from tasks.config import Config, redact_url
from tasks.errors import BrokerError, WorkerError
from tasks.jobs import JobPlan, submit

from .local import LocalWorkers, start_local_workers
from .redis_server import start_embedded_redis

POLL_S = 0.25


@dataclass
class JobSummary:
    job_id: str
    files_total: int
    files_done: int = 0
    files_failed: list[dict] = field(default_factory=list)
    frames: int = 0
    outputs: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.files_failed

    def as_dict(self) -> dict:
        return {
            "job_id": self.job_id,
            "files_total": self.files_total,
            "files_done": self.files_done,
            "files_failed": self.files_failed,
            "frames": self.frames,
            "outputs": self.outputs,
            "skipped": self.skipped,
            "seconds": round(self.seconds, 3),
        }


@contextmanager
def local_services(config: Config, workspace: str) -> Iterator[tuple[object, LocalWorkers]]:
    """The Celery app on a reachable broker, and local workers; all stopped on exit."""
    server = None
    url = config.queue.broker_url
    if not url:
        server = start_embedded_redis(os.path.join(workspace, "broker"))
        url = server.url
    workers = None
    try:
        check_broker(url)
        app = configure(url, config.queue.task_time_limit)
        workers = start_local_workers(config, url, os.path.join(workspace, "logs"))
        yield app, workers
    finally:
        with _uninterruptible():  # a second Ctrl-C must not leave orphans behind
            if workers is not None:
                workers.stop()
            if server is not None:
                server.stop()


@contextmanager
def _uninterruptible():
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: nothing to protect
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def check_broker(url: str, timeout: float = 10.0) -> None:
    """Fail within ``timeout`` seconds on a wrong password or an unreachable broker."""
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        client.ping()
    except redis.AuthenticationError:
        raise BrokerError(f"broker {redact_url(url)}: authentication failed (password)") from None
    except redis.RedisError as exc:
        raise BrokerError(f"broker {redact_url(url)} unreachable: {exc}") from None


def run_plan(
    config: Config, plan: JobPlan, on_progress: Callable[[registry.Progress, float], None]
) -> JobSummary:
    """Integrate every scan of ``plan`` on local workers and wait for the outputs."""
    start = time.monotonic()
    summary = JobSummary(
        plan.job_id, len(plan.file_tasks) + len(plan.problems), skipped=list(plan.skipped)
    )
    summary.files_failed += [
        {"file": getattr(p, "path", ""), "message": str(p)} for p in plan.problems
    ]
    if plan.scans:
        with local_services(config, plan.workspace) as (app, workers):
            results = submit(app, plan)
            outcomes = _watch(app, plan, results, workers, on_progress)
            _summarise(summary, app, plan, outcomes)
    summary.seconds = time.monotonic() - start
    return summary


def _watch(app, plan: JobPlan, results: dict, workers: LocalWorkers, on_progress) -> dict:
    client, prefix = app.backend.client, plan.config.queue.queue_prefix
    stall = plan.config.queue.stall_timeout
    start = last_change = time.monotonic()
    last_state, outcomes = None, {}
    pending = dict(results)
    while pending:
        for key, task_id in list(pending.items()):
            meta = app.backend.get_task_meta(task_id)
            if meta["status"] in ("SUCCESS", "FAILURE", "REVOKED"):
                outcomes[key] = meta["result"]
                del pending[key]
        progress = registry.read_progress(client, prefix, plan.job_id)
        now = time.monotonic()
        on_progress(progress, now - start)
        state = (progress.frames_done, progress.files_done, progress.files_failed, len(pending))
        if state != last_state:
            last_state, last_change = state, now
        for worker in workers.dead():
            raise WorkerError(
                f"worker {worker.name} exited (log {worker.log}): {worker.log_tail(3)}"
            )
        if pending and now - last_change > stall:
            raise WorkerError(
                f"no progress for {stall} s ([queue] stall_timeout); "
                f"worker logs in {os.path.dirname(workers.workers[0].log)}"
            )
        if pending:
            time.sleep(POLL_S)
    return outcomes


def _summarise(summary: JobSummary, app, plan: JobPlan, outcomes: dict) -> None:
    progress = registry.read_progress(
        app.backend.client, plan.config.queue.queue_prefix, plan.job_id
    )
    summary.files_done = progress.files_done
    summary.frames = progress.frames_done
    summary.files_failed += [
        {"file": f["file"], "message": f["message"]} for f in progress.failures.values()
    ]
    for scan, _ in plan.scans:
        outcome = outcomes.get(scan.scan_key)
        if isinstance(outcome, dict) and outcome.get("status") == "done":
            summary.outputs.append(outcome["output"])
        elif isinstance(outcome, dict) and outcome.get("status") == "failed":
            summary.files_failed.append({"file": scan.output, "message": outcome["message"]})
        elif not isinstance(outcome, dict):
            summary.files_failed.append({"file": scan.output, "message": f"assembly: {outcome}"})
