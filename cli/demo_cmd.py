"""ringflow demo: write a small ESRF-layout dataset, then integrate it."""

from __future__ import annotations

from pathlib import Path

import typer

from tasks.demo import DemoSpec, write_demo

from .common import err, load_config
from .run_cmd import execute


def demo(
    folder: Path = typer.Argument(
        ..., metavar="FOLDER", help="Folder to write the demo dataset into."
    ),
    run: bool = typer.Option(True, "--run/--no-run", help="Integrate it after writing."),
    scans: int = typer.Option(2, min=1, help="Scans in the dataset file."),
    files: int = typer.Option(3, min=1, help="Lima files per scan."),
    frames: int = typer.Option(50, min=1, help="Frames per Lima file."),
    detector: str = typer.Option("pilatus1m", help="pyFAI detector name."),
    lima_name: str = typer.Option("pilatus", help="Detector name in the Bliss files."),
    unit: str = typer.Option("2th_deg", help="Radial unit of the written configuration."),
    n_pts: int = typer.Option(1000, min=2, help="Radial bins of the written configuration."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary as the last line."),
) -> None:
    """Write a realistic small dataset (LaB6 rings, bitshuffle-LZ4 Lima files) and run it.

    Example: ringflow demo /tmp/rf-demo
    """
    spec = DemoSpec(str(folder.resolve()), scans, files, frames, detector, lima_name, unit, n_pts)
    err.print(
        f"writing {scans} scans x {files} files x {frames} frames of {detector} into {folder}"
    )
    written = write_demo(spec)
    err.print(f"dataset: {written.dataset}\nconfig:  {written.config}", markup=False)
    if not run:
        typer.echo(written.config)
        return
    raise typer.Exit(execute(load_config(Path(written.config)), as_json))
