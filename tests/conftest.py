"""Shared fixtures: small demo datasets and a helper that runs the real CLI in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from tasks.demo import DemoSpec, write_demo

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "cli.main"]
MEASURED: list[str] = []  # figures the tests measured, shown in pytest's final summary


SLURM_MODULES = ("test_distributed", "test_chaos", "test_script")  # they submit SLURM jobs


@pytest.fixture
def measured(request):
    """Record a figure a test measured (a recovery time, trials passed): pytest prints it in
    its final summary, so CI's log shows it without ``-s``. It travels as a user property of
    the test's report, which pytest-xdist hands from its worker to the main process."""
    return lambda text: request.node.user_properties.append(("measured", text))


def pytest_runtest_logreport(report) -> None:
    if report.when == "teardown":
        MEASURED.extend(text for name, text in report.user_properties if name == "measured")


def pytest_collection_modifyitems(items) -> None:
    """Tests that submit SLURM jobs run one at a time, on one pytest-xdist worker: the CI
    node is sized to fit a job's workers, not two jobs' (``--dist loadgroup``)."""
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if module in SLURM_MODULES or "slurm" in item.name:
            item.add_marker(pytest.mark.xdist_group("slurm"))


def pytest_terminal_summary(terminalreporter) -> None:
    if MEASURED:
        terminalreporter.section("measured by the tests")
        for text in MEASURED:
            terminalreporter.write_line(text)


def cli_env(extra: dict | None = None) -> dict:
    """What a user's shell gives ringflow: no broker URL inherited from the test run, this
    checkout importable, a wide terminal (rich tables unwrapped); then ``extra``."""
    env = {k: v for k, v in os.environ.items() if k != "RINGFLOW_BROKER_URL"}
    return env | {"PYTHONPATH": str(ROOT), "COLUMNS": "200"} | (extra or {})


def run_cli(*args: str, env: dict | None = None, timeout: float = 300):
    """Run ``ringflow ARGS`` as a user would: a fresh process, real services."""
    return subprocess.run(
        [*CLI, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(env),
        cwd=ROOT,
    )


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def edit_config(path: str | Path, changes: dict[str, dict[str, str]], out: str | Path) -> Path:
    """Copy an INI file with some keys set (sections created as needed)."""
    import configparser

    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str
    parser.read(path)
    for section, values in changes.items():
        if not parser.has_section(section):
            parser.add_section(section)
        for key, value in values.items():
            parser.set(section, key, value)
    with open(out, "w") as fh:
        parser.write(fh)
    return Path(out)


def copy_dataset(demo, folder: Path) -> Path:
    """A private copy of a demo's RAW_DATA under ``folder``, to damage; its master file."""
    raw = folder / "RAW_DATA"
    shutil.copytree(demo.dataset.rsplit("/RAW_DATA/", 1)[0] + "/RAW_DATA", raw)
    return next(raw.rglob("sample_0001.h5"))


def spawn_cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    """A ringflow command left running, as a user's terminal would."""
    return subprocess.Popen(
        [*CLI, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=str(ROOT),
        env=cli_env(env),
    )


def kill_tree(root_pid: int) -> list[int]:
    """SIGKILL a process and everything it started, as a crashed node would: no cleanup."""
    import psutil

    root = psutil.Process(root_pid)
    procs = [root, *root.children(recursive=True)]
    for proc in procs:
        proc.kill()
    psutil.wait_procs(procs, timeout=10)
    return [p.pid for p in procs]


def assert_same_scan(output: str, reference: str) -> None:
    with h5py.File(output) as a, h5py.File(reference) as b:
        for name in ("I", "I_errors", "source_frame", "frame_index"):
            left, right = a[f"1.1/integrated/{name}"][()], b[f"1.1/integrated/{name}"][()]
            assert left.shape == right.shape and left.tobytes() == right.tobytes(), name


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory):
    """2 scans x 2 Lima files x 4 Pilatus-1M frames, with its PONI, mask and config."""
    root = tmp_path_factory.mktemp("demo")
    return write_demo(DemoSpec(str(root), scans=2, files_per_scan=2, frames_per_file=4))


@pytest.fixture(scope="session")
def long_files(tmp_path_factory):
    """1 scan x 2 Lima files x 300 frames, and its output from a clean `ringflow run`: a file
    takes seconds even with its engine loaded from the workspace's cache, long enough to
    kill a worker mid-file."""
    root = tmp_path_factory.mktemp("long")
    demo = write_demo(DemoSpec(str(root), scans=1, files_per_scan=2, frames_per_file=300))
    clean = edit_config(demo.config, {"output": {"location": str(root / "clean")}}, root / "c.ini")
    result = run_cli("run", clean, "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    (output,) = last_json(result.stdout)["outputs"]
    return demo, output
