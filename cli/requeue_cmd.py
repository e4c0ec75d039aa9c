"""ringflow requeue: send a job's failed or chosen files again; their scans get assembled."""

from __future__ import annotations

from pathlib import Path

import typer

from tasks.app import configure
from worker_launcher.broker import shared_broker_url
from worker_launcher.requeue import Selection, requeue

from .common import load_config, say, user_errors


def requeue_cmd(
    config: Path = typer.Argument(..., help="Configuration file (INI)."),
    job: str = typer.Argument(..., help="Job id (see ringflow status)."),
    failed: bool = typer.Option(False, "--failed", help="Every failed file of the job."),
    files: list[str] = typer.Option(None, "--file", help="A failed file's path (repeatable)."),
    scan: list[str] = typer.Option(None, "--scan", help="A scan's failed files, e.g. 2.1."),
    stranded: bool = typer.Option(
        False, "--stranded", help="Move files waiting on queues with no live worker to live ones."
    ),
) -> None:
    """Re-enqueue failed files onto live GPU queues; done files keep their partial results.

    Each scan they complete is assembled again. Requeueing twice sends nothing the second time.
    """
    cfg = load_config(config)
    selection = Selection(failed, tuple(files or ()), tuple(scan or ()), stranded)
    with user_errors():
        app = configure(shared_broker_url(cfg, "requeue"))
        result = requeue(app, cfg, job, selection)
    if result.moved:
        say("moved", f"{result.moved} stranded file(s) to live GPU queues")
    for path in result.files:
        say("requeued", path)
    for reason in result.skipped:
        say("skipped", reason)
    say(
        "requeue",
        f"{len(result.files)} file(s) requeued, {len(result.scans)} scan(s) to assemble; "
        f"follow with: ringflow status {config} {job} --watch",
    )
