"""Keeping a job's local processes alive while the client follows it.

``ringflow run``, ``requeue`` and ``workers local`` run their workers here, and with the
embedded broker, the broker too; nobody else would notice one of them die. The supervisor
restarts a local worker whose main process ended (bounded restarts with backoff,
:mod:`.local`) and the embedded server when it died (same socket, password and AOF,
:class:`.embedded.ServerKeeper`). Either way the files the dead process's workers had taken
are handed back at once (:func:`.recovery.restore_orphans`): they would otherwise wait in
the broker's unacknowledged set for the visibility timeout, hours. Hand-back is repeated for
HAND_BACK_WINDOW_S after a death, every ORPHAN_GRACE_S: a message taken a moment before the
death is an orphan only once no live worker lists it for that long.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from tasks.errors import BrokerError, WorkerError

from .embedded import WorkspaceBroker
from .local import LocalWorkers, WorkerProcess
from .nodes import live_nodes
from .recovery import ORPHAN_GRACE_S, hand_back_queue, restore_orphans

HAND_BACK_WINDOW_S = 6 * ORPHAN_GRACE_S


@dataclass
class LocalSupervisor:
    """The watch's supervisor for local workers (see the module docstring).

    ``give_up``: what the user can do once restarts are exhausted, appended to the error.
    """

    app: object
    prefix: str
    workers: LocalWorkers
    broker: WorkspaceBroker | None = None
    on_event: Callable[[str], None] = print
    give_up: str = ""
    _hand_back_until: float = 0.0
    _handed_back_at: float = 0.0

    def check(self) -> None:
        try:
            if self.workers.restart_dead(self.on_event, self._hand_back_queue):
                self._hand_back_soon()
        except WorkerError as exc:
            raise WorkerError(f"{exc}; {self.give_up}" if self.give_up else str(exc)) from None
        self._hand_back()

    def broker_lost(self) -> None:
        """The broker did not answer: start the embedded server again if it died."""
        keeper = self.broker.keeper if self.broker else None
        if keeper is None:
            return  # an external broker: wait for it (the watch bounds the outage)
        try:
            line = keeper.restart_if_dead()
        except BrokerError as exc:
            raise BrokerError(f"{exc}; {self.give_up}" if self.give_up else str(exc)) from None
        if line:
            self.on_event(line)
            self._hand_back_soon()

    def _hand_back_queue(self, worker: WorkerProcess) -> None:
        """A dead GPU worker's files, at once: its queue has no other consumer (its
        replacement is not started yet), unless another machine serves the same slot."""
        if worker.spec.slot is None:
            return  # the assembly queue: GPU workers take from it too, see _hand_back
        if any(worker.spec.queue in node.queues for node in live_nodes(self.app, self.prefix)):
            return
        restored = hand_back_queue(self.app, worker.spec.queue, self.prefix)
        if restored:
            self.on_event(f"{len(restored)} file(s) taken by {worker.name} handed back")

    def _hand_back_soon(self) -> None:
        self._hand_back_until = time.monotonic() + HAND_BACK_WINDOW_S
        self._handed_back_at = 0.0

    def _hand_back(self) -> None:
        now = time.monotonic()
        if now > self._hand_back_until or now - self._handed_back_at < ORPHAN_GRACE_S:
            return
        self._handed_back_at = now
        restored = restore_orphans(self.app, self.prefix)
        if restored:
            self.on_event(f"{len(restored)} file(s) taken by a dead process handed back")
