"""ringflow check: run's validation and plan, with nothing written and nothing started."""

from __future__ import annotations

import fcntl
import os
import time

import pytest

from tasks.config import Config
from tasks.errors import OutputError
from tasks.gpu import local_fallback_note
from tasks.jobs import plan_job
from tasks.writers import make_dirs
from worker_launcher.check import DryRun, lock_holder

from .conftest import edit_config, last_json, run_cli
from .services import redis_url

SECRET = "S3cret"


def demo_config(small_demo, tmp_path, out="out", **changes):
    sections = {"output": {"location": str(tmp_path / out)}}
    for section, values in changes.items():
        sections.setdefault(section, {}).update(values)
    return edit_config(small_demo.config, sections, tmp_path / "c.ini")


def tree(folder) -> list[tuple]:
    """Every path below ``folder``, its mode, size and mtime: what check must leave as is."""
    found = []
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            info = os.lstat(os.path.join(root, name))
            found.append((os.path.join(root, name), info.st_mode, info.st_size, info.st_mtime))
    return sorted(found)


def test_a_valid_config_lists_what_run_would_process(small_demo, tmp_path):
    config = demo_config(small_demo, tmp_path)
    result = run_cli("check", config)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stderr.splitlines() if "sample_0001.h5 " in line]
    assert len(rows) == 2 and all("│ 2 " in row and "│ 8 " in row for row in rows), rows
    assert "2 scans, 4 files, 16 frames to do" in result.stderr
    assert not (tmp_path / "out").exists()  # no output folder, no workspace
    plan = plan_job(Config.from_file(config))  # what run plans (in this process)
    assert (len(plan.file_tasks), plan.n_frames) == (4, 16)


def test_json_report_and_device_notes(small_demo, tmp_path):
    """opencl without a GPU here: the note `run` prints, from the same function."""
    config = demo_config(small_demo, tmp_path, **{"azimuthal integration": {"ai_method": "opencl"}})
    result = run_cli("check", config, "--json")
    report = last_json(result.stdout)
    assert result.returncode == 0 and report["ok"]
    assert [(s["files"], s["frames"], s["state"]) for s in report["scans"]] == [(2, 8, "to do")] * 2
    assert report["broker"]["kind"] == "embedded" and report["problems"] == []
    note = local_fallback_note("opencl", False)
    assert report["notes"] == ([note] if note else [])
    assert all(f"note: {n}" in result.stderr for n in report["notes"])


def test_nothing_is_written(small_demo, tmp_path):
    """Planning creates output folders and removes a killed run's temporaries: not here."""
    out = tmp_path / "new" / "out"
    leftover = (
        out / "sample" / "sample_0001" / ".azint_sample_0001_scan0001_pilatus.h5.abcd1234.tmp"
    )
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half")
    os.utime(leftover, (time.time() - 60,) * 2)
    config = demo_config(small_demo, tmp_path, out="new/out")
    before = tree(tmp_path)
    result = run_cli("check", config, "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    assert tree(tmp_path) == before
    report = last_json(result.stdout)
    assert any(str(leftover) in w for w in report["warnings"]), report["warnings"]
    assert str(out / ".ringflow") in report["would_create"]


def answer(make, folder) -> list[str] | str:
    try:
        return make(str(folder))
    except OutputError as exc:
        return str(exc)


@pytest.mark.parametrize("below", ["new/deeper", "a_file/sub", "a_file"])
def test_the_dry_run_answers_as_make_dirs_does(tmp_path, below):
    """check's stand-in for the folders planning creates: the same list, the same error."""
    (tmp_path / "a_file").write_text("")
    dry = answer(DryRun().make_dirs, tmp_path / below)
    assert os.listdir(tmp_path) == ["a_file"]
    assert dry == answer(make_dirs, tmp_path / below)


def test_a_poni_that_is_not_there(small_demo, tmp_path):
    gone = tmp_path / "gone.poni"
    config = demo_config(
        small_demo, tmp_path, **{"azimuthal integration": {"poni_file": str(gone)}}
    )
    result = run_cli("check", config)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {gone}: PONI file not found"]


def test_an_unreachable_broker_names_no_secret(small_demo, tmp_path):
    url = f"redis://:{SECRET}@127.0.0.1:1/0"
    start = time.monotonic()
    result = run_cli("check", demo_config(small_demo, tmp_path), env={"RINGFLOW_BROKER_URL": url})
    assert result.returncode == 1 and time.monotonic() - start < 60
    assert SECRET not in result.stdout + result.stderr
    assert "error: broker redis://:***@127.0.0.1:1/0 unreachable" in result.stderr


def test_a_broker_held_by_a_run_is_seen_without_taking_its_lock(tmp_path):
    path = tmp_path / "owner.lock"
    path.write_text(f"{os.getpid()}\n")  # what the owner writes once it holds the lock
    with open(path) as fh:
        assert lock_holder(str(path)) == 0
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert lock_holder(str(path)) == os.getpid()
    assert lock_holder(str(path)) == 0


@pytest.mark.service
def test_after_a_run_its_outputs_are_skipped(small_demo, tmp_path):
    config = demo_config(small_demo, tmp_path, output={"existing_output": "skip"})
    planned = last_json(run_cli("check", config, "--json").stdout)
    ran = run_cli("run", config, "--json")
    assert ran.returncode == 0, ran.stderr[-2000:]
    summary = last_json(ran.stdout)
    assert (summary["files_done"], summary["frames"]) == (planned["files"], planned["frames"])
    result = run_cli("check", config, "--json")
    report = last_json(result.stdout)
    assert result.returncode == 0 and report["files"] == 0 and report["files_skipped"] == 4
    assert {s["state"] for s in report["scans"]} == {"skipped"}
    assert sorted(s["output"] for s in report["scans"]) == sorted(summary["outputs"])
    unreachable = {"RINGFLOW_BROKER_URL": f"redis://:{SECRET}@127.0.0.1:1/0"}
    idle = run_cli("check", config, env=unreachable)  # as run: nothing to do needs no broker
    assert idle.returncode == 0 and "run needs no broker" in idle.stderr, idle.stderr[-2000:]


@pytest.mark.service
def test_a_reachable_broker(small_demo, tmp_path):
    url = redis_url()
    result = run_cli("check", demo_config(small_demo, tmp_path), env={"RINGFLOW_BROKER_URL": url})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "reachable" in result.stderr
    password = url.rsplit("@", 1)[0].rsplit(":", 1)[-1]
    assert password not in result.stdout + result.stderr
