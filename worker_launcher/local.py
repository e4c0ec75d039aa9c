"""Celery workers on this machine: the job script of :mod:`.script`, run with bash.

Fresh processes, not forks of the caller: the caller may have run pyFAI (OpenMP), and a
forked OpenMP runtime hangs. Each worker is a prefork pool whose children build their own
pyFAI engines. A worker of GPU slot k sees only its GPU through CUDA_VISIBLE_DEVICES, as
under SLURM.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from tasks.config import Config
from tasks.errors import WorkerError

from .script import WorkerSpec, assemble_spec, gpu_spec, job_script


@dataclass
class WorkerProcess:
    name: str
    log: str
    process: subprocess.Popen

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 5) -> str:
        try:
            with open(self.log, errors="replace") as fh:
                return "".join(fh.readlines()[-lines:]).strip()
        except OSError:
            return ""


@dataclass
class LocalWorkers:
    workers: list[WorkerProcess] = field(default_factory=list)

    def dead(self) -> list[WorkerProcess]:
        return [w for w in self.workers if not w.alive()]

    def check(self) -> None:
        """Raise if any worker exited: a local run has no other worker to fall back on."""
        for worker in self.dead():
            raise WorkerError(
                f"worker {worker.name} exited (log {worker.log}): {worker.log_tail(3)}"
            )

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
    config: Config, gpus: list[str], first_slot: int = 0
) -> list[tuple[WorkerSpec, dict[str, str]]]:
    """One integration worker per GPU id (slot first_slot + k sees GPU gpus[k]) or one CPU
    worker (slot first_slot), and one assembly worker."""
    specs = [
        (gpu_spec(config, first_slot + k), {"CUDA_VISIBLE_DEVICES": gpu})
        for k, gpu in enumerate(gpus)
    ] or [(gpu_spec(config, first_slot), {})]
    return specs + [(assemble_spec(config), {})]


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
    os.makedirs(folder, exist_ok=True)
    workers = LocalWorkers()
    try:
        for spec, env in local_specs(config, gpus or [], first_slot):
            workers.workers.append(_start(config, spec, env, url_file, folder))
            if on_start:
                on_start(workers.workers[-1].process.pid, spec.role)
    except BaseException:  # Ctrl-C between two starts: leave nothing behind
        workers.stop()
        raise
    return workers


def _start(config: Config, spec: WorkerSpec, env: dict, url_file: str, folder: str):
    tag = "l" + uuid.uuid4().hex[:6]
    script = os.path.join(folder, f"worker-{spec.role}-{tag}.sh")
    with open(script, "w") as fh:
        fh.write(job_script(config, spec, url_file, folder))
    log = os.path.join(folder, f"worker-{spec.role}-{tag}.log")
    full_env = dict(os.environ) | env | {"RINGFLOW_NODE_TAG": tag}
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [shutil.which("bash") or "/bin/bash", script],
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return WorkerProcess(f"{spec.role}-{tag}", log, process)


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
