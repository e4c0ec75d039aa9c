"""Progress where stderr is no terminal (nohup, SLURM, a log file): plain lines, never a bar."""

from __future__ import annotations

import pytest

from cli.progress import PHASES

from .conftest import edit_config, run_cli


@pytest.mark.service
def test_a_run_without_terminal_prints_plain_progress_lines(small_demo, tmp_path):
    config = edit_config(
        small_demo.config, {"output": {"location": str(tmp_path / "out")}}, tmp_path / "c.ini"
    )
    result = run_cli("run", config, env={"RINGFLOW_PROGRESS_EVERY_S": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(result.stdout.split()) == 2  # the outputs
    lines = result.stderr.strip().splitlines()
    progress = [line for line in lines if line.startswith("progress: ")]
    assert progress, result.stderr
    assert all("━" not in line and "\r" not in line for line in lines), result.stderr
    assert ": 4/4 files, 16/16 frames, " in progress[-1], progress  # 2 scans x 2 files x 4
    assert any(line.startswith("workspace: ") and "worker logs in" in line for line in lines)
    phases = [line.split(": ", 1)[1] for line in lines if line.startswith("phase: ")]
    assert phases[:2] == [
        "starting the broker and the local workers",
        "planning: finding the scans and checking the inputs",
    ], result.stderr
    job = [phase.rsplit(": ", 1)[1] for phase in phases[2:]]
    assert job and job == [p for p in PHASES if p in job], result.stderr  # each once, in order
    assert job[-1] == "assembling"


def test_progress_interval_from_the_environment(monkeypatch, capsys):
    from cli.progress import PLAIN_EVERY_S, plain_every_s

    monkeypatch.setenv("RINGFLOW_PROGRESS_EVERY_S", "2.5")
    assert plain_every_s() == 2.5
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv("RINGFLOW_PROGRESS_EVERY_S", bad)
        assert plain_every_s() == PLAIN_EVERY_S
        assert f"RINGFLOW_PROGRESS_EVERY_S = '{bad}'" in capsys.readouterr().err
