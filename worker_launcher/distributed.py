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
from tasks.app import configure_for
from tasks.config import Config
from tasks.errors import WorkerError
from tasks.jobs import JobPlan, submit
from tasks.queues import gpu_slot, move_pending, pending_files

from .nodes import Node, live_nodes
from .recovery import ORPHAN_GRACE_S, hand_back_queue, restore_orphans
from .slurm import SlurmError, SlurmLauncher
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
    """A job can progress: some GPU worker answers (it assembles too, see
    :func:`.script.gpu_spec`, so the assembly worker is not waited for)."""
    return any(node.slots(prefix) for node in nodes)


def has_assembler(nodes: list[Node], prefix: str) -> bool:
    """The dedicated assembly worker answers (its only queue is the assembly queue)."""
    queue = keys.assemble_queue(prefix)
    return any(node.queues == (queue,) for node in nodes)


def wait_for_workers(
    app, config: Config, launcher: SlurmLauncher | None, timeout: float
) -> list[Node]:
    """Wait until a GPU worker answers; WorkerError after ``timeout`` naming what is missing
    and SLURM's state and reason for each of the deployment's jobs."""
    prefix = config.queue.queue_prefix
    deadline = time.monotonic() + timeout
    while True:
        nodes = live_nodes(app, prefix)
        if can_run(nodes, prefix):
            return nodes
        jobs = launcher.jobs() if launcher else []
        raise_if_gpu_jobs_gone(launcher, jobs, prefix)
        if time.monotonic() > deadline:
            alive = f" ({', '.join(n.name for n in nodes)} answered)" if nodes else ""
            raise WorkerError(
                f"no GPU worker came up within {timeout:.0f} s "
                f"([queue] worker_start_timeout){alive}{_slurm_states(launcher, jobs)}"
            )
        time.sleep(1.0)


