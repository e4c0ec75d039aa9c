"""ringflow workers submit|list|stop|local: the deployment's Celery workers."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import typer
from rich.table import Table

from tasks.app import configure_for
from tasks.config import redact_url
from tasks.errors import RingflowError
from worker_launcher.broker import shared_broker_url, write_url_file
from worker_launcher.local import start_local_workers, visible_gpus
from worker_launcher.nodes import forget_dead, live_nodes
from worker_launcher.slurm import SlurmLauncher
from worker_launcher.supervise import LocalSupervisor
from worker_launcher.watch import (
    broker_down,
    interrupts_deferred,
    raise_if_stopped,
    uninterruptible,
)

from .common import err, exit_interrupted, load_config, say, say_recovery, user_errors
from .run_cmd import ignore_further_interrupts, install_interrupt_handlers, say_local_notes

app = typer.Typer(
    help="Start, list and stop the deployment's workers.\n\nExample: ringflow workers list my.ini",
    no_args_is_help=True,
)
CONFIG = typer.Argument(..., metavar="CONFIG", help="Configuration file (INI).")


@app.command()
def submit(
    config: Path = CONFIG,
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the job scripts, submit none."),
) -> None:
    """Submit n_workers SLURM jobs (one GPU each) and the assembly job; running ones are kept.

    Example: ringflow workers submit my.ini
    """
    cfg = load_config(config)
    launcher = SlurmLauncher(cfg)
    with user_errors():
        if dry_run:
            for spec in launcher.specs():
                typer.echo(f"# ---- {spec.job_name}.sh ----")
                typer.echo(launcher.script(spec))
            return
        for spec, job_id, new in launcher.submit(shared_broker_url(cfg, "workers submit")):
            typer.echo(f"{job_id}\t{spec.job_name}\t{'submitted' if new else 'already queued'}")
    say("logs", launcher.log_dir)


@app.command("list")
def list_(
    config: Path = CONFIG,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """The deployment's SLURM jobs and the Celery workers that answer now.

    Example: ringflow workers list my.ini
    """
    cfg = load_config(config)
    prefix = cfg.queue.queue_prefix
    with user_errors():
        url = shared_broker_url(cfg, "workers list")
        nodes = live_nodes(configure_for(url, cfg.queue), prefix)
        jobs = _slurm_jobs_or_none(cfg)
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "slurm": [j.as_dict() for j in jobs or []],
                    "nodes": [n.as_dict(prefix) for n in nodes],
                }
            )
        )
        return
    table = Table("SLURM job", "name", "state", "node/reason", "Celery worker", "queues", "GPU")
    unmatched = list(nodes)
    for job in jobs or []:
        node = next((n for n in unmatched if n.slurm_job == job.job_id), None)
        if node:
            unmatched.remove(node)
        where = job.node if job.state == "RUNNING" else job.reason
        table.add_row(job.job_id, job.name, job.state, where, *_node_cells(node))
    for node in unmatched:  # workers not started by SLURM (workers local, ringflow run)
        table.add_row("-", "", "", "", *_node_cells(node))
    err.print(table)
    say("broker", redact_url(url))


def _slurm_jobs_or_none(cfg):
    try:
        return SlurmLauncher(cfg).jobs()
    except RingflowError as exc:
        say("warning", f"no SLURM view: {exc}")
        return None


def _node_cells(node) -> tuple[str, str, str]:
    if node is None:
        return "- (not answering)", "", ""
    gpus = node.info.get("gpus") or {}
    gpu = gpus.get("CUDA_VISIBLE_DEVICES", "") or ",".join(gpus.values())
    return node.name, ", ".join(node.queues), gpu


@app.command()
def stop(config: Path = CONFIG) -> None:
    """Cancel the deployment's SLURM jobs and wait until squeue no longer lists them.

    Example: ringflow workers stop my.ini
    """
    cfg = load_config(config)
    with user_errors():
        cancelled = SlurmLauncher(cfg).cancel()
        url = cfg.broker_url()
        if url:
            app_ = configure_for(url, cfg.queue)
            forget_dead(app_, cfg.queue.queue_prefix, live_nodes(app_, cfg.queue.queue_prefix))
    typer.echo(f"cancelled: {' '.join(cancelled) or 'none'}")


@app.command()
def local(
    config: Path = CONFIG,
    gpus: str = typer.Option(
        None, "--gpus", help="GPU ids, e.g. 0,1 (default: all visible; none: one CPU worker)."
    ),
    first_slot: int = typer.Option(
        0,
        "--first-slot",
        min=0,
        help="Queue slot of the first worker, when several machines "
        "serve one deployment (each its own range of gpu<k> queues).",
    ),
) -> None:
    """Run the deployment's workers on this machine until Ctrl-C: one per GPU, or one CPU one.

    Example: ringflow workers local my.ini --gpus 0,1
    """
    cfg = load_config(config)
    install_interrupt_handlers()
    ids = [g for g in (gpus.split(",") if gpus is not None else visible_gpus()) if g.strip()]
    workers = None
    try:
        with user_errors():
            url = shared_broker_url(cfg, "workers local")
            launcher = SlurmLauncher(cfg)  # same folder layout as SLURM workers
            url_file = write_url_file(launcher.folder, url)
            logs = f"{launcher.folder}/logs/local"
            say_local_notes(cfg, ids)
            with interrupts_deferred():
                workers = start_local_workers(cfg, url_file, logs, ids, first_slot=first_slot)
            for worker in workers.workers:
                say("started", f"{worker.name} (log {worker.log})")
            app_ = configure_for(url, cfg.queue)
            supervisor = LocalSupervisor(app_, cfg.queue.queue_prefix, workers, None, say_recovery)
            while True:
                with contextlib.suppress(*broker_down()):  # the workers reconnect themselves
                    supervisor.check()
                raise_if_stopped()
                time.sleep(1.0)
    except KeyboardInterrupt:
        ignore_further_interrupts()
        say("interrupted", "stopping the workers")
        exit_interrupted()
    finally:
        if workers is not None:
            with uninterruptible():  # a second Ctrl-C must not leave orphans behind
                workers.stop()
