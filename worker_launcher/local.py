"""Celery workers on this machine: the job script of :mod:`.script`, run with bash.

Fresh processes, not forks of the caller: the caller may have run pyFAI (OpenMP), and a
forked OpenMP runtime hangs. Each worker is a prefork pool whose children build their own
pyFAI engines. A worker of GPU slot k sees only its GPU through CUDA_VISIBLE_DEVICES, as
under SLURM. Unlike a SLURM job, a local worker runs in this interpreter, and its engines and
threads are scaled down to the CPUs this process may use (:func:`local_sizing`): the
configuration is usually written for a cluster node.

A worker whose main process dies is started again with the same script and environment
(:meth:`LocalWorkers.restart_dead`, at most RESTARTS times, after BACKOFF_S): the caller's
supervisor (:mod:`.supervise`) hands its files back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from tasks.config import Config
from tasks.errors import WorkerError
from tasks.gpu import LOCAL_WORKER_ENV, local_fallback_note
from tasks.writers import make_private_folder, private_file

from .script import WorkerSpec, assemble_spec, gpu_spec, job_script
from .watch import interrupts_deferred

RESTARTS = 3  # restarts of one local worker before the job fails
BACKOFF_S = (0.0, 2.0, 5.0)  # wait before the 1st, 2nd, 3rd restart: a crash loop slows down


def describe_exit(code: int | None) -> str:
    """A Popen return code in words: 'killed by SIGKILL', 'exited with code 3'."""
    if code is None:
        return "still running"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exited with code {code}"


@dataclass
class WorkerProcess:
    name: str
    log: str
    process: subprocess.Popen
    spec: WorkerSpec
    env: dict[str, str]
    restarts: int = 0  # how many times this worker (its role) was started again

    def alive(self) -> bool:
        return self.process.poll() is None

    def exit_reason(self) -> str:
        return describe_exit(self.process.poll())


@dataclass
class LocalWorkers:
    workers: list[WorkerProcess] = field(default_factory=list)
    starter: Callable[[WorkerSpec, dict[str, str]], WorkerProcess] | None = None
    on_start: Callable[[int, str], None] | None = None
    _due: dict[str, float] = field(default_factory=dict)  # role -> when its restart may run

    def dead(self) -> list[WorkerProcess]:
        return [w for w in self.workers if not w.alive()]

    def check(self) -> None:
        """Restart the workers that died (see :meth:`restart_dead`); raise when one has died
        more often than RESTARTS: a worker that cannot stay up must not loop forever."""
        self.restart_dead()

    def restart_dead(
        self,
        on_event: Callable[[str], None] | None = None,
        on_dead: Callable[[WorkerProcess], None] | None = None,
    ) -> list[str]:
        """Start again each worker whose main process ended, after its backoff; returns the
        names of the workers found dead by this call (their in-flight files are orphans).

        What is left of a dead worker's process group (pool children) is killed first: a
        child still writing a partial would race the file's redelivery. ``on_dead`` is then
        told of it, before its replacement starts (and takes files from its queue).
        """
        gone = []
        for k, worker in enumerate(self.workers):
            if worker.alive():
                continue
            role = worker.spec.role
            if role not in self._due:
                _signal_group(worker.process, signal.SIGKILL)
                gone.append(worker.name)
                if on_dead:
                    on_dead(worker)
                if worker.restarts >= RESTARTS or self.starter is None:
                    raise WorkerError(
                        f"worker {worker.name} {worker.exit_reason()} (log {worker.log}); "
                        f"restarted {worker.restarts} times, giving up"
                    )
                self._due[role] = time.monotonic() + BACKOFF_S[worker.restarts]
                if on_event:
                    on_event(
                        f"worker {worker.name} {worker.exit_reason()} (log {worker.log}); "
                        f"restarting it ({worker.restarts + 1} of {RESTARTS})"
                    )
            if time.monotonic() < self._due[role]:
                continue
            del self._due[role]
            with interrupts_deferred():  # a process started is a process recorded
                fresh = self.starter(worker.spec, worker.env)
                fresh.restarts = worker.restarts + 1
                self.workers[k] = fresh
                if self.on_start:
                    self.on_start(fresh.process.pid, role)
        return gone

    def stop_if_idle(self, client, prefix: str) -> bool:
        """Stop the workers at once (SIGKILL) if no message of this deployment waits in a queue
        or is held by a worker; False, and nothing done, otherwise.

        Celery's warm shutdown of an idle worker takes 2-3 s (the signal waits for the event
        loop's next timer, billiard's processes sleep 1 s after their last message, its
        supervisor polls every 0.5 s) and has nothing to finish. The workers' records are
        removed here, as their own shutdown would have done.
        """
        from tasks.queues import in_flight, waiting_messages

        from .nodes import forget_pids

        if waiting_messages(client, prefix) or in_flight(client, prefix):
            return False
        for worker in self.workers:
            _signal_group(worker.process, signal.SIGKILL)
        for worker in self.workers:
            with contextlib.suppress(subprocess.TimeoutExpired):  # stop() on exit tries again
                worker.process.wait(10)
        forget_pids(client, prefix, {w.process.pid for w in self.workers})
        return True

    def stop(self, timeout: float = 20.0) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL of whatever is left of each process group."""
        for worker in self.workers:
            _signal_group(worker.process, signal.SIGTERM)
        for worker in self.workers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.process.wait(timeout)
            _signal_group(worker.process, signal.SIGKILL)  # pool children outliving their parent
            worker.process.wait(5)


