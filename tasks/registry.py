"""Per-job records in Redis: manifest, counters, done, retrying and failed files.

Workers write, the client reads; one pipeline per update; every key expires with the job
(``[queue] job_ttl_days``). With Redis persistence on (AOF), the records outlive a restart.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import redis

from . import keys
from .config import Config
from .errors import RingflowError
from .payloads import ConfigRecord, digest_of

T = TypeVar("T")
CONFIGS_KEPT = 16  # configurations a worker process keeps, one per job it ran files of
_configs: dict[tuple[str, str, str], Config] = {}

JOB_TTL = 7 * 24 * 3600
BROKER_WAIT_S = 40.0  # as long as publishing waits for a restarting broker (tasks.app)


def durably(write: Callable[[], T], wait_s: float = BROKER_WAIT_S) -> T:
    """Run ``write`` (a registry update or read), again while the broker restarts, up to
    ``wait_s``; its value.

    A file task's record is its end: failing it for a broker back a second later would fail
    the file's chord, and the scan, for nothing. A write repeated after a reply lost may count
    a file twice in the live counters; the records themselves (hashes by task id) do not.
    """
    deadline = time.monotonic() + wait_s
    delay = 0.2
    while True:
        try:
            return write()
        except (redis.ConnectionError, redis.TimeoutError):
            if time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)
            delay = min(2 * delay, 5.0)


@dataclass
class Progress:
    files_done: int = 0
    files_failed: int = 0
    frames_done: int = 0
    failures: dict[str, dict] = field(default_factory=dict)
    scan_frames: dict[str, int] = field(default_factory=dict)  # scan key -> frames done


def register_job(
    client,
    prefix: str,
    job_id: str,
    manifest: dict[str, dict],
    scans: dict[str, dict],
    ttl: int = JOB_TTL,
    config: ConfigRecord | None = None,
    monitors: dict[str, str] | None = None,
) -> None:
    """Store the job's configuration, every file task and scan of the job and the files'
    monitor values, in one pipeline, before any of them runs.

    ``scans`` maps scan key -> {scan: payload, callback: chord callback task id};
    ``monitors`` task id -> JSON list of its frames' monitor values.
    """
    pipe = client.pipeline()
    if config is not None:
        pipe.set(keys.job_config(prefix, job_id), config.text, ex=ttl)
    if monitors:
        pipe.hset(keys.job_monitors(prefix, job_id), mapping=monitors)
        pipe.expire(keys.job_monitors(prefix, job_id), ttl)
    progress = keys.job_progress(prefix, job_id)
    pipe.hset(progress, mapping={"files_done": 0, "files_failed": 0, "frames_done": 0})
    pipe.expire(progress, ttl)
    for name, content in (
        (keys.job_manifest(prefix, job_id), manifest),
        (keys.job_scans(prefix, job_id), scans),
    ):
        if content:
            pipe.hset(name, mapping={k: json.dumps(v) for k, v in content.items()})
            pipe.expire(name, ttl)
    pipe.zadd(keys.jobs(prefix), {job_id: time.time()})
    pipe.execute()


def job_config(client, prefix: str, job_id: str, digest: str) -> Config:
    """The configuration a file task names by ``digest``: read from the job's registry and
    checked once per worker process and job, kept for the job's other files."""
    key = (prefix, job_id, digest)
    if key not in _configs:
        raw = durably(lambda: client.get(keys.job_config(prefix, job_id)))
        if raw is None:
            raise RingflowError(
                f"job {job_id}: no configuration in the registry of prefix {prefix!r} "
                "(its records expired, or the task came from another broker)"
            )
        if len(_configs) >= CONFIGS_KEPT:
            _configs.clear()
        _configs[key] = ConfigRecord.load(text(raw), digest, job_id)
    return _configs[key]


def file_monitor(client, prefix: str, job_id: str, task_id: str, digest: str) -> list[float]:
    """The monitor values of a file task's frames, which it names by ``digest``."""
    raw = durably(lambda: client.hget(keys.job_monitors(prefix, job_id), task_id))
    if raw is None:
        raise RingflowError(
            f"job {job_id}: no monitor values of file task {task_id} in the registry"
        )
    values = text(raw)
    if digest_of(values) != digest:
        raise RingflowError(
            f"job {job_id}: the monitor values of file task {task_id} in the registry are not "
            "those its message names (digest differs): refused"
        )
    return json.loads(values)


def read_manifest(client, prefix: str, job_id: str) -> dict[str, dict]:
    """task_id -> file task payload (with its GPU slot), as registered."""
    return _read_json_hash(client, keys.job_manifest(prefix, job_id))


def read_scans(client, prefix: str, job_id: str) -> dict[str, dict]:
    """scan key -> {scan: payload, callback: task id}, as registered."""
    return _read_json_hash(client, keys.job_scans(prefix, job_id))


def read_scan(client, prefix: str, job_id: str, scan_key: str) -> dict | None:
    """One scan's {scan: payload, callback: task id}, as registered; None if it is not.

    An assembly reads only its own scan: each payload lists the scan's partials, so the
    whole hash of a 100-scan job of 1,000-file scans is about 13 MB.
    """
    raw = client.hget(keys.job_scans(prefix, job_id), scan_key)
    return None if raw is None else json.loads(raw)


