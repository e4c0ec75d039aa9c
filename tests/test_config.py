"""Configuration: integrator files parse unchanged; every invalid value gets a precise error."""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path

import pytest

from tasks.config import SECTIONS, Config, template
from tasks.errors import ConfigError

from .conftest import run_cli

INTEGRATOR_FILE = """\
[dataset]
location = {root}/RAW_DATA/*/*/*.h5, {root}/other.h5
hdf5_entry = 2.1
layout = ID11

[azimuthal integration]
n_pts = 3000
unit = q_A^-1
detector = eiger2_cdte_4m
detector_name = eiger
detector_suffix = raw_frame
mask_file = mask.edf
flatfield_file = flat.edf
dark_file = /abs/dark.edf
poni_file = calib.poni
error_model = poisson
azimuthal_range = (-90., 90., 36)
radial_range = (0.5, 30)
ai_method = opencl
polarization_factor = 0.95
correct_solid_angle = 0
correct_detector_attenuation = yes
average_xy = median
pixel_splitting = full
trim_method =
trim_n_pts = 0
trim_bounds =

[computations distribution]
partition = gpu-long
n_workers = 2
ai_engines_per_worker = 6
cores_per_worker = 3
time = 02:30:00
memory_per_worker = 64GB
python_executables = /opt/venv/bin/python
workspace_path = /scratch/ringflow

[output]
location = out
existing_output = skip
repack_output = 1
partial_files_subfolder = partials
file_mode = 775
try_metadata = samy, mon

[pipeline]
verbosity = 3
"""


def write(tmp_path, text):
    path = tmp_path / "conf.ini"
    path.write_text(text)
    return path


def test_integrator_file_parses_with_same_meaning(tmp_path):
    config = Config.from_file(write(tmp_path, INTEGRATOR_FILE.format(root=tmp_path)))
    ds, ai, comp, out = config.dataset, config.integration, config.computations, config.output
    assert ds.location == (f"{tmp_path}/RAW_DATA/*/*/*.h5", f"{tmp_path}/other.h5")
    assert (ds.hdf5_entry, ds.layout) == ("2.1", "ID11")
    assert (ai.n_pts, ai.unit, ai.detector, ai.detector_name) == (
        3000,
        "q_A^-1",
        "eiger2_cdte_4m",
        "eiger",
    )
    assert ai.detector_suffix == "raw_frame"
    assert ai.mask_file == str(tmp_path / "mask.edf")  # relative to the config file
    assert ai.dark_file == "/abs/dark.edf"
    assert ai.azimuthal_range == (-90.0, 90.0, 36) and ai.n_slices == 36
    assert ai.radial_range == (0.5, 30.0)
    assert ai.polarization_factor == 0.95
    assert ai.correct_solid_angle is False and ai.correct_detector_attenuation is True
    assert ai.method == ("full", "csr", "opencl")
    assert (ai.error_model, ai.average_xy) == ("poisson", "median")
    assert (comp.partition, comp.n_workers, comp.ai_engines_per_worker) == ("gpu-long", 2, 6)
    assert (comp.cores_per_worker, comp.time, comp.memory_per_worker) == (3, "02:30:00", "64GB")
    assert comp.workspace_path == "/scratch/ringflow"
    assert out.location == str(tmp_path / "out")
    assert (out.existing_output, out.file_mode, out.try_metadata) == (
        "skip",
        0o775,
        ("samy", "mon"),
    )
    assert config.pipeline.verbosity == 3
    assert config.queue.broker_url == ""  # embedded Redis by default
    assert config.warnings == ()


def test_defaults_are_the_integrators(tmp_path):
    config = Config.from_file(
        write(tmp_path, "[dataset]\nlocation = a.h5\n[azimuthal integration]\nponi_file = p.poni\n")
    )
    ai = config.integration
    assert (ai.n_pts, ai.unit, ai.error_model, ai.ai_method) == (2500, "r_mm", "hybrid", "opencl")
    assert ai.azimuthal_range == (-180.0, 180.0, 1) and ai.radial_range is None
    assert ai.polarization_factor == 0.99 and ai.pixel_splitting == "no"
    assert config.computations.n_workers == 4 and config.computations.ai_engines_per_worker == 8
    assert config.output.existing_output == "reprocess_if_conffile_more_recent"


def test_mapping_round_trip(tmp_path):
    config = Config.from_file(write(tmp_path, INTEGRATOR_FILE.format(root=tmp_path)))
    again = Config.from_mapping(config.as_mapping(), source=config.source)
    assert again == config


