"""Orchestration benchmark: what ringflow costs per file beyond the integration itself.

Two figures, each against its target on 2 cores:

1. Per-file task overhead, in ms of wall time per file. Datasets of one-frame Lima files of a
   120 x 80 detector (``imxpad_s10``: one integration takes well under a millisecond, shown on
   its own line) go through ringflow's own path: ``plan_job``, then ``submit`` and ``watch``
   on ``local_services`` (embedded Redis with its AOF, as ``ringflow run``; 2 integration
   processes and the assembly worker). Broker and worker start-up is left out: the services
   start once, a warm-up job makes every pool process build its pyFAI engine, then jobs of
   N1 and N2 files are timed from ``submit`` to the last scan written (``watch`` polls every
   0.25 s, the same for both jobs). (t(N2) - t(N1)) / (N2 - N1) cancels what every job pays
   once; what remains is each file's share of the client's submit, its queue round trip, task
   body (config parse, file open, integration, partial write, registry records), result and
   chord bookkeeping, and its share of the scan assembly (reading its partial back), all on
   2 shared cores. The two jobs have the same number of scans, so per-scan costs cancel; the
   figure still grows with files per scan (each file's message carries the scan's chord
   body). Target: <= 50 ms/file.
2. Enqueue 100,000 file tasks: ``submit(app, plan)`` (job registration and one chord per scan of
   100 files) against a real Redis from ``start_embedded_redis`` (AOF on, as ``ringflow
   run``), no worker. The payloads are those of a real plan (50-frame files, so each registers
   its 50 monitor values), repeated with their own ids, paths and partials. ``--short``
   enqueues 2,000 and reports 50 x its time, labelled as extrapolated. Target: <= 10 s.

Each part runs in a fresh interpreter: Celery's app keeps its first broker connection for the
life of a process, and pyFAI's OpenMP state must not leak into the caller. That process is
pinned to 2 CPUs (its workers and Redis inherit that) and is stopped, with everything it
started, on error or timeout.

    python benchmarks/orchestration.py            # full: 20 and 200 files, 100,000 tasks
    python benchmarks/orchestration.py --short    # CI: 10 and 60 files, 2,000 tasks
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import re
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

if __package__:
    from .common import Measure, Section, as_dicts, format_table, pin_cores
else:  # run as a script, or imported by a sibling script: benchmarks/ is on sys.path
    if str(Path(__file__).resolve().parent) not in sys.path:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import Measure, Section, as_dicts, format_table, pin_cores  # noqa: E402

SECTION = "orchestration"
CORES = 2  # the figures are for 2 cores
DETECTOR = "imxpad_s10"  # 120 x 80 pixels: integration is negligible next to the overhead
SCANS = 2  # per job, the same for both sizes: per-scan costs cancel in the difference
SIZES = {False: (20, 200), True: (10, 60)}  # files per timed job (N1, N2), by --short
ROUNDS = {False: 2, True: 1}  # each size's fastest round counts (the machine is shared)
WARMUP_FILES = 8
PER_FILE_TARGET_MS = 50.0
ENQUEUE_TARGET_TASKS = 100_000
ENQUEUE_TASKS = {False: 100_000, True: 2_000}
ENQUEUE_TARGET_S = 10.0
ENQUEUE_FILES_PER_SCAN = 100
ENQUEUE_FRAMES_PER_FILE = 50
STALL_TIMEOUT_S = 60  # [queue] stall_timeout of the jobs: a stuck job ends the run
PART_TIMEOUT_S = {False: 540, True: 300}  # whole part, in its own process
STOP_GRACE_S = 60.0  # for a part's process to stop its workers and Redis


# ---------------------------------------------------------------------------------------
# Running a part in a fresh interpreter


def in_fresh_process(func: Callable[..., Section], *args: object, timeout: float) -> Section:
    """``func(*args)`` in a spawned interpreter, ended (cleanly, then by force) on timeout."""
    ctx = multiprocessing.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child, args=(sender, func, args))
    process.start()
    sender.close()
    answered = False
    try:
        if not receiver.poll(timeout):
            raise TimeoutError(f"{func.__name__} took more than {timeout:.0f} s")
        try:
            ok, value = receiver.recv()
        except EOFError:
            process.join(5)
            raise RuntimeError(f"{func.__name__} died (exit code {process.exitcode})") from None
        answered = True
    finally:
        receiver.close()
        _stop(process, STOP_GRACE_S if answered else 0.0)
    if not ok:
        raise RuntimeError(f"{func.__name__} failed in its process:\n{value}")
    return value


def _child(sender, func: Callable[..., Section], args: tuple) -> None:
    # SIGTERM from the parent unwinds the stack, so local_services stops workers and Redis
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    os.environ["OMP_NUM_THREADS"] = "1"  # as the workers (cores_per_worker = 1); before pyFAI
    pin_cores(CORES)
    try:
        result = (True, func(*args))
    except BaseException:
        result = (False, traceback.format_exc())
    with contextlib.suppress(OSError):  # the parent no longer listens (timeout, Ctrl-C)
        sender.send(result)
    sender.close()


def _stop(process: multiprocessing.process.BaseProcess, wait: float) -> None:
    """Let it exit within ``wait`` s, else SIGTERM (it stops what it started), else SIGKILL."""
    process.join(wait)
    if process.is_alive():
        process.terminate()
        process.join(STOP_GRACE_S)
    if process.is_alive():
        process.kill()
        process.join(5)


# ---------------------------------------------------------------------------------------
# 1. Per-file overhead


@dataclass(frozen=True)
class JobTiming:
    files: int
    seconds: float  # submit -> every scan written
    submit_s: float  # the client's submit alone
    task_s: float  # sum over files of the time inside the file task (registry records)
    assemble_s: float  # sum over scans of the assembly task's own time
    redis_commands: int  # commands Redis ran during the job (all clients)
    redis_s: float  # Redis's own CPU time for them


def write_job_dataset(root: str, files: int, space: str) -> str:
    """A demo dataset of ``files`` one-frame Lima files over SCANS scans; returns its INI.

    All datasets share ``root`` (so one calibration, one pyFAI engine) and one workspace
    (so one broker and one set of workers serve every job).
    """
    from tasks.demo import DemoSpec, write_demo

    spec = DemoSpec(
        root=root,
        scans=SCANS,
        files_per_scan=files // SCANS,
        frames_per_file=1,
        detector=DETECTOR,
        sample=f"files{files:05d}",
    )
    text = Path(write_demo(spec).config).read_text()
    text = re.sub(r"ai_engines_per_worker = \d+", f"ai_engines_per_worker = {CORES}", text)
    text = text.replace(
        "[computations distribution]\n",
        f"[computations distribution]\nworkspace_path = {space}\n",
    )
    text = text.replace("[queue]\n", f"[queue]\nstall_timeout = {STALL_TIMEOUT_S}\n")
    path = Path(root, f"files{files:05d}.ini")
    path.write_text(text)
    return str(path)


def run_job(app, workers, config_path: str) -> JobTiming:
    """One job through ringflow's client path: plan, submit, watch until every scan is written."""
    from tasks import registry
    from tasks.config import Config
    from tasks.jobs import check_plan, plan_job, submit
    from worker_launcher.watch import watch

    config = Config.from_file(config_path)
    plan = plan_job(config)
    check_plan(plan)
    app.backend.client.config_resetstat()
    start = time.perf_counter()
    callbacks = submit(app, plan)
    submitted = time.perf_counter()
    outcomes = watch(app, plan, callbacks, workers, lambda progress, elapsed: None)
    seconds = time.perf_counter() - start
    bad = [o for o in outcomes.values() if not (isinstance(o, dict) and o["status"] == "done")]
    if bad:
        raise RuntimeError(f"{len(plan.file_tasks)}-file job: scans not written: {bad}")
    stats = app.backend.client.info("commandstats").values()
    done = registry.read_done(app.backend.client, config.queue.queue_prefix, plan.job_id)
    if len(done) != len(plan.file_tasks):
        raise RuntimeError(f"{len(done)} of {len(plan.file_tasks)} files recorded done")
    return JobTiming(
        files=len(plan.file_tasks),
        seconds=seconds,
        submit_s=submitted - start,
        task_s=sum(info["seconds"] for info in done.values()),
        assemble_s=sum(o["seconds"] for o in outcomes.values()),
        redis_commands=sum(s["calls"] for s in stats),
        redis_s=1e-6 * sum(s["usec"] for s in stats),
    )


