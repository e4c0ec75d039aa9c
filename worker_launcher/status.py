"""What a job looks like now, from its records in Redis: per scan, per file, per worker.

Read-only: built from the registry (manifest, done, retrying, failed files), the scans'
callback results, the GPU queues' lengths and the workers that answer. Works while the job
runs and after it ended, as long as its records have not expired.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from tasks import keys, registry
from tasks.errors import RingflowError
from tasks.queues import pending_files
from tasks.registry import text

from .distributed import scan_outcomes
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
    state: str = "running"  # running, written, incomplete (a file failed), failed (assembly)
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
    frames_done: int = 0
    frames_per_s: float = 0.0
    state: str = "running"
    counts: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self) | {"scans": [asdict(s) | {"pending": s.pending} for s in self.scans]}


def latest_job(client, prefix: str) -> str:
    """The most recently submitted job of the deployment."""
    newest = client.zrevrange(keys.jobs(prefix), 0, 0)
    if not newest:
        raise RingflowError(f"no job recorded for queue_prefix {prefix!r} on this broker")
    return text(newest[0])


def job_status(app, prefix: str, job_id: str) -> JobStatus:
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
    for scan, outcome in scan_outcomes(app, registered).items():
        _apply_outcome(scans[scan], outcome)
    nodes = live_nodes(app, prefix)
    queued = pending_files(client, prefix)
    consumed = {q for node in nodes for q in node.queues}
    status = JobStatus(
        job_id=job_id,
        submitted=float(submitted),
        scans=list(scans.values()),
        failed=[f | {"task_id": t} for t, f in progress.failures.items()],
        retrying=[r | {"task_id": t} for t, r in retries.items() if t not in done],
        workers=[n.as_dict(prefix) for n in nodes],
        queued=queued,
        stranded=sorted(q for q in queued if q not in consumed),
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
    status.state = _job_state(status.scans)
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


def _apply_outcome(row: ScanStatus, outcome: dict | None) -> None:
    if outcome is None:
        return
    if not isinstance(outcome, dict):
        row.state, row.message = "failed", f"assembly: {outcome}"
    elif outcome.get("status") == "done":
        row.state = "written"
    elif outcome.get("status") == "incomplete":
        row.state, row.message = "incomplete", f"{len(outcome.get('failed', []))} file(s) failed"
    else:
        row.state, row.message = "failed", str(outcome.get("message", ""))


def _job_state(scans: list[ScanStatus]) -> str:
    if any(s.state == "running" for s in scans):
        return "running"
    return "done" if all(s.state == "written" for s in scans) else "incomplete"


def _rate(status: JobStatus, done: dict) -> float:
    """Frames per second since submission: up to now while running, else to the last file."""
    times = [d["time_s"] for d in done.values() if "time_s" in d]
    end = time.time() if status.counts["pending"] or not times else max(times)
    elapsed = max(end - status.submitted, 1e-3)
    return round(status.frames_done / elapsed, 1)