def test_unknown_keys_warn_by_name(tmp_path):
    text = (
        "[dataset]\nlocation = a.h5\nbogus_key = 1\n[azimuthal integration]\n"
        "poni_file = p.poni\n[mystery]\nx = 1\n"
    )
    config = Config.from_file(write(tmp_path, text))
    assert any("bogus_key" in w and "[dataset]" in w for w in config.warnings)
    assert any("[mystery]" in w for w in config.warnings)


BASE = "[dataset]\nlocation = a.h5\n[azimuthal integration]\nponi_file = p.poni\n"


@pytest.mark.parametrize(
    "section, key, value, reason",
    [
        ("azimuthal integration", "n_pts", "many", "integer"),
        ("azimuthal integration", "n_pts", "0", ">= 1"),
        ("azimuthal integration", "unit", "q nm^-1", "radial unit"),
        ("azimuthal integration", "error_model", "gaussian", "allowed values"),
        ("azimuthal integration", "azimuthal_range", "(10, -10, 1)", "min < max"),
        ("azimuthal integration", "azimuthal_range", "(-180, 180, 2.5)", "positive integer"),
        ("azimuthal integration", "radial_range", "(1, 2, 3)", "(min, max)"),
        ("azimuthal integration", "radial_range", "(a, b)", "numbers"),
        ("azimuthal integration", "ai_method", "cuda", "allowed values"),
        ("azimuthal integration", "pixel_splitting", "diagonal", "allowed values"),
        ("azimuthal integration", "polarization_factor", "2", "between -1 and 1"),
        ("azimuthal integration", "correct_solid_angle", "maybe", "0/1"),
        ("azimuthal integration", "average_xy", "mode", "allowed values"),
        ("azimuthal integration", "trim_method", "mean", "allowed values"),
        ("azimuthal integration", "sensor_thickness_cm", "nan", "finite"),
        ("azimuthal integration", "sensor_thickness_cm", "0", "> 0"),
        ("azimuthal integration", "polarization_factor", "inf", "finite"),
        ("azimuthal integration", "radial_range", "(0, nan)", "finite"),
        ("azimuthal integration", "n_pts", "1000 ; bins", "integer"),
        ("dataset", "hdf5_entry", "scan1", "entry name"),
        ("dataset", "layout", "ID99", "allowed values"),
        ("computations distribution", "n_workers", "-1", ">= 1"),
        ("computations distribution", "time", "forever", "SLURM time"),
        ("computations distribution", "memory_per_worker", "lots", "size"),
        ("output", "existing_output", "append", "allowed values"),
        ("output", "file_mode", "999", "octal"),
        ("output", "repack_output", "0", "self-contained"),
        ("queue", "broker_url", "amqp://host", "redis://"),
        ("queue", "queue_prefix", "a b", "letters"),
    ],
)
def test_invalid_values_name_section_key_and_value(tmp_path, section, key, value, reason):
    sections = {"dataset": {"location": "a.h5"}, "azimuthal integration": {"poni_file": "p.poni"}}
    sections.setdefault(section, {})[key] = value
    text = "".join(
        f"[{name}]\n" + "".join(f"{k} = {v}\n" for k, v in values.items())
        for name, values in sections.items()
    )
    with pytest.raises(ConfigError) as info:
        Config.from_file(write(tmp_path, text))
    message = str(info.value)
    assert f"[{section}] {key}" in message and value in message and reason in message


def test_missing_required_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"\[dataset\] location.*required"):
        Config.from_file(write(tmp_path, "[azimuthal integration]\nponi_file = p.poni\n"))
    with pytest.raises(ConfigError, match=r"\[azimuthal integration\] poni_file.*required"):
        Config.from_file(write(tmp_path, "[dataset]\nlocation = a.h5\n"))


def test_environment_overrides_broker_url(tmp_path, monkeypatch):
    monkeypatch.setenv("RINGFLOW_BROKER_URL", "redis://:s3cret@10.0.0.1:6379/2")
    config = Config.from_file(write(tmp_path, BASE + "[queue]\nbroker_url = redis://other\n"))
    assert config.queue.broker_url == "redis://:s3cret@10.0.0.1:6379/2"
    assert "s3cret" not in config.as_ini()