def integration_ms(config_path: str, repeat: int = 200) -> float:
    """Median time of one pyFAI integration of a dataset frame, in this process (1 thread)."""
    import h5py
    import hdf5plugin  # noqa: F401 (bitshuffle-LZ4 filter for the Lima files)

    from tasks.config import Config
    from tasks.engine import Engine
    from tasks.jobs import plan_job

    config = Config.from_file(config_path)
    task = plan_job(config).file_tasks[0]
    with h5py.File(task.path) as h5:
        frame = h5[task.dataset][0]
    engine = Engine(config)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        engine.integrate(frame, 1.0)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def per_file_section(short: bool) -> Section:
    """Part 1, in its own process: warm services, then the N1- and N2-file jobs."""
    from tasks.config import Config
    from worker_launcher.distributed import wait_for_workers
    from worker_launcher.run import local_services

    n1, n2 = SIZES[short]
    with tempfile.TemporaryDirectory(prefix="ringflow-orchestration-") as tmp:
        space = os.path.join(tmp, "workspace")
        root = os.path.join(tmp, "data")
        paths = {n: write_job_dataset(root, n, space) for n in (WARMUP_FILES, n1, n2)}
        config = Config.from_file(paths[n1])
        timings: dict[int, list[JobTiming]] = {n1: [], n2: []}
        with local_services(config, space) as services:
            wait_for_workers(services.app, config, None, config.queue.worker_start_timeout)
            run_job(services.app, services.workers, paths[WARMUP_FILES])
            for _ in range(ROUNDS[short]):
                for n in (n1, n2):
                    timings[n].append(run_job(services.app, services.workers, paths[n]))
        frame_ms = integration_ms(paths[n1])
    return per_file_report(timings, frame_ms)


