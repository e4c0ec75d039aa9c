"""What a scan's output holds besides its rows, and the files and folders around it.

The method (``reduction/note``) and ``reduction/input/radial_range`` from the partials'
provenance; ``average_xy`` in the NeXus file and as .xye text beside it, as ESRF's integrator
writes them; ``[output] file_mode`` on the files and on the folders ringflow creates. Real
partials and real assemblies (``assemble_scan.run``, the chord callback's own body); the
folder modes once more as an unprivileged user, since root ignores permission bits, and once
through the real CLI.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest

from tasks.assemble import finish_folders
from tasks.config import Config
from tasks.errors import OutputError
from tasks.jobs import JobPlan, scan_folders
from tasks.partials import read_header, write_partial
from tasks.writers import (
    Average,
    ScanResult,
    average_text_paths,
    make_dirs,
    process_umask,
    write_average_text,
)

from .conftest import ROOT, edit_config, last_json, run_cli
from .test_assemble import assemble_partials, make_partials, provenance, run_assembly

NOBODY = 65534


def mode_of(path) -> int:
    return os.stat(path).st_mode & 0o777


def reduced(stack: np.ndarray, kind: str) -> np.ndarray:
    """numpy's own nanmean / nanmedian over the frames of a stored stack."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return (np.nanmean if kind == "mean" else np.nanmedian)(stack, axis=0)


def as_printed(values: np.ndarray) -> np.ndarray:
    """``values`` as "%.5f" text reads back."""
    return np.array([float(f"{v:.5f}") for v in np.ravel(values)]).reshape(np.shape(values))


# --- the method and the radial range ---------------------------------------------------------


def test_method_and_radial_range_are_those_the_partials_carried(tmp_path):
    parts = make_partials(tmp_path, [4, 3])
    method = "no/csr/opencl on Portable Computing Language: cpu-haswell-AMD EPYC"
    parts = [
        replace(p, provenance=provenance(method) | {"radial_range": [1.5, 42.25]}) for p in parts
    ]
    out = run_assembly(tmp_path, parts, {})
    with h5py.File(out) as h5:
        process = h5["entry_0000/reduction"]
        assert process.attrs["NX_class"] == "NXprocess"
        assert process["note"][()].decode() == method
        radial_range = process["input/radial_range"]
        assert radial_range.dtype == np.float64 and radial_range[()].tolist() == [1.5, 42.25]
        assert radial_range.attrs["units"] == "1/nm"  # as the radial axis's own
        assert h5["entry_0000/integrated/radial_axis"].attrs["units"] == "1/nm"


def test_files_integrated_by_different_methods_name_each(tmp_path):
    methods = ["no/csr/opencl on NVIDIA H200", "no/csr/opencl on NVIDIA H200", "no/csr/cython"]
    parts = make_partials(tmp_path, [2, 2, 2])
    parts = [replace(p, provenance=provenance(m)) for p, m in zip(parts, methods, strict=True)]
    with h5py.File(run_assembly(tmp_path, parts, {})) as h5:
        assert h5["entry_0000/reduction/note"][()].decode() == (
            "no/csr/opencl on NVIDIA H200; no/csr/cython"
        )


@pytest.mark.parametrize("missing", ["method", "radial_range", "geometry", "pyFAI"])
def test_partial_without_provenance_is_an_error_naming_it(tmp_path, missing):
    parts = make_partials(tmp_path, [3, 3])
    keys = {k: v for k, v in provenance().items() if k != missing}
    parts[1] = replace(parts[1], provenance=keys)
    outcome, out = assemble_partials(tmp_path, parts, {})
    assert outcome["status"] == "failed" and not os.path.exists(out)
    partial = str(tmp_path / "partials" / "0001.h5")
    assert f"{partial}: partial result without {missing} in its" in outcome["message"]
    assert os.path.exists(partial)  # kept for a requeue


