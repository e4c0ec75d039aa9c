"""ringflow flower: Celery Flower on the deployment's broker, authenticated."""

from __future__ import annotations

import subprocess
from pathlib import Path

import typer

from worker_launcher.broker import check_broker, shared_broker_url
from worker_launcher.flower import flower_command

from .common import EXIT_INTERRUPTED, load_config, say, user_errors


def flower(
    config: Path = typer.Argument(..., help="Configuration file (INI)."),
    insecure: bool = typer.Option(
        False, "--insecure", help="Start without authentication (trusted networks only)."
    ),
    port: int = typer.Option(None, "--port", help="Port (default: [monitoring] flower_port)."),
) -> None:
    """Monitor queued and running tasks in a browser; Prometheus metrics at /metrics."""
    cfg = load_config(config)
    with user_errors():
        url = shared_broker_url(cfg, "flower")
        check_broker(url)
        command = flower_command(cfg, url, insecure, port)
    if insecure:
        say("warning", "Flower runs WITHOUT authentication (--insecure)")
    say("flower", f"{command.url} (Ctrl-C to stop)")
    process = subprocess.Popen(command.argv, env=command.env)
    try:
        code = process.wait()
    except KeyboardInterrupt:
        process.terminate()
        process.wait(10)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    raise typer.Exit(code)