def test_template_lists_every_key_and_parses(tmp_path):
    text = template("/data/*.h5")
    for section, keys in (
        Config.from_mapping(
            {"dataset": {"location": "x"}, "azimuthal integration": {"poni_file": "p"}}
        )
        .as_mapping()
        .items()
    ):
        assert f"[{section}]" in text
        for key in keys:
            assert f"\n{key} = " in text
    path = write(tmp_path, text.replace("poni_file = \n", "poni_file = p.poni\n"))
    config = Config.from_file(path)
    assert config.dataset.location == ("/data/*.h5",) and config.warnings == ()


def test_cli_config_writes_template_and_refuses_overwrite(tmp_path):
    target = tmp_path / "new.ini"
    result = run_cli("config", target, "--dataset", "/data/x.h5")
    assert result.returncode == 0 and "location = /data/x.h5" in target.read_text()
    again = run_cli("config", target)
    assert again.returncode == 2 and "exists" in again.stderr


def test_cli_invalid_value_is_one_line_exit_2(tmp_path):
    path = write(tmp_path, BASE + "n_pts = -5\n")
    result = run_cli("run", path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert any("n_pts" in line and "-5" in line for line in lines)


TEMPLATE = Path(__file__).parent / "data" / "integrator-2026.1.2-nocomments.conf"


def filled_template(tmp_path: Path, changes: dict[str, dict[str, str]] | None = None) -> Path:
    """The integrator's generated template (``integrator-config --nocomments``), with only the
    values a user must fill in set, each by editing its line in place."""
    user = {
        "dataset": {"location": str(tmp_path / "sample_0001.h5")},
        "azimuthal integration": {
            "detector": "Pilatus1M",
            "detector_name": "pilatus",
            "mask_file": str(tmp_path / "mask.edf"),
            "poni_file": str(tmp_path / "calib.poni"),
        },
        "output": {"location": str(tmp_path / "out")},
    }
    for section, values in (changes or {}).items():
        user.setdefault(section, {}).update(values)
    lines, section = [], ""
    for line in TEMPLATE.read_text().splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        key = line.split("=", 1)[0].strip()
        if "=" in line and key in user.get(section, {}):
            line = f"{key} = {user[section][key]}"
        lines.append(line)
    path = tmp_path / "integrator.conf"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_integrators_template_parses_with_its_meaning(tmp_path):
    config = Config.from_file(filled_template(tmp_path))
    assert config.warnings == ()
    ai, comp = config.integration, config.computations
    assert (ai.trim_method, ai.trim_n_pts, ai.trim_bounds) == ("", 0, ())
    assert ai.radial_range is None and ai.unit == "r_mm" and ai.n_pts == 2500
    assert (ai.error_model, ai.ai_method, ai.pixel_splitting) == ("hybrid", "opencl", "no")
    assert ai.azimuthal_range == (-180.0, 180.0, 1) and ai.polarization_factor == 0.99
    assert ai.correct_detector_attenuation and ai.correct_solid_angle and not ai.average_xy
    assert ai.detector_suffix == "" and ai.dark_file == "" and ai.flatfield_file == ""
    assert (comp.n_workers, comp.ai_engines_per_worker, comp.cores_per_worker) == (4, 8, 4)
    assert comp.python_executables.startswith("/cvmfs/")  # kept for SLURM jobs only
    assert config.output.file_mode == 0o755 and config.output.try_metadata == ()


def test_empty_values_mean_not_set(tmp_path):
    """Every key left empty takes its default (error_model and polarization_factor: None)."""
    empty = {name: {f.metadata["key"]: "" for f in fields(cls)} for name, cls in SECTIONS.items()}
    empty["dataset"]["location"] = "a.h5"
    empty["azimuthal integration"]["poni_file"] = "p.poni"
    config = Config.from_mapping(empty, source=str(tmp_path / "c.ini"))
    defaults = Config.from_mapping(
        {"dataset": {"location": "a.h5"}, "azimuthal integration": {"poni_file": "p.poni"}},
        source=str(tmp_path / "c.ini"),
    )
    ai = config.integration
    assert (ai.error_model, ai.polarization_factor) == ("", None)
    changed = replace(ai, error_model="hybrid", polarization_factor=0.99)
    assert changed == defaults.integration
    for attr in ("dataset", "computations", "output", "pipeline", "queue", "monitoring"):
        assert getattr(config, attr) == getattr(defaults, attr), attr


def test_required_keys_left_empty_are_named(tmp_path):
    path = filled_template(tmp_path, {"azimuthal integration": {"poni_file": ""}})
    with pytest.raises(ConfigError, match=r"\[azimuthal integration\] poni_file.*required"):
        Config.from_file(path)


def test_keys_in_their_older_section_are_moved_with_a_warning(tmp_path):
    path = tmp_path / "old.ini"
    path.write_text(
        "[dataset]\nlocation = a.h5\nmask_file = m.edf\ndetector = Pilatus1M\n"
        "[azimuthal integration]\nponi_file = p.poni\n"
    )
    config = Config.from_file(path)
    assert config.integration.mask_file == str(tmp_path / "m.edf")
    assert config.integration.detector == "Pilatus1M"
    moved = [w for w in config.warnings if "deprecated" in w]
    assert len(moved) == 2 and all("[azimuthal integration]" in w for w in moved)


def test_a_key_in_the_wrong_section_is_an_error_naming_both(tmp_path):
    path = tmp_path / "wrong.ini"
    path.write_text(
        "[dataset]\nlocation = a.h5\ndark_file = d.edf\n[azimuthal integration]\nponi_file = p\n"
    )
    with pytest.raises(ConfigError) as info:
        Config.from_file(path)
    assert "[dataset] dark_file" in str(info.value)
    assert "belongs in [azimuthal integration]" in str(info.value)


def test_parsed_as_the_integrator_reads_files(tmp_path, monkeypatch):
    """No inline comments (a '#' in a path is part of it), a BOM accepted, '~' expanded."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = tmp_path / "c.ini"
    text = (
        "[dataset]\nlocation = ~/RAW_DATA/run#2/*.h5\n"
        "[azimuthal integration]\nponi_file = ~/calib #1.poni\nmask_file = m.edf ; old\n"
        "unit = q_a^-1\n"
    )
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    config = Config.from_file(path)
    assert config.dataset.location == (str(tmp_path / "home/RAW_DATA/run#2/*.h5"),)
    assert config.integration.poni_file == str(tmp_path / "home/calib #1.poni")
    assert config.integration.mask_file == str(tmp_path / "m.edf ; old")
    assert config.integration.unit == "q_A^-1"


@pytest.mark.parametrize(
    ("method", "bounds", "expected"),
    [
        ("median", "(10, 90)", ("median", (10.0, 90.0))),
        ("medfilt", "50", ("median", (50.0,))),
        ("sigma-clip", "3", ("sigma_clip", (3.0,))),
        ("sigmaclip", "", ("sigma_clip", ())),
    ],
)
def test_trim_methods_and_their_bounds(tmp_path, method, bounds, expected):
    changes = {"trim_method": method, "trim_bounds": bounds, "trim_n_pts": "180"}
    config = Config.from_file(filled_template(tmp_path, {"azimuthal integration": changes}))
    ai = config.integration
    assert (ai.trim_method, ai.trim_bounds, ai.trim_n_pts) == (*expected, 180)


@pytest.mark.parametrize(
    ("changes", "key", "reason"),
    [
        ({"trim_method": "median", "azimuthal_range": "(-180, 180, 36)"}, "azimuthal_range",
         "one azimuthal slice"),
        ({"trim_method": "median", "trim_bounds": "(90, 10)"}, "trim_bounds", "percentiles"),
        ({"trim_method": "median", "trim_bounds": "(-5, 50)"}, "trim_bounds", "percentiles"),
        ({"trim_method": "sigma_clip", "trim_bounds": "0"}, "trim_bounds", "threshold > 0"),
    ],
)  # fmt: skip
def test_trim_settings_the_integrator_refuses(tmp_path, changes, key, reason):
    path = filled_template(tmp_path, {"azimuthal integration": changes})
    with pytest.raises(ConfigError, match=rf"\] {key} = .*{reason}"):
        Config.from_file(path)


def test_sigma_clip_drops_pixel_splitting_with_a_warning(tmp_path):
    changes = {"trim_method": "sigma_clip", "pixel_splitting": "full"}
    config = Config.from_file(filled_template(tmp_path, {"azimuthal integration": changes}))
    assert any("pixel_splitting ignored" in w for w in config.warnings)


@pytest.mark.parametrize("mode", [0o000, 0o007, 0o077, 0o640, 0o755, 0o777, 0o2775])
def test_every_file_mode_survives_the_trip_to_the_workers(tmp_path, mode):
    """Workers rebuild the configuration from its INI text: the mode must parse back."""
    path = filled_template(tmp_path, {"output": {"file_mode": format(mode, "o")}})
    config = Config.from_file(path)
    assert config.output.file_mode == mode
    again = Config.from_mapping(config.as_mapping(), source=config.source)
    assert again.output.file_mode == mode
