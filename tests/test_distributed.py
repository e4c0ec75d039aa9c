"""Distributed mode against real services: SLURM jobs with fake GPUs, a password-protected
Redis, Celery workers started by the job script, Flower.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path

import h5py
import numpy as np
import pytest

from tasks import keys, registry
from tasks.app import configure
from worker_launcher.distributed import ClusterSupervisor, enqueue, job_outcomes
from worker_launcher.nodes import live_nodes

from .conftest import (
    CLI,
    ROOT,
    assert_same_scan,
    cli_env,
    copy_dataset,
    edit_config,
    last_json,
    run_cli,
)
from .services import redis_url, require_slurm, squeue_names, unique_prefix, wait_until

pytestmark = pytest.mark.service


def cluster_config(demo, tmp_path: Path, prefix: str, **sections) -> Path:
    changes = {
        "computations distribution": {
            "partition": "debug",
            "n_workers": "2",
            "ai_engines_per_worker": "1",
            "cores_per_worker": "1",
            "assemble_cores": "1",
            "memory_per_worker": "500MB",
            "time": "00:30:00",
            "workspace_path": str(tmp_path / "ws"),
        },
        "output": {"location": str(tmp_path / "out")},
        "queue": {"queue_prefix": prefix, "worker_start_timeout": "90"},
    }
    for section, values in sections.items():
        changes.setdefault(section, {}).update(values)
    return edit_config(demo.config, changes, tmp_path / f"{prefix}.ini")


@pytest.fixture(scope="module")
def reference(small_demo, tmp_path_factory) -> dict[str, dict]:
    """Outputs of the embedded `ringflow run` on the demo: file name -> datasets."""
    out = tmp_path_factory.mktemp("reference")
    config = edit_config(small_demo.config, {"output": {"location": str(out)}}, out / "c.ini")
    result = run_cli("run", config, "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    return {Path(p).name: read_integrated(p) for p in last_json(result.stdout)["outputs"]}


def read_integrated(path: str) -> dict:
    with h5py.File(path) as h5:
        data = h5["1.1/integrated"] if "1.1" in h5 else h5["2.1/integrated"]
        return {name: data[name][()] for name in ("I", "I_errors", "frame_index")}


def assert_same_as_reference(outputs: list[str], reference: dict) -> None:
    assert sorted(Path(p).name for p in outputs) == sorted(reference)
    for path in outputs:
        got, ref = read_integrated(path), reference[Path(path).name]
        for name in ref:
            np.testing.assert_array_equal(got[name], ref[name], err_msg=f"{path} {name}")


def gpu_slot_of(node: str, prefix: str) -> int:
    return int(re.match(re.escape(prefix) + r"-gpu(\d+)-", node).group(1))


def test_workers_submit_enqueue_stop(small_demo, tmp_path, reference):
    require_slurm()
    url, prefix = redis_url(), unique_prefix("sub")
    config = cluster_config(small_demo, tmp_path, prefix)
    env = {"RINGFLOW_BROKER_URL": url}
    app = configure(url)
    try:
        submitted = run_cli("workers", "submit", config, env=env)
        assert submitted.returncode == 0, submitted.stderr
        assert len(submitted.stdout.strip().splitlines()) == 3  # gpu0, gpu1, assemble
        wait_until(lambda: len(live_nodes(app, prefix)) == 3, 120, "3 workers to answer")

        listed = run_cli("workers", "list", config, "--json", env=env)
        assert listed.returncode == 0, listed.stderr
        view = last_json(listed.stdout)
        assert len([j for j in view["slurm"] if j["state"] == "RUNNING"]) == 3
        gpus = {n["name"]: n["gpus"]["CUDA_VISIBLE_DEVICES"] for n in view["nodes"] if n["slots"]}
        assert sorted(gpus.values()) == ["0", "1"], gpus  # each worker its own GPU

        enqueued = run_cli("enqueue", config, env=env)
        assert enqueued.returncode == 0, enqueued.stderr
        job_id = enqueued.stdout.strip().splitlines()[-1]
        outcomes = wait_until(
            lambda: (o := job_outcomes(app, prefix, job_id)) and all(o.values()) and o,
            180,
            "both scans to be assembled",
        )
        assert [o["status"] for o in outcomes.values()] == ["done", "done"], outcomes
        assert_same_as_reference([o["output"] for o in outcomes.values()], reference)

        done = registry.read_done(app.backend.client, prefix, job_id)
        assert len(done) == 4
        for info in done.values():  # each worker consumed only its own queue
            assert info["queue"] == f"{prefix}.gpu{gpu_slot_of(info['worker'], prefix)}"
        assert {i["queue"] for i in done.values()} == {f"{prefix}.gpu0", f"{prefix}.gpu1"}
        assert len({i["gpus"]["CUDA_VISIBLE_DEVICES"] for i in done.values()}) == 2
        assert url.split("@")[0] not in json.dumps(
            registry.read_scans(app.backend.client, prefix, job_id)
        )
    finally:
        stopped = run_cli("workers", "stop", config, env=env)
    assert stopped.returncode == 0, stopped.stderr
    assert squeue_names(prefix) == []


def test_integrate_slurm_end_to_end(small_demo, tmp_path, reference):
    require_slurm()
    url, prefix = redis_url(), unique_prefix("seed")
    config = cluster_config(small_demo, tmp_path, prefix)
    result = run_cli("integrate-slurm", config, "--json", env={"RINGFLOW_BROKER_URL": url})
    assert result.returncode == 0, result.stderr[-3000:]
    summary = last_json(result.stdout)
    assert summary["files_done"] == 4 and summary["frames"] == 16 and not summary["files_failed"]
    assert_same_as_reference(summary["outputs"], reference)
    assert url.split("@")[0] not in result.stdout + result.stderr  # no password
    assert squeue_names(prefix) == []  # workers cancelled without --keep-workers


def test_integrate_slurm_when_gpu_jobs_fill_the_node(small_demo, tmp_path, reference):
    """The GPU jobs together take every CPU of the node, so the assembly job stays PENDING
    (Resources) for the whole job: the GPU workers assemble the scans once their own queues
    are empty, the CLI says so in one line with SLURM's reason, and the outputs equal a
    clean run's. (Before GPU workers took assemblies, integrate-slurm waited
    worker_start_timeout for the assembly worker and cancelled everything.)"""
    require_slurm()
    cpus, idle = node_cpus()
    assert idle == cpus, f"the SLURM node must be idle for this test ({cpus - idle} CPUs busy)"
    url, prefix = redis_url(), unique_prefix("full")
    distribution = {
        "n_workers": "2",
        "ai_engines_per_worker": "1",
        "cores_per_worker": "1",
        "cpus_per_worker": str(cpus // 2),  # the two GPU jobs: all CPUs but cpus % 2...
        "assemble_cores": str(cpus % 2 + 1),  # ...one fewer than the assembly job asks
        "memory_per_worker": "500MB",  # 3 x 500 MB: far below RealMemory, CPUs decide alone
    }
    config = cluster_config(
        small_demo, tmp_path, prefix, **{"computations distribution": distribution}
    )
    env = {"RINGFLOW_BROKER_URL": url}
    start = time.monotonic()
    cli = start_cli(["integrate-slurm", str(config), "--json"], env, tmp_path / "islurm")
    seen: set[tuple[str, str]] = set()  # (state, reason) of the assembly job while it runs
    try:
        while cli.poll() is None and time.monotonic() - start < 300:
            seen |= set(squeue_jobs(f"ringflow-{prefix}-assemble").values())
            time.sleep(0.5)
    finally:
        if cli.poll() is None:
            cli.kill()
        cli.wait(60)
        for role in ("gpu0", "gpu1", "assemble"):
            subprocess.run(["scancel", "--name", f"ringflow-{prefix}-{role}"], check=False)
    took = time.monotonic() - start
    stderr = (tmp_path / "islurm.err").read_text()
    assert cli.returncode == 0, stderr[-3000:]
    summary = last_json((tmp_path / "islurm.out").read_text())
    assert summary["files_done"] == 4 and not summary["files_failed"], summary
    assert_same_as_reference(summary["outputs"], reference)
    for path in summary["outputs"]:  # bit for bit
        got, ref = read_integrated(path), reference[Path(path).name]
        assert all(
            got[n].dtype == ref[n].dtype and got[n].tobytes() == ref[n].tobytes() for n in ref
        )

    job = re.search(rf"ringflow-{prefix}-assemble: SLURM job (\d+) submitted", stderr).group(1)
    assert {state for state, _ in seen} == {"PENDING"}, seen  # never started
    assert ("PENDING", "Resources") in seen, seen
    note = f"no assembly worker yet (SLURM job {job} PENDING (Resources)): "
    assert len([line for line in stderr.splitlines() if note in line]) == 1, stderr
    shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True)
    assert "RunTime=00:00:00" in shown.stdout, shown.stdout  # cancelled, never run

    app = configure(url)
    logs = {p.name: p.read_text() for p in (tmp_path / "ws").rglob("ringflow-*.log")}
    assert not [name for name in logs if "-assemble-" in name], logs.keys()  # it never ran
    scans = registry.read_scans(app.backend.client, prefix, summary["job_id"])
    for entry in scans.values():  # each scan assembled by a GPU worker: its log says so
        done = f"ringflow.assemble_scan[{entry['callback']}] succeeded"
        assert [name for name, text in logs.items() if "-gpu" in name and done in text], done
    print(
        f"GPU jobs of {cpus // 2} CPUs each filling the {cpus}-CPU node: assembly job {job} "
        f"PENDING (Resources) throughout, scans assembled by the GPU workers, "
        f"integrate-slurm done in {took:.1f} s"
    )


def node_cpus() -> tuple[int, int]:
    """CPUs of the (single) SLURM node, and how many of them are idle."""
    out = subprocess.run(
        ["sinfo", "-h", "-N", "-o", "%c %C"], capture_output=True, text=True, timeout=20
    ).stdout.split()
    _allocated, idle, _other, _total = map(int, out[1].split("/"))
    return int(out[0].rstrip("+")), idle


def squeue_jobs(name: str) -> dict[str, tuple[str, str]]:
    """This user's jobs called ``name``: job id -> (state, reason)."""
    out = subprocess.run(
        ["squeue", "--me", "-h", "-n", name, "-o", "%i|%T|%r"],
        capture_output=True,
        text=True,
        timeout=20,
    ).stdout
    return {
        i: (state, reason) for i, state, reason in (line.split("|") for line in out.splitlines())
    }


