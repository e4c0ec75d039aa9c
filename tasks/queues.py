"""The GPU queues as Redis lists: how many files wait on each, and moving them between slots.

Kombu's Redis transport keeps a queue's messages in a list named after the queue (one more
list per priority level, ``<queue>\\x06\\x16<priority>``), pushed on the left and consumed
on the right. A message remembers its routing key, which decides where it returns if a worker
hands it back, so a moved message is rewritten to name its new queue.
"""

from __future__ import annotations

import json
import re

from . import keys

PRIORITY_SEP = "\x06\x16"


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


def move_pending(client, prefix: str, source: str, targets: list[str]) -> int:
    """Move every waiting message of ``source`` to ``targets`` in turn; returns how many.

    Each message passes through a holding list (atomic LMOVE), so a crash mid-move leaves it
    there, not lost; :func:`recover_moving` finishes the job.
    """
    if not targets:
        return 0
    recover_moving(client, prefix, targets[0])
    lists = [source] + [f"{source}{PRIORITY_SEP}{p}" for p in (3, 6, 9)]
    moved = 0
    for name in lists:
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
