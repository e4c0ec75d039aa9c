"""ringflow config: write a commented configuration template."""

from __future__ import annotations

from pathlib import Path

import typer

from tasks.config import template

from .common import EXIT_USAGE, say


def config(
    path: Path = typer.Argument(..., metavar="PATH", help="Where to write the template (INI)."),
    dataset: str = typer.Option("", "--dataset", help="Value for [dataset] location."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
) -> None:
    """Write a configuration template with every key, its default and its meaning.

    Example: ringflow config my.ini --dataset /data/id15/RAW_DATA/s/s_0001/s_0001.h5
    """
    if path.exists() and not force:
        say("error", f"{path}: exists; use --force to overwrite")
        raise typer.Exit(EXIT_USAGE)
    try:
        path.write_text(template(dataset))
    except OSError as exc:
        say("error", f"{path}: cannot write: {exc.strerror}")
        raise typer.Exit(EXIT_USAGE) from None
    typer.echo(str(path))