def test_integrate_slurm_unknown_partition_shows_slurms_message(small_demo, tmp_path):
    require_slurm()
    url, prefix = redis_url(), unique_prefix("part")
    config = cluster_config(
        small_demo, tmp_path, prefix, **{"computations distribution": {"partition": "nosuch"}}
    )
    start = time.monotonic()
    result = run_cli("integrate-slurm", config, env={"RINGFLOW_BROKER_URL": url}, timeout=120)
    assert result.returncode == 1
    assert "invalid partition" in result.stderr.lower(), result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - start < 60
    assert squeue_names(prefix) == []


def test_wrong_password_fails_fast_and_names_no_secret(small_demo, tmp_path):
    url = redis_url()
    wrong = re.sub(r"://([^:/@]*):[^@]*@", r"://\1:not-the-password@", url)
    config = cluster_config(small_demo, tmp_path, unique_prefix("pw"))
    start = time.monotonic()
    result = run_cli("enqueue", config, env={"RINGFLOW_BROKER_URL": wrong}, timeout=60)
    assert result.returncode != 0
    assert time.monotonic() - start < 15
    assert "authentication failed" in result.stderr and "Traceback" not in result.stderr
    assert "not-the-password" not in result.stderr + result.stdout


def test_unreachable_broker_fails_within_ten_seconds(small_demo, tmp_path):
    config = cluster_config(
        small_demo,
        tmp_path,
        unique_prefix("unr"),
        queue={"broker_url": "redis://10.255.255.1:6379/0"},
    )
    start = time.monotonic()
    result = run_cli("workers", "list", config, timeout=60)
    assert result.returncode != 0 and "unreachable" in result.stderr, result.stderr
    assert time.monotonic() - start < 20  # 10 s connect timeout plus interpreter start


