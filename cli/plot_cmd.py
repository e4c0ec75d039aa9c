"""ringflow plot: a picture of one output, without leaving the terminal for a viewer."""

from __future__ import annotations

import re
from pathlib import Path

import typer

from tasks.errors import InputDataError

from .common import usage, user_errors

SIZE_LIMITS = (100, 10000)  # pixels per side: below, nothing is legible; above, a poster
# reading an output: a missing, foreign or wrongly addressed file is the user's mistake
# (exit 2); a file that cannot be read or written is not (exit 1)
RESULT_MISTAKES = (InputDataError,)


def plot(
    output: Path = typer.Argument(..., help="A ringflow output (NeXus/HDF5)."),
    image: Path = typer.Option(..., "-o", "--output", help="Image to write (PNG; .svg, .pdf)."),
    frame: int = typer.Option(None, "--frame", help="Plot this frame (row, from 0) alone."),
    entry: str = typer.Option(None, "--entry", help="Entry (scan) to plot; default: the file's."),
    width: int = typer.Option(None, "--width", help="Width in pixels (default 1200)."),
    height: int = typer.Option(None, "--height", help="Height in pixels (default 800)."),
    size: str = typer.Option(None, "--size", help="WIDTHxHEIGHT in pixels, e.g. 1600x900."),
) -> None:
    """Plot an output: a 1D scan as a heat map of its frames over its mean pattern, a cake
    as its mean cake, or one frame (--frame N: the pattern with its error bars, or the cake).

    Example: ringflow plot azint_sample_scan0001.h5 -o scan1.png
    """
    from worker_launcher.results import PlotRequest, plot_output

    request = PlotRequest(str(output), str(image), entry, frame, figure_size(width, height, size))
    with user_errors(usage=RESULT_MISTAKES):
        typer.echo(plot_output(request))


def figure_size(width: int | None, height: int | None, size: str | None):
    """The figure's pixels from --size or --width/--height (each defaulting alone)."""
    from worker_launcher.results import FigureSize

    if size is not None:
        if width is not None or height is not None:
            usage("--size and --width/--height: give one or the other")
        found = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", size)
        if not found:
            usage(f"--size {size}: expected WIDTHxHEIGHT in pixels, e.g. 1600x900")
        width, height = int(found[1]), int(found[2])
    default = FigureSize()
    chosen = FigureSize(width or default.width, height or default.height)
    low, high = SIZE_LIMITS
    for name, value in (("width", chosen.width), ("height", chosen.height)):
        if not low <= value <= high:
            usage(f"--{name} {value}: expected {low} to {high} pixels")
    return chosen
