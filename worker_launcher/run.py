"""Run a job on this machine: broker (embedded unless configured), local workers, submit, watch.

The embedded broker keeps its data in the job's workspace (:mod:`.embedded`), so a finished
or killed run can be followed with ``status`` and completed with ``requeue``, which starts
the broker and local workers there again.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from tasks import registry
from tasks.app import configure_for
from tasks.config import Config
from tasks.errors import BrokerError, RingflowError
from tasks.jobs import JobPlan, remove_run_leftovers, submit
from tasks.outputs import workspace

from .distributed import scan_outcomes, wait_for_workers
from .embedded import WorkspaceBroker, job_broker
from .local import LocalWorkers, start_local_workers
from .recovery import restore_orphans
from .requeue import RequeueResult, Selection, remove_job_leftovers, requeue
from .status import JobStatus, job_status
from .supervise import LocalSupervisor
from .watch import (
    JobSummary,
    interrupts_deferred,
    new_summary,
    summarise,
    uninterruptible,
    watch,
)


@dataclass
class LocalServices:
    app: object
    broker: WorkspaceBroker
    workers: LocalWorkers
    handed_back: list[str]  # in-flight files a killed run left, handed back before start
    space: str = ""
    submitted: bool = False  # a job was sent to these workers: their workspace is kept


@contextmanager
def local_services(config: Config, space: str) -> Iterator[LocalServices]:
    """The Celery app on the job's broker, and local workers; all stopped on exit.

    Owning the embedded broker means no worker of it is alive: files a killed run's workers
    had taken are handed back before the new workers start.
    """
    stack = contextlib.ExitStack()
    try:
        with interrupts_deferred():
            broker = stack.enter_context(job_broker(config.broker_url(), space))
        if broker.embedded and not broker.owner:
            raise BrokerError(
                f"{broker.folder}: the job broker of this workspace is in use by ringflow "
                f"process {broker.owner_pid}; wait for it to end (ringflow status shows it)"
            )
        app = configure_for(broker.url, config.queue)
        prefix = config.queue.queue_prefix
        handed_back = restore_orphans(app, prefix, no_worker_alive=True) if broker.owner else []
        logs = os.path.join(space, "logs")
        with interrupts_deferred():
            workers = start_local_workers(config, broker.url_file, logs, on_start=broker.record)
            stack.callback(workers.stop)
        yield LocalServices(app, broker, workers, handed_back, space)
    finally:
        with uninterruptible():  # a second Ctrl-C must not leave orphans behind
            stack.close()


@contextmanager
def services_ahead(config: Config) -> Iterator[LocalServices | None]:
    """Broker and workers started before the job is planned: they boot, and the integration
    processes build their engines, while the client discovers the scans.

    Yields None when they cannot start yet (planning then reports the problem, as it would
    have, and :func:`run_plan` starts them itself). If no job reaches them (a planning
    error, nothing to do), the folders created here are removed: a mistake leaves no trace.
    """
    try:
        space = workspace(config)
    except RingflowError:
        yield None
        return
    created = _first_missing(space)
    services, broker_failed = None, False
    try:
        try:
            with local_services(config, space) as services:
                yield services
        except (RingflowError, OSError) as exc:
            if services is not None:
                raise  # a failure after the start belongs to the job
            broker_failed = isinstance(exc, BrokerError)  # its log is for the user to read
            yield None  # the start failed: plan first, as without this
    finally:
        unused = services is None or not services.submitted
        if created and unused and not broker_failed:
            shutil.rmtree(created, ignore_errors=True)


def _first_missing(path: str) -> str:
    """The outermost folder of ``path`` that does not exist yet ("" if it exists)."""
    missing = ""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        missing, path = path, os.path.dirname(path)
    return missing


def run_plan(
    config: Config,
    plan: JobPlan,
    on_progress: Callable[[registry.Progress, float], None],
    services: LocalServices | None = None,
    on_event: Callable[[str], None] = print,
) -> JobSummary:
    """Integrate every scan of ``plan`` on local workers and wait for the outputs; on
    ``services`` if started ahead for this workspace, else on workers started here.

    ``on_event`` is told, in one line, of each worker or broker restarted on the way."""
    start = time.monotonic()
    summary = new_summary(plan)
    if plan.scans:
        ahead = services is not None and services.space == plan.workspace
        with (
            contextlib.nullcontext(services)
            if ahead
            else local_services(config, plan.workspace) as services
        ):
            services.submitted = True
            callbacks = submit(services.app, plan)
            hint = f"worker logs in {os.path.join(plan.workspace, 'logs')}"
            supervisor = supervise(services, config, plan.job_id, on_event)
            outcomes = watch(services.app, plan, callbacks, supervisor, on_progress, hint, on_event)
            summarise(summary, services.app, plan, outcomes)
            stop_idle_workers(services, config.queue.queue_prefix)
            removed = remove_run_leftovers(plan)
            if removed:
                on_event(f"{len(removed)} temporary file(s) of killed processes removed")
    summary.seconds = time.monotonic() - start
    return summary


def supervise(
    services: LocalServices, config: Config, job_id: str, on_event: Callable[[str], None]
) -> LocalSupervisor:
    """The supervisor of ``services`` for ``job_id``; once it gives up, the user is told how
    to finish the job."""
    give_up = f"finish the job with: ringflow requeue {config.source} {job_id} --stranded"
    return LocalSupervisor(
        services.app,
        config.queue.queue_prefix,
        services.workers,
        services.broker,
        on_event,
        give_up,
    )


def stop_idle_workers(services: LocalServices, prefix: str) -> bool:
    """Every scan has its outcome: the workers go at once if nothing else can reach them.

    Only on the embedded broker this process owns: another client of a shared broker could
    enqueue between the check and the kill. Elsewhere the warm shutdown on exit stops them.
    """
    if not (services.broker.embedded and services.broker.owner):
        return False
    return services.workers.stop_if_idle(services.app.backend.client, prefix)


def requeue_here(
    config: Config,
    job_id: str,
    selection: Selection,
    on_progress: Callable[[registry.Progress, float], None],
    on_event: Callable[[str], None] = print,
) -> tuple[RequeueResult, JobStatus]:
    """``requeue`` on this machine's workers, followed until every scan has an outcome.

    Scans left unassembled by a killed run are followed too: their waiting files run again
    on the new workers, and what the killed workers had taken was handed back at start.
    """
    space = workspace(config)
    with local_services(config, space) as services:
        app, prefix = services.app, config.queue.queue_prefix
        if not registry.read_manifest(app.backend.client, prefix, job_id):
            raise RingflowError(f"job {job_id}: unknown in {space}, or its records expired")
        nodes = wait_for_workers(app, config, None, config.queue.worker_start_timeout)
        owner = services.broker.owner
        result = requeue(app, config, job_id, selection, nodes, slots=[0], orphans_restored=owner)
        result.restored += services.handed_back
        result.stopped = services.broker.stopped
        callbacks = unfinished_scans(app, prefix, job_id)
        result.scans = sorted(set(result.scans) | set(callbacks))
        plan = JobPlan(job_id, config, space)
        hint = f"worker logs in {os.path.join(space, 'logs')}"
        supervisor = supervise(services, config, job_id, on_event)
        watch(app, plan, callbacks, supervisor, on_progress, hint, on_event)
        final = job_status(app, prefix, job_id)
        result.removed += remove_job_leftovers(app.backend.client, prefix, job_id)
        stop_idle_workers(services, prefix)  # as a run does: no warm shutdown of idle workers
        return result, final


def unfinished_scans(app, prefix: str, job_id: str) -> dict[str, str]:
    """scan key -> callback id of the job's scans that have no outcome yet."""
    scans = registry.read_scans(app.backend.client, prefix, job_id)
    outcomes = scan_outcomes(app, scans)
    return {key: entry["callback"] for key, entry in scans.items() if outcomes[key] is None}
