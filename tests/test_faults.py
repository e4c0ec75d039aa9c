"""Fault injection through the real CLI, real Redis and real prefork workers: no file lost.

Each fault is compared with a clean run of the same data: same rows, bit for bit, none
missing and none duplicated.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from .conftest import (
    ROOT,
    assert_same_scan,
    copy_dataset,
    edit_config,
    kill_tree,
    last_json,
    run_cli,
    spawn_cli,
)
from .services import unavailable

pytestmark = pytest.mark.service

HOLD_LOCK = """
import sys, time, h5py
h5 = h5py.File(sys.argv[1], "a")  # HDF5 locks the file, as a detector still writing does
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
h5.close()
"""


def config_for(small_demo, tmp_path, master, name="c.ini", **queue) -> str:
    changes = {
        "dataset": {"location": str(master), "hdf5_entry": "1.1"},
        "output": {"location": str(tmp_path / name.replace(".ini", ""))},
        "queue": {k: str(v) for k, v in queue.items()},
    }
    return str(edit_config(small_demo.config, changes, tmp_path / name))


def integrated(path: str) -> dict[str, np.ndarray]:
    with h5py.File(path) as h5:
        data = h5["1.1/integrated"]
        return {name: data[name][()] for name in ("I", "I_errors", "source_frame")}


def assert_same_output(a: str, b: str) -> None:
    left, right = integrated(a), integrated(b)
    for name in left:
        assert left[name].shape == right[name].shape, name  # no row lost or duplicated
        assert left[name].tobytes() == right[name].tobytes(), name


@pytest.fixture(scope="module")
def clean_run(small_demo, tmp_path_factory):
    """Scan 1.1 integrated without any fault: the reference output."""
    tmp_path = tmp_path_factory.mktemp("clean")
    master = copy_dataset(small_demo, tmp_path)
    result = run_cli("run", config_for(small_demo, tmp_path, master), "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    (output,) = last_json(result.stdout)["outputs"]
    return output


def test_file_locked_by_its_writer_is_retried_until_readable(small_demo, tmp_path, clean_run):
    """A Lima file still open for writing (HDF5 lock: EAGAIN) is retried with backoff."""
    master = copy_dataset(small_demo, tmp_path)
    victim = master.parent / "scan0001" / "pilatus_0000.h5"
    config = config_for(
        small_demo, tmp_path, master, max_retries=10, retry_delay_s=1, retry_delay_max_s=3
    )
    locker = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(victim), "12"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert locker.stdout.readline().strip() == "locked"
        started = time.monotonic()
        result = run_cli("run", config, "--json")
        elapsed = time.monotonic() - started
    finally:
        locker.kill()
        locker.wait()
    assert result.returncode == 0, result.stderr[-3000:]
    summary = last_json(result.stdout)
    assert summary["files_failed"] == [] and summary["files_done"] == 2
    assert summary["files_retried"].get(str(victim), 0) > 1, summary
    assert f"retried: {victim}: done at attempt" in result.stderr
    assert_same_output(summary["outputs"][0], clean_run)
    print(f"locked file: {summary['files_retried']} attempts, run took {elapsed:.1f} s")


def test_corrupt_file_fails_at_once_without_retries(small_demo, tmp_path):
    """Truncated data is permanent: one attempt, however many retries are allowed."""
    master = copy_dataset(small_demo, tmp_path)
    victim = master.parent / "scan0001" / "pilatus_0001.h5"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    config = config_for(small_demo, tmp_path, master, max_retries=5, retry_delay_s=30)
    started = time.monotonic()
    result = run_cli("run", config, "--json")
    assert result.returncode == 1, result.stderr[-2000:]
    assert time.monotonic() - started < 60  # no 30 s backoff happened
    (failure,) = last_json(result.stdout)["files_failed"][:1]
    assert failure["file"] == str(victim) and failure["attempts"] == 1
    assert "truncated file" in failure["message"] and "Traceback" not in result.stderr


def busy_worker_child(root_pid: int, queue: str, timeout: float = 120):
    """A Celery pool process of the worker consuming ``queue`` while it integrates a file.

    Its worker must have received a file task first: pool processes are busy from their
    start, building their engine, before the client has sent anything (a kill then is no
    fault mid-file, and a pool process dying while the pool starts takes its worker down).
    """
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in psutil.Process(root_pid).children(recursive=True):
            try:
                command = f"{proc.name()} {' '.join(proc.cmdline())}"
                if "celery" not in command or queue not in command:
                    continue
                if not received_a_file(proc):
                    continue
                for child in proc.children():
                    if child.cpu_percent(interval=0.2) > 20:  # idle is 0; a busy machine shares
                        return child
            except psutil.Error:
                continue
        time.sleep(0.1)
    raise AssertionError(f"no busy worker child on {queue} within {timeout} s")


def received_a_file(worker) -> bool:
    """Whether the worker's log (its stdout, a file) shows a file task received."""
    for opened in worker.open_files():
        if opened.path.endswith(".log"):
            text = Path(opened.path).read_text(errors="replace")
            if "Task ringflow.integrate_file[" in text and "] received" in text:
                return True
    return False


