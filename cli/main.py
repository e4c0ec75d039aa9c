"""The ringflow Typer application: one module per command, joined here."""

from __future__ import annotations

import typer

from .check_cmd import check
from .config_cmd import config
from .demo_cmd import demo
from .enqueue_cmd import enqueue
from .export_cmd import export
from .flower_cmd import flower
from .plot_cmd import plot
from .requeue_cmd import requeue_cmd
from .run_cmd import run
from .slurm_cmd import integrate_slurm
from .status_cmd import status
from .workers_cmd import app as workers

app = typer.Typer(
    name="ringflow",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # click's plain help: rich's markup would eat "[dataset]" in help texts, and this Typer
    # shows every flag as taking a "<bool>" value in its rich panels
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(asked: bool) -> None:
    if asked:
        from tasks import __version__

        typer.echo(f"ringflow {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(
        False,
        "--version",
        "-V",
        callback=_print_version,
        is_eager=True,
        help="Print ringflow's version and exit.",
    ),
) -> None:
    """Azimuthal integration of Bliss/Lima detector data with pyFAI on Celery workers.

    Example: ringflow demo /tmp/rf-demo, then ringflow run /tmp/rf-demo/demo.ini
    """


app.command("config")(config)
app.command("check")(check)
app.command("demo")(demo)
app.command("run")(run)
app.command("integrate-slurm")(integrate_slurm)
app.command("enqueue")(enqueue)
app.command("status")(status)
app.command("requeue")(requeue_cmd)
app.add_typer(workers, name="workers")
app.command("flower")(flower)
app.command("plot")(plot)
app.command("export")(export)

if __name__ == "__main__":
    app()
