"""ringflow status: a job's scans, failed and retrying files, workers and stranded queues."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from tasks.app import configure_for
from tasks.config import Config
from tasks.errors import BrokerError
from tasks.outputs import workspace
from tasks.states import JobState
from worker_launcher.embedded import job_broker
from worker_launcher.status import JobStatus, job_status, latest_job
from worker_launcher.watch import broker_down, raise_if_stopped

from .common import (
    _STYLES,
    EXIT_FAILED,
    err,
    exit_interrupted,
    load_config,
    say,
    user_errors,
)
from .run_cmd import ignore_further_interrupts, install_interrupt_handlers

WATCH_INTERVAL = 2.0
REOPEN_S = 90.0  # an ended run stops its workers, then its broker, within this


def status(
    config: Path = typer.Argument(..., metavar="CONFIG", help="Configuration file (INI)."),
    job: str = typer.Argument(
        None, metavar="[JOB]", help="Job id (default: the latest job of the deployment)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON line instead of tables."),
    watch: bool = typer.Option(False, "--watch", help="Refresh until the job ends (Ctrl-C stops)."),
) -> None:
    """Per scan: files done/failed/pending, frames/s; live workers, stranded queues, failures.

    Without a broker_url, the job's embedded broker is read from its workspace (started there
    for the time of the command when no ringflow process runs it). A GPU queue waiting for a
    worker is "starting" while the job is younger than [queue] worker_start_timeout, then
    "stranded". --watch refreshes every 2 s until every scan has an outcome: redrawn in place
    on a terminal, else (and with --json) only the final state is printed; when the watched
    `ringflow run` ends, taking its broker with it, the workspace's broker is opened again
    for the final state; watching stops after [queue] stall_timeout s without any change.
    Exit 0 when every scan is written or the job still runs, 1 when a file or scan failed,
    the run was interrupted or the watch gave up.

    Example: ringflow status my.ini --watch
    """
    cfg = load_config(config)
    install_interrupt_handlers()
    with user_errors():  # a location that matches nothing, say
        space = workspace(cfg)
    live = watch and not as_json and err.is_terminal
    try:
        with user_errors(), workspace_errors(space), display(live) as update:
            current, gave_up = follow(cfg, space, job, watch, update)
            update(current)
    except KeyboardInterrupt:
        ignore_further_interrupts()
        exit_interrupted()
    if not live:
        show(current, as_json)
    finish(current, gave_up, config)


def finish(current: JobStatus, gave_up: str, config: Path) -> None:
    """The hint and exit code of a job's state."""
    if gave_up:
        say("error", gave_up)
        raise typer.Exit(EXIT_FAILED)
    if current.state == JobState.INTERRUPTED:
        say("hint", f"finish it with: ringflow requeue {config} {current.job_id} --stranded")
    if current.state in (JobState.INCOMPLETE, JobState.INTERRUPTED):
        raise typer.Exit(EXIT_FAILED)


def follow(
    cfg: Config, space: str, job: str | None, watch: bool, update: Callable[[JobStatus], None]
) -> tuple[JobStatus, str]:
    """The job's state now, or with ``watch`` once it ended; and why the watch gave up ("").

    A run's embedded broker ends with the run: once it is gone, the workspace's broker is
    opened again (tried for REOPEN_S while the run stops) and read as without ``watch``.
    """
    reopen_by = None  # set once the watched broker went away
    while True:
        try:
            with job_broker(cfg.broker_url(), space) as broker:
                if broker.stopped:
                    say("stopped", f"left running by a killed run: {', '.join(broker.stopped)}")
                app = configure_for(broker.url, cfg.queue)
                job = job or latest_job(app.backend.client, cfg.queue.queue_prefix)
                following = watch and not broker.owner  # else no run can move the job on
                try:
                    current, gave_up = read(app, cfg, job, following, update)
                except (*broker_down(), ConnectionError):
                    reopen_by = reopen_by or time.monotonic() + REOPEN_S  # its run ended
                    if not (following and broker.embedded) or time.monotonic() > reopen_by:
                        raise
                    time.sleep(1.0)
                    continue
                if broker.owner and current.state == JobState.RUNNING:  # its run was killed
                    current.state = JobState.INTERRUPTED
                return current, gave_up
        except BrokerError:  # the ended run still stops its broker
            if reopen_by is None or time.monotonic() > reopen_by:
                raise
            time.sleep(1.0)
            raise_if_stopped()


