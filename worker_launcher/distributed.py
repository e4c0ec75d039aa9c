"""Jobs on shared workers (SLURM or `workers local`): enqueue, wait for workers, supervise.

Waiting for workers, and the supervisor that runs in the client while it watches a job, both
raise as soon as no GPU worker job of the deployment is queued or running in SLURM, with each
ended job's last words (a job whose worker cannot integrate says why in one line at its
start, see :mod:`.script`) instead of waiting for ``worker_start_timeout``. The supervisor
also raises when no worker of the deployment is left, and moves the files of a GPU queue that
has had no live consumer for ``[queue] stranded_after`` seconds to the queues of live
workers, so that no file waits forever for a worker that died or never started. When a
worker vanishes (SIGKILL, ``scancel``, a lost node), the files it had taken are handed back
(:mod:`.recovery`) for a while afterwards: a file is handed back once no live worker lists
it for ORPHAN_GRACE_S.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tasks import keys
from tasks.app import configure
from tasks.config import Config
from tasks.errors import WorkerError
from tasks.jobs import JobPlan, submit
from tasks.queues import gpu_slot, move_pending, pending_files

from .nodes import Node, live_nodes
from .recovery import ORPHAN_GRACE_S, restore_orphans
from .slurm import SlurmLauncher
from .watch import JobSummary, new_summary, summarise, uninterruptible, watch

CHECK_EVERY_S = 2.0
ORPHAN_WATCH_S = 6 * ORPHAN_GRACE_S  # how long after a worker vanished its files are sought


def target_slots(config: Config, nodes: list[Node]) -> list[int]:
    """Slots to spread files over: the configured workers' and any live worker's."""
    prefix = config.queue.queue_prefix
    live = {slot for node in nodes for slot in node.slots(prefix)}
    return sorted(live | set(range(config.computations.n_workers)))


def enqueue(app, plan: JobPlan) -> dict[str, str]:
    """Send the plan's files to the GPU queues of the deployment; scan -> callback id."""
    nodes = live_nodes(app, plan.config.queue.queue_prefix)
    return submit(app, plan, target_slots(plan.config, nodes))


def can_run(nodes: list[Node], prefix: str) -> bool:
    """A job can progress: some GPU worker and the assembly worker answer."""
    queues = {q for node in nodes for q in node.queues}
    has_gpu = any(node.slots(prefix) for node in nodes)
    return has_gpu and keys.assemble_queue(prefix) in queues


def wait_for_workers(
    app, config: Config, launcher: SlurmLauncher | None, timeout: float
) -> list[Node]:
    """Wait until a GPU worker and the assembly worker answer; WorkerError after ``timeout``."""
    prefix = config.queue.queue_prefix
    deadline = time.monotonic() + timeout
    while True:
        nodes = live_nodes(app, prefix)
        if can_run(nodes, prefix):
            return nodes
        jobs = launcher.jobs() if launcher else []
        raise_if_gpu_jobs_gone(launcher, jobs, prefix)
        if time.monotonic() > deadline:
            raise WorkerError(
                f"no worker came up within {timeout:.0f} s "
                f"([queue] worker_start_timeout){_slurm_states(launcher, jobs)}"
            )
        time.sleep(1.0)


def raise_if_gpu_jobs_gone(launcher: SlurmLauncher | None, jobs, prefix: str) -> None:
    """WorkerError naming why each ended job ended, once no GPU worker job is queued or
    running: no file can be integrated, so waiting longer would only hide the reason."""
    if not launcher or not launcher.gpu_jobs_gone(jobs):
        return
    why = "".join(f"\n  {line}" for line in launcher.why_ended(jobs))
    raise WorkerError(
        f"no GPU worker job of '{prefix}' is queued or running in SLURM; "
        f"logs in {launcher.log_dir}{why}"
    )


def _slurm_states(launcher: SlurmLauncher | None, jobs) -> str:
    if not launcher:
        return ""
    states = "; ".join(f"{j.name} {j.job_id} {j.state} ({j.reason})" for j in jobs)
    return f"; SLURM: {states or 'no job'}; logs in {launcher.log_dir}"