def test_sigkill_of_a_worker_child_mid_file_redoes_that_file(long_files, tmp_path):
    demo, clean_output = long_files
    config = edit_config(
        demo.config, {"output": {"location": str(tmp_path / "out")}}, tmp_path / "k.ini"
    )
    run = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "run", str(config), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=str(ROOT),
    )
    try:
        victim = busy_worker_child(run.pid, "ringflow.gpu0")
        killed_at = time.monotonic()
        victim.kill()
        stdout, stderr = run.communicate(timeout=300)
        recovered = time.monotonic() - killed_at
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, stderr[-3000:]
    summary = last_json(stdout)
    assert summary["files_done"] == 2 and summary["files_failed"] == []
    assert summary["frames"] == 600  # the redone file counted once
    assert_same_scan(summary["outputs"][0], clean_output)
    logs = "".join(p.read_text() for p in (tmp_path / "out").rglob("worker-gpu0-*.log"))
    assert "WorkerLostError('Worker exited prematurely: signal 9 (SIGKILL)" in logs  # mid-task
    print(f"worker child SIGKILLed mid-file: job finished {recovered:.1f} s later, 0 lost")


def run_process(run_pid: int, kind: str, busy_child):
    """The process of ``ringflow run`` (pid ``run_pid``) that fault ``kind`` kills: the
    integration worker's Celery main process, the assembly worker's, or the broker."""
    import psutil

    if kind == "gpu worker main":
        return busy_child.parent()
    for proc in psutil.Process(run_pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            command = " ".join(proc.cmdline())
            if kind == "assembly worker main" and "-Q ringflow.assemble " in command:
                return proc
            if kind == "embedded broker" and proc.name().endswith("-server"):
                return proc
    raise AssertionError(f"no {kind} process under ringflow run {run_pid}")


@pytest.mark.parametrize("kind", ["gpu worker main", "assembly worker main", "embedded broker"])
def test_run_finishes_after_sigkill_of(kind, long_files, tmp_path):
    """A whole local worker (its Celery main process) or the embedded broker SIGKILLed
    mid-file: `ringflow run` starts it again, hands back what it had taken, and exits 0 with
    the output of a clean run; the restart is said in one line naming the log."""
    demo, clean_output = long_files
    out = tmp_path / "out"
    config = edit_config(demo.config, {"output": {"location": str(out)}}, tmp_path / "k.ini")
    run = spawn_cli("run", config, "--json")
    try:
        victim = run_process(run.pid, kind, busy_worker_child(run.pid, "ringflow.gpu0"))
        killed_at = time.monotonic()
        victim.kill()
        stdout, stderr = run.communicate(timeout=300)
        recovered = time.monotonic() - killed_at
    finally:
        if run.poll() is None:
            kill_tree(run.pid)
    assert run.returncode == 0, stderr[-3000:]
    summary = last_json(stdout)
    assert summary["files_done"] == 2 and summary["files_failed"] == [], summary
    assert_same_scan(summary["outputs"][0], clean_output)
    said = [line for line in stderr.splitlines() if line.startswith("recovery:")]
    if kind == "embedded broker":
        assert any("embedded broker killed by SIGKILL; started again" in s for s in said), said
    else:
        assert any("killed by SIGKILL (log " in s and "restarting it (1 of 3)" in s for s in said)
    assert not list(out.rglob("*.tmp"))
    print(f"{kind} SIGKILLed mid-file: ringflow run finished {recovered:.1f} s later, 0 lost")


def mount_tmpfs(folder, options: str) -> None:
    """A small file system of our own for the output folder (root only, as in CI)."""
    import os

    if os.geteuid() != 0 or not shutil.which("mount"):
        unavailable("mounting a tmpfs needs root and mount(8)")
    folder.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], check=True)