def assembler_note(nodes: list[Node], launcher: SlurmLauncher | None, prefix: str) -> str:
    """One line when integration starts without the assembly worker ("" when it answers)."""
    if has_assembler(nodes, prefix):
        return ""
    name = keys.job_name(prefix, "assemble")
    job = next((j for j in (launcher.jobs() if launcher else []) if j.name == name), None)
    where = f" (SLURM job {job.job_id} {job.state} ({job.reason}))" if job else ""
    return f"no assembly worker yet{where}: the GPU workers assemble the scans until it answers"


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
    """Checks the deployment's workers while a job runs (see the module docstring).

    With a launcher, each check also asks squeue about the GPU worker jobs: once a job that
    ran is no longer listed as one whose processes may run (killed, timed out, node lost),
    its worker is gone for sure, so the files it had taken (in flight on its own GPU queue,
    which nobody else consumes) are handed back at once, with no age grace, and its queue's
    waiting files move to live queues without waiting ``stranded_after``. While a vanished
    worker's job is still COMPLETING, its processes may still finish and acknowledge their
    files: the general orphan search waits until SLURM is done with it.
    """

    app: object
    config: Config
    launcher: SlurmLauncher | None = None
    on_event: Callable[[str], None] = print
    _last_check: float = 0.0
    _no_worker_since: float | None = None
    _stranded_since: dict[str, float] = field(default_factory=dict)
    _seen: dict[str, Node] = field(default_factory=dict)  # workers alive at the last check
    _lost_at: float | None = None  # when a worker was last seen to vanish
    _orphans_checked: float = 0.0
    _vanished_jobs: set[str] = field(default_factory=set)  # SLURM jobs of vanished workers
    _ran: set[str] = field(default_factory=set)  # GPU jobs seen running (or their worker)
    _recovered: set[str] = field(default_factory=set)  # ended GPU jobs already handled

    def check(self) -> None:
        now = time.monotonic()
        if now - self._last_check < CHECK_EVERY_S:
            return
        self._last_check = now
        prefix = self.config.queue.queue_prefix
        nodes = live_nodes(self.app, prefix)
        jobs = self._slurm_jobs()
        if jobs is not None:
            nodes = self._recover_ended_jobs(nodes, jobs)
        if can_run(nodes, prefix):
            self._no_worker_since = None
        else:
            self._workers_missing(now, jobs)
        self._hand_back_orphans(now, nodes, jobs)
        self._rebalance(now, {q for node in nodes for q in node.queues})

    def _slurm_jobs(self):
        """squeue's view of the deployment; None without a launcher or if squeue failed
        (the next check asks again)."""
        if not self.launcher:
            return None
        try:
            return self.launcher.jobs()
        except SlurmError:
            return None

    def _recover_ended_jobs(self, nodes: list[Node], jobs) -> list[Node]:
        """Hand back the files of GPU jobs that ran and ended; the nodes still alive."""
        may_run = {job.job_id for job in jobs if job.may_run}
        slots = self.launcher.gpu_slots()
        self._ran |= {n.slurm_job for n in nodes} | may_run
        ended = {j: s for j, s in slots.items() if j in self._ran and j not in may_run}
        alive = [n for n in nodes if n.slurm_job not in ended]
        for job_id, slot in ended.items():
            if job_id not in self._recovered:
                self._recovered.add(job_id)
                self._hand_back_slot(job_id, slot, alive, jobs)
        return alive

    def _hand_back_slot(self, job_id: str, slot: int, alive: list[Node], jobs) -> None:
        prefix = self.config.queue.queue_prefix
        client = self.app.backend.client
        queue = keys.gpu_queue(prefix, slot)
        name = keys.job_name(prefix, f"gpu{slot}")
        consumed = {q for node in alive for q in node.queues}
        if queue in consumed or any(j.name == name and j.may_run for j in jobs):
            return  # another worker of this slot may hold its files: the general search
        restored = len(hand_back_queue(self.app, queue, prefix))
        targets = sorted(q for q in consumed if gpu_slot(prefix, q) is not None)
        moved = move_pending(client, prefix, queue, targets) if targets else 0
        self._stranded_since.pop(queue, None)
        self.on_event(
            f"SLURM job {job_id} ({name}) ended: {restored} file(s) it had taken handed back"
            + (f", {moved} files moved from {queue} to {', '.join(targets)}" if moved else "")
        )

    def _hand_back_orphans(self, now: float, nodes: list[Node], jobs) -> None:
        names = {node.name for node in nodes}
        vanished = [node for name, node in self._seen.items() if name not in names]
        self._seen = {node.name: node for node in nodes}
        if vanished:
            self._lost_at = now
            self._vanished_jobs |= {node.slurm_job for node in vanished if node.slurm_job}
            self.on_event(f"worker gone: {', '.join(sorted(n.name for n in vanished))}")
        if self._lost_at is None or now - self._orphans_checked < ORPHAN_GRACE_S:
            return
        if any(j.state == "COMPLETING" and j.job_id in self._vanished_jobs for j in jobs or ()):
            self._lost_at = now  # its processes may still ack their files: look once it ended
            return
        self._orphans_checked = now
        restored = restore_orphans(self.app, self.config.queue.queue_prefix)
        if restored:
            self.on_event(f"{len(restored)} file(s) taken by a dead worker handed back")
        if now - self._lost_at > ORPHAN_WATCH_S:
            self._lost_at = None

    def _workers_missing(self, now: float, jobs) -> None:
        self._no_worker_since = self._no_worker_since or now
        if jobs is None:
            jobs = self.launcher.jobs() if self.launcher else []
        raise_if_gpu_jobs_gone(self.launcher, jobs, self.config.queue.queue_prefix)
        waited = now - self._no_worker_since
        if waited > self.config.queue.worker_start_timeout:
            raise WorkerError(
                f"no GPU worker answered for {waited:.0f} s "
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
    app = configure_for(broker_url, config.queue)
    launcher = SlurmLauncher(config)
    try:
        for spec, job_id, new in launcher.submit(broker_url):
            on_event(f"{spec.job_name}: SLURM job {job_id} {'submitted' if new else 'reused'}")
        if plan.scans:
            nodes = wait_for_workers(app, config, launcher, config.queue.worker_start_timeout)
            on_event(f"{len(nodes)} workers alive: {', '.join(n.name for n in nodes)}")
            note = assembler_note(nodes, launcher, config.queue.queue_prefix)
            if note:
                on_event(note)
            callbacks = submit(app, plan, target_slots(config, nodes))
            on_event(f"job {plan.job_id}: {len(plan.file_tasks)} files enqueued")
            supervisor = ClusterSupervisor(app, config, launcher, on_event)
            hint = f"worker logs in {launcher.log_dir}"
            outcomes = watch(app, plan, callbacks, supervisor, on_progress, hint, on_event)
            summarise(summary, app, plan, outcomes)
    finally:
        if not keep_workers:
            with uninterruptible():  # a second Ctrl-C must not leave the jobs running
                cancelled = launcher.cancel()
            on_event(f"worker jobs cancelled: {', '.join(cancelled) or 'none'}")
    summary.seconds = time.monotonic() - start
    return summary


def job_outcomes(app, prefix: str, job_id: str) -> dict[str, dict | None]:
    """scan key -> its callback's outcome (:func:`tasks.states.parse_outcome`), None while
    the scan is not assembled yet."""
    from tasks.registry import read_scans

    return scan_outcomes(app, read_scans(app.backend.client, prefix, job_id))


def scan_outcomes(app, scans: dict[str, dict]) -> dict[str, dict | None]:
    """Same, for scans already read from the registry."""
    from tasks.states import parse_outcome

    return {
        key: parse_outcome(app.backend.get_task_meta(entry["callback"]))
        for key, entry in scans.items()
    }
