"""Fault injection through the real CLI, real Redis and real prefork workers: no file lost.

Each fault is compared with a clean run of the same data: same rows, bit for bit, none
missing and none duplicated.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from .conftest import edit_config, last_json, run_cli

pytestmark = pytest.mark.service

HOLD_LOCK = """
import sys, time, h5py
h5 = h5py.File(sys.argv[1], "a")  # HDF5 locks the file, as a detector still writing does
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
h5.close()
"""


def copy_dataset(small_demo, tmp_path):
    raw = tmp_path / "RAW_DATA"
    shutil.copytree(small_demo.dataset.rsplit("/RAW_DATA/", 1)[0] + "/RAW_DATA", raw)
    return next(raw.rglob("sample_0001.h5"))


def config_for(small_demo, tmp_path, master, name="c.ini", **queue) -> str:
    changes = {
        "dataset": {"location": str(master), "hdf5_entry": "1.1"},
        "output": {"location": str(tmp_path / name.replace(".ini", ""))},
        "queue": {k: str(v) for k, v in queue.items()},
    }
    return str(edit_config(small_demo.config, changes, tmp_path / name))


def integrated(path: str) -> dict[str, np.ndarray]:
    with h5py.File(path) as h5:
        data = h5["1.1/integrated"]
        return {name: data[name][()] for name in ("intensity", "errors", "source_frame")}


def assert_same_output(a: str, b: str) -> None:
    left, right = integrated(a), integrated(b)
    for name in left:
        assert left[name].shape == right[name].shape, name  # no row lost or duplicated
        assert left[name].tobytes() == right[name].tobytes(), name


@pytest.fixture(scope="module")
def clean_run(small_demo, tmp_path_factory):
    """Scan 1.1 integrated without any fault: the reference output."""
    tmp_path = tmp_path_factory.mktemp("clean")
    master = copy_dataset(small_demo, tmp_path)
    result = run_cli("run", config_for(small_demo, tmp_path, master), "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    (output,) = last_json(result.stdout)["outputs"]
    return output


def test_file_locked_by_its_writer_is_retried_until_readable(small_demo, tmp_path, clean_run):
    """A Lima file still open for writing (HDF5 lock: EAGAIN) is retried with backoff."""
    master = copy_dataset(small_demo, tmp_path)
    victim = master.parent / "scan0001" / "pilatus_0000.h5"
    config = config_for(
        small_demo, tmp_path, master, max_retries=10, retry_delay_s=1, retry_delay_max_s=3
    )
    locker = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(victim), "12"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert locker.stdout.readline().strip() == "locked"
        started = time.monotonic()
        result = run_cli("run", config, "--json")
        elapsed = time.monotonic() - started
    finally:
        locker.kill()
        locker.wait()
    assert result.returncode == 0, result.stderr[-3000:]
    summary = last_json(result.stdout)
    assert summary["files_failed"] == [] and summary["files_done"] == 2
    assert summary["files_retried"].get(str(victim), 0) > 1, summary
    assert f"retried: {victim}: done at attempt" in result.stderr
    assert_same_output(summary["outputs"][0], clean_run)
    print(f"locked file: {summary['files_retried']} attempts, run took {elapsed:.1f} s")


def test_corrupt_file_fails_at_once_without_retries(small_demo, tmp_path):
    """Truncated data is permanent: one attempt, however many retries are allowed."""
    master = copy_dataset(small_demo, tmp_path)
    victim = master.parent / "scan0001" / "pilatus_0001.h5"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    config = config_for(small_demo, tmp_path, master, max_retries=5, retry_delay_s=30)
    started = time.monotonic()
    result = run_cli("run", config, "--json")
    assert result.returncode == 1, result.stderr[-2000:]
    assert time.monotonic() - started < 60  # no 30 s backoff happened
    (failure,) = last_json(result.stdout)["files_failed"][:1]
    assert failure["file"] == str(victim) and failure["attempts"] == 1
    assert "truncated file" in failure["message"] and "Traceback" not in result.stderr