def per_file_report(timings: dict[int, list[JobTiming]], frame_ms: float) -> Section:
    """Each size's fastest job; the difference per file, and where that time went."""
    (n1, runs1), (n2, runs2) = sorted(timings.items())
    a, b = min(runs1, key=lambda t: t.seconds), min(runs2, key=lambda t: t.seconds)

    def per_file(field: str) -> float:
        return 1e3 * (getattr(b, field) - getattr(a, field)) / (n2 - n1)

    wall = per_file("seconds")
    section = Section()
    section.add(
        Measure(
            SECTION,
            f"per file task, 1-frame {DETECTOR} files, jobs of {n1} and {n2} files",
            wall,
            "ms/file",
            target=PER_FILE_TARGET_MS,
            target_is="value<=",
            note=(
                f"(t({n2}) - t({n1})) / {n2 - n1}, submit to last scan written, "
                f"{CORES} integration processes; t = {a.seconds:.2f} s and {b.seconds:.2f} s "
                f"(fastest of {len(runs1)})"
            ),
        )
    )
    section.add(
        Measure(
            SECTION,
            f"pyFAI integration of one {DETECTOR} frame (same configuration, 1 thread)",
            frame_ms,
            "ms/frame",
            note="included in the per-file figure; shows the files' own work is negligible",
        )
    )
    busy = CORES * wall  # process time each file costs, the integration processes being busy
    body = per_file("task_s")
    section.notes += [
        f"per file, from the done records and task results (ms): wall {wall:.1f} x "
        f"{CORES} processes = {busy:.1f} busy; inside the file task {body:.1f} "
        f"(of which integration {frame_ms:.2f}); outside it {busy - body:.1f} (Celery's "
        "worker process and prefork IPC, result, chord counter, events, and the cores shared "
        f"with the assembly worker, Redis and the client); client submit "
        f"{per_file('submit_s'):.1f}; scan assembly {per_file('assemble_s'):.1f}",
        f"Redis per file: {per_file('redis_commands') / 1e3:.1f} commands, "
        f"{per_file('redis_s'):.2f} ms of its CPU: not the bottleneck",
    ]
    return section


# ---------------------------------------------------------------------------------------
# 2. Enqueueing


def write_enqueue_dataset(root: str, frames: int = ENQUEUE_FRAMES_PER_FILE) -> str:
    """One scan of four ``frames``-frame files: a real plan whose payloads the big plan
    repeats."""
    from tasks.demo import DemoSpec, write_demo

    spec = DemoSpec(
        root=root,
        scans=1,
        files_per_scan=4,
        frames_per_file=frames,
        detector=DETECTOR,
    )
    return write_demo(spec).config