def test_full_then_read_only_output_folder_then_rerun(small_demo, tmp_path):
    """No space, then a read-only folder: a clear error each time and no half-written file;
    once the folder is fixed, a rerun writes both scans."""
    out = tmp_path / "out"
    mount_tmpfs(out, "size=300k")  # too small for the corrected frames of a scan
    try:
        config = edit_config(
            small_demo.config,
            {
                "output": {"location": str(out), "save_corrected": "1"},
                "computations distribution": {"workspace_path": str(tmp_path / "ws")},
            },
            tmp_path / "full.ini",
        )
        full = run_cli("run", config)
        assert full.returncode == 1 and "Traceback" not in full.stderr
        assert full.stderr.count("cannot be written: No space left on device") == 2, full.stderr
        assert not [p for p in out.rglob("*") if p.is_file()]  # nothing half-written

        subprocess.run(["mount", "-o", "remount,ro,size=64m", str(out)], check=True)
        read_only = run_cli("run", config)
        assert read_only.returncode == 2 and "Traceback" not in read_only.stderr  # before any work
        assert f"{out}/sample/sample_0001: folder is not writable" in read_only.stderr

        subprocess.run(["mount", "-o", "remount,rw,size=64m", str(out)], check=True)
        rerun = run_cli("run", config, "--json")
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        outputs = last_json(rerun.stdout)["outputs"]
        assert len(outputs) == 2
        for path in outputs:
            with h5py.File(path) as h5:
                entry = h5[next(iter(h5))]
                assert entry["reduction/corrected/data"].shape[0] == entry["integrated/I"].shape[0]
        assert not list(out.rglob("*.tmp"))
    finally:
        subprocess.run(["umount", "-l", str(out)], check=False)


def test_killed_run_is_finished_by_requeue_stranded(long_files, tmp_path):
    """`ringflow run` SIGKILLed with its workers and embedded Redis mid-file: the job's
    records survive in the workspace (AOF); `status` says interrupted; `requeue --stranded`
    restarts the broker there, hands back the file the dead worker had taken, and the output
    equals a clean run's. A second requeue has nothing to do."""
    demo, clean_output = long_files
    out = tmp_path / "out"
    config = edit_config(demo.config, {"output": {"location": str(out)}}, tmp_path / "k.ini")
    run = spawn_cli("run", config, "--json")
    busy_worker_child(run.pid, "ringflow.gpu0")
    killed = kill_tree(run.pid)
    assert not list(out.rglob("azint_*.h5"))  # the scan was not assembled
    status = run_cli("status", config, "--json")
    assert status.returncode == 1, status.stderr[-2000:]
    state = last_json(status.stdout)
    assert state["state"] == "interrupted" and state["counts"]["done"] < 2, state
    assert "left running by a killed run" not in status.stderr  # kill_tree got them all
    assert "requeue" in status.stderr and "--stranded" in status.stderr

    started = time.monotonic()
    finish = run_cli("requeue", config, state["job_id"], "--stranded")
    recovery = time.monotonic() - started
    assert finish.returncode == 0, finish.stderr[-3000:]
    assert "file(s) taken by workers that died" in finish.stderr, finish.stderr  # mid-file
    (output,) = [str(p) for p in out.rglob("azint_*.h5")]
    assert_same_scan(output, clean_output)
    again = run_cli("requeue", config, state["job_id"], "--stranded")
    assert again.returncode == 0 and "0 file(s) requeued, 0 scan(s)" in again.stderr
    assert not list(out.rglob("*.tmp"))
    print(
        f"whole run SIGKILLed ({len(killed)} processes): requeue --stranded finished the "
        f"job in {recovery:.1f} s, 0 lost, 0 duplicated"
    )


