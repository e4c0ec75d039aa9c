"""ringflow flower: Celery Flower on the deployment's broker, authenticated."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import typer

from worker_launcher.flower import broker_to_watch, flower_command
from worker_launcher.watch import raise_if_stopped

from .common import exit_interrupted, load_config, say, user_errors
from .run_cmd import ignore_further_interrupts, install_interrupt_handlers


def flower(
    config: Path = typer.Argument(..., metavar="CONFIG", help="Configuration file (INI)."),
    insecure: bool = typer.Option(
        False,
        "--insecure",
        help="Start without authentication, on 127.0.0.1 only (whatever flower_address says).",
    ),
    allow_task_api: bool = typer.Option(
        False,
        "--allow-task-api",
        help="Keep Flower's API that sends, revokes and aborts tasks and controls workers "
        "(off: those endpoints answer 404).",
    ),
    port: int = typer.Option(None, "--port", help="Port (default: [monitoring] flower_port)."),
) -> None:
    """Monitor queued and running tasks in a browser; Prometheus metrics at /metrics.

    Without a broker_url, Flower attaches to the embedded broker of the ringflow run (or
    workers local) that uses the configuration's workspace, and loses it when that run ends.

    Example: ringflow flower my.ini
    """
    cfg = load_config(config)
    with user_errors():
        url, owner = broker_to_watch(cfg)
        command = flower_command(cfg, url, insecure, port, allow_task_api)
    if owner:
        say("flower", f"attached to the embedded broker of process {owner}")
    if insecure:
        say("warning", "Flower runs WITHOUT authentication (--insecure), on 127.0.0.1 only")
    if allow_task_api:
        say("warning", "Flower's API can send and revoke tasks, and stop workers")
    say("flower", f"{command.url} (Ctrl-C to stop)")
    install_interrupt_handlers()
    process = subprocess.Popen(command.argv, env=command.env)
    try:
        while (code := process.poll()) is None:
            raise_if_stopped()
            time.sleep(0.5)
    except KeyboardInterrupt:
        ignore_further_interrupts()
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:  # never leave a Flower behind on its port
            process.kill()
            process.wait(10)
        exit_interrupted()
    raise typer.Exit(code)
