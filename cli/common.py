"""What every command shares: loading a configuration and turning errors into one line."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from tasks.config import Config
from tasks.errors import ConfigError, RingflowError

err = Console(stderr=True, highlight=False, soft_wrap=True)

EXIT_FAILED = 1  # the job ran but some files failed
EXIT_USAGE = 2  # bad configuration or input: nothing was done
EXIT_INTERRUPTED = 130


def exit_interrupted() -> NoReturn:
    """Exit 130 once an interrupt has stopped everything the command started.

    Not through Python's normal exit: when the interrupt's KeyboardInterrupt passed through
    code a C extension ran with ``PyRun_*`` (during imports), CPython remembers it as
    unhandled even though the command caught it, and ends the process by SIGINT instead of
    with the exit code (-2 instead of 130, about one run in five). Streams are flushed first.
    """
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(EXIT_INTERRUPTED)


def load_config(path: Path) -> Config:
    try:
        config = Config.from_file(path)
    except ConfigError as exc:
        fail(exc)
    for warning in config.warnings:
        say("warning", f"{path}: {warning}")
    return config


def broker_errors() -> tuple[type[BaseException], ...]:
    """Exceptions meaning the broker went away mid-command (not a ringflow bug)."""
    import kombu.exceptions
    import redis

    return (redis.RedisError, kombu.exceptions.OperationalError, ConnectionError)


@contextmanager
def user_errors(
    code: int = EXIT_FAILED, usage: tuple[type[RingflowError], ...] = (ConfigError,)
) -> Iterator[None]:
    """Turn ringflow errors and a lost broker into one line and an exit code; no traceback.

    ``usage``: the errors that are the user's mistake (exit 2); any other ringflow error
    exits with ``code``."""
    try:
        yield
    except usage as exc:
        fail(exc, EXIT_USAGE)
    except RingflowError as exc:
        fail(exc, code)
    except broker_errors() as exc:
        say("error", f"lost the connection to the broker: {str(exc).splitlines()[0]}")
        raise typer.Exit(code) from None


def fail(exc: RingflowError, code: int = EXIT_USAGE) -> None:
    say("error", str(exc))
    raise typer.Exit(code)


def usage(text: str) -> None:
    """A mistake on the command line: one line, exit 2."""
    say("error", text)
    raise typer.Exit(EXIT_USAGE)


_STYLES = {
    "error": "red",
    "failed": "red",
    "interrupted": "red",
    "warning": "yellow",
    "recovery": "yellow",
}


def say_recovery(text: str) -> None:
    """A worker or broker that died and what was done about it (the supervisor's lines)."""
    say("recovery", text)


def say(kind: str, text: str) -> None:
    """One line on stderr: 'kind: text', the text shown verbatim (no rich markup)."""
    style = _STYLES.get(kind)
    label = f"[{style}]{kind}:[/]" if style else f"{kind}:"
    err.print(f"{label} {escape(text)}")
