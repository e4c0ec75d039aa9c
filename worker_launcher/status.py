"""What a job looks like now, from its records in Redis: per scan, per file, per worker.

Read-only: built from the registry (manifest, done, retrying, failed files), the scans'
callback results, the GPU queues' lengths and the workers that answer. Works while the job
runs and after it ended, as long as its records have not expired. State names and the
reading of callback results come from :mod:`tasks.states`.

A GPU queue holding files that no live worker consumes is *starting* while the job is
younger than ``start_timeout`` (``[queue] worker_start_timeout``: ``ringflow run`` starts
its workers as it submits, SLURM may queue them, and a run waits that long for them), and
*stranded* after: its worker died or never came, and ``requeue --stranded`` moves its files.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from tasks import keys, registry
from tasks.errors import RingflowError
from tasks.queues import pending_files
from tasks.registry import text
from tasks.states import JobState, ScanState, job_state, parse_outcome, scan_state

from .nodes import live_nodes
from .watch import done_frames


@dataclass
class ScanStatus:
    scan: str
    output: str
    files: int
    done: int = 0
    failed: int = 0
    retrying: int = 0
    frames: int = 0
    state: str = ScanState.RUNNING
    message: str = ""

    @property
    def pending(self) -> int:
        return self.files - self.done - self.failed


@dataclass
class JobStatus:
    job_id: str
    submitted: float
    scans: list[ScanStatus]
    failed: list[dict]  # file, scan, error, message, attempts, worker, time
    retrying: list[dict]
    workers: list[dict]  # live Celery workers of the deployment and their queues
    queued: dict[str, int]  # GPU queue -> files waiting in it
    stranded: list[str]  # GPU queues holding files that no live worker consumes
    starting: list[str] = field(default_factory=list)  # the same while workers may start
    frames_done: int = 0
    frames_per_s: float = 0.0
    state: str = JobState.RUNNING
    counts: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self) | {"scans": [asdict(s) | {"pending": s.pending} for s in self.scans]}


def latest_job(client, prefix: str) -> str:
    """The most recently submitted job of the deployment."""
    newest = client.zrevrange(keys.jobs(prefix), 0, 0)
    if not newest:
        raise RingflowError(f"no job recorded for queue_prefix {prefix!r} on this broker")
    return text(newest[0])


def job_status(app, prefix: str, job_id: str, start_timeout: float = 0.0) -> JobStatus:
    """The job's state now; queues without a live worker are *starting* for the first
    ``start_timeout`` seconds after submission, then *stranded* (see the module docstring)."""
    client = app.backend.client
    submitted = client.zscore(keys.jobs(prefix), job_id)
    files = registry.read_manifest(client, prefix, job_id)
    if submitted is None or not files:
        raise RingflowError(f"job {job_id}: unknown on this broker, or its records expired")
    done = registry.read_done(client, prefix, job_id)
    progress = registry.read_progress(client, prefix, job_id)
    retries = registry.read_retries(client, prefix, job_id)
    registered = registry.read_scans(client, prefix, job_id)
    scans = _scan_rows(registered, files, done, progress, retries)
    for key, entry in registered.items():
        outcome = parse_outcome(app.backend.get_task_meta(entry["callback"]))
        scans[key].state, scans[key].message = scan_state(outcome)
    nodes = live_nodes(app, prefix)
    queued = pending_files(client, prefix)
    consumed = {q for node in nodes for q in node.queues}
    unconsumed = sorted(q for q in queued if q not in consumed)
    young = time.time() - float(submitted) < start_timeout
    status = JobStatus(
        job_id=job_id,
        submitted=float(submitted),
        scans=list(scans.values()),
        failed=[f | {"task_id": t} for t, f in progress.failures.items()],
        retrying=[r | {"task_id": t} for t, r in retries.items() if t not in done],
        workers=[n.as_dict(prefix) for n in nodes],
        queued=queued,
        stranded=[] if young else unconsumed,
        starting=unconsumed if young else [],
        frames_done=progress.frames_done,
    )
    status.counts = {
        "files": len(files),
        "done": len(done),
        "failed": len(progress.failures),
        "retrying": len(status.retrying),
        "pending": len(files) - len(done) - len(progress.failures),
    }
    if not status.counts["pending"]:  # exact once nothing runs: the counter counts redone frames
        status.frames_done = done_frames(done)
    status.frames_per_s = _rate(status, done)
    status.state = job_state([s.state for s in status.scans])
    return status


def _scan_rows(scans: dict, files: dict, done: dict, progress, retries: dict) -> dict:
    rows = {
        key: ScanStatus(scan=key, output=entry["scan"]["output"], files=0)
        for key, entry in scans.items()
    }
    for task_id, task in files.items():
        row = rows.get(task["scan_key"])
        if row is None:
            continue
        row.files += 1
        if task_id in done:
            row.done += 1
            row.frames += int(done[task_id].get("frames", 0))
        elif task_id in progress.failures:
            row.failed += 1
        elif task_id in retries:
            row.retrying += 1
    return rows


def _rate(status: JobStatus, done: dict) -> float:
    """Frames per second since submission: up to now while running, else to the last file."""
    times = [d["time_s"] for d in done.values() if "time_s" in d]
    end = time.time() if status.counts["pending"] or not times else max(times)
    elapsed = max(end - status.submitted, 1e-3)
    return round(status.frames_done / elapsed, 1)
