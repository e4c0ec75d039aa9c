"""Every queue name and Redis key ringflow uses, built from one place.

Templates are pinned by tests: changing one is a deliberate, visible act.
"""

from __future__ import annotations

GPU_QUEUE = "{prefix}.gpu{slot}"
ASSEMBLE_QUEUE = "{prefix}.assemble"
JOB_PROGRESS = "{prefix}:job:{job_id}:progress"
JOB_FAILED = "{prefix}:job:{job_id}:failed"
JOB_MANIFEST = "{prefix}:job:{job_id}:manifest"


def gpu_queue(prefix: str, slot: int) -> str:
    """Queue consumed by the worker bound to GPU slot ``slot``."""
    return GPU_QUEUE.format(prefix=prefix, slot=slot)


def assemble_queue(prefix: str) -> str:
    """Queue of the scan assembly (compression-pool) tasks."""
    return ASSEMBLE_QUEUE.format(prefix=prefix)


def job_progress(prefix: str, job_id: str) -> str:
    """Hash of counters: files_done, files_failed, frames_done."""
    return JOB_PROGRESS.format(prefix=prefix, job_id=job_id)


def job_failed(prefix: str, job_id: str) -> str:
    """Hash task_id -> JSON {file, error, message} of failed file tasks."""
    return JOB_FAILED.format(prefix=prefix, job_id=job_id)


def job_manifest(prefix: str, job_id: str) -> str:
    """Hash task_id -> JSON file task payload: what the job must do."""
    return JOB_MANIFEST.format(prefix=prefix, job_id=job_id)