def test_password_file_and_dry_run_keep_the_secret(small_demo, tmp_path):
    url = redis_url()
    password = re.search(r"://[^:/@]*:([^@]*)@", url).group(1)
    secret = tmp_path / "redis.password"
    secret.write_text(password + "\n")
    config = cluster_config(
        small_demo,
        tmp_path,
        unique_prefix("pwf"),
        queue={
            "broker_url": re.sub(r"://[^@]*@", "://", url),
            "broker_password_file": str(secret),
        },
    )
    listed = run_cli("workers", "list", config, "--json")
    assert listed.returncode == 0, listed.stderr  # the password file was used
    dry = run_cli("workers", "submit", config, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert password not in dry.stdout + dry.stderr
    assert dry.stdout.count("#SBATCH --gres=gpu:1") == 2
    for script in dry.stdout.split("# ---- ")[1:]:  # every script is valid bash
        text = script.split("----\n", 1)[1]
        check = subprocess.run(["bash", "-n"], input=text, text=True, capture_output=True)
        assert check.returncode == 0, check.stderr


def test_stranded_queue_moves_to_live_worker(small_demo, tmp_path):
    """Files enqueued for a GPU slot with no worker end up on a live slot, none lost."""
    url, prefix = redis_url(), unique_prefix("strand")
    config = cluster_config(small_demo, tmp_path, prefix, queue={"stranded_after": "1"})
    env = {"RINGFLOW_BROKER_URL": url}
    local = start_cli(["workers", "local", str(config), "--gpus", "0"], env, tmp_path / "local")
    try:
        app = configure(url)
        wait_until(lambda: len(live_nodes(app, prefix)) == 2, 90, "local gpu0 + assembly workers")
        from tasks.config import Config
        from tasks.jobs import plan_job

        cfg = Config.from_file(config)
        plan = plan_job(cfg)
        enqueue(app, plan)  # n_workers = 2: half the files go to gpu1, which has no worker
        assert app.backend.client.llen(f"{prefix}.gpu1") == 2
        events = []
        supervisor = ClusterSupervisor(app, cfg, None, events.append)
        outcomes = wait_until(
            lambda: (
                supervisor.check()
                or ((o := job_outcomes(app, prefix, plan.job_id)) and all(o.values()) and o)
            ),
            120,
            "the job to finish on the gpu0 worker",
            interval=1.0,
        )
        assert [o["status"] for o in outcomes.values()] == ["done", "done"]
        assert any("2 files moved" in e for e in events), events
        done = registry.read_done(app.backend.client, prefix, plan.job_id)
        assert len(done) == 4 and {i["queue"] for i in done.values()} == {f"{prefix}.gpu0"}
        assert app.backend.client.llen(f"{prefix}:moving") == 0
    finally:
        local.send_signal(2)
        local.wait(60)
    assert local.returncode == 130, (tmp_path / "local.err").read_text()[-2000:]


def test_flower_requires_auth_and_shows_workers_and_tasks(small_demo, tmp_path):
    url, prefix = redis_url(), unique_prefix("flw")
    secret = tmp_path / "flower.password"
    secret.write_text("flower-pw-123\n")
    port = free_port()
    config = cluster_config(
        small_demo,
        tmp_path,
        prefix,
        monitoring={"flower_port": str(port), "flower_password_file": str(secret)},
    )
    env = {"RINGFLOW_BROKER_URL": url}
    (tmp_path / "x").mkdir()
    refused = run_cli("flower", cluster_config(small_demo, tmp_path / "x", prefix), env=env)
    assert refused.returncode != 0 and "--insecure" in refused.stderr
    flower = start_cli(["flower", str(config)], env, tmp_path / "flower")
    local = start_cli(["workers", "local", str(config), "--gpus", "0,1"], env, tmp_path / "local")
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: http_status(f"{base}/healthcheck") == 200, 60, "Flower to answer")
        assert http_status(f"{base}/api/workers") == 401
        auth = {"Authorization": "Basic " + b64encode(b"ringflow:flower-pw-123").decode()}
        app = configure(url)
        wait_until(lambda: len(live_nodes(app, prefix)) == 3, 90, "2 gpu + assembly workers")
        enqueued = run_cli("enqueue", config, env=env)
        assert enqueued.returncode == 0, enqueued.stderr
        job_id = enqueued.stdout.strip().splitlines()[-1]
        wait_until(
            lambda: (o := job_outcomes(app, prefix, job_id)) and all(o.values()), 120, "the job"
        )
        workers = wait_until(
            lambda: [
                w for w in http_json(f"{base}/api/workers?refresh=1", auth) if f"{prefix}-gpu" in w
            ],
            30,
            "Flower to list the workers",
        )
        assert len(workers) == 2
        tasks = wait_until(
            lambda: [t for t in http_json(f"{base}/api/tasks", auth) if t.startswith(job_id)],
            30,
            "Flower to list the job's tasks",
        )
        assert len(tasks) == 6  # 4 files + 2 scan callbacks
        with urllib.request.urlopen(f"{base}/metrics", timeout=10) as metrics:  # Prometheus
            assert "flower_events_total" in metrics.read().decode()
    finally:
        for process in (local, flower):
            process.send_signal(2)
            process.wait(60)
    logs = (tmp_path / "flower.out").read_text() + (tmp_path / "flower.err").read_text()
    assert "flower-pw-123" not in logs


