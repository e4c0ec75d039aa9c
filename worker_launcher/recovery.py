"""Handing back the files of workers that died: stranded queues and in-flight messages.

A GPU queue with no live consumer is *stranded*: its waiting files move to live queues. A
message taken by a worker that then died (SIGKILL, ``scancel``, a node lost) stays in kombu's
unacknowledged set until the visibility timeout, hours later; it is an *orphan* when no live
worker holds its task, and is handed back at once.
"""

from __future__ import annotations

import time

from tasks.errors import RingflowError
from tasks.queues import in_flight, move_pending, pending_files, restore_in_flight

from .nodes import Node, held_tasks

ORPHAN_GRACE_S = 5.0  # a message younger than this may not be listed by its worker yet
FINAL_STATES = ("SUCCESS", "FAILURE")


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
        finished = app.backend.get_task_meta(message.task_id)["status"] in FINAL_STATES
        if restore_in_flight(client, message, finished) and not finished:
            restored.append(message.task_id)
    return young