def add_frames(client, prefix: str, job_id: str, scan_key: str, count: int) -> None:
    """Count ``count`` more frames integrated, for the job and for its scan ``scan_key``."""
    name = keys.job_progress(prefix, job_id)
    pipe = client.pipeline(transaction=False)
    pipe.hincrby(name, "frames_done", count)
    pipe.hincrby(name, keys.SCAN_FRAMES + scan_key, count)
    pipe.execute()


def mark_done(
    client, prefix: str, job_id: str, task_id: str, info: dict, ttl: int = JOB_TTL
) -> None:
    """Count a finished file and record where it ran (worker, queue, GPU) and how long."""
    name = keys.job_done(prefix, job_id)
    _record(client, prefix, job_id, "files_done", name, task_id, info, ttl)


def read_done(client, prefix: str, job_id: str) -> dict[str, dict]:
    """task_id -> where and how each finished file ran."""
    return _read_json_hash(client, keys.job_done(prefix, job_id))


def mark_failed(
    client, prefix: str, job_id: str, task_id: str, failure: dict, ttl: int = JOB_TTL
) -> None:
    """Count a file that failed for good (error, message, traceback tail, attempts, where)."""
    name = keys.job_failed(prefix, job_id)
    _record(client, prefix, job_id, "files_failed", name, task_id, failure, ttl)


def mark_retrying(
    client, prefix: str, job_id: str, task_id: str, attempt: dict, ttl: int = JOB_TTL
) -> None:
    """Record a transient failure that an automatic retry will follow."""
    name = keys.job_retries(prefix, job_id)
    pipe = client.pipeline()
    pipe.hset(name, task_id, json.dumps(attempt))
    pipe.expire(name, ttl)
    pipe.execute()


def read_retries(client, prefix: str, job_id: str) -> dict[str, dict]:
    """task_id -> the last transient failure of files retried automatically."""
    return _read_json_hash(client, keys.job_retries(prefix, job_id))


def reopen(client, prefix: str, job_id: str, task_ids: list[str], scans: dict[str, dict]) -> None:
    """Failed files about to be requeued: out of the failed record (one pipeline), with
    their scans' new callback ids, so status counts them pending again."""
    pipe = client.pipeline()
    pipe.hdel(keys.job_failed(prefix, job_id), *task_ids)
    pipe.hdel(keys.job_retries(prefix, job_id), *task_ids)
    pipe.hincrby(keys.job_progress(prefix, job_id), "files_failed", -len(task_ids))
    if scans:
        pipe.hset(
            keys.job_scans(prefix, job_id), mapping={k: json.dumps(v) for k, v in scans.items()}
        )
    pipe.execute()


def mark_scan_finished(client, prefix: str, job_id: str, scan_key: str) -> dict[str, dict]:
    """Set "finished" in the scan's entry, then read every scan of the job.

    Each assembly writes its mark before it reads the others' (Redis runs one command at a
    time), so of two finishing together the second sees both: a folder's last scan always
    finds the others finished. Nothing else writes the entry of a scan being assembled.
    """
    name = keys.job_scans(prefix, job_id)
    entry = json.loads(client.hget(name, scan_key))
    client.hset(name, scan_key, json.dumps(entry | {"finished": True}))
    return read_scans(client, prefix, job_id)


def _record(
    client, prefix: str, job_id: str, counter: str, name: str, task_id: str, info: dict, ttl: int
) -> None:
    """Bump ``counter``, store ``info`` under ``task_id`` in hash ``name``, clear its retry."""
    pipe = client.pipeline()
    pipe.hincrby(keys.job_progress(prefix, job_id), counter, 1)
    pipe.hset(name, task_id, json.dumps(info))
    pipe.expire(name, ttl)
    pipe.hdel(keys.job_retries(prefix, job_id), task_id)
    pipe.execute()


def _read_json_hash(client, name: str) -> dict[str, dict]:
    return {text(k): json.loads(v) for k, v in client.hgetall(name).items()}


def finished_task_ids(client, prefix: str, job_id: str) -> set[str]:
    """Task ids of the job's files recorded done or failed (their last attempt is over)."""
    pipe = client.pipeline()
    pipe.hkeys(keys.job_done(prefix, job_id))
    pipe.hkeys(keys.job_failed(prefix, job_id))
    done, failed = pipe.execute()
    return {text(t) for t in (*done, *failed)}


def read_progress(client, prefix: str, job_id: str) -> Progress:
    pipe = client.pipeline()
    pipe.hgetall(keys.job_progress(prefix, job_id))
    pipe.hgetall(keys.job_failed(prefix, job_id))
    counters, failed = pipe.execute()
    counters = {text(k): int(v) for k, v in counters.items()}
    size = len(keys.SCAN_FRAMES)
    return Progress(
        files_done=counters.get("files_done", 0),
        files_failed=counters.get("files_failed", 0),
        frames_done=counters.get("frames_done", 0),
        failures={text(k): json.loads(v) for k, v in failed.items()},
        scan_frames={k[size:]: v for k, v in counters.items() if k.startswith(keys.SCAN_FRAMES)},
    )


def text(value) -> str:
    """A Redis reply (bytes or str) as str."""
    return value.decode() if isinstance(value, bytes) else str(value)
