"""Live Celery workers of a deployment: who answers now, on which queues, with which GPU."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from tasks import keys
from tasks.queues import gpu_slot
from tasks.registry import text

INSPECT_TIMEOUT = 1.0


@dataclass(frozen=True)
class Node:
    name: str
    queues: tuple[str, ...]
    info: dict = field(default_factory=dict)  # what the worker recorded at start (tasks.node)

    def slots(self, prefix: str) -> list[int]:
        return [s for s in (gpu_slot(prefix, q) for q in self.queues) if s is not None]

    @property
    def slurm_job(self) -> str:
        return str(self.info.get("slurm_job", ""))

    def as_dict(self, prefix: str) -> dict:
        return {"name": self.name, "queues": list(self.queues), "slots": self.slots(prefix)} | {
            k: self.info.get(k) for k in ("gpus", "slurm_job", "host", "pid", "role")
        }


def live_nodes(app, prefix: str, timeout: float = INSPECT_TIMEOUT) -> list[Node]:
    """Workers that answer within ``timeout`` and consume a queue of this deployment."""
    replies = app.control.inspect(timeout=timeout).active_queues() or {}
    ours = re.compile(re.escape(prefix) + r"\.(gpu\d+|assemble)")
    records = app.backend.client.hgetall(keys.workers(prefix))
    info = {text(k): json.loads(v) for k, v in records.items()}
    nodes = []
    for name, queues in sorted(replies.items()):
        names = tuple(sorted(q["name"] for q in queues))
        if any(ours.fullmatch(q) for q in names):
            nodes.append(Node(name, names, info.get(name, {})))
    return nodes


def forget_dead(app, prefix: str, alive: list[Node]) -> None:
    """Drop the records of workers that no longer answer (killed before unregistering)."""
    client = app.backend.client
    names = {n.name for n in alive}
    stale = [k for k in client.hkeys(keys.workers(prefix)) if text(k) not in names]
    if stale:
        client.hdel(keys.workers(prefix), *stale)


def forget_pids(client, prefix: str, pids: set[int]) -> None:
    """Drop the records of the worker processes ``pids`` (killed, so never unregistered)."""
    records = client.hgetall(keys.workers(prefix))
    mine = [name for name, info in records.items() if json.loads(info).get("pid") in pids]
    if mine:
        client.hdel(keys.workers(prefix), *mine)


def held_tasks(app, timeout: float = 2 * INSPECT_TIMEOUT) -> set[str]:
    """Ids of the tasks that answering workers run, hold reserved, or hold until their retry
    time (a retried file waits in its worker's memory, its message unacknowledged)."""
    inspect = app.control.inspect(timeout=timeout)
    held = set()
    for tasks in (inspect.active() or {}).values():
        held.update(task["id"] for task in tasks)
    for tasks in (inspect.reserved() or {}).values():
        held.update(task["id"] for task in tasks)
    for tasks in (inspect.scheduled() or {}).values():
        held.update(task["request"]["id"] for task in tasks)
    return held
