"""Workers write only inside their job, whatever its messages and registry say.

An attacker with the broker's password rewrites a queued job before any worker runs it: the
kombu messages in the Redis list (a file task's partial outside, through ``..``, through a
symlink) and the scan payloads in the job's registry (an output outside, a partial list
naming a victim file). Real Redis, real workers started by the job script; nothing outside
the job's folders appears or disappears, and each forged task fails with one line.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from tasks import keys, registry
from tasks.app import configure
from tasks.config import Config
from tasks.demo import DemoSpec, write_demo
from tasks.errors import ConfigError
from tasks.jobs import plan_job
from worker_launcher.distributed import enqueue, job_outcomes
from worker_launcher.nodes import live_nodes

from .conftest import edit_config
from .services import redis_url, unique_prefix, wait_until
from .test_distributed import cluster_config, start_cli

pytestmark = pytest.mark.service
OUTSIDE = "outside the job's folders"


def forge_queue(client, queue: str, change) -> list[dict]:
    """Rewrite each message of ``queue`` in place: ``change(payload)`` edits the file task
    in its body, as anyone who can write to the broker could. Returns the new payloads."""
    payloads = []
    for index, raw in enumerate(client.lrange(queue, 0, -1)):
        message = json.loads(raw)
        args, kwargs, embed = json.loads(base64.b64decode(message["body"]))
        change(args[0])
        payloads.append(args[0])
        message["body"] = base64.b64encode(json.dumps([args, kwargs, embed]).encode()).decode()
        client.lset(queue, index, json.dumps(message))
    return payloads


def forge_scan(client, prefix: str, job_id: str, scan_key: str, **changes) -> None:
    name = keys.job_scans(prefix, job_id)
    entry = json.loads(client.hget(name, scan_key))
    entry["scan"].update(changes)
    client.hset(name, scan_key, json.dumps(entry))


def test_forged_paths_write_and_delete_nothing_outside(tmp_path):
    url, prefix = redis_url(), unique_prefix("forge")
    demo = write_demo(DemoSpec(str(tmp_path / "d"), scans=5, files_per_scan=1, frames_per_file=2))
    ws, outside = tmp_path / "ws", tmp_path / "outside"  # ws: cluster_config's workspace
    outside.mkdir()
    victim = outside / "victim.h5"
    victim.write_bytes(b"precious")
    one_worker = {"n_workers": "1"}
    config = cluster_config(demo, tmp_path, prefix, **{"computations distribution": one_worker})
    app = configure(url)
    client = app.backend.client
    plan = plan_job(Config.from_file(config))
    scans = [scan for scan, _ in plan.scans]
    assert len(scans) == 5
    enqueue(app, plan)  # no worker yet: every message waits in the gpu0 list

    partials = ws / "partials" / plan.job_id
    (partials / "link").parent.mkdir(parents=True)
    (outside / "symdir").mkdir()
    (partials / "link").symlink_to(outside / "symdir")
    escapes = {  # scan key -> where its file task now writes
        scans[0].scan_key: str(outside / "abs" / "evil.h5"),
        scans[1].scan_key: str(ws / "partials" / ".." / ".." / "outside" / "dotdot" / "x.h5"),
        scans[2].scan_key: str(partials / "link" / "sym.h5"),
    }

    def change(task: dict) -> None:
        task["partial"] = escapes.get(task["scan_key"], task["partial"])

    forged = forge_queue(client, keys.gpu_queue(prefix, 0), change)
    assert len(forged) == 5 and sum(t["partial"] in escapes.values() for t in forged) == 3
    forge_scan(client, prefix, plan.job_id, scans[3].scan_key, output=str(outside / "s.h5"))
    kept = scans[4].partials[0]
    forge_scan(client, prefix, plan.job_id, scans[4].scan_key, partials=[kept, str(victim)])

    env = {"RINGFLOW_BROKER_URL": url}
    local = start_cli(["workers", "local", str(config)], env, tmp_path / "local")
    try:
        wait_until(lambda: len(live_nodes(app, prefix)) == 2, 90, "gpu0 + assembly workers")
        outcomes = wait_until(
            lambda: (o := job_outcomes(app, prefix, plan.job_id)) and all(o.values()) and o,
            120,
            "every scan's outcome",
        )
    finally:
        local.send_signal(2)
        local.wait(60)

    assert sorted(p.name for p in outside.rglob("*")) == ["symdir", "victim.h5"]
    assert victim.read_bytes() == b"precious" and not any((outside / "symdir").iterdir())
    failed = registry.read_progress(client, prefix, plan.job_id).failures
    assert sorted(f["scan"] for f in failed.values()) == sorted(escapes)
    for failure in failed.values():
        assert OUTSIDE in failure["message"] and "\n" not in failure["message"], failure
        assert escapes[failure["scan"]] in failure["message"]
    for scan in scans[:3]:
        assert outcomes[scan.scan_key]["status"] == "incomplete"
    for scan in scans[3:]:
        outcome = outcomes[scan.scan_key]
        assert outcome["status"] == "failed" and OUTSIDE in outcome["message"], outcome
        assert "\n" not in outcome["message"] and not os.path.exists(scan.output)
    assert os.path.exists(kept)  # the refused assembly removed none of its partials
    logs = "".join(p.read_text() for p in Path(ws).rglob("*.log"))
    assert logs.count("refused:") >= 5, logs[-3000:]


def test_worker_without_write_roots_writes_nothing(small_demo, tmp_path):
    """A worker not started by the job script (no $RINGFLOW_WRITE_ROOTS) fails closed: its
    files fail with one line, and it says so in its log at start."""
    import subprocess
    import sys

    from .conftest import ROOT, cli_env

    url, prefix = redis_url(), unique_prefix("noroots")
    config = edit_config(
        small_demo.config,
        {
            "computations distribution": {"n_workers": "1", "workspace_path": str(tmp_path)},
            "output": {"location": str(tmp_path / "out")},
            "queue": {"queue_prefix": prefix},
        },
        tmp_path / "c.ini",
    )
    app = configure(url)
    plan = plan_job(Config.from_file(config))
    enqueue(app, plan)
    env = {k: v for k, v in cli_env({"RINGFLOW_BROKER_URL": url}).items()}
    env.pop("RINGFLOW_WRITE_ROOTS", None)
    queue = keys.gpu_queue(prefix, 0)
    argv = [sys.executable, "-m", "celery", "-A", "tasks.app", "worker", "--pool=solo", "-Q"]
    log = tmp_path / "worker.log"
    with open(log, "w") as out:
        worker = subprocess.Popen(
            [*argv, queue, "-n", f"{prefix}@%h", "--without-gossip", "--without-mingle"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        failed = wait_until(
            lambda: (
                (f := registry.read_progress(app.backend.client, prefix, plan.job_id).failures)
                and len(f) == 4
                and f
            ),
            120,
            "the 4 files to fail",
        )
    finally:
        worker.terminate()
        worker.wait(30)
        app.backend.client.delete(keys.assemble_queue(prefix))  # callbacks nobody consumes
    for failure in failed.values():
        assert "started without $RINGFLOW_WRITE_ROOTS" in failure["message"], failure
    assert not (tmp_path / "partials").exists()
    assert "it writes nothing" in log.read_text()


@pytest.mark.parametrize("location", [False, True])
@pytest.mark.parametrize("subfolder", ["", "partials_here"])
def test_every_planned_path_is_inside_the_roots(small_demo, tmp_path, location, subfolder):
    """The roots the job script passes hold every partial and output the planning makes
    (the experiment's PROCESSED_DATA or [output] location; workspace or partials subfolder),
    and nothing next to them."""
    from tasks.confine import OutsideJobError, check_output, check_partial, write_roots

    from .conftest import copy_dataset

    master = copy_dataset(small_demo, tmp_path / "beamline")
    output = {"partial_files_subfolder": subfolder} if subfolder else {}
    if location:
        output["location"] = str(tmp_path / "out")
    changes = {"dataset": {"location": str(master.parent.parent / "*" / "*.h5")}}
    config = Config.from_file(
        edit_config(small_demo.config, changes | {"output": output}, tmp_path / "c.ini")
    )
    roots = write_roots(config)
    plan = plan_job(config)
    assert len(plan.scans) == 2
    for scan, files in plan.scans:
        check_output(scan.output, roots)
        for task in files:
            check_partial(task.partial, roots)
    processed = tmp_path / "beamline" / "PROCESSED_DATA"  # the experiment's, every sample
    assert roots.outputs == (str(tmp_path / "out" if location else processed),)
    for path in (tmp_path / "beamline" / "RAW_DATA" / "x.h5", tmp_path / "x.h5"):
        with pytest.raises(OutsideJobError, match="outside the job's folders"):
            check_output(str(path), roots)
    stray = os.path.join(os.path.dirname(plan.scans[0][0].output), "stray", "p.h5")
    with pytest.raises(OutsideJobError, match="partial outside the job's folders"):
        check_partial(stray, roots)


@pytest.mark.parametrize("subfolder", ["./partials", "a//b/", "p/./q"])
def test_partial_subfolders_written_loosely_are_inside_the_roots(small_demo, tmp_path, subfolder):
    from tasks.confine import check_partial, write_roots

    output = {"partial_files_subfolder": subfolder, "location": str(tmp_path / "out")}
    config = Config.from_file(
        edit_config(small_demo.config, {"output": output}, tmp_path / "c.ini")
    )
    roots = write_roots(config)
    for _, files in plan_job(config).scans:
        for task in files:
            check_partial(task.partial, roots)


@pytest.mark.parametrize("subfolder", ["../elsewhere", "/abs/partials", "a/../../b"])
def test_partial_subfolders_that_climb_out_are_refused_at_load(small_demo, tmp_path, subfolder):
    config = edit_config(
        small_demo.config, {"output": {"partial_files_subfolder": subfolder}}, tmp_path / "c.ini"
    )
    with pytest.raises(ConfigError, match="partial_files_subfolder = .*no leading / and no"):
        Config.from_file(config)


def test_an_output_folder_linked_to_another_disk_is_refused_while_planning(small_demo, tmp_path):
    """A workers' check would refuse it only after every file of the scan is integrated."""
    location, elsewhere = tmp_path / "out", tmp_path / "other_disk"
    elsewhere.mkdir()
    location.mkdir()
    (location / "sample").symlink_to(elsewhere, target_is_directory=True)
    config = Config.from_file(
        edit_config(small_demo.config, {"output": {"location": str(location)}}, tmp_path / "c.ini")
    )
    plan = plan_job(config)
    assert plan.scans == [] and len(plan.problems) == 2
    assert all("output outside the job's folders" in str(p) for p in plan.problems)


def test_a_forged_registry_cannot_open_up_the_workspace(small_demo, tmp_path):
    from tasks.confine import holds_outputs, inside_outputs, write_roots

    location = tmp_path / "out"
    config = Config.from_file(
        edit_config(small_demo.config, {"output": {"location": str(location)}}, tmp_path / "c.ini")
    )
    roots = write_roots(config)
    assert inside_outputs(str(location / "sample" / "sample_0001"), roots)
    for folder in (location / ".ringflow", location / ".ringflow" / "partials", location):
        assert not inside_outputs(str(folder), roots), folder
    # where the walk up a scan's folders ends by design, said without a "refused" alarm
    assert holds_outputs(str(location), roots) and holds_outputs(str(tmp_path), roots)
    assert not holds_outputs(str(location / ".ringflow"), roots)
