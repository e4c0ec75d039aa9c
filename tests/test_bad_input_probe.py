"""Bad input a hostile probe tried: each gets one line naming the file, key or value, a
non-zero exit, no traceback, no hang, and nothing already written is lost."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

from tasks.errors import InputDataError
from tasks.readers import open_frames

from .conftest import ROOT, copy_dataset, edit_config, last_json, run_cli
from .test_bad_input import assert_clean_error, config_with

NO_DAC = [  # setpriv: run without the capabilities that let root ignore file permissions
    "--inh-caps=-dac_override,-dac_read_search",
    "--bounding-set=-dac_override,-dac_read_search",
]


def _detector_file(path, data=None, **links) -> str:
    """A Bliss-like dataset file: entry 1.1 with ``measurement/pilatus`` as ``data`` or as
    the soft links given."""
    with h5py.File(path, "w") as h5:
        measurement = h5.create_group("1.1/measurement")
        if data is not None:
            measurement["pilatus"] = data
        for name, target in links.items():
            measurement[name] = h5py.SoftLink(target)
    return str(path)


# --- planning: refused before any work, exit 2 ---------------------------------------------


@pytest.mark.service
def test_a_soft_link_cycle_under_the_detector(small_demo, tmp_path):
    cycle = _detector_file(
        tmp_path / "cycle.h5", pilatus="/1.1/measurement/loop", loop="/1.1/measurement/pilatus"
    )
    config = config_with(small_demo, tmp_path, dataset={"location": cycle})
    assert_clean_error(
        run_cli("run", config),
        "cycle.h5: 1.1/measurement/pilatus -> /1.1/measurement/loop",
        "soft-link cycle",
        code=2,
    )


@pytest.mark.service
@pytest.mark.parametrize("dtype", ["complex64", "bool"])
def test_frames_of_a_dtype_that_cannot_be_integrated(small_demo, tmp_path, dtype):
    """The dtype is in h5py's metadata: found while planning, named, not numba's words."""
    bad = _detector_file(tmp_path / "x.h5", np.zeros((2, 1043, 981), dtype))
    config = config_with(small_demo, tmp_path, dataset={"location": bad})
    assert_clean_error(
        run_cli("run", config),
        f"x.h5: 1.1/measurement/pilatus: frames of dtype {dtype} cannot be integrated",
        "(expected integer or float)",
        code=2,
    )


def test_a_worker_names_the_dtype_of_frames_it_cannot_integrate(tmp_path):
    """A Lima file rewritten after planning: the worker's reader refuses it the same way."""
    path = tmp_path / "pilatus_0000.h5"
    with h5py.File(path, "w") as h5:
        h5["entry_0000/measurement/data"] = np.zeros((2, 4, 3), np.complex64)
    with (
        pytest.raises(InputDataError) as caught,
        open_frames(str(path), "/entry_0000/measurement/data", (4, 3)),
    ):
        pass
    assert str(caught.value) == (
        f"{path}: entry_0000/measurement/data: frames of dtype complex64 cannot be integrated "
        "(expected integer or float)"
    )


@pytest.mark.service
def test_a_file_name_too_long_for_the_outputs(small_demo, tmp_path):
    """240 characters: the output's temporary name would pass 255 bytes; refused while
    planning, not by the workers after integrating."""
    master = copy_dataset(small_demo, tmp_path)
    long_master = master.with_name("L" * 237 + ".h5")
    master.rename(long_master)
    config = config_with(small_demo, tmp_path, dataset={"location": str(long_master)})
    result = run_cli("run", config)
    assert_clean_error(result, "L" * 237 + ".h5: the file name", "(NAME_MAX)", code=2)
    assert not list((tmp_path / "out").rglob("*.h5"))


@pytest.mark.service
def test_an_engine_that_cannot_fit_in_memory_is_refused_while_planning(small_demo, tmp_path):
    config = config_with(small_demo, tmp_path, azimuthal_integration={"n_pts": "1000000000"})
    assert_clean_error(
        run_cli("run", config),
        "[azimuthal integration] n_pts = 1000000000: one integration engine cannot fit",
        "GiB",
        "lower n_pts",
        code=2,
    )


