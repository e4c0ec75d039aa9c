"""ringflow integrate-slurm: SLURM workers, enqueue, live progress, outputs."""

from __future__ import annotations

from pathlib import Path

import typer

from worker_launcher.broker import shared_broker_url
from worker_launcher.distributed import integrate_on_slurm

from .common import EXIT_FAILED, exit_interrupted, load_config, say, user_errors
from .progress import job_progress, report
from .run_cmd import ignore_further_interrupts, install_interrupt_handlers, plan_or_fail


def integrate_slurm(
    config: Path = typer.Argument(..., metavar="CONFIG", help="Configuration file (INI)."),
    keep_workers: bool = typer.Option(
        False, "--keep-workers", help="Leave the worker jobs running for the next dataset."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary as the last line."),
) -> None:
    """Submit (or reuse) SLURM workers, enqueue every file, follow the job, report outputs.

    Example: ringflow integrate-slurm my.ini
    """
    cfg = load_config(config)
    install_interrupt_handlers()
    try:
        with user_errors():
            url = shared_broker_url(cfg, "integrate-slurm")
            plan = plan_or_fail(cfg, check_device=False)
            with job_progress(plan, quiet=as_json) as update:
                summary = integrate_on_slurm(
                    cfg, plan, url, keep_workers, update, lambda text: say("slurm", text)
                )
    except KeyboardInterrupt:
        ignore_further_interrupts()
        say("interrupted", "stopped following the job; worker jobs cancelled unless kept")
        exit_interrupted()
    report(summary, as_json)
    raise typer.Exit(0 if summary.ok else EXIT_FAILED)