def test_partial_of_an_older_ringflow_without_provenance_is_named(tmp_path):
    (part,) = make_partials(tmp_path, [2])
    path = str(tmp_path / "old.h5")
    write_partial(path, part)
    with h5py.File(path, "a") as h5:
        del h5.attrs["provenance"]  # as ringflow wrote them before provenance
    with pytest.raises(OutputError, match=f"^{path}: partial result without geometry, pyFAI"):
        read_header(path)


# --- average_xy -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mean", "median"])
@pytest.mark.parametrize("cake", [False, True], ids=["1d", "cake"])
def test_average_xy_is_numpys_over_the_stack_and_its_xye_files(tmp_path, kind, cake):
    parts = make_partials(tmp_path, [4, 3, 5], cake=cake, seed=3)
    out = run_assembly(tmp_path, parts, {}, {"average_xy": kind})
    with h5py.File(out) as h5:
        stack, average = h5["entry_0000/integrated"], h5[f"entry_0000/reduction/integrated_{kind}"]
        radial = stack["radial_axis"][()]
        for name in ("I", "I_errors"):
            expected = reduced(stack[name][()], kind)
            np.testing.assert_array_equal(average[name][()], expected)
        assert average.attrs["signal"] == "I"
        np.testing.assert_array_equal(average["radial_axis"][()], radial)
        intensity, errors = average["I"][()], average["I_errors"][()]
    slices = 36 if cake else 1
    paths = average_text_paths(out, slices)
    folder = tmp_path / "out"
    if cake:
        assert [os.path.basename(p) for p in paths[:2]] == ["azint01_scan.xye", "azint02_scan.xye"]
        assert os.path.basename(paths[-1]) == "azint36_scan.xye"
    else:
        assert paths == [str(folder / "azint_scan.xye")]
    assert sorted(os.listdir(folder)) == sorted(["azint_scan.h5", *map(os.path.basename, paths)])
    for k, path in enumerate(paths):
        text = np.loadtxt(path)
        assert text.shape == (len(radial), 3)
        np.testing.assert_array_equal(text[:, 0], as_printed(radial))
        np.testing.assert_array_equal(text[:, 1], as_printed(intensity.reshape(slices, -1)[k]))
        np.testing.assert_array_equal(text[:, 2], as_printed(errors.reshape(slices, -1)[k]))
        first = Path(path).read_text().splitlines()[0]
        assert not first.startswith("#") and len(first.split()) == 3  # no header, as integrator


def test_average_xy_without_errors_has_two_columns(tmp_path):
    parts = [replace(p, sigma=None) for p in make_partials(tmp_path, [3, 4], seed=5)]
    out = run_assembly(tmp_path, parts, {}, {"average_xy": "median", "error_model": ""})
    with h5py.File(out) as h5:
        assert "I_errors" not in h5["entry_0000/integrated"]
        average = h5["entry_0000/reduction/integrated_median"]
        assert "I_errors" not in average
        expected = reduced(h5["entry_0000/integrated/I"][()], "median")
        np.testing.assert_array_equal(average["I"][()], expected)
        radial = average["radial_axis"][()]
    text = np.loadtxt(tmp_path / "out" / "azint_scan.xye")
    assert text.shape == (len(radial), 2)
    np.testing.assert_array_equal(text[:, 0], as_printed(radial))
    np.testing.assert_array_equal(text[:, 1], as_printed(expected))


def small_result(average: Average, azimuthal=None) -> ScanResult:
    return ScanResult(
        entry="e",
        intensity=None,
        sigma=None,
        radial=np.linspace(1, 2, average.intensity.shape[-1]),
        unit="q_nm^-1",
        azimuthal=azimuthal,
        source_file=[],
        source_frame=np.arange(0),
        normalization=None,
        configuration="",
        geometry={},
        versions={},
        method="",
        radial_range=(1.0, 2.0),
        fingerprint="",
        metadata={},
        average=average,
    )