@pytest.mark.service
def test_an_entry_that_is_not_in_the_file(small_demo, tmp_path):
    config = config_with(small_demo, tmp_path, dataset={"hdf5_entry": "9.1"})
    assert_clean_error(
        run_cli("run", config),
        "sample_0001.h5",
        "[dataset] hdf5_entry 9.1 is not in the file",
        code=2,
    )


@pytest.mark.service
def test_detector_data_that_is_not_a_stack_of_frames(small_demo, tmp_path):
    flat = _detector_file(tmp_path / "flat.h5", np.zeros((1043, 981), np.int32))
    config = config_with(small_demo, tmp_path, dataset={"location": flat})
    assert_clean_error(
        run_cli("run", config),
        "flat.h5: 1.1/measurement/pilatus has shape (1043, 981), expected frames x rows x cols",
        code=2,
    )


# --- files that are not readable regular files, among good ones: each fails alone ---------


@pytest.mark.service
@pytest.mark.skipif(not shutil.which("setpriv"), reason="needs util-linux's setpriv")
def test_files_that_are_not_readable_regular_files_fail_alone(small_demo, tmp_path):
    """A dangling link, a directory and a FIFO matching the glob (the FIFO must not block the
    planning), and a mode-000 file. Tests run as root, who reads any file: the command runs
    without the capabilities that bypass file permissions (CAP_DAC_OVERRIDE,
    CAP_DAC_READ_SEARCH), so the mode-000 file really is unreadable to it."""
    folder = tmp_path / "more"
    folder.mkdir()
    (folder / "dangling.h5").symlink_to(tmp_path / "nowhere.h5")
    (folder / "dir.h5").mkdir()
    os.mkfifo(folder / "fifo.h5")
    secret = folder / "secret.h5"
    shutil.copy(small_demo.dataset, secret)
    secret.chmod(0)
    location = f"{small_demo.dataset}, {folder}/*.h5"
    config = config_with(small_demo, tmp_path, dataset={"location": location})
    result = subprocess.run(
        ["setpriv", *NO_DAC, sys.executable, "-m", "cli.main", "run", str(config), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "RINGFLOW_BROKER_URL"}
        | {"PYTHONPATH": str(ROOT), "COLUMNS": "200"},
    )
    assert_clean_error(result, "dangling.h5: symbolic link to", "which does not exist", code=1)
    assert_clean_error(result, "dir.h5: not a regular file (a directory)")
    assert_clean_error(result, "fifo.h5: not a regular file (a FIFO)")
    assert_clean_error(result, "secret.h5: cannot be read: Permission denied")
    summary = last_json(result.stdout)
    assert len(summary["outputs"]) == 2 and summary["files_done"] == 4


# --- ringflow's own files in the input tree ------------------------------------------------


def _beside_the_inputs(small_demo, tmp_path):
    """The demo's dataset folder outside RAW_DATA, globbed: outputs go beside the inputs."""
    folder = tmp_path / "sample_0001"
    shutil.copytree(os.path.dirname(small_demo.dataset), folder)
    config = edit_config(
        small_demo.config, {"dataset": {"location": f"{folder}/*.h5"}}, tmp_path / "c.ini"
    )
    return folder, config


@pytest.mark.service
def test_outputs_in_the_input_tree_are_not_taken_as_input(small_demo, tmp_path):
    folder, config = _beside_the_inputs(small_demo, tmp_path)
    first = run_cli("run", config, "--json")
    assert first.returncode == 0, first.stderr[-2000:]
    outputs = sorted(last_json(first.stdout)["outputs"])
    assert [os.path.dirname(o) for o in outputs] == [str(folder)] * 2
    again = run_cli("run", config, "--json")
    assert again.returncode == 0, again.stderr[-2000:]
    for output in outputs:
        assert f"warning: {output}: a file ringflow wrote, not taken as input" in again.stderr
    assert sorted(last_json(again.stdout)["outputs"]) == outputs


