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

ORPHAN_GRACE_S = 10.0  # a message younger than this may not be listed by its worker yet
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


def restore_orphans(app, prefix: str, no_worker_alive: bool = False) -> list[str]:
    """Hand back the in-flight messages no live worker holds; returns their task ids.

    ``no_worker_alive``: the caller knows every worker of the deployment is gone (the
    embedded broker of a workspace it owns), so every in-flight message is an orphan.
    """
    client = app.backend.client
    started = time.time()
    held = set() if no_worker_alive else held_tasks(app)
    restored = []
    for message in in_flight(client, prefix):
        young = started - message.since < ORPHAN_GRACE_S
        if message.task_id in held or (young and not no_worker_alive):
            continue
        finished = app.backend.get_task_meta(message.task_id)["status"] in FINAL_STATES
        if restore_in_flight(client, message, finished) and not finished:
            restored.append(message.task_id)
    return restored
