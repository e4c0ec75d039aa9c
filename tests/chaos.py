"""A seeded fault injector for real `ringflow run` jobs: SIGKILL of one ringflow process.

A trial runs the real CLI on a small dataset, waits for the first file task to reach the
gpu0 worker (the first assembly task, for the assembly worker), sleeps a seeded delay and
SIGKILLs one process of a seeded kind:

- ``pool_child``: a Celery prefork child of the gpu0 worker (integrating a file, mostly);
- ``worker_main``: the Celery main process of the gpu0 worker;
- ``assemble_main``: the Celery main process of the assembly worker;
- ``broker``: the embedded Valkey server;
- ``client``: the ``ringflow run`` process itself (then ``status --json`` gives the job id
  and ``requeue CONFIG JOB --stranded`` finishes the job: the one manual step allowed).

The job must then end on its own with exit code 0, outputs equal to a clean run's byte for
byte, no process of the trial left alive and no stray file in the output folder.

Everything a trial does follows from its seed: the kind is ``KINDS[seed % len(KINDS)]``, the
delay and the victim among several pool children come from ``random.Random(seed)``. A trial
is rerun alone with ``RINGFLOW_CHAOS_SEED=<its seed> RINGFLOW_CHAOS_TRIALS=1``.

The distributed variant (:class:`SlurmTrial`, :func:`run_slurm_trial`) runs ``ringflow
integrate-slurm`` on the CI SLURM and a shared Redis (a queue prefix per trial), waits for
the first file task of the victim's GPU worker (the slot is drawn from the seed too) and
does one of ``SLURM_KINDS``: ``scancel_gpu`` (``scancel --signal=KILL`` of that worker's
job), ``pool_child`` / ``worker_main`` (SIGKILL of a prefork child / of the Celery main
process, found by psutil from ``-Q <prefix>.gpu<k>``: SLURM runs the jobs on this machine),
``scancel_assemble`` (the assembly job; the GPU workers assemble instead) or ``client``
(then ``requeue JOB --stranded``, ``status JOB --watch --json``, ``workers stop``). On top
of the checks above, squeue must stop listing the trial's jobs within SLURM_GONE_S; the
harness scancels them at the end whatever happened. Rerun one with
``RINGFLOW_CHAOS_SLURM_SEED=<its seed> RINGFLOW_CHAOS_SLURM_TRIALS=1``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import statistics
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import h5py
import numpy as np
import psutil

from .conftest import CLI, ROOT, cli_env, edit_config

KINDS = ("pool_child", "worker_main", "assemble_main", "broker", "client")
DEFAULT_SEED = 20250101
DEFAULT_TRIALS = 20
# a kill lands 0..window s after its anchor: the first file task received by gpu0, or, for
# the assembly worker (idle until then, and an assembly takes ~0.1 s), the first assembly
# task received by any worker
WINDOW_S = {"assemble_main": 0.3}
DEFAULT_WINDOW_S = 4.0
FIRST_FILE_TIMEOUT_S = 90.0
COMMAND_TIMEOUT_S = 150.0  # a run (or a requeue) longer than this is a hung trial
SETTLE_S = 10.0  # what a finished command leaves has this long to go away
RERUN = (
    "RINGFLOW_CHAOS_SEED={seed} RINGFLOW_CHAOS_TRIALS=1 "
    "python -m pytest tests/test_chaos.py -s -n 0 -k sigkill_of_any"
)


@dataclass(frozen=True)
class Trial:
    number: int
    seed: int
    kinds = KINDS  # class attributes, not fields: what a kind of trial may inject
    rerun = RERUN

    @property
    def kind(self) -> str:
        return self.kinds[self.seed % len(self.kinds)]

    @property
    def delay(self) -> float:
        return round(random.Random(self.seed).uniform(0.0, self.window), 3)

    @property
    def window(self) -> float:
        return WINDOW_S.get(self.kind, DEFAULT_WINDOW_S)

    @property
    def anchor(self) -> str:
        return "assembly" if self.kind == "assemble_main" else "file"

    def rng(self) -> random.Random:
        """The trial's generator past its delay draw: the victim choices."""
        rng = random.Random(self.seed)
        rng.uniform(0.0, self.window)
        return rng

    @property
    def anchor_text(self) -> str:
        return f"{self.anchor} task"

    def label(self) -> str:
        return (
            f"[chaos trial {self.number} seed {self.seed} kind {self.kind} "
            f"delay {self.delay:.3f} s after the first {self.anchor_text}; "
            f"rerun: {self.rerun.format(seed=self.seed)}]"
        )


