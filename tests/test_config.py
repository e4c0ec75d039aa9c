"""Configuration: integrator files parse unchanged; every invalid value gets a precise error."""

from __future__ import annotations

import pytest

from tasks.config import Config, template
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
        ("azimuthal integration", "trim_method", "median", "not supported yet"),
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