@pytest.mark.service
def test_temporaries_left_by_a_killed_run_are_removed_by_the_next(small_demo, tmp_path):
    """What a kill during assembly leaves (the output's and a partial's temporary files) goes
    at the next run, named; a temporary that is not ringflow's stays."""
    config = config_with(small_demo, tmp_path)
    first = run_cli("run", config, "--json")
    assert first.returncode == 0, first.stderr[-2000:]
    output = sorted(last_json(first.stdout)["outputs"])[0]
    folder, name = os.path.split(output)
    left = os.path.join(folder, f".{name}.k1ll3d_x.tmp")
    with open(left, "wb") as fh:
        fh.write(b"\x89HDF\r\n half an output")
    stem_dir = tmp_path / "out" / ".ringflow" / "partials" / "0123456789ab" / name[:-3]
    stem_dir.mkdir(parents=True)  # a killed run's job: its partials' folder stays
    partial = os.path.join(stem_dir, ".0000_pilatus_0000_0.h5.abcd_123.tmp")
    open(partial, "wb").close()
    other = os.path.join(folder, ".notes.txt.abcd1234.tmp")
    open(other, "wb").close()
    again = run_cli("run", config, "--json")
    assert again.returncode == 0, again.stderr[-2000:]
    for path in (left, partial):
        assert not os.path.exists(path)
        assert f"warning: {path}: removed, a temporary file left by a killed run" in again.stderr
    assert os.path.exists(other)
    with h5py.File(output) as h5:
        assert h5["1.1/integrated/I"].shape[0] == 8


def test_temporaries_of_workers_a_requeue_stopped_are_removed_by_it(small_demo, tmp_path):
    """`requeue --stranded` after a killed run stops the run's workers (one may be writing
    any scan's output or partial): once the job's scans have their outcomes, the temporaries
    of every scan of the job go, not only those of the files it sent again."""
    config = config_with(small_demo, tmp_path)
    first = run_cli("run", config, "--json")
    assert first.returncode == 0, first.stderr[-2000:]
    summary = last_json(first.stdout)
    output = sorted(summary["outputs"])[-1]
    folder, name = os.path.split(output)
    left = os.path.join(folder, f".{name}.s70pp3d_.tmp")
    with open(left, "wb") as fh:
        fh.write(b"\x89HDF\r\n half an output")
    job_partials = tmp_path / "out" / ".ringflow" / "partials" / summary["job_id"] / name[:-3]
    job_partials.mkdir(parents=True)
    partial = os.path.join(job_partials, ".0001_pilatus_0000_0.h5.x2_y3z4w.tmp")
    open(partial, "wb").close()
    requeued = run_cli("requeue", config, summary["job_id"], "--stranded")
    assert requeued.returncode == 0, requeued.stderr[-2000:]
    for path in (left, partial):
        assert not os.path.exists(path), requeued.stderr
        assert f"warning: {path}: removed, a temporary file left by a killed run" in (
            requeued.stderr
        )
    with h5py.File(output) as h5:  # the output itself untouched
        assert h5[f"{next(iter(h5))}/integrated/I"].shape[0] == 8


# --- the workspace's disk full -----------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 64 MiB tmpfs of its own (root can mount one): a disk that really fills up."""
    mount = tmp_path / "fs"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.service
