"""Following a submitted job until each scan's callback has an outcome, then summarising it.

Every wait is bounded: the supervisor's ``check()`` raises when the workers are gone, and a
job that makes no progress for ``[queue] stall_timeout`` seconds ends with an error.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

from tasks import registry
from tasks.errors import BrokerError, WorkerError
from tasks.jobs import JobPlan

from .recovery import LostCallbacks

POLL_S = 0.25
BROKER_OUTAGE_S = 60.0  # a broker restart shorter than this does not end the watch
STOP = threading.Event()  # set by the CLI's signal handler: a KeyboardInterrupt that Python
# swallowed (raised inside a __del__) is raised again by the next poll


def raise_if_stopped() -> None:
    if STOP.is_set():
        raise KeyboardInterrupt


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


@contextmanager
def interrupts_deferred():
    """Ctrl-C or SIGTERM during the block raise KeyboardInterrupt at its end, not inside it.

    For starting processes: an interrupt between a start and its bookkeeping would leave a
    process nobody stops.
    """
    caught: list[int] = []
    try:
        previous = {
            sig: signal.signal(sig, lambda signum, frame: caught.append(signum))
            for sig in (signal.SIGINT, signal.SIGTERM)
        }
    except ValueError:  # not the main thread: nothing to protect
        previous = {}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if caught:
        STOP.set()
        raise KeyboardInterrupt


class Supervisor(Protocol):
    def check(self) -> None:
        """Raise WorkerError when the job cannot finish (workers dead); may fix queues."""

    # optional: broker_lost() -> None, called while the broker does not answer; may start
    # it again (the embedded one), or raise BrokerError when it cannot


@dataclass
class JobSummary:
    job_id: str
    files_total: int
    files_done: int = 0
    files_failed: list[dict] = field(default_factory=list)
    files_retried: dict[str, int] = field(default_factory=dict)  # file -> attempts it took
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
            "files_retried": self.files_retried,
            "frames": self.frames,
            "outputs": self.outputs,
            "skipped": self.skipped,
            "seconds": round(self.seconds, 3),
        }


def new_summary(plan: JobPlan) -> JobSummary:
    """A summary that already lists the plan's problems (files that could not be planned)."""
    summary = JobSummary(
        plan.job_id, len(plan.file_tasks) + len(plan.problems), skipped=list(plan.skipped)
    )
    summary.files_failed += [
        {"file": getattr(p, "path", ""), "message": str(p)} for p in plan.problems
    ]
    return summary


def watch(
    app,
    plan: JobPlan,
    callbacks: dict[str, str],
    supervisor: Supervisor,
    on_progress: Callable[[registry.Progress, float], None],
    log_hint: str = "",
    on_event: Callable[[str], None] | None = None,
) -> dict:
    """Wait for every scan callback; returns scan key -> callback result.

    A callback Celery lost (its chord one count short) is sent again
    (:class:`worker_launcher.recovery.LostCallbacks`); ``on_event`` tells the user.
    """
    stall = plan.config.queue.stall_timeout
    lost = LostCallbacks(app, plan.config.queue.queue_prefix, plan.job_id, on_event)
    start = last_change = time.monotonic()
    last_state, outcomes = None, {}
    pending = dict(callbacks)
    outage_since = None
    while pending:
        try:
            progress = _poll(app, plan, pending, outcomes)
            if pending:
                supervisor.check()
                lost.look(pending)
        except broker_down() as exc:  # a broker restart: workers reconnect, so do we
            outage_since = outage_since or time.monotonic()
            lost.restart_clocks()  # counts delayed by the outage land once it is over
            restart = getattr(supervisor, "broker_lost", None)
            if restart is not None:
                restart()
            if time.monotonic() - outage_since > BROKER_OUTAGE_S:
                lost = f"broker unreachable for {BROKER_OUTAGE_S:.0f} s: {exc}"
                raise BrokerError(lost) from None
            raise_if_stopped()
            time.sleep(1.0)
            continue
        outage_since = None
        now = time.monotonic()
        on_progress(progress, now - start)
        state = (progress.frames_done, progress.files_done, progress.files_failed, len(pending))
        if state != last_state:
            last_state, last_change = state, now
        raise_if_stopped()
        if pending and now - last_change > stall:
            raise WorkerError(f"no progress for {stall} s ([queue] stall_timeout); {log_hint}")
        if pending:
            time.sleep(POLL_S)
    return outcomes


def done_frames(done: dict[str, dict]) -> int:
    """Frames of the files done, each counted once however many attempts it took."""
    return sum(int(info.get("frames", 0)) for info in done.values())


def _poll(app, plan: JobPlan, pending: dict, outcomes: dict) -> registry.Progress:
    """Move scans whose callback ended from ``pending`` to ``outcomes`` (each its
    :func:`tasks.states.parse_outcome`); the job's counters."""
    from tasks.states import parse_outcome

    for key, task_id in list(pending.items()):
        outcome = parse_outcome(app.backend.get_task_meta(task_id))
        if outcome is not None:
            outcomes[key] = outcome
            del pending[key]
    return registry.read_progress(app.backend.client, plan.config.queue.queue_prefix, plan.job_id)


def broker_down() -> tuple[type[BaseException], ...]:
    """Errors meaning the broker cannot be reached right now (it may come back)."""
    import kombu.exceptions
    import redis

    return (redis.ConnectionError, redis.TimeoutError, kombu.exceptions.OperationalError)


def summarise(summary: JobSummary, app, plan: JobPlan, outcomes: dict) -> None:
    from tasks.states import Outcome

    client, prefix = app.backend.client, plan.config.queue.queue_prefix
    progress = registry.read_progress(client, prefix, plan.job_id)
    summary.files_failed += [
        {"file": f["file"], "message": f["message"], "attempts": f.get("attempts", 1)}
        for f in progress.failures.values()
    ]
    done = registry.read_done(client, prefix, plan.job_id)
    summary.files_done = len(done)  # exact: the live counters also count redone work
    summary.frames = done_frames(done)
    summary.files_retried = {
        info["file"]: info["attempts"] for info in done.values() if info.get("attempts", 1) > 1
    }
    for scan, _ in plan.scans:  # an incomplete scan's files are among the failures already
        outcome = outcomes.get(scan.scan_key) or {"status": Outcome.FAILED, "message": "no outcome"}
        if outcome["status"] == Outcome.DONE:
            summary.outputs.append(outcome["output"])
        elif outcome["status"] == Outcome.FAILED:
            summary.files_failed.append({"file": scan.output, "message": outcome["message"]})