def test_file_that_vanishes_then_appears_is_retried(long_files, tmp_path):
    """A Lima file missing when its turn comes (ENOENT: moved by a storage tier, an NFS
    hiccup) and back 8 s later is retried until readable; the output equals a clean run's."""
    demo, clean_output = long_files
    master = copy_dataset(demo, tmp_path)
    victim = master.parent / "scan0001" / "pilatus_0001.h5"
    config = edit_config(
        demo.config,
        {
            "dataset": {"location": str(master)},
            "output": {"location": str(tmp_path / "out")},
            "computations distribution": {"ai_engines_per_worker": "1"},  # files one by one
            "queue": {"max_retries": "10", "retry_delay_s": "1", "retry_delay_max_s": "3"},
        },
        tmp_path / "late.ini",
    )
    run = spawn_cli("run", config, "--json")
    busy_worker_child(run.pid, "ringflow.gpu0")  # file 0 runs; file 1 waits its turn
    hidden = victim.with_suffix(".away")
    victim.rename(hidden)
    time.sleep(8)
    hidden.rename(victim)
    stdout, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr[-3000:]
    summary = last_json(stdout)
    assert summary["files_done"] == 2 and summary["files_failed"] == []
    assert summary["files_retried"].get(str(victim), 0) > 1, summary
    assert_same_scan(summary["outputs"][0], clean_output)
    print(f"vanished file: done at attempt {summary['files_retried'][str(victim)]}, 0 lost")


def test_redis_restart_mid_job_with_aof(long_files, tmp_path):
    """The broker (AOF on) is stopped mid-file and started again 3 s later on the same socket:
    workers and the client reconnect, the job completes, the output equals a clean run's."""
    from worker_launcher.redis_server import start_embedded_redis

    demo, clean_output = long_files
    redis = start_embedded_redis(str(tmp_path / "redis"), persistent=True)
    config = edit_config(
        demo.config,
        {
            "output": {"location": str(tmp_path / "out")},
            "queue": {"queue_prefix": "restart"},
        },
        tmp_path / "r.ini",
    )
    run = spawn_cli("run", config, "--json", env={"RINGFLOW_BROKER_URL": redis.url})
    try:
        busy_worker_child(run.pid, "restart.gpu0")
        redis.stop()  # SIGTERM: Redis writes its AOF and exits
        down_at = time.monotonic()
        time.sleep(3)
        redis = start_embedded_redis(redis.folder, persistent=True, password=redis.password)
        stdout, stderr = run.communicate(timeout=300)
        recovered = time.monotonic() - down_at
    finally:
        if run.poll() is None:
            run.kill()
        redis.stop()
    assert run.returncode == 0, stderr[-3000:]
    summary = last_json(stdout)
    assert summary["files_done"] == 2 and summary["files_failed"] == [], summary
    assert_same_scan(summary["outputs"][0], clean_output)
    assert redis.password not in stdout + stderr
    print(f"Redis restarted mid-file: job done {recovered:.1f} s after the stop, 0 lost")


@pytest.fixture
def two_workers(long_files, tmp_path):
    """Workers on a shared broker as on two machines: gpu0 (+ assembly) and gpu1 (+
    assembly), each its own `workers local`; yields what a test needs to kill gpu1's."""
    from tasks.app import configure
    from worker_launcher.nodes import live_nodes

    from .services import redis_url, unique_prefix, wait_until

    url, prefix = redis_url(), unique_prefix("kill")
    demo, _ = long_files
    config = edit_config(
        demo.config,
        {
            "output": {"location": str(tmp_path / "out")},
            "queue": {"queue_prefix": prefix, "stranded_after": "1"},
            "computations distribution": {
                "n_workers": "2",
                "ai_engines_per_worker": "1",
                "workspace_path": str(tmp_path / "ws"),
            },
        },
        tmp_path / "w.ini",
    )
    env = {"RINGFLOW_BROKER_URL": url}
    survivor = spawn_cli("workers", "local", config, "--gpus", "0", env=env)
    doomed = spawn_cli("workers", "local", config, "--gpus", "1", "--first-slot", "1", env=env)
    try:
        app = configure(url)

        def both_up():
            return {s for n in live_nodes(app, prefix) for s in n.slots(prefix)} == {0, 1}

        wait_until(both_up, 90, "gpu0 and gpu1 workers")
        yield app, prefix, config, env, doomed
    finally:
        for cli in (survivor, doomed):
            if cli.poll() is None:
                cli.send_signal(2)
                cli.wait(60)


