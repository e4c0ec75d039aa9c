"""Reaching the broker: a bounded connection check, and the 0600 file workers read the URL from."""

from __future__ import annotations

import os
import tempfile

import redis

from tasks.config import Config, redact_url
from tasks.errors import BrokerError, ConfigError

CHECK_TIMEOUT = 10.0


def shared_broker_url(config: Config, command: str) -> str:
    """The external broker's URL, checked reachable (:func:`check_broker`).

    Distributed commands cannot use a private embedded Redis.
    """
    url = config.broker_url()
    if not url:
        raise ConfigError(
            "queue",
            "broker_url",
            "",
            f"'ringflow {command}' needs a Redis that workers on other nodes reach: set "
            "broker_url = redis://host:port/0 (or $RINGFLOW_BROKER_URL)",
            config.source,
        )
    check_broker(url)
    return url


def check_broker(url: str, timeout: float = CHECK_TIMEOUT) -> None:
    """Fail within ``timeout`` seconds on a wrong password or an unreachable broker."""
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        client.ping()
    except redis.AuthenticationError:
        raise BrokerError(f"broker {redact_url(url)}: authentication failed (password)") from None
    except redis.ResponseError as exc:  # e.g. NOAUTH: the server wants a password
        raise BrokerError(f"broker {redact_url(url)}: {exc}") from None
    except (redis.RedisError, ValueError) as exc:
        raise BrokerError(f"broker {redact_url(url)} unreachable: {exc}") from None


def write_url_file(folder: str, url: str) -> str:
    """Write ``url`` to ``folder``/broker.url, mode 0600, atomically; return its path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "broker.url")
    fd, tmp = tempfile.mkstemp(prefix=".broker.url.", dir=folder)  # created 0600
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(url + "\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