@dataclass
class ClusterSupervisor:
    """Checks the deployment's workers while a job runs (see the module docstring)."""

    app: object
    config: Config
    launcher: SlurmLauncher | None = None
    on_event: Callable[[str], None] = print
    _last_check: float = 0.0
    _no_worker_since: float | None = None
    _stranded_since: dict[str, float] = field(default_factory=dict)
    _seen: set[str] = field(default_factory=set)  # worker names alive at the last check
    _lost_at: float | None = None  # when a worker was last seen to vanish
    _orphans_checked: float = 0.0

    def check(self) -> None:
        now = time.monotonic()
        if now - self._last_check < CHECK_EVERY_S:
            return
        self._last_check = now
        prefix = self.config.queue.queue_prefix
        nodes = live_nodes(self.app, prefix)
        if can_run(nodes, prefix):
            self._no_worker_since = None
        else:
            self._workers_missing(now)
        self._hand_back_orphans(now, nodes)
        self._rebalance(now, {q for node in nodes for q in node.queues})

    def _hand_back_orphans(self, now: float, nodes: list[Node]) -> None:
        names = {node.name for node in nodes}
        vanished = self._seen - names
        self._seen = names
        if vanished:
            self._lost_at = now
            self.on_event(f"worker gone: {', '.join(sorted(vanished))}")
        if self._lost_at is None or now - self._orphans_checked < ORPHAN_GRACE_S:
            return
        self._orphans_checked = now
        restored = restore_orphans(self.app, self.config.queue.queue_prefix)
        if restored:
            self.on_event(f"{len(restored)} file(s) taken by a dead worker handed back")
        if now - self._lost_at > ORPHAN_WATCH_S:
            self._lost_at = None

    def _workers_missing(self, now: float) -> None:
        self._no_worker_since = self._no_worker_since or now
        jobs = self.launcher.jobs() if self.launcher else []
        raise_if_gpu_jobs_gone(self.launcher, jobs, self.config.queue.queue_prefix)
        waited = now - self._no_worker_since
        if waited > self.config.queue.worker_start_timeout:
            raise WorkerError(
                f"no GPU or assembly worker answered for {waited:.0f} s "
                f"([queue] worker_start_timeout){_slurm_states(self.launcher, jobs)}"
            )

    def _rebalance(self, now: float, live_queues: set[str]) -> None:
        prefix = self.config.queue.queue_prefix
        client = self.app.backend.client
        live = sorted(q for q in live_queues if gpu_slot(prefix, q) is not None)
        for queue in list(pending_files(client, prefix)):
            if queue in live_queues:
                self._stranded_since.pop(queue, None)
                continue
            since = self._stranded_since.setdefault(queue, now)
            if live and now - since >= self.config.queue.stranded_after:
                moved = move_pending(client, prefix, queue, live)
                self.on_event(
                    f"{moved} files moved from {queue} (no live worker) to {', '.join(live)}"
                )
                self._stranded_since.pop(queue, None)


def integrate_on_slurm(
    config: Config,
    plan: JobPlan,
    broker_url: str,
    keep_workers: bool,
    on_progress: Callable,
    on_event: Callable[[str], None],
) -> JobSummary:
    """Submit (or reuse) the SLURM workers, enqueue the plan, follow it to the end."""
    start = time.monotonic()
    summary = new_summary(plan)
    app = configure(broker_url, config.queue.task_time_limit)
    launcher = SlurmLauncher(config)
    try:
        for spec, job_id, new in launcher.submit(broker_url):
            on_event(f"{spec.job_name}: SLURM job {job_id} {'submitted' if new else 'reused'}")
        if plan.scans:
            nodes = wait_for_workers(app, config, launcher, config.queue.worker_start_timeout)
            on_event(f"{len(nodes)} workers alive: {', '.join(n.name for n in nodes)}")
            callbacks = submit(app, plan, target_slots(config, nodes))
            on_event(f"job {plan.job_id}: {len(plan.file_tasks)} files enqueued")
            supervisor = ClusterSupervisor(app, config, launcher, on_event)
            hint = f"worker logs in {launcher.log_dir}"
            outcomes = watch(app, plan, callbacks, supervisor, on_progress, hint)
            summarise(summary, app, plan, outcomes)
    finally:
        if not keep_workers:
            with uninterruptible():  # a second Ctrl-C must not leave the jobs running
                cancelled = launcher.cancel()
            on_event(f"worker jobs cancelled: {', '.join(cancelled) or 'none'}")
    summary.seconds = time.monotonic() - start
    return summary


def job_outcomes(app, prefix: str, job_id: str) -> dict[str, dict | None]:
    """scan key -> its callback's result, None while the scan is not assembled yet."""
    from tasks.registry import read_scans

    return scan_outcomes(app, read_scans(app.backend.client, prefix, job_id))


def scan_outcomes(app, scans: dict[str, dict]) -> dict[str, dict | None]:
    """Same, for scans already read from the registry."""
    outcomes = {}
    for key, entry in scans.items():
        meta = app.backend.get_task_meta(entry["callback"])
        outcomes[key] = meta["result"] if meta["status"] in ("SUCCESS", "FAILURE") else None
    return outcomes