def synthetic_plan(base, n_tasks: int, files_per_scan: int = ENQUEUE_FILES_PER_SCAN):
    """``n_tasks`` file tasks in scans of ``files_per_scan``, ids as plan_job makes them.

    Each file task is a copy of one of ``base``'s (same configuration, same monitor values,
    registered under its own id) with its own task id, scan, index, first row and partial
    path.
    """
    from tasks.jobs import JobPlan

    scan0, files0 = base.scans[0]
    plan = JobPlan(base.job_id, base.config, base.workspace)
    for s in range(math.ceil(n_tasks / files_per_scan)):
        count = min(files_per_scan, n_tasks - s * files_per_scan)
        key = f"{s + 1}.1"
        files = []
        for i in range(count):
            model = files0[i % len(files0)]
            task_id = f"{base.job_id}-{s:04d}-{i:04d}"
            if model.monitor_digest:
                plan.monitors[task_id] = base.monitors[model.task_id]
            files.append(
                replace(
                    model,
                    task_id=task_id,
                    scan_key=key,
                    index=i,
                    scan_start=i * model.n_frames,
                    partial=f"{os.path.dirname(model.partial)}/{key}/{i:04d}.h5",
                )
            )
        scan = replace(
            scan0,
            scan_key=key,
            output=scan0.output.replace("scan0001", f"scan{s + 1:04d}"),
            n_frames=sum(f.n_frames for f in files),
            partials=[f.partial for f in files],
        )
        plan.scans.append((scan, files))
    return plan


def enqueue_section(short: bool) -> Section:
    """Part 2, in its own process: submit a big plan to a fresh Redis, nothing consuming."""
    from tasks import keys
    from tasks.app import configure_for
    from tasks.config import Config
    from tasks.jobs import plan_job, submit
    from worker_launcher.redis_server import start_embedded_redis

    n_tasks = ENQUEUE_TASKS[short]
    with tempfile.TemporaryDirectory(prefix="ringflow-enqueue-") as tmp:
        config = Config.from_file(write_enqueue_dataset(tmp))
        plan = synthetic_plan(plan_job(config), n_tasks)
        server = start_embedded_redis(os.path.join(tmp, "redis"), persistent=True)
        try:
            app = configure_for(server.url, config.queue)
            client = app.backend.client
            client.ping()  # connected before the clock starts, as after plan_job in a run
            start = time.perf_counter()
            submit(app, plan)
            seconds = time.perf_counter() - start
            queue = keys.gpu_queue(config.queue.queue_prefix, 0)
            queued, message = client.llen(queue), client.lindex(queue, 0) or b""
            memory_mib = client.info("memory")["used_memory"] / 2**20
            client.flushdb()  # the queues and job records: nothing must ever run them
        finally:
            server.stop()
    if queued != n_tasks:
        raise RuntimeError(f"{queued} of {n_tasks} file tasks on {queue}")
    return enqueue_report(n_tasks, seconds, len(message), memory_mib)


def enqueue_report(n_tasks: int, seconds: float, message_bytes: int, memory_mib: float) -> Section:
    scale = ENQUEUE_TARGET_TASKS / n_tasks
    extrapolated = scale != 1
    name = f"enqueue {ENQUEUE_TARGET_TASKS:,} file tasks ({ENQUEUE_FILES_PER_SCAN} per chord)"
    if extrapolated:
        name += f", EXTRAPOLATED from {n_tasks:,} x {scale:g}"
    section = Section()
    section.add(
        Measure(
            SECTION,
            name,
            seconds * scale,
            "s",
            target=ENQUEUE_TARGET_S,
            target_is="value<=",
            note=f"measured {seconds:.2f} s for {n_tasks:,} tasks: submit() to a real Redis",
        )
    )
    section.notes.append(
        f"enqueue: {1e3 * seconds / n_tasks:.2f} ms per file task; one queued message "
        f"{message_bytes / 1024:.1f} KiB; Redis used {memory_mib:.0f} MiB for {n_tasks:,} "
        "tasks (messages, manifest, chord records)"
    )
    return section


# ---------------------------------------------------------------------------------------


def measure(short: bool) -> Section:
    """Both parts, each in its own process pinned to 2 CPUs; the caller's process is untouched."""
    section = Section()
    for part in (per_file_section, enqueue_section):
        result = in_fresh_process(part, short, timeout=PART_TIMEOUT_S[short])
        section.measures += result.measures
        section.notes += result.notes
    return section


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="CI size: 10/60 files, 2,000 tasks")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON line")
    args = parser.parse_args()
    start = time.monotonic()
    section = measure(args.short)
    elapsed = time.monotonic() - start
    if args.json:
        print(json.dumps({"measures": as_dicts(section.measures), "notes": section.notes}))
    else:
        print(format_table(section.measures))
        for note in [*(m.note for m in section.measures if m.note), *section.notes]:
            print(f"- {note}")
        print(f"- benchmark took {elapsed:.0f} s")
    return 0 if all(m.ok is not False for m in section.measures) else 1


if __name__ == "__main__":
    sys.exit(main())
