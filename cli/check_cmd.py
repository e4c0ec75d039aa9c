"""ringflow check: what `ringflow run` would do with a configuration, doing none of it."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from worker_launcher.check import PROBLEM, SKIPPED, CheckReport, ScanLine, check_config

from .common import EXIT_FAILED, EXIT_USAGE, err, load_config, say


def check(
    config: Path = typer.Argument(..., metavar="CONFIG", help="Configuration file (INI)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON report as the last line."),
) -> None:
    """Validate everything `ringflow run` would, and say per scan what it would process.

    Configuration, PONI, mask/dark/flat, device notes, output folders, memory, the plan's
    problems and warnings; a configured broker is pinged (the embedded one is not started).
    Nothing is written. Exit 0 when `run` would start, 2 for a mistake in the configuration
    or input, 1 when the broker cannot be reached.

    Example: ringflow check my.ini
    """
    report = check_config(load_config(config))
    say_lines(report)
    if as_json:
        typer.echo(json.dumps(report.as_dict()))
    elif not report.error:  # as `run`: a mistake is one line, nothing else to show
        err.print(scan_table(report.scans))
        err.print(summary(report))
    raise typer.Exit(exit_code(report))


def exit_code(report: CheckReport) -> int:
    """The code `run` would end with at once for the same mistake; 0 when it would start."""
    if report.error:
        return EXIT_USAGE
    return 0 if report.would_start else EXIT_FAILED


def say_lines(report: CheckReport) -> None:
    """Notes, warnings and problems as `run` prints them, then what stops it."""
    for note in report.notes:
        say("note", note)
    for warning in report.warnings:
        say("warning", warning)
    for problem in report.problems:
        if problem != report.error:
            say("problem", problem)
    if report.error:
        say("error", report.error)
    if report.broker:
        say_broker(report)


def say_broker(report: CheckReport) -> None:
    """Its failure stops `run` only when there is something to integrate."""
    broker = report.broker
    if broker.ok:
        if not report.error:
            say("broker", broker.message)
    elif report.error or report.needs_broker:
        say("error", broker.message)
    else:
        say("warning", f"{broker.message} (nothing to integrate: run needs no broker)")


def scan_table(scans: list[ScanLine]) -> Table:
    table = Table("scan", "files", "frames", "skipped", "state", "output file")
    for s in scans:
        skipped = f"{s.skipped_files} files, {s.skipped_frames} frames" if s.skipped_files else "-"
        state = f"{s.state}: {s.why}" if s.state in (SKIPPED, PROBLEM) else s.state
        table.add_row(s.label, str(s.files), str(s.frames), skipped, state, s.output)
    return table


def summary(report: CheckReport) -> str:
    """One line: what run would process, and whether it would start."""
    t, b = report.totals(), report.broker
    verdict = "ringflow run would start" if report.would_start else "ringflow run would stop"
    parts = [
        f"{verdict}: {t['scans_to_do']} scans, {t['files']} files, {t['frames']} frames to do",
        f"{t['scans_skipped']} scans skipped ({t['files_skipped']} files)",
        f"{len(report.problems)} problems"
        + (" (their files fail: run would end with exit 1)" if report.problems else ""),
    ]
    if report.memory:
        parts.append(f"engine ~{gib(report.memory.estimate)} of {gib(report.memory.limit)}")
    if b is not None and b.ok:
        parts.append(f"broker {'reachable' if b.url else 'embedded'}")
    else:
        parts.append("broker unusable" + ("" if report.needs_broker else " (not needed)"))
    return "; ".join(parts)


def gib(n: int) -> str:
    return f"{n / 2**30:.3g} GiB"