def test_flower_attaches_to_the_embedded_broker_of_a_run(tmp_path):
    """No broker_url: Flower watches a running `ringflow run` through its private socket,
    and says what to do when no run owns the workspace's broker."""
    from tasks.config import Config
    from tasks.demo import DemoSpec, write_demo
    from tasks.outputs import workspace
    from worker_launcher.embedded import URL, broker_folder

    # frames enough for the run to outlast Flower's start and its first look at the workers
    demo = write_demo(DemoSpec(str(tmp_path / "demo"), scans=1, frames_per_file=120))
    secret = tmp_path / "flower.password"
    secret.write_text("flower-pw-789\n")
    port = free_port()
    monitoring = {"flower_port": str(port), "flower_password_file": str(secret)}
    changes = {"output": {"location": str(tmp_path / "out")}, "monitoring": monitoring}
    config = edit_config(demo.config, changes, tmp_path / "c.ini")
    refused = run_cli("flower", config)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "no ringflow process runs its embedded broker" in refused.stderr, refused.stderr
    url_file = Path(broker_folder(workspace(Config.from_file(config))), URL)
    run = start_cli(["run", str(config)], {}, tmp_path / "run")
    flower = None
    try:
        wait_until(lambda: url_file.exists() and url_file.read_text().strip(), 60, "the broker")
        flower = start_cli(["flower", str(config)], {}, tmp_path / "flower")
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: http_status(f"{base}/healthcheck") == 200, 60, "Flower to answer")
        assert http_status(f"{base}/api/workers") == 401
        auth = {"Authorization": "Basic " + b64encode(b"ringflow:flower-pw-789").decode()}

        def gpu_workers() -> list[str]:  # the assembly worker may answer first: wait for both
            names = list(http_json(f"{base}/api/workers?refresh=1", auth))
            return [n for n in names if "-gpu" in n] and names

        workers = wait_until(gpu_workers, 60, "a GPU worker in Flower")
        assert any("-assemble" in name for name in workers), workers
        assert run.wait(300) == 0, (tmp_path / "run.err").read_text()[-2000:]
    finally:
        for process in (run, flower):
            if process is not None and process.poll() is None:
                process.send_signal(2)
                process.wait(60)
    said = (tmp_path / "flower.err").read_text()
    assert "attached to the embedded broker of process" in said, said
    assert "flower-pw-789" not in said + (tmp_path / "flower.out").read_text()


