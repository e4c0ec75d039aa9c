"""The embedded broker of a job workspace: its data kept on disk, one owner at a time.

``ringflow run`` starts the private server of :mod:`.redis_server` (a unix socket only) with
an append-only file (AOF) in ``<workspace>/broker``, so the job's records outlive the run:
``status`` and ``requeue`` start the server again on the same data. One ringflow process
owns the folder at a time (``flock`` on ``owner.lock``); the others reach the owner's running
server through its 0600 URL file instead of starting a second server on the same data.

The owner records every process it starts (server and local workers). A ringflow process
that was killed leaves them behind; the next owner stops them before it starts anew.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import psutil

from tasks.errors import BrokerError
from tasks.writers import PRIVATE_FILE, make_private_folder, private_file

from .broker import check_broker, write_url_file
from .local import describe_exit
from .redis_server import LOG_NAME, EmbeddedRedis, start_embedded_redis

LOCK, URL, PROCESSES = "owner.lock", "broker.url", "processes.json"
SERVER_RESTARTS = 3  # restarts of a dead embedded server within one run before giving up


@dataclass
class ServerKeeper:
    """The owner's embedded server, started again when it died.

    Same folder, so the same socket and AOF (every acknowledged write is in the file: the
    server writes it before it replies), and the same password: workers and the client
    reconnect to the URL they have, and find the job's queues and records as they were.
    """

    folder: str
    server: EmbeddedRedis
    restarts: int = 0

    def restart_if_dead(self) -> str:
        """'' while the server runs; else start it again and say so in one line."""
        code = self.server.process.poll()
        if code is None:
            return ""
        how = describe_exit(code)
        log = os.path.join(self.folder, LOG_NAME)
        if self.restarts >= SERVER_RESTARTS:
            raise BrokerError(
                f"embedded broker {how} (log {log}); restarted {self.restarts} times, giving up"
            )
        self.restarts += 1
        self.server = start_embedded_redis(
            self.folder, persistent=True, password=self.server.password
        )
        record_process(self.folder, self.server.process.pid, "redis")
        return f"embedded broker {how}; started again from its AOF (log {log})"


@dataclass(frozen=True)
class WorkspaceBroker:
    folder: str
    url: str
    url_file: str
    owner: bool  # this process started the server and stops it on exit
    owner_pid: int = 0
    embedded: bool = True  # False: the configured external broker
    stopped: tuple[str, ...] = ()  # 'role pid' of what a killed owner had left running
    keeper: ServerKeeper | None = field(default=None, compare=False)  # the owner's server

    def record(self, pid: int, role: str) -> None:
        """Remember a process this owner started, to stop it if the owner is killed."""
        if self.owner:
            record_process(self.folder, pid, role)


def broker_folder(workspace: str) -> str:
    return os.path.join(workspace, "broker")


@contextmanager
def job_broker(broker_url: str | None, workspace: str) -> Iterator[WorkspaceBroker]:
    """The configured broker (checked reachable), else the workspace's embedded one."""
    if not broker_url:
        with workspace_broker(workspace) as broker:
            yield broker
        return
    check_broker(broker_url)
    make_private_folder(workspace)
    folder = broker_folder(workspace)
    url_file = write_url_file(folder, broker_url)
    yield WorkspaceBroker(folder, broker_url, url_file, owner=False, embedded=False)


@contextmanager
def workspace_broker(workspace: str) -> Iterator[WorkspaceBroker]:
    """The workspace's broker: started here (and stopped on exit) unless another ringflow
    process owns it, in which case that process's server is used as it is."""
    folder = broker_folder(workspace)
    make_private_folder(workspace)  # logs, scripts, partials and the AOF: the owner's only
    make_private_folder(folder)
    lock = _take_lock(folder)
    if lock is None:
        yield _running_broker(folder)
        return
    try:
        _forget_url(folder)  # a killed owner's: others must not try it while this one starts
        stopped = tuple(stop_left_behind(folder))
        keeper = ServerKeeper(folder, start_embedded_redis(folder, persistent=True))
        try:
            record_process(folder, keeper.server.process.pid, "redis")
            url_file = write_url_file(folder, keeper.server.url)
            yield WorkspaceBroker(
                folder,
                keeper.server.url,
                url_file,
                owner=True,
                owner_pid=os.getpid(),
                stopped=stopped,
                keeper=keeper,
            )
        finally:
            _forget_url(folder)
            keeper.server.stop()  # SIGTERM: Redis flushes the AOF before it exits
            _forget_processes(folder)
    finally:
        lock.close()  # releases the flock


