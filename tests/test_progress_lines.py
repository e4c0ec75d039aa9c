"""Progress where stderr is no terminal (nohup, SLURM, a log file): plain lines, never a bar."""

from __future__ import annotations

import pytest

from cli.progress import PHASES, ScanRow, busiest, scans_integrated
from tasks.registry import Progress

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
    assert ": 4/4 files, 16/16 frames, 2/2 scans integrated, " in progress[-1], progress
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


def test_the_scans_shown_are_those_being_integrated_nearest_their_end():
    scans = [ScanRow(f"s{k}", f"azint_{k}", 10) for k in range(6)]
    progress = Progress(scan_frames={"s0": 10, "s1": 2, "s2": 9, "s3": 5, "s5": 7})
    assert [s.key for s in busiest(scans, progress, 2)] == ["s2", "s5"]  # in the job's order
    assert [s.key for s in busiest(scans, progress)] == ["s1", "s2", "s3", "s5"]
    assert scans_integrated(scans, progress) == 1


def test_a_terminal_shows_a_row_per_scan_being_integrated(monkeypatch):
    """On a terminal, under the job's bar: a row for each busy scan, none for one ended."""
    import io

    from rich.console import Console

    import cli.progress as progress_module

    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=160)
    monkeypatch.setattr(progress_module, "err", console)
    scans = [ScanRow("a", "azint_scan0001", 80), ScanRow("b", "azint_scan0002", 80)]
    with progress_module.frames_progress("job j", 160, 4, scans=scans) as update:
        update(Progress(frames_done=100, files_done=2, scan_frames={"a": 80, "b": 20}), 1.0)
    shown = screen.getvalue()
    assert "job j" in shown and "2/4 files  100/160 frames" in shown, shown
    assert "azint_scan0002" in shown and "20/80 frames" in shown, shown
    assert "azint_scan0001" not in shown, shown