def test_flower_task_api_only_when_asked(small_demo, tmp_path):
    """Authenticated, Flower still cannot send or revoke tasks (404) unless started with
    --allow-task-api; then it can. (Worker control answers 404 for an unknown worker either
    way, so it is not tried here.)"""
    url, prefix = redis_url(), unique_prefix("flapi")
    secret = tmp_path / "flower.password"
    secret.write_text("flower-pw-456\n")
    env = {"RINGFLOW_BROKER_URL": url}
    auth = {"Authorization": "Basic " + b64encode(b"ringflow:flower-pw-456").decode()}
    junk = f"{prefix}.junk"
    sent = {"args": [{}], "queue": junk}
    paths = ("/api/task/async-apply/ringflow.integrate_file", "/api/task/revoke/x")
    codes = {}
    for allow in (False, True):  # a port each: the first may not have let its port go yet
        port = free_port()
        monitoring = {"flower_port": str(port), "flower_password_file": str(secret)}
        config = cluster_config(small_demo, tmp_path, prefix, monitoring=monitoring)
        base = f"http://127.0.0.1:{port}"
        option = ["--allow-task-api"] if allow else []
        flower = start_cli(["flower", str(config), *option], env, tmp_path / f"flower{allow}")
        try:
            health = f"{base}/healthcheck"
            wait_until(lambda url=health: http_status(url) == 200, 60, "Flower to answer")
            assert http_status(f"{base}/api/workers", auth) == 200
            codes[allow] = [http_post(base + path, sent, auth) for path in paths]
        finally:
            flower.send_signal(2)
            flower.wait(60)
    client = configure(url).backend.client
    assert codes[False] == [404, 404], codes
    assert codes[True][:2] == [200, 200] and client.llen(junk) == 1, codes
    client.delete(junk)


def test_flower_insecure_listens_on_loopback_only(small_demo, tmp_path):
    import psutil

    url, prefix, port = redis_url(), unique_prefix("flins"), free_port()
    monitoring = {"flower_port": str(port), "flower_address": "0.0.0.0"}
    config = cluster_config(small_demo, tmp_path, prefix, monitoring=monitoring)
    env = {"RINGFLOW_BROKER_URL": url}
    cli = start_cli(["flower", str(config), "--insecure"], env, tmp_path / "flower")
    try:
        wait_until(lambda: http_status(f"http://127.0.0.1:{port}/healthcheck") == 200, 60, "Flower")
        flower = psutil.Process(cli.pid).children(recursive=True)
        listening = [
            c.laddr
            for p in flower
            for c in p.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN
        ]
    finally:
        cli.send_signal(2)
        cli.wait(60)
    assert listening and all(a.ip == "127.0.0.1" and a.port == port for a in listening), listening


