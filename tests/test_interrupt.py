"""Ctrl-C stops every process ringflow started: workers and the embedded Redis."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from .conftest import edit_config, kill_tree, spawn_cli

pytestmark = pytest.mark.service


def running(pattern: str) -> bool:
    return subprocess.run(["pgrep", "-f", pattern], capture_output=True).returncode == 0


def test_ctrl_c_stops_workers_and_broker(small_demo, tmp_path):
    config = edit_config(
        small_demo.config, {"output": {"location": str(tmp_path / "out")}}, tmp_path / "c.ini"
    )
    cli = spawn_cli("run", config)
    logs = tmp_path / "out" / ".ringflow" / "logs"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (
        logs.exists() and len(list(logs.glob("*.log"))) == 2
    ):
        time.sleep(0.05)
    names = [p.stem.removeprefix("worker-") for p in logs.glob("*.log")]
    assert len(names) == 2, "workers never started"
    # one Ctrl-C stops everything: one that Python dropped (raised inside a __del__) is
    # remembered and raised at the next check; the workers' warm shutdown of engines still
    # booting can take 20 s on a busy machine
    cli.send_signal(signal.SIGINT)
    try:
        _, stderr = cli.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        kill_tree(cli.pid)
        raise AssertionError("one Ctrl-C did not stop ringflow run within 90 s") from None
    assert cli.returncode == 130, stderr[-2000:]
    assert "interrupted" in stderr and "Traceback" not in stderr
    broker_conf = str(tmp_path / "out" / ".ringflow" / "broker" / "redis.conf")
    for pattern in [f"ringflow-{name}" for name in names] + [broker_conf]:
        assert not running(pattern), f"{pattern} still running"
