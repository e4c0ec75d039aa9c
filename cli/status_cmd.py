"""ringflow status: a job's scans, failed and retrying files, workers and stranded queues."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import typer
from rich.table import Table

from tasks.app import configure
from tasks.outputs import workspace
from worker_launcher.embedded import job_broker
from worker_launcher.status import JobStatus, job_status, latest_job
from worker_launcher.watch import raise_if_stopped

from .common import EXIT_FAILED, EXIT_INTERRUPTED, err, load_config, say, user_errors
from .run_cmd import ignore_further_interrupts, install_interrupt_handlers

WATCH_INTERVAL = 2.0


def status(
    config: Path = typer.Argument(..., help="Configuration file (INI)."),
    job: str = typer.Argument(None, help="Job id (default: the latest job of the deployment)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON line instead of tables."),
    watch: bool = typer.Option(False, "--watch", help="Refresh until the job ends (Ctrl-C stops)."),
) -> None:
    """Per scan: files done/failed/pending, frames/s; live workers, stranded queues, failures.

    Without a broker_url, the job's embedded broker is read from its workspace (started there
    for the time of the command when no ringflow process runs it). Exit 0 when every scan is
    written or the job still runs, 1 when a file or scan failed or the run was interrupted.
    """
    cfg = load_config(config)
    prefix = cfg.queue.queue_prefix
    install_interrupt_handlers()
    with user_errors(), job_broker(cfg.broker_url(), workspace(cfg)) as broker:
        if broker.stopped:
            say("stopped", f"left running by a killed run: {', '.join(broker.stopped)}")
        app = configure(broker.url)
        job_id = job or latest_job(app.backend.client, prefix)
        try:
            current = job_status(app, prefix, job_id)
            while watch and current.state == "running" and not broker.owner:
                show(current, as_json)
                time.sleep(WATCH_INTERVAL)
                raise_if_stopped()
                current = job_status(app, prefix, job_id)
        except KeyboardInterrupt:
            ignore_further_interrupts()
            raise typer.Exit(EXIT_INTERRUPTED) from None
        if broker.owner and current.state == "running":  # its run was killed
            current.state = "interrupted"
    show(current, as_json)
    if current.state == "interrupted":
        say("hint", f"finish it with: ringflow requeue {config} {job_id} --stranded")
    if current.state in ("incomplete", "interrupted"):
        raise typer.Exit(EXIT_FAILED)


def show(current: JobStatus, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(current.as_dict()))
        return
    c = current.counts
    say(
        "job",
        f"{current.job_id} {current.state}: {c['done']}/{c['files']} files done, "
        f"{c['failed']} failed, {c['retrying']} retrying, {c['pending']} pending; "
        f"{current.frames_done} frames, {current.frames_per_s} frames/s",
    )
    scans = Table("scan", "files", "done", "failed", "pending", "frames", "state", "output file")
    for s in sorted(current.scans, key=lambda s: s.scan):
        state = s.state + (f" ({s.message})" if s.message else "")
        scans.add_row(
            os.path.basename(s.scan), str(s.files), str(s.done), str(s.failed), str(s.pending),
            str(s.frames), state, os.path.basename(s.output),
        )  # fmt: skip
    err.print(scans)
    if current.workers:
        workers = Table("worker", "queues", "SLURM job")
        for w in current.workers:
            workers.add_row(w["name"], ", ".join(w["queues"]), str(w.get("slurm_job") or "-"))
        err.print(workers)
    else:
        say("workers", "none answering")
    for queue in current.stranded:
        say("stranded", f"{queue}: {current.queued[queue]} file(s) waiting, no live worker")
    for r in current.retrying:
        say("retrying", f"{r['message']} (attempt {r['attempts']}, next in {r['next_in_s']} s)")
    for f in current.failed:
        say("failed", f"{f['message']} (attempts {f.get('attempts', 1)}, {f.get('worker', '?')})")