def start_cli(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    """A long-running ringflow command; its stdout/stderr go to log.out / log.err."""
    with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
        return subprocess.Popen([*CLI, *args], env=cli_env(env), cwd=ROOT, stdout=out, stderr=err)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_post(url: str, body: dict, headers: dict) -> int:
    data = json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, headers=headers | {"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def http_status(url: str, headers: dict | None = None) -> int:
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=headers or {}), timeout=5
        ) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def http_json(url: str, headers: dict):
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
        return json.loads(r.read())


def test_tls_broker_with_password(small_demo, tmp_path):
    """rediss:// end to end: a real Redis serving TLS only, its certificate checked."""
    from .services import unavailable

    server, openssl = Path("/usr/bin/redis-server"), shutil.which("openssl")
    if not server.exists() or not openssl:
        unavailable("TLS test needs Debian's redis-server and openssl: run `bash .ci/redis-up`")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    port, password = free_port(), "tls-secret-" + unique_prefix("")
    conf = tmp_path / "redis.conf"
    conf.write_text(
        f"port 0\ntls-port {port}\nbind 127.0.0.1\ntls-cert-file {cert}\ntls-key-file {key}\n"
        f"tls-ca-cert-file {cert}\ntls-auth-clients no\nrequirepass {password}\n"
        f'dir "{tmp_path}"\nmaxmemory-policy noeviction\n'
    )
    process = subprocess.Popen([server, conf], stdout=subprocess.DEVNULL)
    url = f"rediss://:{password}@127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={cert}"
    try:
        import redis

        wait_until(lambda: _pings(redis, url), 20, "the TLS Redis")
        config = edit_config(
            small_demo.config,
            {"output": {"location": str(tmp_path / "out")}, "dataset": {"hdf5_entry": "1.1"}},
            tmp_path / "c.ini",
        )
        result = run_cli("run", config, "--json", env={"RINGFLOW_BROKER_URL": url})
        assert result.returncode == 0, result.stderr[-2000:]
        assert last_json(result.stdout)["files_done"] == 2
        assert password not in result.stdout + result.stderr
        plain = url.replace("rediss://", "redis://").split("?")[0]  # TLS port refuses plain text
        refused = run_cli("enqueue", config, env={"RINGFLOW_BROKER_URL": plain}, timeout=60)
        assert refused.returncode != 0 and "Traceback" not in refused.stderr
    finally:
        process.terminate()
        process.wait(10)


def _pings(redis, url: str) -> bool:
    try:
        return redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except redis.RedisError:
        return False


def test_status_follows_a_job_with_a_failed_file(small_demo, tmp_path):
    """Before workers: every file pending on queues whose worker is still starting (the job
    is younger than worker_start_timeout); after: per-scan states, the failed file with its
    message and attempts, live workers, frames/s; exit 1 (incomplete)."""
    url, prefix = redis_url(), unique_prefix("status")
    master = copy_dataset(small_demo, tmp_path)
    victim = master.parent / "scan0002" / "pilatus_0000.h5"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    config = cluster_config(small_demo, tmp_path, prefix, dataset={"location": str(master)})
    env = {"RINGFLOW_BROKER_URL": url}
    queued = run_cli("enqueue", config, env=env)
    assert queued.returncode == 0, queued.stderr[-2000:]
    job_id = queued.stdout.strip().splitlines()[-1]

    before = run_cli("status", config, "--json", env=env)
    assert before.returncode == 0, before.stderr[-2000:]
    state = last_json(before.stdout)
    assert state["job_id"] == job_id and state["state"] == "running"
    assert state["counts"] == {"files": 4, "done": 0, "failed": 0, "retrying": 0, "pending": 4}
    assert state["starting"] == [f"{prefix}.gpu0", f"{prefix}.gpu1"] and state["workers"] == []
    assert state["stranded"] == []
    assert url.split("@")[0].split(":")[-1] not in before.stdout + before.stderr  # no password

    local = start_cli(["workers", "local", str(config), "--gpus", "0,1"], env, tmp_path / "local")
    try:
        after = run_cli("status", config, job_id, "--watch", "--json", env=env, timeout=180)
    finally:
        local.send_signal(2)
        local.wait(60)
    assert after.returncode == 1, after.stderr[-2000:]  # a scan is incomplete
    final = last_json(after.stdout)
    assert final["state"] == "incomplete" and final["stranded"] == final["starting"] == []
    assert final["counts"] == {"files": 4, "done": 3, "failed": 1, "retrying": 0, "pending": 0}
    scans = {s["scan"].rsplit("::", 1)[-1]: s for s in final["scans"]}
    assert scans["1.1"]["state"] == "written" and scans["1.1"]["frames"] == 8
    assert scans["2.1"]["state"] == "incomplete" and scans["2.1"]["failed"] == 1
    (failure,) = final["failed"]
    assert failure["file"] == str(victim) and failure["attempts"] == 1
    assert "truncated file" in failure["message"] and failure["worker"].startswith(prefix)
    assert final["frames_done"] == 12 and final["frames_per_s"] > 0
    assert {w["name"].split("-")[-2] for w in final["workers"]} >= {"gpu0", "gpu1"}

    table = run_cli("status", config, job_id, env=env)
    assert table.returncode == 1 and "Traceback" not in table.stderr
    assert f"failed: {victim}" in table.stderr and "incomplete" in table.stderr