def kill_gpu1_mid_file(doomed, prefix: str) -> float:
    busy_worker_child(doomed.pid, f"{prefix}.gpu1")
    kill_tree(doomed.pid)
    return time.monotonic()


def registry_done(app, prefix: str, job_id: str) -> dict:
    from tasks import registry

    return registry.read_done(app.backend.client, prefix, job_id)


def assert_done_once_on_gpu0(app, prefix: str, job_id: str, tmp_path, clean_output) -> None:
    from tasks import registry

    done = registry.read_done(app.backend.client, prefix, job_id)
    assert sorted(info["queue"] for info in done.values()) == [f"{prefix}.gpu0"] * 2
    (output,) = [str(p) for p in (tmp_path / "out").rglob("azint_*.h5")]
    assert_same_scan(output, clean_output)


def test_sigkill_of_a_whole_worker_then_requeue_stranded(two_workers, long_files, tmp_path):
    """The gpu1 worker is SIGKILLed with its whole process tree mid-file; with nobody
    following the job, `requeue --stranded` hands its file back and moves it to gpu0."""
    app, prefix, config, env, doomed = two_workers
    queued = run_cli("enqueue", config, env=env)
    assert queued.returncode == 0, queued.stderr[-2000:]
    job_id = queued.stdout.strip().splitlines()[-1]
    killed_at = kill_gpu1_mid_file(doomed, prefix)
    requeued = run_cli("requeue", config, job_id, "--stranded", env=env)
    assert requeued.returncode == 0, requeued.stderr[-2000:]
    assert "handed back: 1 file(s) taken by workers that died" in requeued.stderr
    assert "moved: 1 stranded file(s)" in requeued.stderr
    final = run_cli("status", config, job_id, "--watch", "--json", env=env, timeout=240)
    recovery = time.monotonic() - killed_at
    assert final.returncode == 0, final.stderr[-2000:]
    state = last_json(final.stdout)
    assert state["counts"] == {"files": 2, "done": 2, "failed": 0, "retrying": 0, "pending": 0}
    assert_done_once_on_gpu0(app, prefix, job_id, tmp_path, long_files[1])
    print(
        f"whole worker SIGKILLed: its file done on gpu0 {recovery:.1f} s after the kill "
        "(requeue --stranded), 0 lost, 0 duplicated"
    )


def test_sigkill_of_a_whole_worker_is_recovered_by_the_supervisor(
    two_workers, long_files, tmp_path
):
    """Same kill while a client follows the job (as `integrate-slurm` does): its supervisor
    sees the worker vanish, hands the file back and moves it to gpu0 with no user action."""
    from tasks.config import Config
    from tasks.jobs import plan_job
    from worker_launcher.distributed import ClusterSupervisor, enqueue, job_outcomes

    from .services import wait_until

    app, prefix, config, env, doomed = two_workers
    cfg = Config.from_file(config)
    plan = plan_job(cfg)
    enqueue(app, plan)
    events: list[str] = []
    supervisor = ClusterSupervisor(app, cfg, None, events.append)
    supervisor.check()  # sees both workers alive
    killed_at = kill_gpu1_mid_file(doomed, prefix)

    def finished():
        supervisor.check()
        outcomes = job_outcomes(app, prefix, plan.job_id)
        return all(outcomes.values()) and outcomes

    outcomes = wait_until(finished, 180, "the job to finish on gpu0", interval=1.0)
    recovery = time.monotonic() - killed_at
    assert [o["status"] for o in outcomes.values()] == ["done"]
    assert any(e.startswith("worker gone:") and f"{prefix}-gpu1-" in e for e in events), events
    # the file reaches gpu0 one of two ways, depending on which process the kill hit first:
    # in flight (the main process died first) it is handed back; rejected back onto gpu1's
    # queue (the pool child died first, its main process requeued it) it moves as stranded
    handed_back = "1 file(s) taken by a dead worker handed back" in events
    moved = any(e.startswith(f"1 files moved from {prefix}.gpu1 ") for e in events)
    assert handed_back or moved, (events, registry_done(app, prefix, plan.job_id))
    assert_done_once_on_gpu0(app, prefix, plan.job_id, tmp_path, long_files[1])
    print(
        f"whole worker SIGKILLed while followed: file handed back and done on gpu0 "
        f"{recovery:.1f} s after the kill, 0 lost, 0 duplicated"
    )


