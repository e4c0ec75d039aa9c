"""Re-enqueueing a job's failed or chosen files; the scans they complete are assembled again.

Files already done keep their partial results and are never redone: each affected scan gets
a new chord whose header holds only the requeued files and whose body assembles the whole
scan from all its partials. The requeued files leave the failed record before they are sent,
so asking twice requeues nothing the second time.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field

from tasks import registry
from tasks.config import Config
from tasks.errors import RingflowError
from tasks.jobs import assign_slots, send_chords
from tasks.outputs import leftover_cutoff, remove_leftovers
from tasks.payloads import FileTask

from .distributed import target_slots
from .nodes import Node, live_nodes
from .recovery import move_stranded, restore_orphans


@dataclass(frozen=True)
class Selection:
    failed: bool = False
    files: tuple[str, ...] = ()
    scans: tuple[str, ...] = ()  # scan keys, or their 'master name::entry' / entry suffix
    stranded: bool = False

    @property
    def empty(self) -> bool:
        return not (self.failed or self.files or self.scans or self.stranded)

    def check(self) -> None:
        if self.empty:
            raise RingflowError("nothing selected: give --failed, --file, --scan or --stranded")


@dataclass
class RequeueResult:
    files: list[str] = field(default_factory=list)  # requeued file paths
    scans: list[str] = field(default_factory=list)  # scans that will be assembled again
    skipped: list[str] = field(default_factory=list)  # 'path: reason' for selected files left
    moved: int = 0  # stranded messages moved to live queues
    restored: list[str] = field(default_factory=list)  # orphaned in-flight tasks handed back
    stopped: tuple[str, ...] = ()  # 'role pid' left running by a killed run, stopped first
    removed: list[str] = field(default_factory=list)  # temporaries a killed writer left


def requeue(
    app,
    config: Config,
    job_id: str,
    selection: Selection,
    nodes: list[Node] | None = None,
    slots: list[int] | None = None,
    orphans_restored: bool = False,
) -> RequeueResult:
    """Requeue the selected files of ``job_id`` onto ``slots`` (default: the live workers').

    ``nodes``: the live workers, when the caller has just asked. ``orphans_restored``: the
    caller handed back every in-flight file before any worker started (the owner of the
    embedded broker): looking again would only wait out the grace of files the new workers
    have just taken.
    """
    selection.check()
    started = time.time()
    client, prefix = app.backend.client, config.queue.queue_prefix
    manifest = registry.read_manifest(client, prefix, job_id)
    if not manifest:
        raise RingflowError(f"job {job_id}: unknown on this broker, or its records expired")
    result = RequeueResult()
    nodes = live_nodes(app, prefix) if nodes is None else nodes
    if selection.stranded and not orphans_restored:
        result.restored = restore_orphans(app, prefix, wait=True)
    if selection.stranded:
        result.moved = move_stranded(client, prefix, nodes)
    done = registry.read_done(client, prefix, job_id)
    failed = registry.read_progress(client, prefix, job_id).failures
    chosen = []
    for task_id, task in manifest.items():
        if not _selected(task, task_id in failed, selection):
            continue
        if task_id in done:
            result.skipped.append(f"{task['path']}: already done, its partial is reused")
        elif task_id not in failed:
            result.skipped.append(f"{task['path']}: still queued or running")
        else:
            chosen.append(task_id)
    if chosen:
        since = leftover_cutoff(config, started)
        result.removed = _remove_leftovers(client, prefix, job_id, manifest, chosen, since)
        result.scans = _send(
            app, config, job_id, manifest, chosen, slots or target_slots(config, nodes)
        )
        result.files = [manifest[t]["path"] for t in chosen]
    return result


def _remove_leftovers(client, prefix: str, job_id: str, manifest, chosen, since: float) -> list:
    """Temporaries a killed writer left of the scans about to be redone: their outputs' and
    the chosen files' partials' (see :func:`tasks.outputs.remove_leftovers`)."""
    scans = registry.read_scans(client, prefix, job_id)
    keys = {manifest[t]["scan_key"] for t in chosen}
    outputs = [scans[k]["scan"]["output"] for k in keys if k in scans]
    folders = sorted({os.path.dirname(manifest[t]["partial"]) for t in chosen})
    return remove_leftovers(outputs, folders, since)


def remove_job_leftovers(client, prefix: str, job_id: str) -> list[str]:
    """Once every scan of the job has its outcome: the temporaries of any of its outputs and
    partials that no process of this machine holds open, e.g. those of a killed run's
    workers stopped mid-write when this command took over their broker."""
    manifest = registry.read_manifest(client, prefix, job_id)
    return _remove_leftovers(client, prefix, job_id, manifest, list(manifest), time.time())


def _selected(task: dict, is_failed: bool, selection: Selection) -> bool:
    scan = task["scan_key"]
    by_scan = any(scan == s or scan.endswith(s) for s in selection.scans)
    return (selection.failed and is_failed) or task["path"] in selection.files or by_scan


def _send(app, config: Config, job_id: str, manifest: dict, chosen: list[str], slots) -> list:
    """One chord per affected scan: the chosen files, then the whole scan's assembly."""
    client, prefix = app.backend.client, config.queue.queue_prefix
    scans = registry.read_scans(client, prefix, job_id)
    files = [FileTask.from_dict(manifest[t]) for t in chosen]
    placement = assign_slots(files, slots)
    by_scan: dict[str, list[FileTask]] = {}
    for task in files:
        by_scan.setdefault(task.scan_key, []).append(task)
    callbacks = {
        scan: f"{job_id}-assemble-{uuid.uuid4().hex[:8]}" for scan in by_scan if scan in scans
    }
    reopened = {s: scans[s] | {"callback": c} for s, c in callbacks.items()}
    registry.reopen(client, prefix, job_id, chosen, reopened)
    send_chords(
        app,
        prefix,
        job_id,
        [
            (scan, [t.to_dict() | {"slot": placement[t.task_id]} for t in tasks], callbacks[scan])
            for scan, tasks in by_scan.items()
            if scan in callbacks
        ],
    )
    return sorted(by_scan)
