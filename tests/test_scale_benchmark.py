"""The scale simulation (``benchmarks/scale.py``) runs as a user runs it: a fresh process,
the embedded Redis, real Celery workers with the stand-in engine, every scan assembled."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import ROOT, cli_env


@pytest.mark.service
def test_the_scale_simulation_drains_its_job_and_reports_per_file_costs():
    run = subprocess.run(
        [sys.executable, "benchmarks/scale.py", "--short", "--json"],
        capture_output=True,
        text=True,
        timeout=240,
        env=cli_env(),
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["files"] == 200 and result["scans"] == 2 and result["left_in_queues"] == 0
    # every file costs Redis commands and bytes, and some CPU; a scan's fan-in is its own
    # assembly at least
    assert result["redis_commands_per_file"] > 5 and result["redis_bytes_in_per_file"] > 1000
    assert 0 < result["cpu_ms_per_file"] < 1000
    assert result["fan_in_max_s"] >= result["assembly_median_s"] > 0
