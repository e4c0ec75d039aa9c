"""ringflow run: integrate a configuration's dataset on this machine."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from tasks.config import Config
from tasks.errors import ConfigError, RingflowError
from tasks.jobs import JobPlan, check_plan, plan_job
from worker_launcher.run import JobSummary, run_plan

from .common import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, err, fail, load_config, say


def run(
    config: Path = typer.Argument(..., help="Configuration file (INI)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary as the last line."),
) -> None:
    """Integrate every scan of the configuration with local workers (embedded Redis default)."""
    code = execute(load_config(config), as_json)
    raise typer.Exit(code)


def execute(config: Config, as_json: bool = False) -> int:
    """Plan, run and report a job; returns the exit code."""
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        plan = _plan(config)
        summary = _run_with_progress(config, plan, quiet=as_json)
    except KeyboardInterrupt:
        say("interrupted", "workers and broker stopped")
        return EXIT_INTERRUPTED
    except ConfigError as exc:
        fail(exc, EXIT_USAGE)
    except RingflowError as exc:
        fail(exc, EXIT_FAILED)
    _report(summary, as_json)
    return 0 if summary.ok else EXIT_FAILED


def _plan(config: Config) -> JobPlan:
    from tasks.engine import check_opencl, load_corrections, load_geometry

    try:
        ai = load_geometry(config.integration)  # light: no integration runs in this process
        load_corrections(config.integration, ai.detector.shape)
        check_opencl(config.integration)
        plan = plan_job(config, detector_shape=tuple(ai.detector.shape))
        check_plan(plan)
    except RingflowError as exc:
        fail(exc, EXIT_USAGE)
    return plan


def _run_with_progress(config: Config, plan: JobPlan, quiet: bool) -> JobSummary:
    for problem in plan.problems:
        say("error", str(problem))
    for output in plan.skipped:
        say("skipped", f"{output} (existing_output = {config.output.existing_output})")
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn(
            "{task.fields[files]} files  {task.completed:.0f}/{task.total:.0f} frames  "
            "{task.fields[rate]:.1f} frames/s  {task.fields[failed]} failed"
        ),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err, disable=quiet, transient=False) as bar:
        task = bar.add_task(
            f"job {plan.job_id}", total=plan.n_frames, files="0/0", rate=0.0, failed=0
        )
        n_files = len(plan.file_tasks)

        def update(progress, elapsed: float) -> None:
            bar.update(
                task,
                completed=progress.frames_done,
                failed=progress.files_failed,
                files=f"{progress.files_done}/{n_files}",
                rate=progress.frames_done / elapsed if elapsed > 0 else 0.0,
            )

        return run_plan(config, plan, update)


def _report(summary: JobSummary, as_json: bool) -> None:
    for failure in summary.files_failed:
        say("failed", failure["message"])
    rate = summary.frames / summary.seconds if summary.seconds else 0.0
    err.print(
        f"{summary.files_done}/{summary.files_total} files, {summary.frames} frames in "
        f"{summary.seconds:.1f} s ({rate:.1f} frames/s)"
    )
    if as_json:
        typer.echo(json.dumps(summary.as_dict()))
    else:
        for output in summary.outputs:
            typer.echo(output)


def _interrupt(signum, frame):
    raise KeyboardInterrupt