def settings(
    env: str = "RINGFLOW_CHAOS", all_kinds: tuple[str, ...] = KINDS, default: int = DEFAULT_TRIALS
) -> tuple[int, int, tuple[str, ...]]:
    """(master seed, trials, kinds) from <env>_SEED / _TRIALS / _KINDS."""
    seed = int(os.environ.get(f"{env}_SEED") or DEFAULT_SEED)
    trials = int(os.environ.get(f"{env}_TRIALS") or default)
    names = os.environ.get(f"{env}_KINDS") or ",".join(all_kinds)
    kinds = tuple(k for k in all_kinds if k in {n.strip() for n in names.split(",")})
    unknown = {n.strip() for n in names.split(",")} - set(all_kinds)
    if unknown or not kinds or trials < 1:
        raise ValueError(f"{env}_KINDS {names!r} (one of {all_kinds}) or _TRIALS {trials}")
    return seed, trials, kinds


def plan_trials(
    master: int, count: int, kinds: tuple[str, ...] = KINDS, trial: type[Trial] = Trial
) -> list[Trial]:
    """The master seed is the first trial's own seed (when its kind is among ``kinds``); the
    others derive from it, their kinds in turn so that every kind gets its share."""
    every = trial.kinds
    first = every[master % len(every)]
    trials = [trial(0, master)] if first in kinds else []
    offset = kinds.index(first) if trials else 0  # trial 1 takes the kind after the first's
    for number in range(len(trials), count):
        kind = kinds[(number + offset) % len(kinds)]
        base = random.Random(f"{master}:{number}").randrange(10**6, 10**9)
        trials.append(trial(number, base - base % len(every) + every.index(kind)))
    return trials


@dataclass
class Outcome:
    number: int
    seed: int
    kind: str
    delay: float
    landed: bool = False  # the victim was alive and SIGKILLed while the job ran
    victim: str = ""
    done_at_kill: str = ""  # tasks done and in flight when the kill landed (workers' logs)
    recovery_s: float | None = None  # from the kill to the job's end (run or requeue exit)
    trial_s: float = 0.0
    ok: bool = False
    error: str = ""
    notes: list[str] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)  # seconds from the trial's start

    def mark(self, phase: str, origin: float) -> None:
        self.phases[phase] = round(time.monotonic() - origin, 2)


class Tracker:
    """Every process of a trial: descendants of its commands, sampled every 0.1 s (orphans
    keep being followed), the workspace's process records, and any process whose command
    line or broker URL file names the trial's workspace or configuration."""

    def __init__(self, workspace: Path, config: Path):
        self.workspace, self.config = str(workspace), str(config)
        self.seen: dict[tuple[int, float], psutil.Process] = {}  # (pid, start time): no reuse
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Tracker:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.kill_all()

    def add(self, pid: int, created: float | None = None) -> None:
        """Follow ``pid`` (if it started at ``created``, when given: a recorded pid may have
        been reused by an unrelated process since)."""
        with contextlib.suppress(psutil.Error):
            self._keep(psutil.Process(pid), created)

    def _keep(self, proc: psutil.Process, created: float | None = None) -> None:
        started = proc.create_time()
        if created is None or abs(started - created) < 0.01:
            with self.lock:
                self.seen.setdefault((proc.pid, started), proc)

    def _loop(self) -> None:
        while not self.stopping.wait(0.1):
            self.sample()

    def sample(self) -> None:
        with self.lock:
            known = list(self.seen.values())
        for proc in known:
            with contextlib.suppress(psutil.Error):
                for child in proc.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        self._keep(child)
        for record in process_records(self.workspace):
            self.add(record.get("pid", 0), record.get("created", 0.0))

    def alive(self) -> list[psutil.Process]:
        """The trial's processes still running (zombies are dead: nobody reaps orphans here)."""
        self.sample()
        with self.lock:
            found = {p.pid: p for p in self.seen.values() if running(p)}
        for proc in psutil.process_iter():
            if proc.pid not in found and proc.pid != os.getpid() and self.names_trial(proc):
                found[proc.pid] = proc
        return sorted(found.values(), key=lambda p: p.pid)

    def names_trial(self, proc: psutil.Process) -> bool:
        try:
            command = " ".join(proc.cmdline())
            if self.workspace in command or self.config in command:
                return running(proc)
            return self.workspace in proc.environ().get("RINGFLOW_BROKER_URL_FILE", "")
        except psutil.Error:
            return False

    def settle(self, timeout: float = SETTLE_S) -> tuple[list[str], list[str]]:
        """Wait (bounded) for the trial's processes to end: (those alive when called, those
        still alive after ``timeout``), described."""
        deadline = time.monotonic() + timeout
        first = left = self.alive()
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = self.alive()
        return [describe(p) for p in first], [describe(p) for p in left]

    def kill_all(self) -> None:
        for proc in self.alive():
            with contextlib.suppress(psutil.Error):
                proc.kill()
        with self.lock:
            procs = list(self.seen.values())
        psutil.wait_procs([p for p in procs if running(p)], timeout=5)