def test_a_file_task_done_twice_gives_the_same_partial(small_demo, tmp_path):
    """Redelivery is harmless: the real task body run twice on one file writes the same
    partial, bit for bit, replaced whole (a new inode, no temporary file left)."""
    from tasks import registry
    from tasks.app import configure
    from tasks.config import Config
    from tasks.integrate import integrate_file
    from tasks.jobs import plan_job
    from worker_launcher.redis_server import start_embedded_redis

    redis = start_embedded_redis(str(tmp_path / "redis"))
    try:
        app = configure(redis.url)
        config = edit_config(
            small_demo.config, {"output": {"location": str(tmp_path / "out")}}, tmp_path / "c.ini"
        )
        plan = plan_job(Config.from_file(config))
        prefix, record = plan.config.queue.queue_prefix, plan.config_record
        registry.register_job(
            app.backend.client, prefix, plan.job_id, {}, {}, config=record, monitors=plan.monitors
        )
        task = plan.file_tasks[0]

        def run_once() -> tuple[dict, int]:
            result = integrate_file.apply(args=(task.to_dict(),)).get(timeout=120)
            assert result["status"] == "done", result
            with h5py.File(task.partial) as h5:
                content = {name: h5[name][()].tobytes() for name in h5}
            return content, os.stat(task.partial).st_ino

        (first, inode), (second, inode_again) = run_once(), run_once()
    finally:
        redis.stop()
    assert first == second and set(first) >= {"intensity", "sigma", "source_frame"}
    assert inode != inode_again  # renamed into place, never rewritten in place
    assert os.listdir(os.path.dirname(task.partial)) == [os.path.basename(task.partial)]


def test_status_during_a_run_and_a_second_run_refused(long_files, tmp_path):
    """While `ringflow run` owns its workspace, `status` reads the live embedded broker
    (workers listed, exit 0) and a second run of the same workspace is refused by name."""
    demo, clean_output = long_files
    out = tmp_path / "out"
    config = edit_config(demo.config, {"output": {"location": str(out)}}, tmp_path / "s.ini")
    run = spawn_cli("run", config, "--json")
    try:
        busy = busy_worker_child(run.pid, "ringflow.gpu0")
        busy.suspend()  # the run must outlive both commands, however fast its files go
        try:
            status = run_cli("status", config, "--json")
            second = run_cli("run", config)
        finally:
            busy.resume()
        stdout, stderr = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
    assert status.returncode == 0, status.stderr[-2000:]
    state = last_json(status.stdout)
    assert state["state"] == "running" and len(state["workers"]) == 2, state
    assert second.returncode == 1 and "Traceback" not in second.stderr
    assert f"in use by ringflow process {run.pid}" in second.stderr, second.stderr
    assert run.returncode == 0, stderr[-2000:]
    assert_same_scan(last_json(stdout)["outputs"][0], clean_output)


