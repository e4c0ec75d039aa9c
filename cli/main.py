"""The ringflow Typer application: one module per command, joined here."""

from __future__ import annotations

import typer

from .config_cmd import config
from .demo_cmd import demo
from .enqueue_cmd import enqueue
from .flower_cmd import flower
from .requeue_cmd import requeue_cmd
from .run_cmd import run
from .slurm_cmd import integrate_slurm
from .status_cmd import status
from .workers_cmd import app as workers

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
app.command("integrate-slurm")(integrate_slurm)
app.command("enqueue")(enqueue)
app.command("status")(status)
app.command("requeue")(requeue_cmd)
app.add_typer(workers, name="workers")
app.command("flower")(flower)

if __name__ == "__main__":
    app()
