"""Celery workers on this machine, started as fresh processes.

Fresh processes, not forks of the caller: the caller may have run pyFAI (OpenMP), and a
forked OpenMP runtime hangs. Each worker is a prefork pool whose children build their own
pyFAI engines; the broker URL reaches them through the environment only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass, field

import tasks
from tasks import keys
from tasks.app import BROKER_ENV, TIME_LIMIT_ENV
from tasks.config import Config


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

    def stop(self, timeout: float = 20.0) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL of whatever is left of each process group."""
        for worker in self.workers:
            _signal_group(worker.process, signal.SIGTERM)
        for worker in self.workers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.process.wait(timeout)
            _signal_group(worker.process, signal.SIGKILL)  # pool children outliving their parent
            worker.process.wait(5)


def start_local_workers(
    config: Config, broker_url: str, log_dir: str, slot: int = 0
) -> LocalWorkers:
    """One integration worker on the queue of GPU slot ``slot`` and one assembly worker."""
    comp, prefix = config.computations, config.queue.queue_prefix
    os.makedirs(log_dir, exist_ok=True)
    tag = uuid.uuid4().hex[:6]
    workers = LocalWorkers()
    specs = [
        (
            f"gpu{slot}",
            keys.gpu_queue(prefix, slot),
            comp.ai_engines_per_worker,
            comp.cores_per_worker,
        ),
        ("assemble", keys.assemble_queue(prefix), 1, comp.cores_per_worker),
    ]
    try:
        for role, queue, concurrency, threads in specs:
            name = f"ringflow-{role}-{tag}@%h"
            log = os.path.join(log_dir, f"worker-{role}-{tag}.log")
            command = worker_command(queue, concurrency, name, config.pipeline.verbosity)
            env = worker_env(broker_url, threads, config.queue.task_time_limit)
            with open(log, "ab") as out:
                process = subprocess.Popen(
                    command,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            workers.workers.append(WorkerProcess(name, log, process))
    except BaseException:  # Ctrl-C between two starts: leave nothing behind
        workers.stop()
        raise
    return workers


def worker_command(queue: str, concurrency: int, name: str, verbosity: int = 2) -> list[str]:
    level = {0: "WARNING", 1: "WARNING", 2: "INFO", 3: "DEBUG"}.get(verbosity, "INFO")
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "tasks.app",
        "worker",
        "--pool=prefork",
        f"--concurrency={concurrency}",
        "-Q",
        queue,
        "-n",
        name,
        "--without-gossip",
        "--without-mingle",
        f"--loglevel={level}",
        "-E",
    ]


def worker_env(broker_url: str, threads: int, time_limit: int) -> dict[str, str]:
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(tasks.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env[BROKER_ENV] = broker_url
    env[TIME_LIMIT_ENV] = str(time_limit)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    return env


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)
