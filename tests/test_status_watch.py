"""`status` against real runs: a revoked scan callback is final, results live as long as the
job's records, and `status --watch` follows a `ringflow run` to its end, broker gone or not."""

from __future__ import annotations

import signal
import time

import pytest

from tasks import registry
from tasks.app import configure
from tasks.config import Config
from tasks.jobs import plan_job
from tasks.outputs import workspace
from worker_launcher.broker import redis_client
from worker_launcher.distributed import enqueue, job_outcomes
from worker_launcher.embedded import workspace_broker
from worker_launcher.nodes import live_nodes

from .conftest import copy_dataset, edit_config, kill_tree, last_json, run_cli, spawn_cli
from .services import redis_url, unique_prefix, wait_until
from .test_distributed import cluster_config, start_cli
from .test_faults import received_a_file

pytestmark = pytest.mark.service

DAY = 86400


def pool_of_a_worker_with_a_file(root_pid: int, queue: str, timeout: float = 120) -> list:
    """The pool processes of the worker consuming ``queue``, once it received a file task."""
    import psutil

    def pool():
        for proc in psutil.Process(root_pid).children(recursive=True):
            try:
                command = " ".join(proc.cmdline())
                if "celery" in command and queue in command and received_a_file(proc):
                    return proc.children()
            except psutil.Error:
                continue
        return None

    return wait_until(pool, timeout, f"a file task received on {queue}", interval=0.1)


def test_a_revoked_scan_callback_is_final_in_status(small_demo, tmp_path):
    """A scan whose assembly was revoked will never be written: `status` says failed with
    the reason, the job incomplete (exit 1), and `--watch` does not wait for it."""
    url, prefix = redis_url(), unique_prefix("revoked")
    master = copy_dataset(small_demo, tmp_path)
    config = cluster_config(small_demo, tmp_path, prefix, dataset={"location": str(master)})
    env = {"RINGFLOW_BROKER_URL": url}
    app = configure(url)
    local = start_cli(["workers", "local", str(config), "--gpus", "0,1"], env, tmp_path / "local")
    try:
        wait_until(lambda: len(live_nodes(app, prefix)) == 3, 120, "gpu0, gpu1 and assembly")
        plan = plan_job(Config.from_file(config))
        callbacks = enqueue(app, plan)
        revoked_scan, callback = sorted(callbacks.items())[0]
        app.control.revoke(callback)  # every worker answers; files take longer than this
        outcomes = wait_until(
            lambda: (o := job_outcomes(app, prefix, plan.job_id)) and all(o.values()) and o,
            120,
            "both scans to have an outcome",
        )
        status = run_cli("status", config, plan.job_id, "--json", env=env)
        watched = run_cli("status", config, plan.job_id, "--watch", "--json", env=env, timeout=60)
    finally:
        local.send_signal(signal.SIGINT)
        local.wait(60)
    assert outcomes[revoked_scan]["status"] == "failed", outcomes
    assert app.backend.get_task_meta(callback)["status"] == "REVOKED"
    for result in (status, watched):
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
        state = last_json(result.stdout)
        assert state["state"] == "incomplete", state
        scans = {s["scan"]: s for s in state["scans"]}
        assert scans[revoked_scan]["state"] == "failed"
        assert "assembly revoked" in scans[revoked_scan]["message"]
        (other,) = set(scans) - {revoked_scan}
        assert scans[other]["state"] == "written" and state["counts"]["done"] == 4
    assert len(watched.stdout.strip().splitlines()) == 1  # --watch --json: the final state only


def test_results_expire_with_the_job_ttl(small_demo, tmp_path):
    """With job_ttl_days = 30, the Celery results the workers wrote (file tasks and scan
    callbacks, `celery-task-meta-<id>`) live 30 days, as the job's records do, not 7."""
    changes = {"output": {"location": str(tmp_path / "out")}, "queue": {"job_ttl_days": "30"}}
    config = edit_config(small_demo.config, changes, tmp_path / "ttl.ini")
    result = run_cli("run", config, "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    job_id = last_json(result.stdout)["job_id"]
    cfg = Config.from_file(config)
    prefix = cfg.queue.queue_prefix
    with workspace_broker(workspace(cfg)) as broker:  # the run's AOF, started again
        client = redis_client(broker.url)
        ids = [e["callback"] for e in registry.read_scans(client, prefix, job_id).values()]
        ids += list(registry.read_manifest(client, prefix, job_id))
        ttls = {i: client.ttl(f"celery-task-meta-{i}") for i in ids}
        record_ttl = client.ttl(f"{prefix}:job:{job_id}:manifest")
        client.close()
    assert len(ttls) == 2 + 4
    assert all(29 * DAY < ttl <= 30 * DAY for ttl in ttls.values()), ttls
    assert abs(min(ttls.values()) - record_ttl) < 600, (ttls, record_ttl)


def test_status_watch_follows_a_run_to_its_end(long_files, tmp_path):
    """`status --watch --json` on a running `ringflow run`: it waits while the run works,
    and once the run ended, its broker stopped with it, prints the final state, exit 0."""
    demo, _ = long_files
    out = tmp_path / "out"
    config = edit_config(demo.config, {"output": {"location": str(out)}}, tmp_path / "w.ini")
    run = spawn_cli("run", config, "--json")
    watcher = None
    try:
        pool = pool_of_a_worker_with_a_file(run.pid, "ringflow.gpu0")
        for child in pool:  # the run cannot end before the watcher follows it
            child.suspend()
        try:
            watcher = spawn_cli("status", config, "--watch", "--json")
            time.sleep(8)
            assert watcher.poll() is None, watcher.communicate()
            watcher.send_signal(signal.SIGSTOP)  # it looks again only once the run is gone
        finally:
            for child in pool:
                child.resume()
        run_out, run_err = run.communicate(timeout=300)
        assert run.returncode == 0, run_err[-2000:]
        watcher.send_signal(signal.SIGCONT)
        stdout, stderr = watcher.communicate(timeout=150)
    finally:
        for process in (run, watcher):
            if process is not None and process.poll() is None:
                kill_tree(process.pid)  # its broker and workers too
    assert watcher.returncode == 0, stderr[-2000:]
    assert "Traceback" not in stderr and "lost the connection" not in stderr, stderr
    final = last_json(stdout)
    assert len(stdout.strip().splitlines()) == 1  # no state printed while it ran
    assert final["job_id"] == last_json(run_out)["job_id"] and final["state"] == "done"
    assert final["counts"]["done"] == final["counts"]["files"] == 2 and not final["stranded"]
    assert [s["state"] for s in final["scans"]] == ["written"]