def test_text_file_failing_leaves_no_temporary_and_no_half_file(tmp_path):
    output = str(tmp_path / "azint_x_scan0001_pilatus.h5")
    blocked = tmp_path / "azint_x_scan0001_pilatus.xye"
    blocked.mkdir()  # a file cannot replace a folder: the rename fails
    result = small_result(Average("mean", np.ones(5, np.float32), None))
    with pytest.raises(OutputError, match="azint_x_scan0001_pilatus.xye: cannot be written"):
        write_average_text(output, result, 0o644)
    assert os.listdir(tmp_path) == [blocked.name] and blocked.is_dir()
    blocked.rmdir()
    (path,) = write_average_text(output, result, 0o640)
    assert path == str(blocked) and mode_of(path) == 0o640
    assert os.listdir(tmp_path) == [blocked.name]


def test_cake_slices_are_numbered_in_the_file_name_only(tmp_path):
    output = "/data/azint_study/PROCESSED_DATA/s/azint_s_0001_scan0002_eiger.h5"
    assert average_text_paths(output, 1) == [output[:-3] + ".xye"]
    assert average_text_paths(output, 12)[11] == (
        "/data/azint_study/PROCESSED_DATA/s/azint12_s_0001_scan0002_eiger.xye"
    )


# --- file_mode --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "umask"),
    [(0o750, 0o022), (0o555, 0o022), (0o077, 0o022), (0o000, 0o022), (0o755, 0o077)],
    ids=lambda m: f"{m:03o}",
)
def test_output_and_text_files_get_file_mode_within_the_umask(tmp_path, mode, umask):
    config = {"file_mode": format(mode, "03o")}
    parts = make_partials(tmp_path, [2, 2], cake=True)
    previous = os.umask(umask)
    try:
        out = run_assembly(tmp_path, parts, config, {"average_xy": "mean"})
    finally:
        os.umask(previous)
    files = [out, *average_text_paths(out, 36)]
    assert [mode_of(path) for path in files] == [mode & ~umask] * len(files)
    assert sorted(os.listdir(tmp_path / "out")) == sorted(map(os.path.basename, files))


def test_make_dirs_keeps_the_owner_writing_and_never_touches_existing_folders(tmp_path):
    existing = tmp_path / "PROCESSED_DATA"
    existing.mkdir()
    existing.chmod(0o751)
    leaf = existing / "sample" / "sample_0001"
    created = make_dirs(str(leaf), 0o055)
    assert created == [str(existing / "sample"), str(leaf)]
    assert [mode_of(p) for p in created] == [0o755, 0o755]  # 0o055 | owner rwx while in use
    assert mode_of(existing) == 0o751
    assert make_dirs(str(leaf), 0o055) == []  # already there: not ours this time
    previous = os.umask(0o077)  # file_mode never gives more than the umask allows
    try:
        assert mode_of(make_dirs(str(tmp_path / "other"), 0o750)[0]) == 0o700
    finally:
        os.umask(previous)


def test_scan_folders_are_the_created_ones_holding_the_output_but_the_workspace(tmp_path):
    mapping = {"dataset": {"location": "x.h5"}, "azimuthal integration": {"poni_file": "p"}}
    config = Config.from_mapping(mapping)
    root = str(tmp_path / "out")
    plan = JobPlan("j", config, f"{root}/.ringflow")
    plan.created = [root, f"{root}/a", f"{root}/a/a_0001", f"{root}/ab", f"{root}/b"]
    assert scan_folders(plan, f"{root}/a/a_0001/azint_a_scan0001.h5") == [
        f"{root}/a/a_0001",
        f"{root}/a",
    ]  # not "out", above the workspace; not "ab", a neighbour with the same start
    assert scan_folders(plan, f"{root}/b/azint_b.h5") == [f"{root}/b"]


