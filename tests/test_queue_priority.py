"""A GPU worker consumes its own queue before the assembly queue (its fallback, see
:func:`worker_launcher.script.gpu_spec`), with a real Celery worker started from the job
script and a real Redis: files waiting on its queue go first, assemblies after."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import pytest

from tasks import keys, registry
from tasks.app import configure
from tasks.config import Config
from tasks.gpu import LOCAL_WORKER_ENV
from tasks.jobs import plan_job
from worker_launcher.broker import write_url_file
from worker_launcher.distributed import enqueue, job_outcomes
from worker_launcher.script import gpu_spec, job_script

from .conftest import edit_config
from .services import redis_url, unique_prefix, wait_until

pytestmark = pytest.mark.service


def test_gpu_worker_takes_its_own_files_before_waiting_assemblies(small_demo, tmp_path):
    """Job 1's scans wait for their assembly (the worker that integrated them consumed only
    its GPU queue); job 2's 4 files are then enqueued on the same GPU queue, and only then
    does a GPU worker with the assembly fallback start. It takes job 2's files first: each
    ends before any assembly of job 1 starts (done records and result meta), and its log
    receives the 4 files before any assembly."""
    url, prefix = redis_url(), unique_prefix("prio")
    app = configure(url)
    client = app.backend.client
    # job 2 writes inside job 1's output folder: the workers' roots (job 1's) allow both
    configs = [config_for(small_demo, tmp_path, prefix, out) for out in ("out", "out/job2")]
    folder = tmp_path / "workers"
    url_file = write_url_file(str(folder), url)
    spec = gpu_spec(configs[0], 0)
    assert spec.queues == f"{prefix}.gpu0,{prefix}.assemble"

    first = start_worker(configs[0], replace(spec, fallback=""), url_file, folder / "first")
    try:
        job1 = plan_job(configs[0])
        enqueue(app, job1)
        assembly = keys.assemble_queue(prefix)
        wait_until(lambda: client.llen(assembly) == 2, 120, "job 1's 2 assemblies to wait")
    finally:
        stop_worker(first)
    job2 = plan_job(configs[1])
    enqueue(app, job2)
    assert client.llen(f"{prefix}.gpu0") == 4 and client.llen(assembly) == 2

    second = start_worker(configs[0], spec, url_file, folder / "second")
    try:
        outcomes = wait_until(
            lambda: all(o := scan_outcomes(app, prefix, job1, job2)) and o,
            120,
            "the 4 scans of both jobs to be assembled",
        )
    finally:
        stop_worker(second)
    assert [o["status"] for o in outcomes] == ["done"] * 4, outcomes

    files = registry.read_done(client, prefix, job2.job_id)
    assert len(files) == 4 and len({info["worker"] for info in files.values()}) == 1
    file_spans = sorted((i["time_s"] - i["seconds"], i["time_s"]) for i in files.values())
    assembly_starts = sorted(
        assembly_span(app, entry["callback"])[0]
        for entry in registry.read_scans(client, prefix, job1.job_id).values()
    )
    gap = assembly_starts[0] - file_spans[-1][1]
    print(
        f"GPU worker with 4 files of its own and 2 assemblies waiting: files started at "
        f"{[round(s - file_spans[0][0], 2) for s, _ in file_spans]} s, the assemblies at "
        f"{[round(s - file_spans[0][0], 2) for s in assembly_starts]} s"
    )
    assert gap >= -0.01, (file_spans, assembly_starts)  # ms rounding of time_s

    received = re.findall(r"Task (ringflow\.\w+)\[([^\]]+)\] received", second.log.read_text())
    order = [
        "file2" if task_id in files else "assembly" if name.endswith("assemble_scan") else "?"
        for name, task_id in received
    ]
    assert order[:6] == ["file2"] * 4 + ["assembly"] * 2, received


def scan_outcomes(app, prefix: str, *jobs) -> list[dict | None]:
    return [o for job in jobs for o in job_outcomes(app, prefix, job.job_id).values()]


def config_for(demo, tmp_path: Path, prefix: str, out: str) -> Config:
    changes = {
        "computations distribution": {
            "n_workers": "1",
            "ai_engines_per_worker": "1",
            "cores_per_worker": "1",
            "workspace_path": str(tmp_path / "ws"),
        },
        "output": {"location": str(tmp_path / out)},
        "queue": {"queue_prefix": prefix},
        "pipeline": {"verbosity": "2"},  # the worker logs each task it receives
    }
    ini = tmp_path / f"{out.replace('/', '-')}.ini"
    return Config.from_file(edit_config(demo.config, changes, ini))


def assembly_span(app, task_id: str) -> tuple[float, float]:
    """When an assembly started and ended (epoch s): its result meta's date_done and the
    seconds its result says it took."""
    meta = app.backend.get_task_meta(task_id)
    done = meta["date_done"]
    done = done if isinstance(done, datetime) else datetime.fromisoformat(done)
    end = (done if done.tzinfo else done.replace(tzinfo=timezone.utc)).timestamp()
    return end - meta["result"]["seconds"], end


class Worker:
    def __init__(self, process: subprocess.Popen, log: Path):
        self.process, self.log = process, log


def start_worker(config: Config, spec, url_file: str, base: Path) -> Worker:
    """The job script of ``spec``, run here with bash (as ``workers local`` runs it)."""
    base.parent.mkdir(parents=True, exist_ok=True)
    script = base.with_suffix(".sh")
    script.write_text(job_script(config, spec, url_file, str(base.parent), local=True))
    log = base.with_suffix(".log")
    env = os.environ | {"RINGFLOW_NODE_TAG": base.name, LOCAL_WORKER_ENV: "1"}
    with open(log, "wb") as out:
        process = subprocess.Popen(
            ["bash", str(script)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return Worker(process, log)


def stop_worker(worker: Worker) -> None:
    """Warm shutdown, then SIGKILL of whatever is left of its process group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(worker.process.pid, signal.SIGTERM)
    try:
        worker.process.wait(30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.process.pid, signal.SIGKILL)
    assert worker.process.returncode in (0, -signal.SIGKILL), worker.log.read_text()[-2000:]
