"""Bad input: one clear line naming file and problem, no traceback, good files still done."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from .conftest import copy_dataset, edit_config, last_json, run_cli

pytestmark = pytest.mark.service


def config_with(small_demo, tmp_path, **sections):
    changes = {"output": {"location": str(tmp_path / "out")}}
    for name, values in sections.items():
        changes.setdefault(name.replace("_", " "), {}).update(values)
    return edit_config(small_demo.config, changes, tmp_path / "c.ini")


def assert_clean_error(result, *fragments, code=None):
    assert result.returncode != 0
    if code is not None:
        assert result.returncode == code
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if "error" in line or "failed:" in line]
    assert any(all(f in line for f in fragments) for line in lines), result.stderr[-2000:]


def test_glob_that_matches_nothing(small_demo, tmp_path):
    config = config_with(small_demo, tmp_path, dataset={"location": f"{tmp_path}/none_*.h5"})
    assert_clean_error(run_cli("run", config), "none_*.h5", "matches no file", code=2)


def test_missing_poni(small_demo, tmp_path):
    config = config_with(
        small_demo, tmp_path, azimuthal_integration={"poni_file": str(tmp_path / "gone.poni")}
    )
    assert_clean_error(run_cli("run", config), "gone.poni", "PONI file not found", code=2)


def test_unknown_radial_unit(small_demo, tmp_path):
    """Config parsing only checks the unit's form; pyFAI's list is checked while planning."""
    config = config_with(small_demo, tmp_path, azimuthal_integration={"unit": "furlongs"})
    assert_clean_error(
        run_cli("run", config), "[azimuthal integration] unit = 'furlongs'", "radial unit", code=2
    )


def test_mask_of_wrong_shape(small_demo, tmp_path):
    import fabio

    mask = tmp_path / "small_mask.edf"
    fabio.edfimage.EdfImage(data=np.zeros((10, 10), np.int8)).write(str(mask))
    config = config_with(small_demo, tmp_path, azimuthal_integration={"mask_file": str(mask)})
    assert_clean_error(run_cli("run", config), "small_mask.edf", "mask shape (10, 10)", code=2)


def test_a_mistake_found_while_the_workers_start_leaves_no_trace(small_demo, tmp_path):
    """Broker and workers start while the job is planned; a mistake found then (a PONI that
    is not there) stops them, and the folders they created are removed."""
    config = config_with(
        small_demo,
        tmp_path,
        output={"location": str(tmp_path / "new" / "out")},
        azimuthal_integration={"poni_file": str(tmp_path / "gone.poni")},
    )
    assert_clean_error(run_cli("run", config), "gone.poni", "PONI file not found", code=2)
    assert not (tmp_path / "new").exists()


def test_not_hdf5_file_among_good_ones(small_demo, tmp_path):
    bad = tmp_path / "notes.h5"
    bad.write_text("this is not HDF5")
    config = config_with(small_demo, tmp_path, dataset={"location": f"{small_demo.dataset}, {bad}"})
    result = run_cli("run", config, "--json")
    assert_clean_error(result, "notes.h5", "not an HDF5 file", code=1)
    summary = last_json(result.stdout)
    assert len(summary["outputs"]) == 2 and summary["files_done"] == 4
    assert [f["file"] for f in summary["files_failed"]] == [str(bad)]


def test_detector_absent_from_an_entry(small_demo, tmp_path):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as h5:
        h5.create_group("1.1/measurement/eiger")
        h5["1.1/measurement/mon"] = np.ones(3)
    config = config_with(
        small_demo, tmp_path, dataset={"location": f"{small_demo.dataset}, {other}"}
    )
    result = run_cli("run", config, "--json")
    assert_clean_error(result, "other.h5", "detector 'pilatus' not found in entry 1.1", code=1)
    assert len(last_json(result.stdout)["outputs"]) == 2


def test_unwritable_output_folder(small_demo, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")  # a folder cannot be created below a file, even by root
    config = config_with(small_demo, tmp_path, output={"location": str(blocker / "out")})
    assert_clean_error(run_cli("run", config), str(blocker), "cannot create folder")
    assert not (blocker.parent / "out").exists()


def test_truncated_lima_file_fails_alone(small_demo, tmp_path):
    master = copy_dataset(small_demo, tmp_path)
    victim = master.parent / "scan0002" / "pilatus_0001.h5"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    config = config_with(small_demo, tmp_path, dataset={"location": str(master)})
    result = run_cli("run", config, "--json")
    assert_clean_error(result, "pilatus_0001.h5", code=1)
    summary = last_json(result.stdout)
    assert len(summary["outputs"]) == 1 and "scan0001" in summary["outputs"][0]
    assert [f["file"] for f in summary["files_failed"]] == [str(victim)]
    assert not list((tmp_path / "out").rglob("*scan0002*.h5"))


def test_requeue_and_status_of_unknown_jobs(small_demo, tmp_path):
    """On the embedded default: a job id never run there, a workspace with no job, and a
    requeue with nothing selected each get one line and a non-zero exit."""
    config = config_with(small_demo, tmp_path)
    assert_clean_error(run_cli("status", config), "no job recorded", code=1)
    assert_clean_error(
        run_cli("requeue", config, "nosuchjob", "--failed"), "job nosuchjob: unknown", code=1
    )
    assert_clean_error(run_cli("requeue", config, "nosuchjob"), "nothing selected", code=2)


def test_a_poni_that_cannot_be_right(small_demo, tmp_path):
    """A NaN distance would integrate every frame into empty bins: refused before any work."""
    poni = tmp_path / "nan.poni"
    with open(small_demo.poni) as fh:
        lines = fh.read().splitlines()
    poni.write_text(
        "\n".join("Distance: nan" if ln.startswith("Distance:") else ln for ln in lines)
    )
    config = config_with(small_demo, tmp_path, azimuthal_integration={"poni_file": str(poni)})
    assert_clean_error(run_cli("run", config), "nan.poni", "Distance: nan", "finite", code=2)
    assert not (tmp_path / "out").exists()


def test_a_sensor_thickness_that_cannot_be_right(small_demo, tmp_path):
    config = config_with(
        small_demo,
        tmp_path,
        azimuthal_integration={"sensor_thickness_cm": "nan", "correct_detector_attenuation": "1"},
    )
    assert_clean_error(run_cli("run", config), "sensor_thickness_cm = 'nan'", "finite", code=2)


def test_a_monitor_that_is_zero_for_some_frames(small_demo, tmp_path):
    """Dividing by 0 would write infinities: that scan fails, named; the other is written."""
    master = copy_dataset(small_demo, tmp_path)
    with h5py.File(master, "a") as h5:
        mon = h5["2.1/measurement/mon"]
        values = mon[()]
        values[2] = 0
        mon[...] = values
    config = config_with(small_demo, tmp_path, dataset={"location": str(master)})
    result = run_cli("run", config)
    assert_clean_error(result, "2.1/measurement/mon", "monitor value 0.0 at frame 2", code=1)
    written = [p.name for p in (tmp_path / "out").rglob("*.h5")]
    assert written == ["azint_sample_0001_scan0001_pilatus.h5"], written


def test_a_key_in_the_wrong_section_stops_before_any_work(small_demo, tmp_path):
    config = config_with(small_demo, tmp_path, dataset={"dark_file": small_demo.mask})
    assert_clean_error(
        run_cli("run", config), "[dataset] dark_file", "belongs in [azimuthal integration]", code=2
    )


def test_a_mask_in_its_older_section_is_moved_not_dropped(small_demo, tmp_path):
    """The integrator still reads [dataset] mask_file: the job runs with the mask."""
    import configparser

    config = config_with(small_demo, tmp_path)
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str
    parser.read(config)
    mask = parser.get("azimuthal integration", "mask_file")
    parser.remove_option("azimuthal integration", "mask_file")
    parser.set("dataset", "mask_file", mask)
    with open(config, "w") as fh:
        parser.write(fh)
    result = run_cli("run", config, "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "deprecated: [dataset] mask_file belongs in [azimuthal integration]" in result.stderr
    (output, *_) = sorted(last_json(result.stdout)["outputs"])
    with h5py.File(output) as h5:
        text = h5["1.1/reduction/input/configuration"][()].decode()
    assert f"mask_file = {mask}" in text