def running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def describe(proc: psutil.Process) -> str:
    try:
        return f"pid {proc.pid} ({' '.join(proc.cmdline())[:200]})"
    except psutil.Error:
        return f"pid {proc.pid} (gone)"


def process_records(workspace: str) -> list[dict]:
    """What the run recorded in <workspace>/broker/processes.json: pid, role, start time."""
    try:
        with open(os.path.join(workspace, "broker", "processes.json"), encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return []


def recorded(workspace: str, role: str) -> psutil.Process | None:
    """The live process of ``role`` (redis, gpu0, assemble) the run recorded, latest first."""
    for record in reversed(process_records(workspace)):
        if record.get("role") != role:
            continue
        with contextlib.suppress(psutil.Error, KeyError):
            proc = psutil.Process(record["pid"])
            if abs(proc.create_time() - record["created"]) < 0.01 and running(proc):
                return proc
    return None


TASK_LINE = re.compile(
    r"^\[([0-9: ,-]+):.*Task ringflow\.(integrate_file|assemble_scan)\[([^\]]+)\] (\w+)", re.M
)


def worker_logs(workspace: Path, roles: str = "*", prefix: str = "") -> list[tuple[str, Path]]:
    """(role, log) of the workers: local ones' (``<workspace>/logs/worker-<role>-<tag>.log``)
    or, with the deployment's ``prefix``, its SLURM jobs' (``<workspace>/logs/slurm/
    ringflow-<prefix>-<role>-<job id>.log``)."""
    if not prefix:
        logs = sorted((workspace / "logs").glob(f"worker-{roles}-*.log"))
        return [(log.name.split("-")[1], log) for log in logs]
    start = f"ringflow-{prefix}-"
    logs = sorted((workspace / "logs" / "slurm").glob(f"{start}{roles}-*.log"))
    return [(log.name[len(start) :].rsplit("-", 1)[0], log) for log in logs]


def task_events(
    workspace: Path, roles: str = "*", prefix: str = ""
) -> list[tuple[str, str, str, str]]:
    """(role, task name, task id, event) of each task line of the workers' logs, in time
    order: events "received", "succeeded", "raised", "retry"..."""
    events = []
    for role, log in worker_logs(workspace, roles, prefix):
        for match in TASK_LINE.finditer(log.read_text(errors="replace")):
            at, *rest = match.groups()
            events.append((at, role, *rest))
    return [event[1:] for event in sorted(events, key=lambda e: e[0])]


def anchor_reached(workspace: Path, anchor: str) -> bool:
    """The first file task reached gpu0 ("file"), or any worker took an assembly task."""
    if anchor == "file":
        return any(
            e[1] == "integrate_file" and e[3] == "received" for e in task_events(workspace, "gpu0")
        )
    return any(e[1] == "assemble_scan" and e[3] == "received" for e in task_events(workspace))


def work_state(workspace: Path, prefix: str = "") -> str:
    """What the workers' logs say was done and in flight, e.g. when a kill landed."""
    done, in_flight = {"integrate_file": 0, "assemble_scan": 0}, {}
    open_tasks: dict[tuple[str, str], str] = {}
    for role, name, task_id, event in task_events(workspace, prefix=prefix):
        if event == "received":
            open_tasks[(name, task_id)] = role
        else:
            open_tasks.pop((name, task_id), None)
            done[name] += event == "succeeded"
    for (name, _), role in open_tasks.items():
        key = f"{role} {'file' if name == 'integrate_file' else 'assembly'}"
        in_flight[key] = in_flight.get(key, 0) + 1
    busy = ", ".join(f"{n} {k}" for k, n in sorted(in_flight.items())) or "nothing"
    return (
        f"{done['integrate_file']} files and {done['assemble_scan']} assemblies done, "
        f"in flight: {busy}"
    )


def victim_of(kind: str, workspace: str, client: subprocess.Popen, rng: random.Random):
    """The process a trial of ``kind`` kills now; None if there is none (the job ended)."""
    if kind == "client":
        with contextlib.suppress(psutil.Error):
            return psutil.Process(client.pid)
        return None
    if kind == "broker":
        return recorded(workspace, "redis")
    main = recorded(workspace, "assemble" if kind == "assemble_main" else "gpu0")
    if kind != "pool_child" or main is None:
        return main
    try:
        children = sorted(main.children(), key=lambda p: p.pid)
    except psutil.Error:
        return None
    return rng.choice(children) if children else None


class Command:
    """A ringflow command in a fresh process, output to files (no pipe to fill), bounded."""

    def __init__(self, folder: Path, name: str, *args, tracker: Tracker, env: dict | None = None):
        self.out, self.err = folder / f"{name}.stdout", folder / f"{name}.stderr"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.process = subprocess.Popen(
                [*CLI, *map(str, args)],
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                text=True,
                cwd=str(ROOT),
                env=cli_env(env),
            )
        tracker.add(self.process.pid)

    def wait(self, timeout: float = COMMAND_TIMEOUT_S) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TrialFailed(f"still running after {timeout:.0f} s (hung)") from None

    @property
    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err.read_text(errors="replace")


class TrialFailed(AssertionError):
    pass


def chaos_config(demo_config: str, folder: Path) -> Path:
    """The demo's configuration with a workspace of its own, outside the output folder: the
    output folder must then hold the NeXus outputs and nothing else."""
    changes = {
        "output": {"location": str(folder / "out")},
        "computations distribution": {"workspace_path": str(folder / "ws")},
    }
    return edit_config(demo_config, changes, folder / "chaos.ini")


def output_files(out: Path) -> dict[str, Path]:
    return {str(p.relative_to(out)): p for p in sorted(out.rglob("*")) if not p.is_dir()}


def integrated(path: Path) -> dict[str, np.ndarray]:
    """Every dataset of every entry's ``integrated`` group."""
    found = {}
    with h5py.File(path) as h5:
        for entry in h5:
            group = h5[entry].get("integrated")
            for name in group or ():
                found[f"{entry}/integrated/{name}"] = np.asarray(group[name][()])  # title: bytes
    return found


def same_bytes(left: np.ndarray, right: np.ndarray) -> bool:
    if left.shape != right.shape or left.dtype != right.dtype:
        return False
    if left.dtype.kind == "O":  # variable-length strings: the values, not their pointers
        return left.tolist() == right.tolist()
    return left.tobytes() == right.tobytes()


def compare_outputs(out: Path, reference: dict[str, Path]) -> list[str]:
    """What differs from the clean run: files missing or extra (temporaries, partials,
    half-written files), and any integrated dataset not equal byte for byte."""
    found = output_files(out)
    problems = [f"missing output {name}" for name in sorted(set(reference) - set(found))]
    problems += [f"stray file {name}" for name in sorted(set(found) - set(reference))]
    for name in sorted(set(found) & set(reference)):
        try:
            left, right = integrated(found[name]), integrated(reference[name])
        except OSError as exc:  # a half-written file
            problems.append(f"{name}: unreadable: {exc}")
            continue
        if set(left) != set(right):
            problems.append(f"{name}: datasets {sorted(left)} != {sorted(right)}")
        for key in sorted(set(left) & set(right)):
            if not same_bytes(left[key], right[key]):
                problems.append(
                    f"{name}:{key} differs: shape {left[key].shape} vs {right[key].shape}"
                )
    return problems


def tail(text: str, chars: int = 1500) -> str:
    return text[-chars:].strip()


def run_trial(trial: Trial, demo_config: str, reference: dict[str, Path], root: Path) -> Outcome:
    """One trial, start to checks; never raises, never hangs (every wait is bounded)."""
    outcome = Outcome(trial.number, trial.seed, trial.kind, trial.delay)
    folder = root / f"trial{trial.number:03d}-{trial.seed}"
    folder.mkdir(parents=True)
    config = chaos_config(demo_config, folder)
    workspace = folder / "ws"
    started = time.monotonic()
    tracker = Tracker(workspace, config)
    try:
        with tracker:
            try:
                _trial_body(trial, outcome, config, folder, tracker, started)
                lingering, leftovers = tracker.settle()
                outcome.mark("settled", started)
                if lingering:
                    outcome.notes.append("alive when the command ended: " + "; ".join(lingering))
                if leftovers:
                    raise TrialFailed("processes left alive: " + "; ".join(leftovers))
                problems = compare_outputs(folder / "out", reference)
                if problems:
                    raise TrialFailed("outputs differ from a clean run: " + "; ".join(problems))
                outcome.ok = True
            except TrialFailed as exc:
                outcome.error = f"{trial.label()} {exc}"
    except Exception as exc:  # a harness error still names its trial
        outcome.error = f"{trial.label()} harness error: {exc!r}"
    outcome.trial_s = round(time.monotonic() - started, 2)
    return outcome


def _trial_body(trial, outcome: Outcome, config: Path, folder: Path, tracker, started: float):
    workspace = folder / "ws"
    run = Command(folder, "run", "run", config, "--json", tracker=tracker)
    deadline = time.monotonic() + FIRST_FILE_TIMEOUT_S
    while not anchor_reached(workspace, trial.anchor):
        if run.process.poll() is not None:
            if trial.anchor != "file" and run.process.returncode == 0:
                break  # no assembly seen in time (a run ending fast): the kill misses
            raise TrialFailed(
                f"run exited {run.process.returncode} before any {trial.anchor} task started: "
                f"{tail(run.stderr)}"
            )
        if time.monotonic() > deadline:
            raise TrialFailed(f"no {trial.anchor} task started in {FIRST_FILE_TIMEOUT_S:.0f} s")
        time.sleep(0.02)
    outcome.mark(f"first_{trial.anchor}", started)
    kill_at = time.monotonic() + trial.delay
    while time.monotonic() < kill_at and run.process.poll() is None:
        time.sleep(0.01)
    victim = None
    if run.process.poll() is None:
        victim = victim_of(trial.kind, str(workspace), run.process, trial.rng())
    killed_at = time.monotonic()
    if victim is not None:
        with contextlib.suppress(psutil.NoSuchProcess):
            outcome.victim = describe(victim)
            victim.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            outcome.landed = True
            outcome.mark("kill", started)
    if outcome.landed:  # read just after the kill: what its victim had left to do
        outcome.done_at_kill = work_state(workspace)
    if not outcome.landed:
        outcome.notes.append("missed: the job had ended, or the victim was gone, at the kill")

    code = run.wait()
    outcome.mark("run_exit", started)
    if trial.kind == "client" and outcome.landed:
        code = _finish_killed_run(config, folder, tracker, outcome, started)
    else:
        _check_run(run, code)
    if outcome.landed:
        outcome.recovery_s = round(time.monotonic() - killed_at, 2)
    return code


def _check_run(run: Command, code: int) -> None:
    if code != 0:
        raise TrialFailed(f"run exit code {code}: {tail(run.stderr)}")
    try:
        summary = json.loads(run.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise TrialFailed(f"run printed no JSON summary: {tail(run.stdout)}") from None
    if summary["files_failed"] or summary["files_done"] != summary["files_total"]:
        raise TrialFailed(f"run summary: {summary}")


def _finish_killed_run(config: Path, folder: Path, tracker, outcome: Outcome, started) -> int:
    """The one manual step: the job id from ``status --json``, then ``requeue --stranded``."""
    status = Command(folder, "status", "status", config, "--json", tracker=tracker)
    status.wait()
    outcome.mark("status_exit", started)
    try:
        state = json.loads(status.stdout.strip().splitlines()[-1])
        job_id = state["job_id"]
    except (ValueError, IndexError, KeyError):
        raise TrialFailed(
            f"status --json exit {status.process.returncode} gave no job id: "
            f"{tail(status.stdout)} {tail(status.stderr)}"
        ) from None
    outcome.notes.append(f"status after the kill: {state.get('state')}")
    requeue = Command(folder, "requeue", "requeue", config, job_id, "--stranded", tracker=tracker)
    code = requeue.wait()
    outcome.mark("requeue_exit", started)
    if code != 0:
        raise TrialFailed(f"requeue --stranded exit code {code}: {tail(requeue.stderr)}")
    return code


def summarise(outcomes: list[Outcome], seed: int, kinds: tuple[str, ...] = KINDS) -> dict:
    landed = [o for o in outcomes if o.landed]
    times = [o.recovery_s for o in landed if o.ok and o.recovery_s is not None]
    per_kind = {}
    for kind in kinds:
        mine = [o for o in outcomes if o.kind == kind]
        if not mine:
            continue
        kind_times = [o.recovery_s for o in mine if o.ok and o.landed]
        per_kind[kind] = {
            "trials": len(mine),
            "faults": sum(o.landed for o in mine),
            "passed": sum(o.ok for o in mine),
            "failed": sum(not o.ok for o in mine),
            "recovery_median_s": _median(kind_times),
            "recovery_max_s": max(kind_times, default=None),
        }
    return {
        "seed": seed,
        "trials": len(outcomes),
        "faults": len(landed),
        "missed": len(outcomes) - len(landed),
        "passed": sum(o.ok for o in outcomes),
        "failed": sum(not o.ok for o in outcomes),
        "faults_by_kind": {kind: v["faults"] for kind, v in per_kind.items()},
        "recovery_median_s": _median(times),
        "recovery_max_s": max(times, default=None),
        "trial_median_s": _median([o.trial_s for o in outcomes]),
        "total_s": round(sum(o.trial_s for o in outcomes), 1),
        "by_kind": per_kind,
        "outcomes": [asdict(o) for o in outcomes],
    }


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


def report(summary: dict) -> str:
    lines = [
        f"chaos: seed {summary['seed']}, {summary['trials']} trials, {summary['faults']} "
        f"faults landed ({summary['missed']} missed), {summary['passed']} passed, "
        f"{summary['failed']} failed; recovery median {summary['recovery_median_s']} s, "
        f"max {summary['recovery_max_s']} s; {summary['total_s']} s in all",
    ]
    for kind, v in summary["by_kind"].items():
        lines.append(
            f"  {kind:16s} trials {v['trials']:3d} faults {v['faults']:3d} passed "
            f"{v['passed']:3d} failed {v['failed']:3d} recovery median "
            f"{v['recovery_median_s']} s max {v['recovery_max_s']} s"
        )
    return "\n".join(lines)


def line(outcome: Outcome) -> str:
    state = "ok" if outcome.ok else "FAILED"
    hit = "landed" if outcome.landed else "missed"
    phases = " ".join(f"{name} {at}" for name, at in outcome.phases.items())
    return (
        f"chaos trial {outcome.number:3d} seed {outcome.seed} {outcome.kind:16s} delay "
        f"{outcome.delay:5.3f} s {hit} ({outcome.done_at_kill or 'no kill'}): {state}, "
        f"recovery {outcome.recovery_s} s, trial {outcome.trial_s} s; at {phases}"
    )


# ---- the distributed variant: faults during `ringflow integrate-slurm` on a shared broker

SLURM_KINDS = ("scancel_gpu", "pool_child", "worker_main", "scancel_assemble", "client")
GPU_KINDS = {"scancel_gpu", "pool_child", "worker_main"}  # aimed at one GPU worker
SLURM_TRIALS = 5  # one per kind
SLURM_WORKERS = 2  # n_workers: GPU worker jobs, besides the assembly job
# a fault lands 0..window s after the first file task the victim's GPU worker received (any
# GPU worker's, for the assembly job and the client): each worker has two files of ~2.5 s
SLURM_WINDOW_S = 3.0
SLURM_GONE_S = 30.0  # after the end, squeue must stop listing the trial's jobs within this
SLURM_RERUN = (
    "RINGFLOW_CHAOS_SLURM_SEED={seed} RINGFLOW_CHAOS_SLURM_TRIALS=1 "
    "python -m pytest tests/test_chaos.py -s -n 0 -k integrate_slurm"
)


@dataclass(frozen=True)
class SlurmTrial(Trial):
    """A trial of the distributed variant: its seed also draws the victim's GPU slot."""

    kinds = SLURM_KINDS
    rerun = SLURM_RERUN

    @property
    def window(self) -> float:
        return SLURM_WINDOW_S

    @property
    def slot(self) -> int:
        """The GPU worker a GPU kind aims at (drawn for every kind: seeds stay comparable)."""
        return super().rng().randrange(SLURM_WORKERS)

    @property
    def roles(self) -> str:
        """The workers whose first file task is the anchor (a glob of log roles)."""
        return f"gpu{self.slot}" if self.kind in GPU_KINDS else "gpu*"

    @property
    def anchor_text(self) -> str:
        if self.kind in GPU_KINDS:
            return f"file task received by gpu{self.slot}"
        return "file task received by a GPU worker"

    def rng(self) -> random.Random:
        rng = super().rng()
        rng.randrange(SLURM_WORKERS)  # the slot's draw
        return rng


def slurm_config(demo_config: str, folder: Path, prefix: str) -> Path:
    """The demo on the CI SLURM: 2 GPU worker jobs of one process and one CPU each, a queue
    prefix of the trial's own, the workspace beside (not in) the output folder, and short
    timeouts (a worker answers ~5 s after its sbatch)."""
    changes = {
        "output": {"location": str(folder / "out")},
        "computations distribution": {
            "partition": "debug",
            "n_workers": str(SLURM_WORKERS),
            "ai_engines_per_worker": "1",
            "cores_per_worker": "1",
            "assemble_cores": "1",
            "memory_per_worker": "500MB",
            "time": "00:15:00",
            "workspace_path": str(folder / "ws"),
        },
        "queue": {
            "queue_prefix": prefix,
            "worker_start_timeout": "40",
            "stranded_after": "5",
            "stall_timeout": "60",
        },
    }
    return edit_config(demo_config, changes, folder / "chaos-slurm.ini")


def slurm_jobs(prefix: str) -> dict[str, tuple[str, str]]:
    """This user's SLURM jobs of the deployment as squeue lists them: id -> (name, state)."""
    out = subprocess.run(
        ["squeue", "--me", "-h", "-o", "%i|%j|%T"], capture_output=True, text=True, timeout=30
    ).stdout
    jobs = {}
    for row in out.splitlines():
        job_id, name, state = (row.split("|") + ["", ""])[:3]
        if name.startswith(f"ringflow-{prefix}-"):
            jobs[job_id] = (name, state)
    return jobs


def cancel_slurm_jobs(prefix: str) -> list[str]:
    """scancel every job of the deployment (the trial's cleanup, whatever happened)."""
    ids = sorted(slurm_jobs(prefix))
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, timeout=30)
    return ids


def celery_processes(prefix: str, slot: int) -> tuple[psutil.Process | None, list]:
    """The Celery main process of GPU worker ``slot`` (the SLURM job runs here: psutil sees
    it) and its prefork children: the processes whose ``-Q`` list starts with its queue."""
    queue = f"{prefix}.gpu{slot}"
    found = {}
    for proc in psutil.process_iter(["cmdline", "ppid"]):
        command = proc.info["cmdline"] or []
        if "celery" not in command or "-Q" not in command or not running(proc):
            continue
        queues = command[command.index("-Q") + 1 :][:1]
        if queues and queues[0].split(",")[0] == queue:
            found[proc.pid] = proc
    mains = [p for p in found.values() if p.info["ppid"] not in found]
    if not mains:
        return None, []
    main = min(mains, key=lambda p: p.pid)
    return main, sorted(
        (p for p in found.values() if p.info["ppid"] == main.pid), key=lambda p: p.pid
    )


def slurm_victim(trial: SlurmTrial, prefix: str, client: subprocess.Popen):
    """(description, the kill) of the trial's victim now; None if there is none."""
    kind, rng = trial.kind, trial.rng()
    if kind == "client":
        with contextlib.suppress(psutil.Error):
            return _process_kill(psutil.Process(client.pid))
        return None
    if kind in ("scancel_gpu", "scancel_assemble"):
        role = f"gpu{trial.slot}" if kind == "scancel_gpu" else "assemble"
        name = f"ringflow-{prefix}-{role}"
        jobs = [
            i for i, (n, state) in slurm_jobs(prefix).items() if (n, state) == (name, "RUNNING")
        ]
        if not jobs:
            return None
        job_id = jobs[0]

        def scancel() -> bool:
            done = subprocess.run(
                ["scancel", "--signal=KILL", job_id], capture_output=True, text=True, timeout=30
            )
            return done.returncode == 0

        return f"SLURM job {job_id} ({name}), scancel --signal=KILL", scancel
    main, children = celery_processes(prefix, trial.slot)
    if kind == "worker_main":
        return _process_kill(main) if main else None
    return _process_kill(rng.choice(children)) if children else None


def _process_kill(proc: psutil.Process):
    def kill() -> bool:
        try:
            proc.send_signal(signal.SIGKILL)
            return True
        except psutil.NoSuchProcess:
            return False

    return describe(proc), kill


def run_slurm_trial(
    trial: SlurmTrial, demo_config: str, reference: dict[str, Path], root: Path, broker_url: str
) -> Outcome:
    """One distributed trial, start to checks; never raises, never hangs, and leaves no SLURM
    job of its prefix behind (scancelled at the end, whatever happened)."""
    from .services import unique_prefix

    outcome = Outcome(trial.number, trial.seed, trial.kind, trial.delay)
    folder = root / f"slurm{trial.number:03d}-{trial.seed}"
    folder.mkdir(parents=True)
    prefix = unique_prefix("chaos")
    config = slurm_config(demo_config, folder, prefix)
    workspace = folder / "ws"
    started = time.monotonic()
    tracker = Tracker(workspace, config)
    try:
        with tracker:
            try:
                env = {"RINGFLOW_BROKER_URL": broker_url}
                _slurm_trial_body(trial, outcome, config, folder, prefix, tracker, env, started)
                outcome.mark("end", started)
                left = _slurm_jobs_left(prefix)
                outcome.mark("squeue_clear", started)
                if left:
                    raise TrialFailed(f"SLURM jobs still listed {SLURM_GONE_S:.0f} s on: {left}")
                lingering, leftovers = tracker.settle()
                outcome.mark("settled", started)
                if lingering:
                    outcome.notes.append("alive when the command ended: " + "; ".join(lingering))
                if leftovers:
                    raise TrialFailed("processes left alive: " + "; ".join(leftovers))
                problems = compare_outputs(folder / "out", reference)
                if problems:
                    raise TrialFailed("outputs differ from a clean run: " + "; ".join(problems))
                outcome.ok = True
            except TrialFailed as exc:
                outcome.error = f"{trial.label()} {exc}"
            finally:
                if cancel_slurm_jobs(prefix):
                    outcome.notes.append("SLURM jobs of the trial cancelled by the harness")
    except Exception as exc:  # a harness error still names its trial
        outcome.error = f"{trial.label()} harness error: {exc!r}"
    outcome.trial_s = round(time.monotonic() - started, 2)
    return outcome


def _slurm_jobs_left(prefix: str) -> dict:
    deadline = time.monotonic() + SLURM_GONE_S
    while (left := slurm_jobs(prefix)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def _slurm_trial_body(trial, outcome, config, folder, prefix, tracker, env, started) -> None:
    workspace = folder / "ws"
    run = Command(folder, "islurm", "integrate-slurm", config, "--json", tracker=tracker, env=env)
    deadline = time.monotonic() + FIRST_FILE_TIMEOUT_S
    while not any(
        e[1] == "integrate_file" and e[3] == "received"
        for e in task_events(workspace, trial.roles, prefix)
    ):
        if run.process.poll() is not None:
            raise TrialFailed(
                f"integrate-slurm exited {run.process.returncode} before the first "
                f"{trial.anchor_text}: {tail(run.stderr)}"
            )
        if time.monotonic() > deadline:
            raise TrialFailed(f"no {trial.anchor_text} in {FIRST_FILE_TIMEOUT_S:.0f} s")
        time.sleep(0.05)
    outcome.mark("first_file", started)
    kill_at = time.monotonic() + trial.delay
    while time.monotonic() < kill_at and run.process.poll() is None:
        time.sleep(0.01)
    victim = slurm_victim(trial, prefix, run.process) if run.process.poll() is None else None
    killed_at = time.monotonic()
    if victim is not None:
        outcome.victim, kill = victim
        if kill():
            killed_at = time.monotonic()
            outcome.landed = True
            outcome.mark("kill", started)
            outcome.done_at_kill = work_state(workspace, prefix)
    if not outcome.landed:
        outcome.notes.append("missed: the job had ended, or the victim was gone, at the kill")

    code = run.wait()
    outcome.mark("islurm_exit", started)
    if trial.kind == "client" and outcome.landed:
        ended = _finish_killed_client(config, folder, tracker, outcome, started, env)
    else:
        _check_run(run, code)
        ended = time.monotonic()
    if outcome.landed:
        outcome.recovery_s = round(ended - killed_at, 2)


def _finish_killed_client(config, folder, tracker, outcome, started, env) -> float:
    """The user's steps once integrate-slurm was killed (its worker jobs keep serving): the
    job id from ``status --json``, ``requeue JOB --stranded``, ``status JOB --watch --json``
    until the job is done, then ``workers stop``. Returns when the watch ended."""
    status = Command(folder, "status", "status", config, "--json", tracker=tracker, env=env)
    status.wait()
    try:
        state = json.loads(status.stdout.strip().splitlines()[-1])
        job_id = state["job_id"]
    except (ValueError, IndexError, KeyError):
        raise TrialFailed(
            f"status --json exit {status.process.returncode} gave no job id: "
            f"{tail(status.stdout)} {tail(status.stderr)}"
        ) from None
    outcome.notes.append(f"status after the kill: {state.get('state')}")
    requeue = Command(
        folder, "requeue", "requeue", config, job_id, "--stranded", tracker=tracker, env=env
    )
    if requeue.wait() != 0:
        raise TrialFailed(
            f"requeue --stranded exit code {requeue.process.returncode}: {tail(requeue.stderr)}"
        )
    outcome.mark("requeue_exit", started)
    watch = Command(
        folder, "watch", "status", config, job_id, "--watch", "--json", tracker=tracker, env=env
    )
    code = watch.wait()
    ended = time.monotonic()
    outcome.mark("watch_exit", started)
    try:
        final = json.loads(watch.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        final = {}
    if code != 0 or final.get("state") != "done":
        raise TrialFailed(
            f"status --watch exit code {code}, state {final.get('state')}: "
            f"{tail(watch.stdout)} {tail(watch.stderr)}"
        )
    stop = Command(folder, "stop", "workers", "stop", config, tracker=tracker, env=env)
    if stop.wait() != 0:
        raise TrialFailed(f"workers stop exit code {stop.process.returncode}: {tail(stop.stderr)}")
    outcome.mark("stop_exit", started)
    return ended
