"""Reaching the broker: a bounded connection check, and the 0600 file workers read the URL from."""

from __future__ import annotations

import os
import tempfile
from urllib.parse import unquote, urlsplit

import redis

from tasks.config import Config, redact_url
from tasks.errors import BrokerError, ConfigError
from tasks.writers import make_private_folder

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
        client = redis_client(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        client.ping()
    except redis.AuthenticationError:
        raise BrokerError(f"broker {redact_url(url)}: authentication failed (password)") from None
    except redis.ResponseError as exc:  # e.g. NOAUTH: the server wants a password
        raise BrokerError(f"broker {redact_url(url)}: {exc}") from None
    except (ValueError, TypeError):  # its words may quote a piece of the URL: the secret
        raise BrokerError(
            f"broker {redact_url(url)} unreachable: the URL cannot be parsed (a password "
            "holding / ? # @ or : must be percent-encoded)"
        ) from None
    except (redis.RedisError, OSError) as exc:
        raise BrokerError(f"broker {redact_url(url)} unreachable: {_reason(exc, url)}") from None


def _reason(exc: BaseException, url: str) -> str:
    """The first line of ``exc``'s message with any URL or piece of ``url``'s secret hidden."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    text = redact_url(text)
    userinfo = urlsplit(url).netloc.rpartition("@")[0]
    for secret in {userinfo.partition(":")[2], unquote(userinfo.partition(":")[2])} - {""}:
        text = text.replace(secret, "***")
    return text


def redis_client(url: str, **options) -> redis.Redis:
    """A redis-py client for any broker URL ringflow accepts, ``redis+socket://`` included
    (kombu's name for a unix socket, which redis-py spells ``unix://``)."""
    parts = urlsplit(url)
    if parts.scheme != "redis+socket":
        return redis.Redis.from_url(url, **options)
    query = dict(p.split("=", 1) for p in parts.query.split("&") if "=" in p)
    return redis.Redis(
        unix_socket_path=unquote(parts.path),
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        db=int(query.get("virtual_host", query.get("db", 0)) or 0),
        **options,
    )


def write_url_file(folder: str, url: str) -> str:
    """Write ``url`` to ``folder``/broker.url, mode 0600, atomically; return its path.

    A folder that cannot take it (full disk, read-only) is one line naming the folder."""
    path = os.path.join(folder, "broker.url")
    tmp = ""
    try:
        make_private_folder(folder)
        fd, tmp = tempfile.mkstemp(prefix=".broker.url.", dir=folder)  # created 0600
        with os.fdopen(fd, "w") as fh:
            fh.write(url + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        raise BrokerError(f"{folder}: cannot write the broker's URL file: {exc.strerror}") from None
    finally:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)
    return path