def test_requeue_failed_file_after_fixing_it(small_demo, tmp_path, reference):
    """A truncated Lima file fails its scan; once replaced, `requeue --failed` redoes only that
    file, assembles the scan from the kept partials, and the outputs equal the reference.
    Requeueing again sends nothing and changes nothing."""
    url, prefix = redis_url(), unique_prefix("requeue")
    master = copy_dataset(small_demo, tmp_path)
    victim = master.parent / "scan0002" / "pilatus_0001.h5"
    good = victim.read_bytes()
    victim.write_bytes(good[: len(good) // 2])
    config = cluster_config(small_demo, tmp_path, prefix, dataset={"location": str(master)})
    env = {"RINGFLOW_BROKER_URL": url}
    local = start_cli(["workers", "local", str(config), "--gpus", "0,1"], env, tmp_path / "local")
    try:
        queued = run_cli("enqueue", config, env=env)
        assert queued.returncode == 0, queued.stderr[-2000:]
        job_id = queued.stdout.strip().splitlines()[-1]
        first = run_cli("status", config, job_id, "--watch", "--json", env=env, timeout=180)
        assert first.returncode == 1 and last_json(first.stdout)["counts"]["failed"] == 1
        assert not list((tmp_path / "out").rglob("*scan0002*.h5"))

        victim.write_bytes(good)  # the detector's file, complete this time
        started = time.monotonic()
        again = run_cli("requeue", config, job_id, "--failed", env=env)
        assert again.returncode == 0, again.stderr[-2000:]
        assert f"requeued: {victim}" in again.stderr and "1 file(s) requeued" in again.stderr
        final = run_cli("status", config, job_id, "--watch", "--json", env=env, timeout=180)
        recovery = time.monotonic() - started
        assert final.returncode == 0, final.stderr[-2000:]
        state = last_json(final.stdout)
        assert state["state"] == "done" and state["failed"] == []
        assert state["counts"] == {"files": 4, "done": 4, "failed": 0, "retrying": 0, "pending": 0}

        twice = run_cli("requeue", config, job_id, "--failed", env=env)
        assert twice.returncode == 0 and "0 file(s) requeued" in twice.stderr
        time.sleep(2)
    finally:
        local.send_signal(2)
        local.wait(60)
    outputs = sorted(str(p) for p in (tmp_path / "out").rglob("azint_*.h5"))
    assert len(outputs) == 2  # one file per scan, rows neither lost nor duplicated
    assert_same_as_reference(outputs, reference)
    print(f"requeue --failed: scan written {recovery:.1f} s after the requeue, 0 lost")


@pytest.mark.parametrize("signal", ["TERM", "KILL"])
def test_scancel_of_one_worker_job_while_another_lives(long_files, tmp_path, signal):
    """`integrate-slurm` with two GPU worker jobs; the one on gpu1 is scancelled while it
    integrates a file. A plain scancel (SIGTERM) lets the worker finish its file in a warm
    shutdown; with ``--signal=KILL`` the file is redone on gpu0, with no user action: the
    supervisor hands it back to gpu0 within RECOVERY_BOUND_S of squeue no longer listing the
    job. Either way the job completes, the output equals a clean run's, and every file is
    done once."""
    require_slurm()
    url, prefix = redis_url(), unique_prefix("scancel")
    demo, clean_output = long_files
    config = cluster_config(demo, tmp_path, prefix)  # stranded_after: its default, 60 s
    env = {"RINGFLOW_BROKER_URL": url}
    cli = start_cli(["integrate-slurm", str(config), "--json"], env, tmp_path / "islurm")
    app = configure(url)
    try:
        gpu1 = f"{prefix}-gpu1-"  # the broker is shared: other tests' workers answer too

        def gpu1_busy():
            active = app.control.inspect(timeout=0.5).active() or {}
            return next(
                ((n, t[0]["id"]) for n, t in active.items() if n.startswith(gpu1) and t),
                None,
            )

        name, task_id = wait_until(gpu1_busy, 240, "the gpu1 worker job integrating a file")
        # its SLURM job from the record the worker wrote at start: no second broadcast round
        # between seeing the file in flight and cancelling (a file takes a few seconds)
        record = wait_until(  # written once the worker is ready, which a busy node delays
            lambda: app.backend.client.hget(keys.workers(prefix), name), 30, f"{name}'s record"
        )
        slurm_job = str(json.loads(record)["slurm_job"])
        subprocess.run(["scancel", f"--signal={signal}", slurm_job], check=True, timeout=30)
        cancelled_at = time.monotonic()
        times = follow_recovery(app, prefix, slurm_job, task_id, cli)
        cli.wait(300)
        recovery = time.monotonic() - cancelled_at
    finally:
        if cli.poll() is None:
            cli.kill()
        for role in ("gpu0", "gpu1", "assemble"):  # what a failed test would leave queued
            subprocess.run(["scancel", "--name", f"ringflow-{prefix}-{role}"], check=False)
    stderr = (tmp_path / "islurm.err").read_text()
    assert cli.returncode == 0, stderr[-3000:]
    summary = last_json((tmp_path / "islurm.out").read_text())
    assert summary["files_done"] == 2 and summary["files_failed"] == [], summary
    assert_same_scan(summary["outputs"][0], clean_output)
    done = registry.read_done(app.backend.client, prefix, summary["job_id"])
    assert len(done) == 2
    queues = sorted(info["queue"].rsplit(".", 1)[1] for info in done.values())
    since = {k: round(v - cancelled_at, 1) for k, v in times.items()}
    print(
        f"scancel --signal={signal} of the gpu1 job mid-file: files done on {queues}; job "
        f"done {recovery:.1f} s after the scancel, 0 lost, 0 duplicated; seconds after the "
        f"scancel: {since}"
    )
    assert queues == (["gpu0", "gpu1"] if signal == "TERM" else ["gpu0", "gpu0"]), stderr
    if signal == "KILL":
        assert f"worker gone: {name}" in stderr
        handed_back = times["handed_back"] - times["squeue_gone"]
        print(f"file handed back {handed_back:.1f} s after squeue stopped listing the job")
        assert handed_back <= RECOVERY_BOUND_S, (since, stderr)


RECOVERY_BOUND_S = 10.0  # squeue no longer lists a killed job -> its file on a live worker


def follow_recovery(app, prefix: str, slurm_job: str, task_id: str, cli) -> dict[str, float]:
    """Until ``cli`` exits, poll squeue and Redis: when (time.monotonic()) squeue first shows
    the job not running / no longer lists it, and when the file it held is first handed
    back: waiting on, or taken by, the live gpu0 worker, or done."""
    from tasks.queues import in_flight, priority_lists

    client, live = app.backend.client, f"{prefix}.gpu0"
    done = keys.job_done(prefix, task_id.split("-", 1)[0])  # task ids: <job id>-<scan>-<file>
    times: dict[str, float] = {}
    while cli.poll() is None:
        now = time.monotonic()
        state = squeue_state(slurm_job)
        if state != "RUNNING":
            times.setdefault("squeue_not_running", now)
        if not state:
            times.setdefault("squeue_gone", now)
        waiting = (m for name in priority_lists(live) for m in client.lrange(name, 0, -1))
        if (
            any(m.task_id == task_id and m.queue == live for m in in_flight(client, prefix))
            or any(task_id.encode() in m for m in waiting)
            or client.hexists(done, task_id)
        ):
            times.setdefault("handed_back", now)
        time.sleep(0.2)
    return times


def squeue_state(job_id: str) -> str:
    """The job's state as squeue lists it; "" once squeue no longer lists it."""
    out = subprocess.run(
        ["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=20
    )
    return out.stdout.strip() if out.returncode == 0 else ""
