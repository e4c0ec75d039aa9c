"""Handing back the files of workers that died: stranded queues and in-flight messages.

A GPU queue with no live consumer is *stranded*: its waiting files move to live queues. A
message taken by a worker that then died (SIGKILL, ``scancel``, a node lost) stays in kombu's
unacknowledged set until the visibility timeout, hours later; it is an *orphan* when no live
worker holds its task, and is handed back at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tasks import keys, registry
from tasks.errors import RingflowError
from tasks.queues import (
    in_flight,
    move_pending,
    pending_files,
    restore_in_flight,
    waiting_task_ids,
)
from tasks.states import PENDING, SUCCESS, is_final

from .nodes import Node, held_tasks

ORPHAN_GRACE_S = 5.0  # a message younger than this may not be listed by its worker yet
LOST_COUNT_S = 20.0  # a callback missing this long after its scan's last file is lost
LOOK_EVERY_S = 2.0


def move_stranded(client, prefix: str, nodes: list[Node]) -> int:
    """Files waiting on GPU queues that no live worker consumes go to the live ones."""
    live = sorted({q for n in nodes for q in n.queues if q.startswith(f"{prefix}.gpu")})
    if not live:
        raise RingflowError("--stranded: no live GPU worker to move files to; start workers")
    moved = 0
    for queue in pending_files(client, prefix):
        if queue not in live:
            moved += move_pending(client, prefix, queue, live)
    return moved


def hand_back_queue(app, queue: str, prefix: str) -> list[str]:
    """Hand back every in-flight message taken from ``queue``, young ones included; the task
    ids handed back (a finished task's message is dropped instead: never done twice).

    Only for a queue whose one consumer is known dead and not yet replaced (a SLURM job
    gone, a local worker before its restart): no live worker can hold its messages, so the
    grace that :func:`restore_orphans` gives young messages is not needed.
    """
    client = app.backend.client
    restored = []
    for message in in_flight(client, prefix):
        if message.queue != queue:
            continue
        finished = is_final(app.backend.get_task_meta(message.task_id)["status"])
        if restore_in_flight(client, message, finished) and not finished:
            restored.append(message.task_id)
    return restored


def restore_orphans(
    app, prefix: str, no_worker_alive: bool = False, wait: bool = False
) -> list[str]:
    """Hand back the in-flight messages no live worker holds; returns their task ids.

    ``no_worker_alive``: the caller knows every worker of the deployment is gone (the
    embedded broker of a workspace it owns), so every in-flight message is an orphan.
    ``wait``: a message not held but taken less than ORPHAN_GRACE_S ago is looked at again
    once it is that old, instead of being left to a later call.
    """
    restored: list[str] = []
    for _ in range(3):  # new deliveries to live workers are listed by the next look
        young = _restore_pass(app, prefix, no_worker_alive, restored)
        if not (wait and young):
            break
        time.sleep(max(0.0, min(young) + ORPHAN_GRACE_S - time.time()) + 0.1)
    return restored


def _restore_pass(app, prefix: str, no_worker_alive: bool, restored: list[str]) -> list[float]:
    """One look at the in-flight messages; returns when each young unheld one was taken."""
    client = app.backend.client
    started = time.time()
    held = set() if no_worker_alive else held_tasks(app)
    young = []
    for message in in_flight(client, prefix):
        if message.task_id in held:
            continue
        if not no_worker_alive and started - message.since < ORPHAN_GRACE_S:
            young.append(message.since)
            continue
        finished = is_final(app.backend.get_task_meta(message.task_id)["status"])
        if restore_in_flight(client, message, finished) and not finished:
            restored.append(message.task_id)
    return young


@dataclass
class LostCallbacks:
    """Sends the chord callbacks that Celery lost.

    Celery's Redis backend stores a file task's result, then counts it in the scan's chord;
    the count's last increment sends the callback (the scan's assembly). A worker process
    killed between the two (SIGKILL, the OOM killer) has stored SUCCESS, so its message is
    acknowledged and never redone, and the chord stays one short: the callback is never sent
    and the job would wait for its stall timeout. A scan is taken for lost when every one
    of its files is recorded done or failed, with a final result, and its callback has not
    started and waits in no queue nor in any worker's hands, for LOST_COUNT_S on end (a
    count delayed by a broker outage lands within seconds of the broker's return: workers'
    backend retries wait at most 5 s). Its callback is then sent as the chord would have,
    with the same task id: an assembly that runs twice finds its output written and only
    reports it.

    A look costs two Redis round trips (the job's finished files) while no scan is
    suspect; the callbacks and queues are read only for scans whose files are over, and the
    files' results (a read per file) only for those whose callback waits nowhere: with
    assemblies queued behind a slow assembly worker, reading every waiting scan's results
    on every look cost 1,000 reads per 1,000-file scan every 2 s.
    """

    app: object
    prefix: str
    job_id: str
    on_event: Callable[[str], None] | None = None
    files_of: dict[str, list[str]] | None = None  # scan key -> its file task ids
    since: dict[str, float] = field(default_factory=dict)
    last_look: float = 0.0

    def look(self, pending: dict[str, str], now: float | None = None) -> list[str]:
        """Resend the callbacks of ``pending`` (scan key -> callback id) found lost; their
        scan keys."""
        now = time.monotonic() if now is None else now
        if now - self.last_look < LOOK_EVERY_S:
            return []
        self.last_look = now
        suspects = self._suspects(pending)
        for scan_key in set(self.since) - set(suspects):
            del self.since[scan_key]
        resent = []
        for scan_key, (callback, results) in suspects.items():
            if now - self.since.setdefault(scan_key, now) < LOST_COUNT_S:
                continue
            from tasks.jobs import send_assembly

            send_assembly(self.app, self.prefix, self.job_id, scan_key, results, callback)
            del self.since[scan_key]
            resent.append(scan_key)
            if self.on_event:
                self.on_event(
                    f"{scan_key}: every file is done but its assembly was never sent "
                    "(a worker lost while counting its last file); sent it"
                )
        return resent

    def restart_clocks(self) -> None:
        """Forget since when each scan looked lost: after a broker outage, the workers' own
        counts may still land."""
        self.since.clear()

    def _suspects(self, pending: dict[str, str]) -> dict[str, tuple[str, list[dict]]]:
        """scan key -> (callback id, its files' results) of the pending scans whose files
        are all over and whose callback is nowhere."""
        client, backend = self.app.backend.client, self.app.backend
        finished = registry.finished_task_ids(client, self.prefix, self.job_id)
        files_of = self._files_of()
        over = {
            k: c
            for k, c in pending.items()
            if files_of.get(k)
            and finished.issuperset(files_of[k])
            and backend.get_task_meta(c)["status"] == PENDING
        }
        if not over:
            return {}
        queued = waiting_task_ids(client, keys.assemble_queue(self.prefix))
        queued |= {m.task_id for m in in_flight(client, self.prefix)}
        suspects = {}
        for scan_key, callback in over.items():
            if callback in queued:  # waiting for the assembly worker: the usual case
                continue
            metas = [backend.get_task_meta(t) for t in files_of[scan_key]]
            if all(is_final(m["status"]) for m in metas):
                results = [
                    _file_result(t, m) for t, m in zip(files_of[scan_key], metas, strict=True)
                ]
                suspects[scan_key] = (callback, results)
        return suspects

    def _files_of(self) -> dict[str, list[str]]:
        """scan key -> its file task ids, in the chord's order; read once (never changes)."""
        if self.files_of is None:
            manifest = registry.read_manifest(self.app.backend.client, self.prefix, self.job_id)
            self.files_of = {}
            for task_id in sorted(manifest):
                self.files_of.setdefault(manifest[task_id]["scan_key"], []).append(task_id)
        return self.files_of


def _file_result(task_id: str, meta: dict) -> dict:
    """A file task's result as its chord passes it; a raised error as a failed result."""
    result = meta.get("result")
    if meta["status"] == SUCCESS and isinstance(result, dict):
        return result
    return {"status": "failed", "task_id": task_id, "message": str(result)[:500]}