def test_workers_local_restarts_a_killed_worker(small_demo, tmp_path):
    """`workers local` on a shared broker: its GPU worker's Celery main process SIGKILLed
    while idle is started again (one line naming the reason and the log), and answers."""
    import psutil

    from tasks.app import configure
    from worker_launcher.nodes import live_nodes

    from .services import redis_url, unique_prefix, wait_until

    url, prefix = redis_url(), unique_prefix("restart")
    config = edit_config(
        small_demo.config,
        {
            "queue": {"queue_prefix": prefix},
            "computations distribution": {"workspace_path": str(tmp_path / "ws")},
        },
        tmp_path / "w.ini",
    )
    cli = spawn_cli("workers", "local", config, "--gpus", "0", env={"RINGFLOW_BROKER_URL": url})
    app = configure(url)

    def gpu_worker() -> str:
        names = [n.name for n in live_nodes(app, prefix) if n.slots(prefix) == [0]]
        return names[0] if names else ""

    try:
        first = wait_until(gpu_worker, 90, "the gpu0 worker")
        (main,) = [
            p
            for p in psutil.Process(cli.pid).children(recursive=True)
            if "celery" in " ".join(p.cmdline())
            and f"-Q {prefix}.gpu0," in " ".join(p.cmdline())
            and p.parent().pid == cli.pid
        ]
        main.kill()
        second = wait_until(lambda: (n := gpu_worker()) != first and n, 90, "a new gpu0 worker")
    finally:
        cli.send_signal(2)
        _, stderr = cli.communicate(timeout=60)
    assert second and second != first
    said = [line for line in stderr.splitlines() if line.startswith("recovery:")]
    assert any("killed by SIGKILL (log " in s and "restarting it (1 of 3)" in s for s in said), (
        stderr[-2000:]
    )


def lose_one_chord_count(client, backend, queue: str) -> int:
    """Make every chord waiting in ``queue`` one count short, as a worker killed between
    storing a file's result and counting it leaves it: the chord then waits for a file more
    than it has (Celery's total is its header size plus this difference), and never sends
    its callback. Returns how many chords."""
    import json

    groups = {json.loads(raw)["headers"]["group"] for raw in client.lrange(queue, 0, -1)}
    for group in groups:
        client.incr(backend.get_key_for_group(group, ".t"))
        client.expire(backend.get_key_for_group(group, ".t"), 3600)
    return len(groups)


def test_a_chord_one_count_short_still_assembles(small_demo, tmp_path, clean_run, measured):
    """A scan whose files are all done but whose chord will never send the assembly is
    assembled anyway: the client following the job sends the callback itself, once."""
    from tasks.app import configure
    from tasks.config import Config
    from tasks.jobs import JobPlan
    from worker_launcher.distributed import ClusterSupervisor
    from worker_launcher.recovery import LOST_COUNT_S
    from worker_launcher.run import unfinished_scans
    from worker_launcher.watch import watch

    from .services import redis_url, unique_prefix

    url, prefix = redis_url(), unique_prefix("lost")
    master = copy_dataset(small_demo, tmp_path)
    config = config_for(small_demo, tmp_path, master, queue_prefix=prefix, stall_timeout=90)
    one_gpu = {"computations distribution": {"n_workers": "1"}}  # every file on gpu0's queue
    config = str(edit_config(config, one_gpu, tmp_path / "one-gpu.ini"))
    env = {"RINGFLOW_BROKER_URL": url}
    queued = run_cli("enqueue", config, env=env)
    assert queued.returncode == 0, queued.stderr[-2000:]
    job_id = queued.stdout.strip().splitlines()[-1]
    app = configure(url)
    assert lose_one_chord_count(app.backend.client, app.backend, f"{prefix}.gpu0") == 1
    workers = spawn_cli("workers", "local", config, "--gpus", "0", env=env)
    try:
        cfg = Config.from_file(config)
        callbacks = unfinished_scans(app, prefix, job_id)
        events: list[str] = []
        supervisor = ClusterSupervisor(app, cfg, None, events.append)
        outcomes = watch(
            app, JobPlan(job_id, cfg, ""), callbacks, supervisor, lambda *_: None, "", events.append
        )
        assembled_at = time.time()
    finally:
        workers.send_signal(2)
        workers.wait(60)
    (outcome,) = outcomes.values()
    assert outcome["status"] == "done", outcome
    (sent,) = [e for e in events if "assembly was never sent" in e]
    assert sent.startswith(next(iter(callbacks))), sent
    assert_same_output(outcome["output"], clean_run)
    meta = app.backend.get_task_meta(callbacks[next(iter(callbacks))])
    assert meta["status"] == "SUCCESS"
    last_file_at = max(info["time_s"] for info in registry_done(app, prefix, job_id).values())
    measured(
        f"chord one count short: scan written {assembled_at - last_file_at:.1f} s after its "
        f"last file (taken for lost after {LOST_COUNT_S:.0f} s without its callback)"
    )
