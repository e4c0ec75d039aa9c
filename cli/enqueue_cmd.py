"""ringflow enqueue: put one task per Lima file on the deployment's GPU queues."""

from __future__ import annotations

from pathlib import Path

import typer

from tasks.app import configure_for
from worker_launcher.broker import shared_broker_url
from worker_launcher.distributed import enqueue as enqueue_plan

from .common import EXIT_FAILED, load_config, say, user_errors
from .run_cmd import plan_or_fail


def enqueue(
    config: Path = typer.Argument(..., metavar="CONFIG", help="Configuration file (INI)."),
) -> None:
    """Register a job and enqueue its files, balanced over the GPU queues; print the job id.

    Example: ringflow enqueue my.ini
    """
    cfg = load_config(config)
    with user_errors():
        url = shared_broker_url(cfg, "enqueue")
        plan = plan_or_fail(cfg, check_device=False)
        for problem in plan.problems:
            say("error", str(problem))
        callbacks = enqueue_plan(configure_for(url, cfg.queue), plan)
    say(
        "enqueued",
        f"{len(plan.file_tasks)} files, {plan.n_frames} frames, {len(callbacks)} scans",
    )
    typer.echo(plan.job_id)
    if plan.problems:
        raise typer.Exit(EXIT_FAILED)
