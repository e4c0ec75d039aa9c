"""The ringflow Typer application: one module per command, joined here."""

from __future__ import annotations

import typer

from .config_cmd import config
from .demo_cmd import demo
from .run_cmd import run

app = typer.Typer(
    name="ringflow",
    help="Azimuthal integration of Bliss/Lima detector data with pyFAI on Celery workers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command("config")(config)
app.command("demo")(demo)
app.command("run")(run)

if __name__ == "__main__":
    app()
