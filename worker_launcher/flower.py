"""Celery Flower on the deployment's broker, with basic authentication by default.

Credentials and the broker URL reach Flower through its environment (FLOWER_BASIC_AUTH,
RINGFLOW_BROKER_URL), never its command line, which any user of the machine can read.

Flower's REST API can send any task with any arguments, revoke tasks and shut workers
down, for anyone it authenticates. Flower's ``read_only`` option stops the control calls but
not task sending, so Flower runs through this module (``python -m worker_launcher.flower``),
which removes those handlers (:data:`CONTROL_API`) from Flower's URL table, then starts
Flower as ``celery flower`` does; they answer 404. ``--allow-task-api`` keeps them.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from tasks.app import Signing
from tasks.config import (
    FLOWER_PASSWORD_ENV,
    FLOWER_PASSWORD_FILE_ENV,
    FLOWER_USER_ENV,
    Config,
)
from tasks.errors import ConfigError
from tasks.outputs import workspace

from .broker import check_broker
from .embedded import attached_broker
from .script import project_root

ALLOW_TASK_API = "--allow-task-api"
LOOPBACK = "127.0.0.1"
# Flower's handlers that send, apply, revoke, abort or time-limit tasks, or control workers
# (shut down, pool restart/grow/shrink/autoscale, add/cancel consumers)
CONTROL_API = (
    "/api/task/apply/",
    "/api/task/async-apply/",
    "/api/task/send-task/",
    "/api/task/abort/",
    "/api/task/revoke/",
    "/api/task/timeout/",
    "/api/task/rate-limit/",
    "/api/worker/",
)


@dataclass(frozen=True)
class FlowerCommand:
    argv: list[str]
    env: dict[str, str]
    url: str  # where to browse, without credentials


def flower_credentials(config: Config) -> tuple[str, str] | None:
    """(user, password) from the environment or [monitoring]; None when none is configured."""
    mon = config.monitoring
    user = os.environ.get(FLOWER_USER_ENV) or mon.flower_user
    password = os.environ.get(FLOWER_PASSWORD_ENV, "")
    path = os.environ.get(FLOWER_PASSWORD_FILE_ENV) or mon.flower_password_file
    if not password and path:
        try:
            with open(path, encoding="utf-8") as fh:
                password = fh.read().strip()
        except OSError as exc:
            raise ConfigError(
                "monitoring", "flower_password_file", path, f"cannot read: {exc.strerror}"
            ) from None
    if not password:
        return None
    if ":" in user:
        raise ConfigError("monitoring", "flower_user", user, "no ':' in the user name")
    if "," in password:
        raise ConfigError("monitoring", "flower_password_file", path, "no ',' in the password")
    return user, password


def broker_to_watch(config: Config) -> tuple[str, int]:
    """The configured broker, checked reachable, and 0; else the embedded broker of the run
    using the configuration's workspace, and the pid of the process that owns it."""
    url = config.broker_url()
    if url:
        check_broker(url)
        return url, 0
    broker = attached_broker(workspace(config))
    return broker.url, broker.owner_pid


def flower_command(
    config: Config,
    broker_url: str,
    insecure: bool = False,
    port: int | None = None,
    allow_task_api: bool = False,
) -> FlowerCommand:
    """The Flower process to start; refuses to run without authentication unless insecure,
    which binds the loopback address only. Without ``allow_task_api``, Flower cannot send,
    revoke or abort tasks, nor control workers (:data:`CONTROL_API`)."""
    mon = config.monitoring
    credentials = flower_credentials(config)
    env = dict(os.environ)
    env.pop("FLOWER_BASIC_AUTH", None)
    if credentials:
        env["FLOWER_BASIC_AUTH"] = ":".join(credentials)
    elif insecure:
        env["FLOWER_UNAUTHENTICATED_API"] = "true"
    else:
        raise ConfigError(
            "monitoring",
            "flower_password_file",
            "",
            f"Flower needs a password: set flower_password_file, or ${FLOWER_PASSWORD_ENV}; "
            "--insecure starts it without authentication",
            config.source,
        )
    env["RINGFLOW_BROKER_URL"] = broker_url
    env["PYTHONPATH"] = os.pathsep.join(p for p in (project_root(), env.get("PYTHONPATH")) if p)
    signing = Signing.of(config.queue)  # Flower's inspect and control messages are signed too
    for name in Signing.env_names():
        env.pop(name, None)
    env.update(signing.env() if signing else {})
    port = port or mon.flower_port
    address = LOOPBACK if insecure else mon.flower_address
    argv = [sys.executable, "-m", __name__, *([ALLOW_TASK_API] if allow_task_api else [])]
    argv += ["-A", "tasks.app", "flower", f"--address={address}", f"--port={port}"]
    return FlowerCommand(argv, env, f"http://{address}:{port}/")


def without_control_api(handlers: list) -> list:
    """Flower's URL table without the :data:`CONTROL_API` handlers (tuples or URLSpecs)."""

    def pattern(handler) -> str:
        return handler[0] if isinstance(handler, tuple) else handler.regex.pattern

    return [h for h in handlers if not pattern(h).startswith(CONTROL_API)]


def main(argv: list[str]) -> None:
    """``celery ARGV`` (``-A tasks.app flower ...``), Flower's control API removed first
    unless ARGV starts with --allow-task-api."""
    import flower.app
    from celery.bin.celery import main as celery_main

    if argv[:1] == [ALLOW_TASK_API]:
        argv = argv[1:]
    else:  # Flower reads this list when it builds its application
        flower.app.default_handlers[:] = without_control_api(flower.app.default_handlers)
    sys.argv = ["celery", *argv]
    celery_main()


if __name__ == "__main__":
    main(sys.argv[1:])