def registry_of(folders: dict[str, list[str]]) -> dict[str, dict]:
    """A job's scan entries as the registry holds them: scan key -> {"folders": [...]}."""
    return {scan: {"scan": {}, "callback": "", "folders": f} for scan, f in folders.items()}


def test_folders_get_file_mode_when_their_last_scan_finishes(tmp_path):
    parent = tmp_path / "sample"
    shared, alone = parent / "sample_0001", parent / "sample_0002"
    for folder in (shared, alone):
        make_dirs(str(folder), 0o550)
    scans = registry_of(
        {
            "1.1": [str(shared), str(parent)],
            "2.1": [str(shared), str(parent)],
            "3.1": [str(alone), str(parent)],
        }
    )
    scans["1.1"]["finished"] = True
    assert finish_folders(scans, "1.1", 0o550) == []  # 2.1 still writes into sample_0001
    scans["2.1"]["finished"] = True
    assert finish_folders(scans, "2.1", 0o550) == [str(shared)]  # 3.1 still in sample/
    assert [mode_of(p) for p in (shared, alone, parent)] == [0o550, 0o750, 0o750]
    scans["3.1"]["finished"] = True
    assert finish_folders(scans, "3.1", 0o550) == [str(alone), str(parent)]
    assert [mode_of(p) for p in (shared, alone, parent)] == [0o550] * 3
    assert finish_folders(scans, "2.1", 0o550) == [str(shared), str(parent)]  # again: no harm
    for folder in (shared, alone, parent):
        folder.chmod(0o755)


def two_scans_into_one_new_folder(base: str, mode: int) -> None:
    """Two scans assembled one after the other into a folder created with ``mode``, each
    finishing as its assembly does; after that, a later job cannot write there."""
    folder = os.path.join(base, "PROCESSED_DATA", "sample")
    created = make_dirs(folder, mode)
    scans = registry_of({key: created[::-1] for key in ("1.1", "2.1")})
    for key in scans:
        work = Path(base, "work", key)
        work.mkdir(parents=True)
        output = {"file_mode": format(mode, "03o")}
        out = os.path.join(folder, f"azint_sample_{key}.h5")
        outcome, _ = assemble_partials(
            work, make_partials(work, [2, 3]), output, {"average_xy": "mean"}, out
        )
        assert outcome["status"] == "done", outcome
        scans[key]["finished"] = True
        finish_folders(scans, key, mode)
    with pytest.raises(OutputError, match="not writable|cannot create folder"):
        make_dirs(folder, mode)  # the folder existed, ringflow leaves its mode alone


def opened_modes(base: str) -> dict[str, int]:
    """Relative path -> mode of everything below ``base``, each folder opened (owner rwx
    added) once its own mode is read, so that even 0o000 folders can be looked into."""
    modes = {}
    for root, dirs, files in os.walk(base):
        for name in dirs + files:
            path = os.path.join(root, name)
            modes[os.path.relpath(path, base)] = mode_of(path)
            if name in dirs:
                os.chmod(path, 0o755)
    return modes


