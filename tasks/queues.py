"""The GPU queues as Redis lists: how many files wait on each, and moving them between slots.

Kombu's Redis transport keeps a queue's messages in a list named after the queue (one more
list per priority level, ``<queue>\\x06\\x16<priority>``), pushed on the left and consumed
on the right. A message remembers its routing key, which decides where it returns if a worker
hands it back, so a moved message is rewritten to name its new queue.

A message a worker has taken but not acknowledged (acks_late: until its file is done) waits in
kombu's ``unacked`` hash, indexed by delivery time in ``unacked_index``. Kombu hands it back
only after the visibility timeout (hours); :func:`restore_in_flight` hands back at once the
ones whose worker is known dead.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from . import keys
from .registry import text

PRIORITY_SEP = "\x06\x16"
UNACKED, UNACKED_INDEX = "unacked", "unacked_index"  # kombu's Redis transport, default names
_RESTORE = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 1 then
  redis.call('ZREM', KEYS[2], ARGV[1])
  if ARGV[2] ~= '' then redis.call('RPUSH', KEYS[3], ARGV[2]) end
  return 1
end
return 0
"""  # one atomic step: a message is handed back once, even if kombu sweeps at the same time


@dataclass(frozen=True)
class InFlight:
    """A message of this deployment taken by a worker and not acknowledged yet."""

    tag: str  # kombu's delivery tag
    task_id: str
    queue: str
    since: float  # when a worker took it (epoch seconds)
    payload: str  # the message, as kombu stored it


def gpu_slot(prefix: str, queue: str) -> int | None:
    """k for ``<prefix>.gpu<k>``, else None."""
    match = re.fullmatch(re.escape(prefix) + r"\.gpu(\d+)", queue)
    return int(match.group(1)) if match else None


def pending_files(client, prefix: str) -> dict[str, int]:
    """GPU queue name -> number of file tasks waiting in it (non-empty queues only)."""
    counts: dict[str, int] = {}
    for raw in client.scan_iter(match=f"{prefix}.gpu*", count=1000):
        name = raw.decode() if isinstance(raw, bytes) else raw
        base = name.split(PRIORITY_SEP, 1)[0]
        if gpu_slot(prefix, base) is None or client.type(raw) not in (b"list", "list"):
            continue
        counts[base] = counts.get(base, 0) + client.llen(raw)
    return {queue: n for queue, n in counts.items() if n}


def priority_lists(queue: str) -> list[str]:
    """The Redis lists holding ``queue``'s messages: its own and one per priority level."""
    return [queue] + [f"{queue}{PRIORITY_SEP}{p}" for p in (3, 6, 9)]


def waiting_messages(client, prefix: str) -> int:
    """Messages waiting in any queue of this deployment (GPU and assembly, every priority)."""
    assembly = sum(client.llen(name) for name in priority_lists(keys.assemble_queue(prefix)))
    return sum(pending_files(client, prefix).values()) + assembly


def waiting_task_ids(client, queue: str) -> set[str]:
    """Task ids of the messages waiting in ``queue`` (every priority level)."""
    found = set()
    for name in priority_lists(queue):
        for raw in client.lrange(name, 0, -1):
            found.add(json.loads(raw).get("headers", {}).get("id", ""))
    return found


def move_pending(client, prefix: str, source: str, targets: list[str]) -> int:
    """Move every waiting message of ``source`` to ``targets`` in turn; returns how many.

    Each message passes through a holding list (atomic LMOVE), so a crash mid-move leaves it
    there, not lost; :func:`recover_moving` finishes the job.
    """
    if not targets:
        return 0
    recover_moving(client, prefix, targets[0])
    moved = 0
    for name in priority_lists(source):
        while True:
            raw = client.lmove(name, keys.moving(prefix), "RIGHT", "LEFT")
            if raw is None:
                break
            _deliver(client, prefix, raw, targets[moved % len(targets)])
            moved += 1
    return moved


def recover_moving(client, prefix: str, target: str) -> int:
    """Deliver to ``target`` any message a crashed move left in the holding list."""
    count = 0
    while (raw := client.lindex(keys.moving(prefix), -1)) is not None:
        _deliver(client, prefix, raw, target)
        count += 1
    return count


def _deliver(client, prefix: str, raw: bytes, target: str) -> None:
    message = json.loads(raw)
    message["properties"]["delivery_info"] = {"exchange": "", "routing_key": target}
    pipe = client.pipeline()  # MULTI: both or neither
    pipe.rpush(target, json.dumps(message))  # right end: consumed next, it has waited already
    pipe.lrem(keys.moving(prefix), -1, raw)
    pipe.execute()


def in_flight(client, prefix: str) -> list[InFlight]:
    """Unacknowledged messages of this deployment's queues, oldest first."""
    ours = re.compile(re.escape(prefix) + r"\.(gpu\d+|assemble)")
    found = []
    for tag, raw in client.hscan_iter(UNACKED, count=1000):
        message, _exchange, routing_key = json.loads(raw)
        if not ours.fullmatch(routing_key or ""):
            continue
        since = client.zscore(UNACKED_INDEX, tag) or 0.0
        task_id = message.get("headers", {}).get("id", "")
        found.append(InFlight(text(tag), task_id, routing_key, float(since), text(raw)))
    return sorted(found, key=lambda m: m.since)


def restore_in_flight(client, message: InFlight, finished: bool = False) -> bool:
    """Put ``message`` back at the consuming end of its queue, marked redelivered.

    ``finished``: its task already has a final result (the worker died between storing it
    and acknowledging), so the message is dropped instead: doing it again would count the
    file twice in its scan's chord. False if another process handed it back first.
    """
    body = ""
    if not finished:
        payload = json.loads(message.payload)[0]
        payload.setdefault("headers", {})["redelivered"] = True
        payload.setdefault("properties", {}).setdefault("delivery_info", {})["redelivered"] = True
        body = json.dumps(payload)
    keys_ = [UNACKED, UNACKED_INDEX, message.queue]
    return bool(client.eval(_RESTORE, len(keys_), *keys_, message.tag, body))