def read(
    app, cfg: Config, job_id: str, watch: bool, update: Callable[[JobStatus], None]
) -> tuple[JobStatus, str]:
    """The job's state; with ``watch``, once it is no longer running, or after
    ``[queue] stall_timeout`` s without any change (then also a reason)."""
    queue = cfg.queue
    current = job_status(app, queue.queue_prefix, job_id, queue.worker_start_timeout)
    seen, since = _moves(current), time.monotonic()
    while watch and current.state == JobState.RUNNING:
        update(current)
        time.sleep(WATCH_INTERVAL)
        raise_if_stopped()
        current = job_status(app, queue.queue_prefix, job_id, queue.worker_start_timeout)
        if _moves(current) != seen:
            seen, since = _moves(current), time.monotonic()
        elif time.monotonic() - since > queue.stall_timeout:
            return current, (
                f"job {job_id}: no change for {queue.stall_timeout} s ([queue] stall_timeout); "
                "stopped watching, the job may still run"
            )
    return current, ""


def _moves(current: JobStatus) -> tuple:
    """What changes while a job moves on: counts, frames, scan states, workers, queues."""
    return (
        tuple(sorted(current.counts.items())),
        current.frames_done,
        tuple(s.state for s in current.scans),
        tuple(w["name"] for w in current.workers),
        tuple(sorted(current.queued.items())),
    )


@contextmanager
def display(live: bool) -> Iterator[Callable[[JobStatus], None]]:
    """``update(status)``: the job's tables redrawn in place on stderr when ``live``, else
    nothing (the final state is printed once, by :func:`show`)."""
    if not live:
        yield lambda current: None
        return
    with Live(console=err, auto_refresh=False, transient=False) as screen:
        yield lambda current: screen.update(Group(*render(current)), refresh=True)


@contextmanager
def workspace_errors(space: str) -> Iterator[None]:
    """The workspace cannot be written (its disk full, read-only, gone): one line, exit 1.

    Starting the job's broker there writes its records and the broker's files; what the
    workspace already holds is left as it is.
    """
    try:
        yield
    except OSError as exc:
        where = exc.filename or space
        reason = exc.strerror or str(exc).splitlines()[0]
        say("error", f"{where}: cannot write in the job's workspace: {reason}")
        raise typer.Exit(EXIT_FAILED) from None


def show(current: JobStatus, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(current.as_dict()))
        return
    for item in render(current):
        err.print(item)


def render(current: JobStatus) -> list:
    """The job's line, its scans' table, its workers and its queues' and files' troubles."""
    c = current.counts
    items: list = [
        line(
            "job",
            f"{current.job_id} {current.state}: {c['done']}/{c['files']} files done, "
            f"{c['failed']} failed, {c['retrying']} retrying, {c['pending']} pending; "
            f"{current.frames_done} frames, {current.frames_per_s} frames/s",
        )
    ]
    scans = Table("scan", "files", "done", "failed", "pending", "frames", "state", "output file")
    for s in sorted(current.scans, key=lambda s: s.scan):
        state = s.state + (f" ({s.message})" if s.message else "")
        scans.add_row(
            os.path.basename(s.scan), str(s.files), str(s.done), str(s.failed), str(s.pending),
            str(s.frames), state, os.path.basename(s.output),
        )  # fmt: skip
    items.append(scans)
    if current.workers:
        workers = Table("worker", "queues", "SLURM job")
        for w in current.workers:
            workers.add_row(w["name"], ", ".join(w["queues"]), str(w.get("slurm_job") or "-"))
        items.append(workers)
    else:
        items.append(line("workers", "none answering"))
    for queue in current.starting:
        waiting = f"{current.queued[queue]} file(s) waiting for a worker still starting"
        items.append(line("starting", f"{queue}: {waiting}"))
    for queue in current.stranded:
        items.append(
            line("stranded", f"{queue}: {current.queued[queue]} file(s) waiting, no live worker")
        )
    for r in current.retrying:
        items.append(
            line(
                "retrying", f"{r['message']} (attempt {r['attempts']}, next in {r['next_in_s']} s)"
            )
        )
    for f in current.failed:
        attempts = f"attempts {f.get('attempts', 1)}, {f.get('worker', '?')}"
        items.append(line("failed", f"{f['message']} ({attempts})"))
    return items


def line(kind: str, text: str) -> Text:
    """What :func:`cli.common.say` prints, as a renderable."""
    style = _STYLES.get(kind)
    label = f"[{style}]{kind}:[/]" if style else f"{kind}:"
    return Text.from_markup(f"{label} {escape(text)}")
