"""The worker job script: one template, submitted to SLURM or run here with bash.

``ringflow workers submit`` hands it to sbatch; ``workers local`` and ``ringflow run`` run the
same text with bash, where the #SBATCH lines are comments. Every value is shell-quoted. The
broker URL holds the Redis password, so the script only names the 0600 file that holds it:
``--dry-run`` output, SLURM's stored copy and ``ps`` never show the secret.

The script also gives the worker what it trusts instead of its messages: the folders of its
job (:mod:`tasks.confine`, outside which it writes nothing) and, with ``[queue] security_*``,
the files that sign and check every message (:class:`tasks.app.Signing`).
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from dataclasses import dataclass

import tasks
from tasks import keys
from tasks.app import SECURITY_ENV, Signing
from tasks.config import Config
from tasks.confine import WRITE_ROOTS_ENV, write_roots
from tasks.errors import ConfigError

JOB_SCRIPT = """\
#!/bin/bash
{directives}
# ringflow worker {node_base}: deployment {prefix_q}, queue {queue}.
set -eu
unset RINGFLOW_BROKER_URL
export RINGFLOW_BROKER_URL_FILE={url_file}
export RINGFLOW_TASK_TIME_LIMIT={time_limit}
export RINGFLOW_RESULT_EXPIRES={result_expires}
export RINGFLOW_QUEUE_PREFIX={prefix_q}
export RINGFLOW_ROLE={role}
export RINGFLOW_SLOT={slot}
export RINGFLOW_WARM_CONFIG={warm_config}
export OMP_NUM_THREADS={threads} OPENBLAS_NUM_THREADS={threads} MKL_NUM_THREADS={threads}
export RINGFLOW_ENGINE_THREADS={threads}
export {roots_env}={write_roots}
{signing}
export PYTHONPATH={pythonpath}"${{PYTHONPATH:+:$PYTHONPATH}}"
{device_check}
# exec: the worker itself gets SLURM's --signal, for a warm shutdown before the time limit.
exec {python} -m celery -A tasks.app --quiet worker --pool=prefork --concurrency={concurrency} \\
    -Q {queues} -n {node_base}-"${{RINGFLOW_NODE_TAG:-j${{SLURM_JOB_ID:-$$}}}}"@%h \\
    --without-gossip --without-mingle -E --loglevel={loglevel}
"""

# SLURM integration jobs only: a worker that cannot integrate (ai_method = opencl, no GPU, no
# cpu_fallback) ends the job here with one line in its log, instead of failing every file
DEVICE_CHECK = '[ -z "$RINGFLOW_WARM_CONFIG" ] || {python} -m tasks.gpu "$RINGFLOW_WARM_CONFIG"'
NO_DEVICE_CHECK = "# no device check: {why}"

LOG_LEVELS = {0: "WARNING", 1: "WARNING", 2: "INFO", 3: "DEBUG"}
_SAFE = re.compile(r"[A-Za-z0-9_.:,=+/@%\-]+")
_ENTRY = re.compile(
    r"""\s*(?P<name>[A-Za-z0-9_.\-]+)\s*=\s*(?:'(?P<single>[^']*)'|"(?P<double>[^"]*)")\s*"""
)


@dataclass(frozen=True)
class WorkerSpec:
    """One Celery worker: an integration worker of GPU slot k, or the assembly worker."""

    role: str  # "gpu<k>" or "assemble"
    slot: int | None
    queue: str
    concurrency: int
    threads: int  # per process (OMP / decompression)
    cpus: int  # what the SLURM job asks for
    gres: str  # e.g. gpu:1; empty: none
    fallback: str = ""  # a queue consumed only while its own is empty (see :func:`gpu_spec`)

    @property
    def queues(self) -> str:
        """The ``-Q`` list, own queue first: the app consumes in this order (priority)."""
        return ",".join(q for q in (self.queue, self.fallback) if q)

    @property
    def job_name(self) -> str:
        return keys.job_name(self.queue.rsplit(".", 1)[0], self.role)


def gpu_spec(config: Config, slot: int) -> WorkerSpec:
    """An integration worker; it also assembles scans, but only when its GPU queue is empty.

    The assembly job may never start (a node whose CPUs the GPU jobs hold, a partition
    where it queues behind them) or may die: a scan's assembly then waits on a queue that a
    live GPU worker takes it from, so a job completes wherever one GPU job runs. While the
    assembly worker lives, it takes the assemblies (its queue is its only one).
    """
    comp = config.computations
    cpus = comp.cpus_per_worker or comp.ai_engines_per_worker * comp.cores_per_worker
    return WorkerSpec(
        role=f"gpu{slot}",
        slot=slot,
        queue=keys.gpu_queue(config.queue.queue_prefix, slot),
        concurrency=comp.ai_engines_per_worker,
        threads=comp.cores_per_worker,
        cpus=cpus,
        gres=comp.gres,
        fallback=keys.assemble_queue(config.queue.queue_prefix),
    )


def assemble_spec(config: Config) -> WorkerSpec:
    cores = config.computations.assemble_cores
    return WorkerSpec(
        role="assemble",
        slot=None,
        queue=keys.assemble_queue(config.queue.queue_prefix),
        concurrency=1,
        threads=cores,
        cpus=cores,
        gres="",
    )


