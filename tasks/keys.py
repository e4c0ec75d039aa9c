"""Every queue name and Redis key ringflow uses, built from one place.

Templates are pinned by tests: changing one is a deliberate, visible act.
"""

from __future__ import annotations

GPU_QUEUE = "{prefix}.gpu{slot}"
ASSEMBLE_QUEUE = "{prefix}.assemble"
JOB_PROGRESS = "{prefix}:job:{job_id}:progress"
JOB_FAILED = "{prefix}:job:{job_id}:failed"
JOB_MANIFEST = "{prefix}:job:{job_id}:manifest"
JOB_SCANS = "{prefix}:job:{job_id}:scans"
JOB_DONE = "{prefix}:job:{job_id}:done"
JOB_RETRIES = "{prefix}:job:{job_id}:retries"
JOB_CONFIG = "{prefix}:job:{job_id}:config"
JOB_MONITORS = "{prefix}:job:{job_id}:monitors"
JOBS = "{prefix}:jobs"
WORKERS = "{prefix}:workers"
MOVING = "{prefix}:moving"
JOB_NAME = "ringflow-{prefix}-{role}"
NODE_NAME = "{prefix}-{role}-{tag}"
INTEGRATE_FILE = "ringflow.integrate_file"  # task names, as messages carry them
ASSEMBLE_SCAN = "ringflow.assemble_scan"


def gpu_queue(prefix: str, slot: int) -> str:
    """Queue consumed by the worker bound to GPU slot ``slot``."""
    return GPU_QUEUE.format(prefix=prefix, slot=slot)


def assemble_queue(prefix: str) -> str:
    """Queue of the scan assembly (compression-pool) tasks."""
    return ASSEMBLE_QUEUE.format(prefix=prefix)


SCAN_FRAMES = "scan_frames:"  # + scan key: a field of the job's progress hash


def job_progress(prefix: str, job_id: str) -> str:
    """Hash of counters: files_done, files_failed, frames_done, and frames done per scan
    (field SCAN_FRAMES + scan key)."""
    return JOB_PROGRESS.format(prefix=prefix, job_id=job_id)


def job_failed(prefix: str, job_id: str) -> str:
    """Hash task_id -> JSON {file, error, message} of failed file tasks."""
    return JOB_FAILED.format(prefix=prefix, job_id=job_id)


def job_manifest(prefix: str, job_id: str) -> str:
    """Hash task_id -> JSON file task payload: what the job must do."""
    return JOB_MANIFEST.format(prefix=prefix, job_id=job_id)


def job_scans(prefix: str, job_id: str) -> str:
    """Hash scan key -> JSON {scan: scan task payload, callback: chord callback task id}."""
    return JOB_SCANS.format(prefix=prefix, job_id=job_id)


def job_done(prefix: str, job_id: str) -> str:
    """Hash task_id -> JSON {file, frames, worker, queue, gpu, seconds} of finished files."""
    return JOB_DONE.format(prefix=prefix, job_id=job_id)


def job_retries(prefix: str, job_id: str) -> str:
    """Hash task_id -> JSON {attempts, error, message, worker, time, next_in_s} of files
    waiting for an automatic retry after a transient error."""
    return JOB_RETRIES.format(prefix=prefix, job_id=job_id)


def job_config(prefix: str, job_id: str) -> str:
    """String: the job's configuration as JSON (:class:`tasks.payloads.ConfigRecord`), which
    its file tasks name by digest."""
    return JOB_CONFIG.format(prefix=prefix, job_id=job_id)


def job_monitors(prefix: str, job_id: str) -> str:
    """Hash task_id -> JSON list of the monitor values of the file's frames, which its file
    task names by digest."""
    return JOB_MONITORS.format(prefix=prefix, job_id=job_id)


def jobs(prefix: str) -> str:
    """Sorted set of job ids, scored by submission time."""
    return JOBS.format(prefix=prefix)


def workers(prefix: str) -> str:
    """Hash Celery node name -> JSON {slot, queue, gpus, slurm_job, host, pid, started}."""
    return WORKERS.format(prefix=prefix)


def moving(prefix: str) -> str:
    """List holding a message while it moves from a stranded queue to a live one."""
    return MOVING.format(prefix=prefix)


def job_name(prefix: str, role: str) -> str:
    """SLURM job name of a worker: identifies the deployment (prefix) and its role."""
    return JOB_NAME.format(prefix=prefix, role=role)


def node_name(prefix: str, role: str, tag: str) -> str:
    """Celery node name (before '@host') of a worker: unique per deployment, role and tag."""
    return NODE_NAME.format(prefix=prefix, role=role, tag=tag)
