"""Workers as this machine runs them, through the real CLI: sized to the CPUs this process may
use, in this interpreter, and ``ai_method = opencl`` without a GPU (on the CPU locally, a job
that ends at start under SLURM, named by ``integrate-slurm``)."""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from tasks.app import configure
from tasks.gpu import opencl_devices
from worker_launcher.nodes import live_nodes

from .conftest import edit_config, last_json, run_cli
from .services import redis_url, require_slurm, squeue_names, unique_prefix, wait_until
from .test_distributed import cluster_config, start_cli

CPUS = len(os.sched_getaffinity(0))
SIZING_NOTE = "note: ai_engines_per_worker = "
OPENCL_NOTE = "note: ai_method = opencl: no GPU OpenCL device"
CVMFS = "/cvmfs/tomo.esrf.fr/software/packages/ubuntu24.04/x86_64/tomotools/stable/bin/python"


def expected_sizing(engines: int, threads: int, cpus: int) -> tuple[int, int]:
    """The rule, written out again: engines first, then threads, never more than asked."""
    e = min(engines, cpus)
    return e, max(1, min(threads, cpus // e))


def lines_starting(text: str, start: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(start)]


def run_demo(demo, tmp_path: Path, name: str, **sections) -> tuple:
    """`ringflow run --json` of the demo with some keys changed; (result, summary)."""
    changes = {"output": {"location": str(tmp_path / name)}} | sections
    config = edit_config(demo.config, changes, tmp_path / f"{name}.ini")
    started = time.monotonic()
    result = run_cli("run", config, "--json")
    print(f"ringflow run ({name}): {time.monotonic() - started:.1f} s")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = last_json(result.stdout)
    assert summary["files_done"] == 4 and summary["files_failed"] == [], summary
    assert "failed:" not in result.stderr and "Traceback" not in result.stderr
    return result, summary


def integrated(path: str) -> dict[str, np.ndarray | str]:
    with h5py.File(path) as h5:
        entry = h5[next(iter(h5))]
        data = {name: entry[f"integrated/{name}"][()] for name in ("I", "I_errors")}
        method = entry["reduction"].get("note")
        data["method"] = "" if method is None else str(method.asstr()[()])
        return data


def assert_close(got: np.ndarray, ref: np.ndarray, rtol: float, what: str) -> None:
    """|got - ref| <= rtol x max(|ref|, 1e-3 x the row's largest |ref|): relative, with a
    floor for the near-zero bins between rings."""
    assert got.shape == ref.shape, what
    assert np.array_equal(np.isnan(got), np.isnan(ref)), what
    ref0, got0 = np.nan_to_num(ref), np.nan_to_num(got)
    floor = 1e-3 * np.abs(ref0).max(axis=-1, keepdims=True)
    worst = (np.abs(got0 - ref0) / np.maximum(np.abs(ref0), floor)).max()
    assert worst <= rtol, f"{what}: {worst:.2e} > {rtol:.0e}"


@pytest.fixture(scope="module")
def cython_run(small_demo, tmp_path_factory):
    """The demo integrated with cython, configured as on a cluster node (8 engines x 4 threads,
    the integrator's cluster python_executables): what `ringflow run` makes of it here."""
    tmp = tmp_path_factory.mktemp("cython")
    comp = {"ai_engines_per_worker": "8", "cores_per_worker": "4", "python_executables": CVMFS}
    result, summary = run_demo(small_demo, tmp, "out", **{"computations distribution": comp})
    return tmp / "out", result, {Path(p).name: integrated(p) for p in summary["outputs"]}


def test_run_scales_engines_and_threads_to_this_machine(cython_run):
    """8 x 4 asked, the CPUs of this process given: one note, the workers sized by the rule,
    run by this interpreter although python_executables names a cluster path."""
    out, result, _ = cython_run
    engines, threads = expected_sizing(8, 4, CPUS)
    notes = lines_starting(result.stderr, SIZING_NOTE)
    if (engines, threads) == (8, 4):
        assert notes == [], result.stderr
    else:
        assert notes == [
            f"note: ai_engines_per_worker = 8 x cores_per_worker = 4 asks for 32 CPUs, this "
            f"machine gives {CPUS}: running {engines} engine{'s' * (engines > 1)} x "
            f"{threads} thread{'s' * (threads > 1)}"
        ], result.stderr
    (script,) = (out / ".ringflow" / "logs").glob("worker-gpu0-*.sh")
    text = script.read_text()
    assert f"--concurrency={engines} " in text and f"export OMP_NUM_THREADS={threads} " in text
    assert f"export RINGFLOW_ENGINE_THREADS={threads}\n" in text  # the engine's own threads
    assert CVMFS not in text and f"exec {sys.executable} -m celery" in text
    log = script.with_suffix(".log").read_text()
    assert re.search(rf"ready: .*'concurrency': {engines}\b", log), log[-2000:]
    (assemble,) = (out / ".ringflow" / "logs").glob("worker-assemble-*.sh")
    assert "--concurrency=1 " in assemble.read_text()  # not counted, not scaled


def test_opencl_without_gpu_integrates_on_the_cpu_with_one_note(small_demo, tmp_path, cython_run):
    if any(d.kind == "gpu" for d in opencl_devices()):
        pytest.skip("this machine has a GPU OpenCL device: no fallback to show")
    result, summary = run_demo(
        small_demo, tmp_path, "out", **{"azimuthal integration": {"ai_method": "opencl"}}
    )
    (note,) = lines_starting(result.stderr, "note: ai_method")
    assert note.startswith(OPENCL_NOTE) and "Set ai_method = cython to silence this" in note
    reference = cython_run[2]
    for path in summary["outputs"]:  # the batched cython engine: cython's numbers
        got, ref = integrated(path), reference[Path(path).name]
        np.testing.assert_array_equal(got["I"], ref["I"])
        np.testing.assert_array_equal(got["I_errors"], ref["I_errors"])


def test_opencl_with_cpu_fallback_runs_pyfais_opencl_engine(small_demo, tmp_path, cython_run):
    """cpu_fallback = 1 on PoCL's CPU device: pyFAI's OpenCL engine in real Celery workers,
    its results as cython's, and the output says which engine made them."""
    if not any(d.kind == "cpu" for d in opencl_devices()):
        pytest.skip("no OpenCL CPU device (pocl-binary-distribution) on this machine")
    result, summary = run_demo(
        small_demo,
        tmp_path,
        "out",
        **{
            "azimuthal integration": {"ai_method": "opencl"},
            "computations distribution": {"cpu_fallback": "1"},
        },
    )
    assert lines_starting(result.stderr, "note: ai_method") == []
    reference = cython_run[2]
    for path in summary["outputs"]:
        got, ref = integrated(path), reference[Path(path).name]
        assert_close(got["I"], ref["I"], 1e-5, f"{path} intensity")
        assert_close(got["I_errors"], ref["I_errors"], 1e-4, f"{path} errors")
        assert "opencl" in got["method"].lower(), f"{path}: method {got['method']!r}"


@pytest.mark.service
def test_engines_load_the_matrix_the_client_built_once(small_demo, tmp_path, cython_run):
    """`ringflow run` builds pyFAI's matrix once, while its workers start, and keeps it in the
    workspace: no engine process builds its own, in that run or the next, and every run
    integrates the same numbers."""
    logs = tmp_path / "out" / ".ringflow" / "logs"
    seen: set[Path] = set()
    for _ in range(2):
        _, summary = run_demo(small_demo, tmp_path, "out")
        (log,) = [p.read_text() for p in logs.glob("worker-gpu0-*.log") if p not in seen]
        seen |= set(logs.glob("worker-gpu0-*.log"))
        assert "engine loaded from cache" in log, log[-3000:]
        assert "building pyFAI engine" not in log, log[-3000:]
    assert len(list((tmp_path / "out" / ".ringflow" / "engines").iterdir())) == 1
    reference = cython_run[2]
    for path in summary["outputs"]:
        got, ref = integrated(path), reference[Path(path).name]
        np.testing.assert_array_equal(got["I"], ref["I"])
        np.testing.assert_array_equal(got["I_errors"], ref["I_errors"])


@pytest.mark.service
def test_workers_local_says_each_note_once(small_demo, tmp_path):
    url, prefix = redis_url(), unique_prefix("wlnote")
    config = edit_config(
        small_demo.config,
        {
            "azimuthal integration": {"ai_method": "opencl"},
            "computations distribution": {
                "ai_engines_per_worker": "8",
                "cores_per_worker": "4",
                "workspace_path": str(tmp_path / "ws"),
            },
            "queue": {"queue_prefix": prefix},
        },
        tmp_path / "c.ini",
    )
    env = {"RINGFLOW_BROKER_URL": url}
    local = start_cli(["workers", "local", str(config), "--gpus", ""], env, tmp_path / "local")
    try:
        app = configure(url)
        wait_until(lambda: len(live_nodes(app, prefix)) == 2, 90, "the CPU + assembly workers")
    finally:
        local.send_signal(signal.SIGINT)
        local.wait(60)
    stderr = (tmp_path / "local.err").read_text()
    assert local.returncode == 130, stderr[-2000:]
    if not any(d.kind == "gpu" for d in opencl_devices()):
        assert len(lines_starting(stderr, OPENCL_NOTE)) == 1, stderr
    assert len(lines_starting(stderr, SIZING_NOTE)) == (expected_sizing(8, 4, CPUS) != (8, 4))
    (script,) = (tmp_path / "ws" / "logs" / "local").glob("worker-gpu0-*.sh")
    assert f"--concurrency={expected_sizing(8, 4, CPUS)[0]} " in script.read_text()


@pytest.mark.service
def test_integrate_slurm_opencl_without_gpu_fails_at_start_with_one_line(small_demo, tmp_path):
    """The CI cluster's fake GPUs have no OpenCL GPU device: each GPU job ends at start with
    one line in its log, and integrate-slurm shows it at once, not after worker_start_timeout."""
    require_slurm()
    url, prefix = redis_url(), unique_prefix("nogpu")
    config = cluster_config(
        small_demo,
        tmp_path,
        prefix,
        **{
            "azimuthal integration": {"ai_method": "opencl"},
            "queue": {"worker_start_timeout": "300"},
        },
    )
    started = time.monotonic()
    result = run_cli("integrate-slurm", config, env={"RINGFLOW_BROKER_URL": url}, timeout=240)
    elapsed = time.monotonic() - started
    print(f"integrate-slurm, opencl on fake GPUs: exit {result.returncode} in {elapsed:.1f} s")
    assert result.returncode == 1, result.stderr[-3000:]
    assert elapsed < 90, result.stderr[-3000:]  # well under worker_start_timeout (300 s)
    assert "Traceback" not in result.stderr
    shown = re.findall(
        r"ringflow-\S+-gpu(\d) \(SLURM job \d+\): (ringflow worker: .*)", result.stderr
    )
    assert sorted(slot for slot, _ in shown) == ["0", "1"], result.stderr
    for _, line in shown:
        assert line.startswith("ringflow worker: ai_method = opencl: no GPU OpenCL device on ")
    logs = sorted((tmp_path / "ws" / "logs" / "slurm").glob(f"ringflow-{prefix}-gpu*.log"))
    assert len(logs) == 2, logs
    for log in logs:
        assert log.read_text().count("ringflow worker:") == 1, log.read_text()[-2000:]
    assert squeue_names(prefix) == []  # the assembly job cancelled too
