"""Workers as SLURM jobs: one job per GPU slot and one assembly job, named after the deployment.

Every SLURM command goes through :func:`call`, which raises :class:`SlurmError` carrying the
command, its exit code and SLURM's own message (shown to the user as is).
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import asdict, dataclass

from tasks import keys
from tasks.config import Config
from tasks.errors import WorkerError
from tasks.gpu import START_CHECK_MARK
from tasks.outputs import deployment_dir
from tasks.writers import make_private_folder, private_file

from .broker import write_url_file
from .script import WorkerSpec, assemble_spec, gpu_spec, job_script

JOB_ID = re.compile(r"^(?P<job_id>\d+)(;\S+)?$")
ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING"}
# states in which processes of a job may still run; a job that ran and is in none of them
# (squeue no longer lists it, or lists it PENDING again after a requeue) has no process left
MAY_RUN = (ACTIVE - {"PENDING", "REQUEUED"}) | {"STOPPED", "SIGNALING", "STAGE_OUT"}
SQUEUE_FORMAT = "%i|%j|%T|%r|%N|%M"
CALL_TIMEOUT = 60
LOG_TAIL_BYTES = 64 * 1024


class SlurmError(WorkerError):
    def __init__(self, command: list[str], code: int | None, message: str):
        self.command, self.code, self.message = command, code, message
        status = "timed out" if code is None else f"exit {code}"
        super().__init__(f"{command[0]} failed ({status}): {message}")


def call(command: list[str], timeout: float = CALL_TIMEOUT) -> str:
    """Run a SLURM command; its stdout, or SlurmError with what SLURM said."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise SlurmError(command, 127, "not found: is SLURM's client installed here?") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(command, None, f"no answer within {timeout:.0f} s") from None
    if done.returncode != 0:
        message = (done.stderr.strip() or done.stdout.strip() or "no message").splitlines()
        raise SlurmError(command, done.returncode, " ".join(message))
    return done.stdout


@dataclass(frozen=True)
class SlurmJob:
    job_id: str
    name: str
    state: str
    reason: str
    node: str
    elapsed: str

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    @property
    def may_run(self) -> bool:
        """Processes of the job may be alive (a worker in it may still hold files)."""
        return self.state in MAY_RUN

    def as_dict(self) -> dict:
        return asdict(self)


class SlurmLauncher:
    """Submit, list and cancel the worker jobs of one deployment ([queue] queue_prefix)."""

    def __init__(self, config: Config):
        self.config = config
        self.prefix = config.queue.queue_prefix
        self.folder = deployment_dir(config)
        self.log_dir = os.path.join(self.folder, "logs", "slurm")
        self.submitted: dict[str, str] = {}  # job name -> id of the jobs submit() returned

    def specs(self) -> list[WorkerSpec]:
        slots = range(self.config.computations.n_workers)
        return [gpu_spec(self.config, k) for k in slots] + [assemble_spec(self.config)]

    def script(self, spec: WorkerSpec) -> str:
        return job_script(self.config, spec, self.url_file, self.log_dir)

    @property
    def url_file(self) -> str:
        return os.path.join(self.folder, "broker.url")

    def jobs(self) -> list[SlurmJob]:
        """This user's SLURM jobs of this deployment, as squeue shows them."""
        out = call(["squeue", "--me", "-h", "-o", SQUEUE_FORMAT])
        name_start = keys.job_name(self.prefix, "")
        found = []
        for line in out.splitlines():
            parts = line.split("|")
            if len(parts) == 6 and parts[1].startswith(name_start):
                found.append(SlurmJob(*parts))
        return found

    def submit(self, broker_url: str) -> list[tuple[WorkerSpec, str, bool]]:
        """Submit every worker job not already queued or running: (spec, job id, new?)."""
        write_url_file(self.folder, broker_url)
        make_private_folder(self.log_dir)
        running = {job.name: job.job_id for job in self.jobs() if job.active}
        submitted = []
        for spec in self.specs():
            if spec.job_name in running:
                submitted.append((spec, running[spec.job_name], False))
                continue
            submitted.append((spec, self._sbatch(spec), True))
        self.submitted = {spec.job_name: job_id for spec, job_id, _ in submitted}
        return submitted

    def _sbatch(self, spec: WorkerSpec) -> str:
        path = os.path.join(self.folder, "scripts", f"{spec.job_name}.sh")
        make_private_folder(os.path.dirname(path))
        with open(private_file(path, append=False), "w") as fh:
            fh.write(self.script(spec))
        out = call(["sbatch", "--parsable", path]).strip()
        match = JOB_ID.match(out.splitlines()[-1] if out else "")
        if not match:
            raise SlurmError(["sbatch"], 0, f"unexpected answer {out!r}")
        return match.group("job_id")

    def cancel(self, timeout: float = 60.0) -> list[str]:
        """scancel every job of the deployment and wait until squeue no longer lists them."""
        ids = [job.job_id for job in self.jobs() if job.active]
        if ids:
            call(["scancel", *ids])
        deadline = time.monotonic() + timeout
        while (left := self._still_listed(ids)) and time.monotonic() < deadline:
            time.sleep(0.5)
        if left:
            raise SlurmError(["scancel"], 0, f"jobs {', '.join(sorted(left))} still listed")
        return ids

    def _still_listed(self, ids: list[str]) -> set[str]:
        if not ids:
            return set()
        return {job.job_id for job in self.jobs() if job.active} & set(ids)

    def log_path(self, name: str, job_id: str) -> str:
        """The job's log, as its ``--output`` directive names it."""
        return os.path.join(self.log_dir, f"{name}-{job_id}.log")

    def log_tail(self, job: SlurmJob, lines: int = 3) -> str:
        try:
            with open(self.log_path(job.name, job.job_id), errors="replace") as fh:
                return "".join(fh.readlines()[-lines:]).strip()
        except OSError:
            return ""

    def gpu_slots(self) -> dict[str, int]:
        """SLURM job id -> GPU slot, for the GPU worker jobs :meth:`submit` returned."""
        slots = {spec.job_name: spec.slot for spec in self.specs() if spec.slot is not None}
        return {job_id: slots[name] for name, job_id in self.submitted.items() if name in slots}

    def gpu_jobs_gone(self, jobs: list[SlurmJob]) -> bool:
        """No GPU worker job of this deployment is queued or running any more (``jobs``:
        squeue's view): nothing can integrate, whatever the assembly job does."""
        gpu_names = {spec.job_name for spec in self.specs() if spec.slot is not None}
        return not any(job.active and job.name in gpu_names for job in jobs)

    def why_ended(self, jobs: list[SlurmJob]) -> list[str]:
        """'<name> (SLURM job <id>): <line>' for each submitted job that squeue no longer lists
        as active: its start check's line, else its log's last line."""
        active = {job.job_id for job in jobs if job.active}
        return [
            f"{name} (SLURM job {job_id}): {self._last_words(name, job_id)}"
            for name, job_id in self.submitted.items()
            if job_id not in active
        ]

    def _last_words(self, name: str, job_id: str) -> str:
        """The log's tail only: a job that ran for hours may have left a long one."""
        try:
            with open(self.log_path(name, job_id), "rb") as fh:
                fh.seek(max(0, os.fstat(fh.fileno()).st_size - LOG_TAIL_BYTES))
                text = fh.read().decode(errors="replace")
        except OSError:
            return "no log"
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        marked = [line for line in lines if line.startswith(START_CHECK_MARK)]
        return (marked or lines or ["empty log"])[-1]