def local_specs(
    config: Config, gpus: list[str], first_slot: int = 0, cpus: int | None = None
) -> list[tuple[WorkerSpec, dict[str, str]]]:
    """One integration worker per GPU id (slot first_slot + k sees GPU gpus[k]) or one CPU
    worker (slot first_slot), and one assembly worker; integration workers sized to the
    ``cpus`` of this process (:func:`local_sizing`)."""
    engines, threads = local_sizing(*_asked(config), cpus or usable_cpus(), workers_for(gpus))
    specs = [
        (gpu_spec(config, first_slot + k), {"CUDA_VISIBLE_DEVICES": gpu})
        for k, gpu in enumerate(gpus)
    ] or [(gpu_spec(config, first_slot), {})]
    sized = [(_resized(spec, engines, threads), env) for spec, env in specs]
    return sized + [(assemble_spec(config), {})]


def local_sizing(engines: int, threads: int, cpus: int, workers: int = 1) -> tuple[int, int]:
    """(engines, threads per engine) of each of ``workers`` local integration workers so that
    together they use at most ``cpus``; unchanged when they fit.

    Engines first (each integrates a file of its own; a thread more per engine gains less),
    then what is left as threads, never more than configured. The assembly worker is not
    counted: it compresses while no file integrates.
    """
    share = max(1, cpus // max(1, workers))
    engines = max(1, min(engines, share))
    return engines, max(1, min(threads, share // engines))


def local_notes(config: Config, gpus: list[str]) -> list[str]:
    """What local workers on ``gpus`` (none: one CPU worker) do other than configured, a line
    each: opencl on the CPU (no GPU here), fewer engines or threads (fewer CPUs here). Said by
    every command that starts local workers, and listed by ``check``."""
    comp = config.computations
    notes = (
        local_fallback_note(config.integration.ai_method, comp.cpu_fallback),
        sizing_note(config, gpus),
    )
    return [note for note in notes if note]


def sizing_note(config: Config, gpus: list[str], cpus: int | None = None) -> str:
    """The one line saying that :func:`local_specs` scaled the workers down; "" if it did not."""
    cpus = cpus or usable_cpus()
    workers = workers_for(gpus)
    asked = _asked(config)
    engines, threads = local_sizing(*asked, cpus, workers)
    if (engines, threads) == asked:
        return ""
    each = f" x {workers} local GPU workers" if workers > 1 else ""
    per = " per worker" if workers > 1 else ""
    return (
        f"ai_engines_per_worker = {asked[0]} x cores_per_worker = {asked[1]}{each} asks for "
        f"{asked[0] * asked[1] * workers} CPUs, this machine gives {cpus}: running "
        f"{_count(engines, 'engine')} x {_count(threads, 'thread')}{per}"
    )


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity: a cgroup, taskset or SLURM allocation)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity (macOS)
        return os.cpu_count() or 1


def workers_for(gpus: list[str]) -> int:
    """Local integration workers for these GPU ids: one per GPU, or one CPU worker."""
    return max(1, len(gpus))


def _asked(config: Config) -> tuple[int, int]:
    comp = config.computations
    return comp.ai_engines_per_worker, comp.cores_per_worker


def _resized(spec: WorkerSpec, engines: int, threads: int) -> WorkerSpec:
    """``spec`` with fewer engines or threads; as it was when they fit."""
    if (spec.concurrency, spec.threads) == (engines, threads):
        return spec
    return dataclasses.replace(spec, concurrency=engines, threads=threads, cpus=engines * threads)


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def start_local_workers(
    config: Config,
    url_file: str,
    folder: str,
    gpus: list[str] | None = None,
    on_start: Callable[[int, str], None] | None = None,
    first_slot: int = 0,
) -> LocalWorkers:
    """Start the workers of :func:`local_specs`; scripts and logs go to ``folder``.

    ``on_start(pid, role)`` is told of each process as soon as it runs.
    """
    make_private_folder(folder)

    def starter(spec: WorkerSpec, env: dict[str, str]) -> WorkerProcess:
        return _start(config, spec, env, url_file, folder)

    workers = LocalWorkers(starter=starter, on_start=on_start)
    try:
        for spec, env in local_specs(config, gpus or [], first_slot):
            workers.workers.append(starter(spec, env))
            if on_start:
                on_start(workers.workers[-1].process.pid, spec.role)
    except BaseException:  # Ctrl-C between two starts: leave nothing behind
        workers.stop()
        raise
    return workers


def _start(config: Config, spec: WorkerSpec, env: dict, url_file: str, folder: str):
    tag = "l" + uuid.uuid4().hex[:6]
    script = os.path.join(folder, f"worker-{spec.role}-{tag}.sh")
    with open(private_file(script, append=False), "w") as fh:
        fh.write(job_script(config, spec, url_file, folder, local=True))
    log = os.path.join(folder, f"worker-{spec.role}-{tag}.log")
    # a local worker without a GPU integrates on the CPU (tasks.gpu), as the client said
    full_env = dict(os.environ) | env | {"RINGFLOW_NODE_TAG": tag, LOCAL_WORKER_ENV: "1"}
    with open(private_file(log), "ab") as out:
        process = subprocess.Popen(
            [shutil.which("bash") or "/bin/bash", script],
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return WorkerProcess(f"{spec.role}-{tag}", log, process, spec, env)


def visible_gpus() -> list[str]:
    """GPU ids of this machine: $CUDA_VISIBLE_DEVICES if set, else nvidia-smi's list."""
    from tasks.gpu import granted_gpus

    granted = granted_gpus()
    if granted:
        return granted
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)
