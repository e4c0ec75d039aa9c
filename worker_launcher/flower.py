"""Celery Flower on the deployment's broker, with basic authentication by default.

Credentials and the broker URL reach Flower through its environment (FLOWER_BASIC_AUTH,
RINGFLOW_BROKER_URL), never its command line, which any user of the machine can read.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from tasks.config import (
    FLOWER_PASSWORD_ENV,
    FLOWER_PASSWORD_FILE_ENV,
    FLOWER_USER_ENV,
    Config,
)
from tasks.errors import ConfigError

from .script import project_root


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


def flower_command(
    config: Config, broker_url: str, insecure: bool = False, port: int | None = None
) -> FlowerCommand:
    """The Flower process to start; refuses to run without authentication unless insecure."""
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
    port = port or mon.flower_port
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "tasks.app",
        "flower",
        f"--address={mon.flower_address}",
        f"--port={port}",
    ]
    return FlowerCommand(argv, env, f"http://{mon.flower_address}:{port}/")
