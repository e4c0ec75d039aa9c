"""Per-job progress and failures in Redis: counters and a failure hash, one pipeline per update.

Workers write, the client reads; keys expire with the job.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from . import keys

JOB_TTL = 7 * 24 * 3600


@dataclass
class Progress:
    files_done: int = 0
    files_failed: int = 0
    frames_done: int = 0
    failures: dict[str, dict] = field(default_factory=dict)


def register_job(client, prefix: str, job_id: str, manifest: dict[str, dict]) -> None:
    """Store every file task of the job before any of them runs."""
    pipe = client.pipeline()
    progress = keys.job_progress(prefix, job_id)
    pipe.hset(progress, mapping={"files_done": 0, "files_failed": 0, "frames_done": 0})
    if manifest:
        name = keys.job_manifest(prefix, job_id)
        pipe.hset(name, mapping={k: json.dumps(v) for k, v in manifest.items()})
        pipe.expire(name, JOB_TTL)
    pipe.expire(progress, JOB_TTL)
    pipe.execute()


def add_frames(client, prefix: str, job_id: str, count: int) -> None:
    client.hincrby(keys.job_progress(prefix, job_id), "frames_done", count)


def mark_done(client, prefix: str, job_id: str) -> None:
    client.hincrby(keys.job_progress(prefix, job_id), "files_done", 1)


def mark_failed(client, prefix: str, job_id: str, task_id: str, failure: dict) -> None:
    pipe = client.pipeline()
    pipe.hincrby(keys.job_progress(prefix, job_id), "files_failed", 1)
    pipe.hset(keys.job_failed(prefix, job_id), task_id, json.dumps(failure))
    pipe.expire(keys.job_failed(prefix, job_id), JOB_TTL)
    pipe.execute()


def read_progress(client, prefix: str, job_id: str) -> Progress:
    pipe = client.pipeline()
    pipe.hgetall(keys.job_progress(prefix, job_id))
    pipe.hgetall(keys.job_failed(prefix, job_id))
    counters, failed = pipe.execute()
    counters = {_str(k): int(v) for k, v in counters.items()}
    return Progress(
        files_done=counters.get("files_done", 0),
        files_failed=counters.get("files_failed", 0),
        frames_done=counters.get("frames_done", 0),
        failures={_str(k): json.loads(v) for k, v in failed.items()},
    )


def _str(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