def in_unprivileged_process(fn, base: str, *args) -> None:
    """``fn(base, *args)`` as "nobody" when the tests run as root: root ignores permission
    bits, so a folder's mode would prove nothing. Here directly otherwise.

    In a fresh Python process, not a fork of this one: the test process may have run pyFAI's
    OpenMP code or hold h5py's lock, and a forked child of it can hang forever. That process
    first runs ``fn`` as root in a scratch folder, which imports every module it needs, then
    becomes "nobody" (who cannot read root's interpreter) and runs it in ``base``.
    """
    if os.geteuid() != 0:
        fn(base, *args)
        return
    scratch = tempfile.mkdtemp(prefix="ringflow-warm-")
    code = (
        "import os, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        f"from tests.{Path(__file__).stem} import {fn.__name__} as fn\n"
        "try:\n"  # as root its permission checks cannot hold: only the imports count
        f"    fn({scratch!r}, *{args!r})\n"
        "except BaseException:\n    pass\n"
        f"os.setgid({NOBODY})\nos.setuid({NOBODY})\n"
        f"fn({base!r}, *{args!r})\n"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("mode", [0o555, 0o077, 0o000], ids=lambda m: f"{m:03o}")
def test_two_scans_into_one_new_folder_with_a_mode_that_forbids_writing(mode):
    base = tempfile.mkdtemp(prefix="ringflow-mode-")  # reachable by "nobody", unlike tmp_path
    try:
        os.chmod(base, 0o755)
        if os.geteuid() == 0:
            os.chown(base, NOBODY, NOBODY)
        in_unprivileged_process(two_scans_into_one_new_folder, base, mode)
        modes = opened_modes(base)
    finally:
        opened_modes(base)
        shutil.rmtree(base)
    names = ["PROCESSED_DATA", "PROCESSED_DATA/sample"]
    for key in ("1.1", "2.1"):
        names += [f"PROCESSED_DATA/sample/azint_sample_{key}.{ext}" for ext in ("h5", "xye")]
    expected = mode & ~process_umask()  # file_mode within the umask
    assert {name: modes.get(name) for name in names} == dict.fromkeys(names, expected)
    assert len([n for n in modes if n.startswith("PROCESSED_DATA")]) == 6  # no temporaries


# --- through the real CLI ---------------------------------------------------------------------


@pytest.mark.service
def test_run_with_file_mode_and_average_xy(small_demo, tmp_path):
    """Both scans of the demo go into one new folder with mode 555: both are written, every
    file and created folder ends with exactly 555, the pre-existing location keeps its own."""
    location = tmp_path / "out"
    location.mkdir()
    location.chmod(0o751)
    config = edit_config(
        small_demo.config,
        {
            "output": {"location": str(location), "file_mode": "555"},
            "azimuthal integration": {"average_xy": "mean"},
        },
        tmp_path / "c.ini",
    )
    result = run_cli("run", config, "--json", timeout=120)
    try:
        assert result.returncode == 0, result.stderr[-3000:]
        outputs = sorted(last_json(result.stdout)["outputs"])
        assert len(outputs) == 2 and len({os.path.dirname(p) for p in outputs}) == 1
        folder = Path(outputs[0]).parent
        assert folder == location / "sample" / "sample_0001"
        texts = [p[:-3] + ".xye" for p in outputs]
        assert [mode_of(p) for p in [*outputs, *texts, folder, folder.parent]] == [0o555] * 6
        assert mode_of(location) == 0o751
        for output, entry, text in zip(outputs, ("1.1", "2.1"), texts, strict=True):
            with h5py.File(output) as h5:
                process = h5[f"{entry}/reduction"]
                assert "bbox" in process["note"][()].decode()
                low, high = process["input/radial_range"][()]
                assert process["input/radial_range"].attrs["units"] == "deg" and 0 <= low < high
                stack = h5[f"{entry}/integrated"]
                average = h5[f"{entry}/reduction/integrated_mean"]
                for name in ("I", "I_errors"):
                    expected = reduced(stack[name][()], "mean")
                    np.testing.assert_array_equal(average[name][()], expected)
                columns = np.loadtxt(text)
                np.testing.assert_array_equal(columns[:, 0], as_printed(stack["radial_axis"][()]))
                np.testing.assert_array_equal(columns[:, 2], as_printed(average["I_errors"][()]))
    finally:
        for path in (location / "sample", location / "sample" / "sample_0001"):
            if path.exists():
                path.chmod(0o755)


def test_partials_are_their_owners_only_whatever_the_umask(tmp_path):
    (part,) = make_partials(tmp_path, [3])
    previous = os.umask(0o000)
    try:
        write_partial(str(tmp_path / "partials" / "p.h5"), part)
    finally:
        os.umask(previous)
    assert mode_of(tmp_path / "partials" / "p.h5") == 0o600