def test_status_and_requeue_with_the_workspace_disk_full(small_demo, tmp_path, small_tmpfs):
    config = edit_config(
        small_demo.config, {"output": {"location": str(small_tmpfs / "out")}}, tmp_path / "c.ini"
    )
    result = run_cli("run", config, "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    job = last_json(result.stdout)["job_id"]
    filler = small_tmpfs / "filler"
    subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1M"], capture_output=True)
    for args in (("status",), ("requeue", job, "--failed")):
        assert_clean_error(
            run_cli(*args[:1], config, *args[1:]),
            ".ringflow: cannot write in the job's workspace: No space left on device",
            code=1,
        )
    filler.unlink()
    after = run_cli("status", config, job, "--json")  # the job's records are all there
    assert after.returncode == 0, after.stderr[-2000:]
    assert last_json(after.stdout)["state"] == "done"


# --- quotes and newlines in paths ----------------------------------------------------------

WEIRD = 'we"ird\nname'


@pytest.mark.service
def test_a_quote_and_a_newline_in_the_dataset_path(small_demo, tmp_path):
    """Discovery, planning and outputs with such names (the workspace elsewhere)."""
    raw = tmp_path / "RAW_DATA"
    shutil.copytree(os.path.dirname(os.path.dirname(small_demo.dataset)), raw / WEIRD)
    location = glob.escape(str(raw / WEIRD)) + "/*/*.h5"
    config = config_with(small_demo, tmp_path, dataset={"location": location})
    result = run_cli("run", config, "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    outputs = last_json(result.stdout)["outputs"]
    assert len(outputs) == 2 and all(f"/out/{WEIRD}/sample_0001/azint_" in o for o in outputs)


@pytest.mark.service
def test_a_quote_and_a_newline_in_the_workspace_path(small_demo, tmp_path):
    """The same with the default output folder, so the embedded broker's workspace (and
    its configuration file) is below that name too."""
    weird = tmp_path / WEIRD
    shutil.copytree(os.path.dirname(small_demo.dataset), weird)
    location = glob.escape(str(weird)) + "/*.h5"
    config = edit_config(small_demo.config, {"dataset": {"location": location}}, tmp_path / "c.ini")
    result = run_cli("run", config, "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(last_json(result.stdout)["outputs"]) == 2


# --- an engine whose build runs out of memory in a worker process ------------------------

OUT_OF_MEMORY = textwrap.dedent(
    """
    import dataclasses, resource, sys, threading
    from tasks.config import Config
    from tasks import engine

    config = Config.from_file(sys.argv[1])
    ai = dataclasses.replace(config.integration, n_pts=10**9, pixel_splitting="no")
    config = dataclasses.replace(config, integration=ai)
    resource.setrlimit(resource.RLIMIT_AS, (6 * 2**30, 6 * 2**30))
    said = {}

    def call(name, function):
        try:
            function(config)
            said[name] = "built"
        except Exception as exc:
            said[name] = f"{type(exc).__name__}: {exc}"

    warm = threading.Thread(target=call, args=("warm", engine.warm_engine))
    warm.start()  # a worker process's start-up build, then two tasks waiting for it
    tasks = [threading.Thread(target=call, args=(k, engine.engine_for)) for k in "ab"]
    for thread in tasks:
        thread.start()
    for thread in (warm, *tasks):
        thread.join(60)
    for name in ("warm", "a", "b"):
        print(name, said.get(name, "still waiting"))
    """
)


def test_an_engine_build_out_of_memory_fails_every_task_waiting_for_it(small_demo):
    """pyFAI catches its own MemoryError and deadlocks in its fallback (it resets its
    engines inside their own lock): in a fresh process under RLIMIT_AS, with pyFAI really
    building, the start-up build and both tasks waiting for it must each get the error."""
    result = subprocess.run(
        [sys.executable, "-c", OUT_OF_MEMORY, small_demo.config],
        capture_output=True,
        text=True,
        timeout=200,
        cwd=ROOT,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
    )
    lines = result.stdout.splitlines()
    assert len(lines) == 3, result.stdout + result.stderr[-2000:]
    for line in lines:
        assert "ConfigError: " in line and "n_pts = 1000000000" in line, line
        assert "building the engine ran out of memory" in line, line


def test_status_of_a_dataset_glob_that_matches_nothing(small_demo, tmp_path):
    """The workspace follows the first dataset file when no location says where it is."""
    changes = {"dataset": {"location": str(tmp_path / "none_*.h5")}, "output": {"location": ""}}
    config = edit_config(small_demo.config, changes, tmp_path / "c.ini")
    assert_clean_error(run_cli("status", config), "none_*.h5: [dataset] location matches no file")
