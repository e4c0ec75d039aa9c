"""The live progress bar of a job and its final report, shared by run and integrate-slurm."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from tasks.jobs import JobPlan
from worker_launcher.watch import JobSummary

from .common import err, say


@contextmanager
def job_progress(plan: JobPlan, quiet: bool) -> Iterator[Callable]:
    """A rich progress bar on stderr; yields the ``on_progress(progress, elapsed)`` callback."""
    for problem in plan.problems:
        say("error", str(problem))
    for output in plan.skipped:
        say("skipped", f"{output} (existing_output = {plan.config.output.existing_output})")
    label, n_files = f"job {plan.job_id}", len(plan.file_tasks)
    with frames_progress(label, plan.n_frames, n_files, quiet) as update:
        yield update


@contextmanager
def frames_progress(
    label: str, total: int | None = None, n_files: int | None = None, quiet: bool = False
) -> Iterator[Callable]:
    """Frames and files done so far, against totals when they are known."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn(
            "{task.fields[files]} files  {task.completed:.0f}"
            + ("/{task.total:.0f}" if total else "")
            + " frames  {task.fields[rate]:.1f} frames/s  {task.fields[failed]} failed"
        ),
        TimeElapsedColumn(),
    )
    of = f"/{n_files}" if n_files is not None else ""
    with Progress(*columns, console=err, disable=quiet, transient=False) as bar:
        task = bar.add_task(label, total=total, files=f"0{of}", rate=0.0, failed=0)
        baseline = None  # frames already done when following began (a requeued job)

        def update(progress, elapsed: float) -> None:
            nonlocal baseline
            baseline = progress.frames_done if baseline is None else baseline
            new_frames = progress.frames_done - baseline
            bar.update(
                task,
                completed=progress.frames_done,
                failed=progress.files_failed,
                files=f"{progress.files_done}{of}",
                rate=new_frames / elapsed if elapsed > 0 else 0.0,
            )

        yield update


def report(summary: JobSummary, as_json: bool) -> None:
    """Failures and totals on stderr; outputs (or the JSON summary) on stdout."""
    for failure in summary.files_failed:
        attempts = failure.get("attempts", 1)
        say(
            "failed", failure["message"] + (f" (after {attempts} attempts)" if attempts > 1 else "")
        )
    for path, attempts in summary.files_retried.items():
        say("retried", f"{path}: done at attempt {attempts}")
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