def attached_broker(workspace: str) -> WorkspaceBroker:
    """The embedded broker a running ringflow process owns in ``workspace``, used as it is.

    For monitors (Flower): with no run, there is nothing to watch and no broker is started;
    a BrokerError names the workspace instead.
    """
    folder = broker_folder(workspace)
    if os.path.isdir(folder):
        lock = _take_lock(folder)
        if lock is None:  # held: a run owns the broker
            return _running_broker(folder)
        lock.close()
    raise BrokerError(
        f"{workspace}: no ringflow process runs its embedded broker now; start "
        "'ringflow run' first, or set [queue] broker_url"
    )


def _forget_url(folder: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(folder, URL))


def _take_lock(folder: str):
    """The open, exclusively locked owner file; None if another process holds it."""
    fd = os.open(os.path.join(folder, LOCK), os.O_RDWR | os.O_CREAT | os.O_APPEND, PRIVATE_FILE)
    os.fchmod(fd, PRIVATE_FILE)
    fh = os.fdopen(fd, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        return None
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    return fh


def _running_broker(folder: str) -> WorkspaceBroker:
    pid = _owner_pid(folder)
    url_file = os.path.join(folder, URL)
    try:
        with open(url_file, encoding="utf-8") as fh:
            url = fh.read().strip()
    except OSError:
        url = ""
    if not url:
        raise BrokerError(
            f"{folder}: the embedded broker is owned by process {pid}, which is still "
            "starting or stopping it; try again in a moment"
        )
    check_broker(url)
    return WorkspaceBroker(folder, url, url_file, owner=False, owner_pid=pid)


def _owner_pid(folder: str) -> int:
    try:
        with open(os.path.join(folder, LOCK), encoding="utf-8") as fh:
            return int(fh.read().strip() or 0)
    except (OSError, ValueError):
        return 0


def record_process(folder: str, pid: int, role: str) -> None:
    records = _read_processes(folder)
    with contextlib.suppress(psutil.Error):
        records.append({"pid": pid, "role": role, "created": psutil.Process(pid).create_time()})
    _write_processes(folder, records)


def stop_left_behind(folder: str, timeout: float = 10.0) -> list[str]:
    """Stop what a killed owner left running: workers first (SIGKILL of each process group,
    their unacknowledged files are handed back later), then the server (SIGTERM: it flushes
    its AOF). Returns 'role pid' of each process stopped."""
    stopped = []
    records = sorted(_read_processes(folder), key=lambda r: r["role"] == "redis")
    for record in records:
        process = _same_process(record)
        if process is None:
            continue
        if record["role"] == "redis":
            process.terminate()
            with contextlib.suppress(psutil.TimeoutExpired):
                process.wait(timeout)
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        else:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(record["pid"], signal.SIGKILL)
        stopped.append(f"{record['role']} {record['pid']}")
    _forget_processes(folder)
    return stopped


def _same_process(record: dict) -> psutil.Process | None:
    """The recorded process if it still runs (same pid and start time: not a reused pid)."""
    try:
        process = psutil.Process(record["pid"])
        if abs(process.create_time() - record["created"]) < 0.01 and process.is_running():
            return process
    except (psutil.Error, KeyError):
        pass
    return None


def _read_processes(folder: str) -> list[dict]:
    try:
        with open(os.path.join(folder, PROCESSES), encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return []


def _write_processes(folder: str, records: list[dict]) -> None:
    path = os.path.join(folder, PROCESSES)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with os.fdopen(private_file(tmp, append=False), "w", encoding="utf-8") as fh:
            json.dump(records, fh)
        os.replace(tmp, path)
    finally:  # a full disk leaves no half-written copy behind
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _forget_processes(folder: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(folder, PROCESSES))
