"""The live progress bar of a job and its final report, shared by run and integrate-slurm."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from tasks.jobs import JobPlan
from worker_launcher.watch import JobSummary

from .common import err, say

PLAIN_EVERY_S = 5.0  # between two progress lines when stderr is no terminal
EVERY_ENV = "RINGFLOW_PROGRESS_EVERY_S"  # overrides it


def plain_every_s() -> float:
    """Seconds between two plain progress lines: $RINGFLOW_PROGRESS_EVERY_S, else 5."""
    text = os.environ.get(EVERY_ENV, "")
    try:
        value = float(text) if text else PLAIN_EVERY_S
    except ValueError:
        value = -1.0
    if not value >= 0:  # NaN too
        say("warning", f"${EVERY_ENV} = {text!r}: expected seconds >= 0; using {PLAIN_EVERY_S}")
        return PLAIN_EVERY_S
    return value


PHASES = ("starting workers, building engines", "integrating", "assembling")  # in order


def say_phase(text: str, quiet: bool = False) -> None:
    """One ``phase:`` line on stderr (none with --json): what the job does from now on."""
    if not quiet:
        say("phase", text)


def phase_of(progress, n_files: int) -> str:
    """What a job does, read from its counts: every worker builds its engine (pyFAI's matrix,
    an OpenCL kernel) before its first frames; once every file has an outcome, the scans'
    outputs are assembled."""
    if progress.files_done + progress.files_failed >= n_files:
        return PHASES[2]
    return PHASES[1] if progress.frames_done else PHASES[0]


@contextmanager
def job_progress(plan: JobPlan, quiet: bool) -> Iterator[Callable]:
    """A rich progress bar on stderr; yields the ``on_progress(progress, elapsed)`` callback.

    Each phase of the job (see :data:`PHASES`) is told once, as it begins, by a ``phase:``
    line above the bar (or between the plain lines)."""
    for problem in plan.problems:
        say("error", str(problem))
    for output in plan.skipped:
        say("skipped", f"{output} (existing_output = {plan.config.output.existing_output})")
    label, n_files = f"job {plan.job_id}", len(plan.file_tasks)
    scans = [ScanRow(s.scan_key, Path(s.output).stem, s.n_frames) for s, _ in plan.scans]
    told: list[str] = []
    with frames_progress(label, plan.n_frames, n_files, quiet, scans) as update:

        def on_progress(progress, elapsed: float) -> None:
            phase = phase_of(progress, n_files)
            if not told or PHASES.index(phase) > PHASES.index(told[-1]):
                told.append(phase)
                say_phase(f"{label}: {phase}", quiet)
            update(progress, elapsed)

        yield on_progress


@dataclass(frozen=True)
class ScanRow:
    """A scan as the progress shows it: its key in the job's counters, its output's name and
    its frames."""

    key: str
    name: str
    n_frames: int


SCAN_ROWS = 4  # scans shown at once under the job's bar: those nearest their end


def scans_integrated(scans: list[ScanRow], progress) -> int:
    """Scans whose every frame is integrated."""
    return sum(progress.scan_frames.get(s.key, 0) >= s.n_frames for s in scans)


def busiest(scans: list[ScanRow], progress, n: int = SCAN_ROWS) -> list[ScanRow]:
    """The ``n`` scans being integrated (some frames, not all) nearest their end, in the
    order of the job."""
    started = [s for s in scans if 0 < progress.scan_frames.get(s.key, 0) < s.n_frames]
    nearest = sorted(started, key=lambda s: s.n_frames - progress.scan_frames.get(s.key, 0))
    shown = set(nearest[:n])
    return [s for s in started if s in shown]


@contextmanager
def frames_progress(
    label: str,
    total: int | None = None,
    n_files: int | None = None,
    quiet: bool = False,
    scans: list[ScanRow] | None = None,
) -> Iterator[Callable]:
    """Frames and files done so far, against totals when they are known: a live bar on a
    terminal, with a row for each scan being integrated (at most SCAN_ROWS); elsewhere
    (nohup, SLURM, a log file) one plain line every PLAIN_EVERY_S and a last one at the end,
    never a bar cut at the log's width."""
    if quiet:
        yield lambda progress, elapsed: None
    elif err.is_terminal:
        with _live_bar(label, total, n_files, scans or []) as update:
            yield update
    else:
        with _plain_lines(label, total, n_files, scans or []) as update:
            yield update


