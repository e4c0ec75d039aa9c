"""ringflow requeue: send a job's failed or chosen files again; their scans get assembled."""

from __future__ import annotations

from pathlib import Path

import typer

from tasks.app import configure_for
from tasks.config import Config
from tasks.outputs import workspace
from tasks.states import JobState
from worker_launcher.broker import shared_broker_url
from worker_launcher.requeue import RequeueResult, Selection, requeue
from worker_launcher.run import requeue_here

from .common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    exit_interrupted,
    load_config,
    say,
    say_recovery,
    user_errors,
)
from .progress import frames_progress
from .run_cmd import ignore_further_interrupts, install_interrupt_handlers, say_local_notes
from .status_cmd import show, workspace_errors


def requeue_cmd(
    config: Path = typer.Argument(..., metavar="CONFIG", help="Configuration file (INI)."),
    job: str = typer.Argument(..., metavar="JOB", help="Job id (see ringflow status)."),
    failed: bool = typer.Option(False, "--failed", help="Every failed file of the job."),
    files: list[str] = typer.Option(None, "--file", help="A failed file's path (repeatable)."),
    scan: list[str] = typer.Option(None, "--scan", help="A scan's failed files, e.g. 2.1."),
    stranded: bool = typer.Option(
        False,
        "--stranded",
        help="Hand back files of dead workers and move files waiting on queues with no live "
        "worker to live ones.",
    ),
) -> None:
    """Re-enqueue failed files onto live GPU queues; done files keep their partial results.

    Each scan they complete is assembled again. Requeueing twice sends nothing the second time.
    With the embedded broker (no broker_url), the job's broker and local workers are started
    in its workspace and the command follows the job until every scan has an outcome.

    Example: ringflow requeue my.ini 3f2a9c1d7e40 --failed
    """
    cfg = load_config(config)
    selection = Selection(failed, tuple(files or ()), tuple(scan or ()), stranded)
    with user_errors(EXIT_USAGE):  # before any broker or worker is started
        selection.check()
    if cfg.broker_url():
        with user_errors():
            app = configure_for(shared_broker_url(cfg, "requeue"), cfg.queue)
            result = requeue(app, cfg, job, selection)
        tell(result)
        say("requeue", f"follow with: ringflow status {config} {job} --watch")
        return
    code = requeue_locally(cfg, job, selection)
    if code == EXIT_INTERRUPTED:
        exit_interrupted()
    raise typer.Exit(code)


def requeue_locally(cfg: Config, job: str, selection: Selection) -> int:
    install_interrupt_handlers()
    say_local_notes(cfg, [])
    try:
        with (
            user_errors(),
            workspace_errors(workspace(cfg)),
            frames_progress(f"job {job}") as update,
        ):
            result, final = requeue_here(cfg, job, selection, update, say_recovery)
    except KeyboardInterrupt:
        ignore_further_interrupts()
        say("interrupted", "workers and broker stopped")
        return EXIT_INTERRUPTED
    tell(result)
    show(final, as_json=False)
    return 0 if final.state == JobState.DONE else EXIT_FAILED


def tell(result: RequeueResult) -> None:
    if result.stopped:
        say("stopped", f"left running by a killed run: {', '.join(result.stopped)}")
    if result.restored:
        say("handed back", f"{len(result.restored)} file(s) taken by workers that died")
    if result.moved:
        say("moved", f"{result.moved} stranded file(s) to live GPU queues")
    for path in result.removed:
        say("warning", f"{path}: removed, a temporary file left by a killed run")
    for path in result.files:
        say("requeued", path)
    for reason in result.skipped:
        say("skipped", reason)
    say("requeue", f"{len(result.files)} file(s) requeued, {len(result.scans)} scan(s) to assemble")