def job_script(
    config: Config, spec: WorkerSpec, url_file: str, log_dir: str, local: bool = False
) -> str:
    """The full script text for ``spec``; SLURM directives included, no secret in it.

    ``local``: run here with bash (``ringflow run``, ``workers local``): this interpreter, and
    no device check (a local worker without a GPU integrates on the CPU, see :mod:`tasks.gpu`).
    Otherwise a SLURM job: the cluster's interpreter (:func:`slurm_python`).
    """
    prefix = config.queue.queue_prefix
    python = shlex.quote(sys.executable if local else slurm_python(config))
    return JOB_SCRIPT.format(
        # a local script runs with bash: #SBATCH lines would be comments naming its paths
        directives=""
        if local
        else "\n".join(f"#SBATCH {line}" for line in sbatch_directives(config, spec, log_dir)),
        node_base=shlex.quote(keys.node_name(prefix, spec.role, "").rstrip("-")),
        prefix_q=shlex.quote(prefix),
        queue=shlex.quote(spec.queue),
        queues=shlex.quote(spec.queues),
        url_file=shlex.quote(url_file),
        time_limit=int(config.queue.task_time_limit),
        result_expires=int(config.queue.job_ttl_s),
        role=shlex.quote(spec.role),
        slot="" if spec.slot is None else int(spec.slot),
        # integration processes build their engine from it as soon as they start
        warm_config=shlex.quote(config.source) if spec.slot is not None and config.source else "",
        threads=int(spec.threads),
        pythonpath=shlex.quote(project_root()),
        device_check=device_check(spec, python, local),
        roots_env=WRITE_ROOTS_ENV,
        write_roots=shlex.quote(write_roots(config).to_env()),
        signing=signing_lines(Signing.of(config.queue)),
        python=python,
        concurrency=int(spec.concurrency),
        loglevel=LOG_LEVELS.get(config.pipeline.verbosity, "INFO"),
    )


def signing_lines(signing: Signing | None) -> str:
    """The script's exports of the signing files' paths; with signing off, an unset, so that
    a worker never signs with files its caller's environment happened to name."""
    if signing is None:
        return "unset " + " ".join(SECURITY_ENV.values())
    return "\n".join(f"export {name}={shlex.quote(path)}" for name, path in signing.env().items())


def device_check(spec: WorkerSpec, python: str, local: bool) -> str:
    """The script's line that checks the job's device at start, or a comment saying why none:
    only a SLURM integration job needs a GPU and has no one to fall back on."""
    if local:
        return NO_DEVICE_CHECK.format(why="a local worker without a GPU integrates on the CPU")
    if spec.slot is None:
        return NO_DEVICE_CHECK.format(why="the assembly worker needs no GPU")
    return DEVICE_CHECK.format(python=python)


def slurm_python(config: Config) -> str:
    """The interpreter of the SLURM jobs: ``python_executables``, the entry of the job's
    partition when it names one per partition (``gpu='/path'; p9gpu='/path2'``, as ESRF's
    integrator reads it), this interpreter when empty. A cluster path need not exist here."""
    comp = config.computations
    value = python_executables(comp.python_executables)
    if isinstance(value, str):
        return value or sys.executable
    if comp.partition not in value:
        reason = f"no entry for partition {comp.partition!r} (entries: {', '.join(value)})"
        raise ConfigError(
            "computations distribution", "python_executables", comp.python_executables, reason
        )
    return value[comp.partition]


def python_executables(text: str) -> str | dict[str, str]:
    """One interpreter path, or partition -> path for the integrator's ``name='path';`` form
    (recognised, as the integrator does, by a ``;``, or by a single quoted entry)."""
    text = text.strip()
    if ";" not in text and not _ENTRY.fullmatch(text):
        return text
    entries = {}
    for part in filter(str.strip, text.split(";")):
        match = _ENTRY.fullmatch(part)
        if not match:
            reason = "expected one path, or name='path'; entries (one per partition)"
            raise ConfigError("computations distribution", "python_executables", text, reason)
        entries[match["name"]] = match["single"] if match["single"] is not None else match["double"]
    return entries


def sbatch_directives(config: Config, spec: WorkerSpec, log_dir: str) -> list[str]:
    comp = config.computations
    lines = [
        f"--job-name={spec.job_name}",
        f"--partition={comp.partition}",
        "--nodes=1",
        "--ntasks=1",
        f"--cpus-per-task={spec.cpus}",
        f"--mem={slurm_memory(comp.memory_per_worker)}",
        f"--time={comp.time}",
        f"--signal=B:TERM@{comp.warm_shutdown_s}",
        f"--output={_directive_path(os.path.join(log_dir, '%x-%j.log'), 'workspace_path')}",
        "--open-mode=append",
    ]
    if spec.gres:
        lines.insert(4, f"--gres={spec.gres}")
    return lines + list(comp.sbatch_options)


def slurm_memory(text: str) -> str:
    """'100GB' -> '100G': sbatch wants a number with an optional K/M/G/T suffix."""
    match = re.fullmatch(r"(\d+)\s*([KMGT]?)B?", text.strip(), flags=re.IGNORECASE)
    if not match:
        raise ConfigError("computations distribution", "memory_per_worker", text, "bad size")
    return match.group(1) + match.group(2).upper()


def _directive_path(path: str, key: str) -> str:
    """A path as an #SBATCH value: sbatch reads these lines itself, not through a shell."""
    if _SAFE.fullmatch(path):
        return path
    if '"' in path or "\n" in path:
        raise ConfigError("computations distribution", key, path, "quotes/newlines in a path")
    return f'"{path}"'


def project_root() -> str:
    """The folder holding the tasks package: workers import it from there."""
    return os.path.dirname(os.path.dirname(os.path.abspath(tasks.__file__)))
