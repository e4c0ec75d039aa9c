"""The one state contract (tasks.states) and the result expiry that follows the job's TTL:
pure functions and the job script's text, no services."""

from __future__ import annotations

import json
import subprocess
import sys

from celery import states as celery_states
from celery.exceptions import TaskRevokedError

from tasks.app import RESULT_EXPIRES_ENV
from tasks.states import (
    FINAL,
    JobState,
    Outcome,
    ScanState,
    is_final,
    job_state,
    parse_outcome,
    scan_state,
)
from worker_launcher.script import gpu_spec, job_script

from .conftest import ROOT, edit_config

WRITTEN = {"status": "done", "scan": "s::1.1", "output": "/out/s.h5", "frames": 8}


def meta(state: str, result=None) -> dict:
    """What ``backend.get_task_meta`` returns, exceptions already rebuilt."""
    return {"status": state, "result": result, "task_id": "x-assemble"}


def test_final_states_are_celerys_ready_states_revoked_included():
    assert FINAL == celery_states.READY_STATES == {"SUCCESS", "FAILURE", "REVOKED"}
    assert all(is_final(s) for s in ("SUCCESS", "FAILURE", "REVOKED"))
    assert not any(is_final(s) for s in ("PENDING", "RECEIVED", "STARTED", "RETRY", None))


def test_state_names_are_the_words_users_and_json_see():
    assert [o.value for o in Outcome] == ["done", "incomplete", "failed"]
    assert [s.value for s in ScanState] == ["running", "written", "incomplete", "failed"]
    assert [s.value for s in JobState] == ["running", "done", "incomplete", "interrupted"]
    assert json.dumps({"state": JobState.DONE}) == '{"state": "done"}'
    assert f"{ScanState.WRITTEN}" == "written" and ScanState.WRITTEN == "written"


def test_a_callback_not_ended_has_no_outcome():
    for state in ("PENDING", "RECEIVED", "STARTED", "RETRY"):
        assert parse_outcome(meta(state)) is None
        assert scan_state(parse_outcome(meta(state))) == (ScanState.RUNNING, "")


def test_what_the_callback_returned_is_its_outcome():
    assert parse_outcome(meta("SUCCESS", WRITTEN)) == WRITTEN
    assert scan_state(WRITTEN) == (ScanState.WRITTEN, "")
    incomplete = {"status": "incomplete", "scan": "s", "failed": [{"status": "failed"}] * 2}
    assert parse_outcome(meta("SUCCESS", incomplete)) == incomplete
    assert scan_state(incomplete) == (ScanState.INCOMPLETE, "2 file(s) failed")
    refused = {"status": "failed", "scan": "s", "error": "OutputError", "message": "/o: exists"}
    assert scan_state(parse_outcome(meta("SUCCESS", refused))) == (ScanState.FAILED, "/o: exists")


def test_a_revoked_callback_is_a_failed_outcome_that_says_so():
    for reason in ("revoked", "terminated"):
        outcome = parse_outcome(meta("REVOKED", TaskRevokedError(reason)))
        assert outcome["status"] == Outcome.FAILED and outcome["error"] == "TaskRevokedError"
        assert "assembly revoked" in outcome["message"] and "not written" in outcome["message"]
        assert ("terminated" in outcome["message"]) == (reason == "terminated")
        state, message = scan_state(outcome)
        assert state == ScanState.FAILED and message == outcome["message"]


def test_a_callback_that_raised_is_a_failed_outcome_of_one_line():
    outcome = parse_outcome(meta("FAILURE", MemoryError("out of memory\n  in the pool")))
    assert outcome == {
        "status": "failed",
        "error": "MemoryError",
        "message": "assembly: out of memory",
    }
    assert parse_outcome(meta("FAILURE", KeyError()))["message"] == "assembly: KeyError"


def test_a_result_that_is_no_outcome_is_a_failed_one():
    for result in (None, "done", ["done"], {"status": "lost"}, {"output": "/o.h5"}):
        outcome = parse_outcome(meta("SUCCESS", result))
        assert outcome["status"] == Outcome.FAILED and "unexpected result" in outcome["message"]


def test_job_state_from_its_scans():
    assert job_state([ScanState.WRITTEN, ScanState.RUNNING]) == JobState.RUNNING
    assert job_state([ScanState.WRITTEN, ScanState.WRITTEN]) == JobState.DONE
    assert job_state([ScanState.WRITTEN, ScanState.FAILED]) == JobState.INCOMPLETE
    assert job_state([ScanState.INCOMPLETE]) == JobState.INCOMPLETE


def test_job_script_exports_the_result_expiry_of_the_job_ttl(small_demo, tmp_path):
    from tasks.config import Config

    path = edit_config(small_demo.config, {"queue": {"job_ttl_days": "30"}}, tmp_path / "c.ini")
    config = Config.from_file(path)
    script = job_script(config, gpu_spec(config, 0), "/ws/broker.url", "/ws/logs", local=True)
    assert f"export {RESULT_EXPIRES_ENV}={30 * 86400}\n" in script


def test_workers_read_the_result_expiry_at_import():
    code = "from tasks.app import app; print(app.conf.result_expires, app.backend.expires)"
    env = {"PYTHONPATH": str(ROOT), RESULT_EXPIRES_ENV: str(30 * 86400), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(30 * 86400)] * 2


def test_the_client_sets_the_result_expiry_it_is_given():
    code = (
        "from tasks.app import configure\n"
        "app = configure('redis://127.0.0.1:9/0', result_expires=3600)\n"
        "print(app.backend.expires)\n"
        "print(configure('redis://127.0.0.1:9/0', result_expires=7200).backend.expires)\n"
    )
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["3600", "7200"]
