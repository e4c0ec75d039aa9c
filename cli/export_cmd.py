"""ringflow export: one output's mean or one frame as text, for any plotting program."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import usage, user_errors
from .plot_cmd import RESULT_MISTAKES

FORMATS = ("xye", "csv")


def export(
    output: Path = typer.Argument(..., help="A ringflow output (NeXus/HDF5)."),
    frame: int = typer.Option(None, "--frame", help="Export this frame (row, from 0)."),
    mean: bool = typer.Option(False, "--mean", help="Export the mean over frames (default)."),
    fmt: str = typer.Option(
        None,
        "--format",
        help="xye: columns radial, I, error, space-separated, no header (only 2 columns "
        "when the output has no errors); csv: the same with a header line naming each "
        "column and its units. Default: from -o's suffix, else xye.",
    ),
    dest: Path = typer.Option(
        None,
        "-o",
        "--output",
        help="File (or folder) to write; default: beside the output, <name>_mean.xye or "
        "<name>_frame<N>.xye. A cake gives one file per azimuthal slice (_chi01, ...).",
    ),
    entry: str = typer.Option(None, "--entry", help="Entry (scan) to export; default: the file's."),
) -> None:
    """Write the mean pattern over a scan's frames (the stored average when the output has
    one), or one frame's, as text files; print their paths. Errors are the frames' errors
    averaged, as average_xy stores them.

    Example: ringflow export azint_sample_scan0001.h5 --frame 3 --format csv
    """
    from worker_launcher.results import ExportRequest, export_output

    if mean and frame is not None:
        usage("--mean and --frame: give one or the other")
    request = ExportRequest(str(output), text_format(fmt, dest), frame, _text(dest), entry)
    with user_errors(usage=RESULT_MISTAKES):
        for path in export_output(request):
            typer.echo(path)


def text_format(fmt: str | None, dest: Path | None) -> str:
    """--format, else the suffix of -o when it names one, else xye."""
    if fmt is None:
        suffix = dest.suffix.lstrip(".").lower() if dest is not None else ""
        return suffix if suffix in FORMATS else "xye"
    if fmt.lower() not in FORMATS:
        usage(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    return fmt.lower()


def _text(path: Path | None) -> str | None:
    return None if path is None else str(path)
