"""Scale by simulation: many GPU workers on one broker, with a stand-in engine.

Runs ringflow's real orchestration on this machine's loopback: the embedded Redis (AOF on,
as ``ringflow run``), ``submit`` of a synthetic job (scans of ``--scan-files`` files, each
file ``--frames`` frames of a 120 x 80 detector), real Celery workers consuming the
per-GPU queues, the real file task (registry records, partial file, chord count) and the
real assembly of every scan into its NeXus file. Only the engine is a stand-in
(``benchmarks/scale_worker.py``): it waits ``--ms-per-frame`` per frame, as a process
waits for its GPU, and loads no pyFAI.

Simulated GPU workers are Celery worker processes, one per GPU queue, each with a pool of
``--engines`` threads (``-P threads``: 64 x 8 prefork processes would not fit this machine's
memory); one assembly worker (prefork, 2 processes) as ``ringflow run`` starts. Every
process is pinned to ``--cores`` CPUs.

Reported: enqueue time; drain time (submit to the last scan written) and files per second;
orchestration cost per file (CPU of every worker process and of Redis, over files); Redis
commands, bytes in and out and memory per file; each scan's chord fan-in (its last file
recorded done to its NeXus file written, including the assembly itself); and which resource
saturates first: the machine's CPUs or Redis's one thread.

    python benchmarks/scale.py                       # 64 x 8, 100,000 files, 1,000 per scan
    python benchmarks/scale.py --files 10000         # the same workers, a shorter job
    python benchmarks/scale.py --short               # CI: 4 x 2, 200 files, 100 per scan
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import psutil
from common import ROOT, pin_cores

WORKER_MODULE = "benchmarks.scale_worker"
READY_TIMEOUT_S = 600.0  # 64 workers importing Celery on 2 CPUs
STALL_TIMEOUT_S = 300
FULL = {"workers": 64, "engines": 8, "files": 100_000, "scan_files": 1000}
SHORT = {"workers": 4, "engines": 2, "files": 200, "scan_files": 100}


@dataclass
class Deployment:
    """The simulated workers and the assembly worker, each its own process group."""

    processes: list[subprocess.Popen]

    def check(self) -> None:  # watch()'s supervisor: a dead worker ends the benchmark
        dead = [p.args[-1] for p in self.processes if p.poll() is not None]
        if dead:
            raise RuntimeError(f"worker(s) exited: {', '.join(dead)}")

    def stop(self, grace: float = 30.0) -> None:
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)

    def cpu_seconds(self) -> float:
        """User + system CPU of every process of the deployment, children included."""
        total = 0.0
        for process in self.processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                root = psutil.Process(process.pid)
                for proc in [root, *root.children(recursive=True)]:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        times = proc.cpu_times()
                        total += times.user + times.system
        return total


def write_dataset(root: str, frames: int) -> str:
    """The enqueue benchmark's dataset (one scan of four files on a small detector; the job
    repeats its file tasks), with a stall timeout for a long job."""
    from benchmarks.orchestration import write_enqueue_dataset

    path = Path(write_enqueue_dataset(root, frames))
    text = path.read_text().replace("[queue]\n", f"[queue]\nstall_timeout = {STALL_TIMEOUT_S}\n")
    path.write_text(text)
    return str(path)


def stand_in_provenance(config) -> dict:
    """What a real engine of this configuration records (geometry, pyFAI's version...)."""
    from tasks.engine import provenance_of

    radial = config.integration.radial_range
    return provenance_of(config.integration.poni_file) | {
        "method": ["bbox", "csr", "stand-in"],
        "radial_range": list(radial) if radial else [0.0, 1.0],
    }


def worker_env(
    config, url_file: str, args, provenance: dict, shape: tuple[int, ...]
) -> dict[str, str]:
    from scale_worker import COST_ENV, PROVENANCE_ENV, SHAPE_ENV

    from tasks.app import BROKER_FILE_ENV, TIME_LIMIT_ENV
    from tasks.confine import WRITE_ROOTS_ENV, write_roots
    from tasks.node import PREFIX_ENV

    env = {k: v for k, v in os.environ.items() if not k.startswith("RINGFLOW_")}
    return env | {
        BROKER_FILE_ENV: url_file,
        TIME_LIMIT_ENV: "600",
        PREFIX_ENV: config.queue.queue_prefix,
        WRITE_ROOTS_ENV: write_roots(config).to_env(),
        COST_ENV: str(args.ms_per_frame),
        PROVENANCE_ENV: json.dumps(provenance),
        SHAPE_ENV: ",".join(map(str, shape)),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
    }


def start_deployment(config, env: dict, args, log_dir: str) -> Deployment:
    from tasks import keys

    prefix = config.queue.queue_prefix
    commands = [
        (f"sim{k:02d}", WORKER_MODULE, "threads", args.engines, keys.gpu_queue(prefix, k))
        for k in range(args.workers)
    ] + [("assemble", "tasks.app", "prefork", 2, keys.assemble_queue(prefix))]
    processes = []
    for name, module, pool, concurrency, queue in commands:
        command = [
            *("taskset", "-c", ",".join(map(str, args.cpus))),
            sys.executable,
            *("-m", "celery", "-A", module, "--quiet", "worker", f"--pool={pool}"),
            *(f"--concurrency={concurrency}", "-Q", queue, "--without-gossip"),
            *("--without-mingle", "-E", "--loglevel=WARNING", "-n", f"{name}@%h"),
        ]
        with open(os.path.join(log_dir, f"{name}.log"), "ab") as log:
            processes.append(
                subprocess.Popen(
                    command,
                    env=env,
                    cwd=ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
    return Deployment(processes)


def wait_ready(client, prefix: str, expected: int, deployment: Deployment) -> float:
    """Seconds until every worker has registered itself (``tasks.node``)."""
    from tasks import keys

    start = time.monotonic()
    while client.hlen(keys.workers(prefix)) < expected:
        deployment.check()
        if time.monotonic() - start > READY_TIMEOUT_S:
            raise TimeoutError(f"workers not ready after {READY_TIMEOUT_S:.0f} s")
        time.sleep(0.5)
    return time.monotonic() - start


def redis_counters(client) -> dict[str, float]:
    stats, cpu, memory = client.info("stats"), client.info("cpu"), client.info("memory")
    return {
        "commands": stats["total_commands_processed"],
        "bytes_in": stats["total_net_input_bytes"],
        "bytes_out": stats["total_net_output_bytes"],
        "cpu_s": cpu["used_cpu_user"] + cpu["used_cpu_sys"],
        "memory": memory["used_memory"],
    }


def fan_in_seconds(app, prefix: str, job_id: str, plan, callbacks: dict) -> list[float]:
    """Per scan: its last file recorded done (the file task's end) to its assembly's end."""
    from tasks import registry

    done = registry.read_done(app.backend.client, prefix, job_id)
    fan_in = []
    for scan, files in plan.scans:
        last_file = max(done[f.task_id]["time_s"] for f in files)
        meta = app.backend.get_task_meta(callbacks[scan.scan_key])
        finished = meta["date_done"]
        if isinstance(finished, str):
            finished = datetime.fromisoformat(finished)
        fan_in.append(finished.timestamp() - last_file)
    return fan_in


def simulate(args) -> dict:
    from benchmarks.orchestration import synthetic_plan
    from tasks import keys
    from tasks.app import configure_for
    from tasks.config import Config
    from tasks.engine import load_geometry
    from tasks.jobs import plan_job, submit
    from worker_launcher.redis_server import start_embedded_redis
    from worker_launcher.watch import watch

    with tempfile.TemporaryDirectory(prefix="ringflow-scale-") as tmp:
        config = Config.from_file(write_dataset(tmp, args.frames))
        prefix = config.queue.queue_prefix
        plan = synthetic_plan(plan_job(config), args.files, args.scan_files)
        server = start_embedded_redis(os.path.join(tmp, "redis"), persistent=True)
        deployment = None
        try:
            url_file = os.path.join(tmp, "broker-url")
            with open(os.open(url_file, os.O_WRONLY | os.O_CREAT, 0o600), "w") as fh:
                fh.write(server.url)
            shape = tuple(load_geometry(config.integration).detector.shape)
            env = worker_env(config, url_file, args, stand_in_provenance(config), shape)
            app = configure_for(server.url, config.queue)
            client = app.backend.client
            deployment = start_deployment(config, env, args, tmp)
            ready_s = wait_ready(client, prefix, args.workers + 1, deployment)
            before, cpu_before = redis_counters(client), deployment.cpu_seconds()
            start = time.perf_counter()
            callbacks = submit(app, plan, list(range(args.workers)))
            enqueue_s = time.perf_counter() - start
            queued = redis_counters(client)
            outcomes = watch(app, plan, callbacks, deployment, lambda progress, elapsed: None)
            drain_s = time.perf_counter() - start
            after, cpu_after = redis_counters(client), deployment.cpu_seconds()
            bad = [k for k, o in outcomes.items() if o.get("status") != "done"]
            if bad:
                raise RuntimeError(f"scans not written: {bad[:5]} ({len(bad)} of {len(outcomes)})")
            fan_in = fan_in_seconds(app, prefix, plan.job_id, plan, callbacks)
            assembly = [o["seconds"] for o in outcomes.values()]
            written = sum(os.path.isfile(scan.output) for scan, _ in plan.scans)
            if written != len(plan.scans):
                raise RuntimeError(f"{written} of {len(plan.scans)} NeXus files written")
            queue_lengths = [client.llen(keys.gpu_queue(prefix, k)) for k in range(args.workers)]
        finally:
            if deployment is not None:
                deployment.stop()
            server.stop()
    n = args.files
    workers_cpu = cpu_after - cpu_before
    redis_cpu = after["cpu_s"] - before["cpu_s"]
    return {
        "workers": args.workers,
        "engines": args.engines,
        "files": n,
        "scans": len(plan.scans),
        "frames_per_file": args.frames,
        "ms_per_frame": args.ms_per_frame,
        "cores": len(args.cpus),
        "ready_s": ready_s,
        "enqueue_s": enqueue_s,
        "drain_s": drain_s,
        "files_per_s": n / drain_s,
        "cpu_ms_per_file": 1e3 * (workers_cpu + redis_cpu) / n,
        "workers_cpu_ms_per_file": 1e3 * workers_cpu / n,
        "redis_cpu_ms_per_file": 1e3 * redis_cpu / n,
        "machine_busy": (workers_cpu + redis_cpu) / (drain_s * len(args.cpus)),
        "redis_busy": redis_cpu / drain_s,
        "redis_commands_per_file": (after["commands"] - before["commands"]) / n,
        "redis_bytes_in_per_file": (after["bytes_in"] - before["bytes_in"]) / n,
        "redis_bytes_out_per_file": (after["bytes_out"] - before["bytes_out"]) / n,
        "redis_queued_bytes_per_file": (queued["memory"] - before["memory"]) / n,
        "fan_in_median_s": statistics.median(fan_in),
        "fan_in_max_s": max(fan_in),
        "assembly_median_s": statistics.median(assembly),
        "left_in_queues": sum(queue_lengths),
    }


def bottleneck(result: dict) -> str:
    if result["redis_busy"] >= 0.8:
        return "Redis: its one thread is busy {:.0%} of the time".format(result["redis_busy"])
    return (
        f"the machine's {result['cores']} CPUs ({result['machine_busy']:.0%} busy, Redis's thread "
        f"{result['redis_busy']:.0%}): worker-side Python per file, not the broker"
    )


def report(result: dict) -> str:
    r = result
    one_redis = 1e3 / r["redis_cpu_ms_per_file"] if r["redis_cpu_ms_per_file"] else float("inf")
    lines = [
        f"{r['workers']} simulated GPU workers x {r['engines']} engines (threads), "
        f"{r['files']:,} files of {r['frames_per_file']} frames in {r['scans']} scans, "
        f"stand-in {r['ms_per_frame']} ms/frame, {r['cores']} cores",
        f"workers ready          {r['ready_s']:8.1f} s",
        f"enqueue                {r['enqueue_s']:8.2f} s  "
        f"({1e3 * r['enqueue_s'] / r['files']:.3f} ms/file)",
        f"submit to last scan    {r['drain_s']:8.1f} s  ({r['files_per_s']:.0f} files/s)",
        f"CPU per file           {r['cpu_ms_per_file']:8.2f} ms  "
        f"(workers {r['workers_cpu_ms_per_file']:.2f}, Redis {r['redis_cpu_ms_per_file']:.3f})",
        f"Redis per file         {r['redis_commands_per_file']:8.1f} commands, "
        f"{r['redis_bytes_in_per_file'] / 1024:.1f} KiB in, "
        f"{r['redis_bytes_out_per_file'] / 1024:.1f} KiB out, "
        f"{r['redis_queued_bytes_per_file'] / 1024:.1f} KiB held while queued",
        f"chord fan-in per scan  {r['fan_in_median_s']:8.2f} s median, "
        f"{r['fan_in_max_s']:.2f} s max (last file done -> NeXus file written; the "
        f"assembly itself {r['assembly_median_s']:.2f} s median)",
        f"busy                   machine {r['machine_busy']:.0%}, Redis thread "
        f"{r['redis_busy']:.0%}",
        f"first bottleneck       {bottleneck(r)}",
        f"one Redis thread, at this cost per file: about {one_redis:,.0f} files/s",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="CI size: 4 x 2, 200 files")
    parser.add_argument("--workers", type=int, help="simulated GPU workers (64)")
    parser.add_argument("--engines", type=int, help="engines (threads) per worker (8)")
    parser.add_argument("--files", type=int, help="files in the job (100,000)")
    parser.add_argument("--scan-files", type=int, help="files per scan (1,000)")
    parser.add_argument("--frames", type=int, default=1, help="frames per file (1)")
    parser.add_argument("--ms-per-frame", type=float, default=0.0, help="stand-in cost (0)")
    parser.add_argument("--cores", type=int, default=2, help="CPUs to pin everything to (2)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    for name, value in (SHORT if args.short else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.cpus = pin_cores(args.cores)
    result = simulate(args)
    print(json.dumps(result) if args.json else report(result))
    return 0 if result["left_in_queues"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