@dataclass
class _Rate:
    """Frames per second since following began: a requeued job's earlier frames do not count."""

    baseline: int | None = None

    def of(self, frames_done: int, elapsed: float) -> float:
        self.baseline = frames_done if self.baseline is None else self.baseline
        return (frames_done - self.baseline) / elapsed if elapsed > 0 else 0.0


@contextmanager
def _live_bar(
    label: str, total: int | None, n_files: int | None, scans: list[ScanRow]
) -> Iterator[Callable]:
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[text]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    of = f"/{n_files}" if n_files is not None else ""
    frames_of = f"/{total}" if total else ""
    rate = _Rate()
    with Progress(*columns, console=err, transient=False) as bar:
        task = bar.add_task(label, total=total, text=f"0{of} files")
        rows: dict[str, int] = {}  # scan key -> its row, once shown

        def update(progress, elapsed: float) -> None:
            per_s = rate.of(progress.frames_done, elapsed)
            text = (
                f"{progress.files_done}{of} files  {progress.frames_done}{frames_of} frames  "
                f"{per_s:.1f} frames/s  {progress.files_failed} failed"
            )
            bar.update(task, completed=progress.frames_done, text=text)
            _update_rows(bar, rows, scans, progress)

        yield update


def _update_rows(bar: Progress, rows: dict[str, int], scans: list[ScanRow], progress) -> None:
    """Show the busiest scans' rows under the job's bar, hide the others' (ended ones too)."""
    shown = {s.key for s in busiest(scans, progress)}
    for scan in scans:
        done = min(progress.scan_frames.get(scan.key, 0), scan.n_frames)
        if scan.key in shown and scan.key not in rows:
            rows[scan.key] = bar.add_task(f"  {scan.name}", total=scan.n_frames, text="")
        if scan.key in rows:
            text = f"{done}/{scan.n_frames} frames"
            bar.update(rows[scan.key], completed=done, text=text, visible=scan.key in shown)


@contextmanager
def _plain_lines(
    label: str, total: int | None, n_files: int | None, scans: list[ScanRow]
) -> Iterator[Callable]:
    rate, every = _Rate(), plain_every_s()
    last: dict = {"at": None, "line": ""}

    def line(progress, elapsed: float) -> str:
        per_s = rate.of(progress.frames_done, elapsed)
        files = f"{progress.files_done}/{n_files}" if n_files is not None else progress.files_done
        frames = f"{progress.frames_done}/{total}" if total else f"{progress.frames_done}"
        left = ""
        if total and per_s > 0 and progress.frames_done < total:
            left = f", about {(total - progress.frames_done) / per_s:.0f} s left"
        failed = f", {progress.files_failed} failed" if progress.files_failed else ""
        n_in = scans_integrated(scans, progress)
        integrated = f", {n_in}/{len(scans)} scans integrated" if scans else ""
        return (
            f"{label}: {files} files, {frames} frames{integrated}, {per_s:.1f} frames/s"
            f"{failed}, {elapsed:.0f} s{left}"
        )

    def update(progress, elapsed: float) -> None:
        last["line"] = line(progress, elapsed)
        now = time.monotonic()
        if last["at"] is None or now - last["at"] >= every:
            last["at"] = now
            say("progress", last["line"])
            last["line"] = ""

    yield update
    if last["line"]:
        say("progress", last["line"])


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
