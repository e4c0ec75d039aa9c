"""End to end through the real CLI, a real Redis and real prefork Celery workers.

Every output row is compared with pyFAI's own integrate1d_ng / integrate2d_ng on the same
frame, called here with the parameters written out explicitly.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import fabio
import h5py
import numpy as np
import pyFAI
import pytest
import redis
from pyFAI.calibrant import get_calibrant
from pyFAI.detectors.sensors import ALL_MATERIALS

from tasks.codecs import pipeline
from tasks.discovery import LIMA_DATASET
from worker_launcher.redis_server import start_embedded_redis

from .conftest import edit_config, last_json, run_cli
from .nexus_checks import assert_valid_nexus
from .services import redis_url, unique_prefix

pytestmark = pytest.mark.service


def scan_frames(master: str, entry: str):
    """(frames, source file names, monitor) of a demo scan, read straight from the Lima files."""
    with h5py.File(master) as h5:
        sources = sorted(
            {v.file_name for v in h5[f"{entry}/measurement/pilatus"].virtual_sources()}
        )
        monitor = h5[f"{entry}/measurement/mon"][()]
    folder = master.rsplit("/", 1)[0]
    frames = []
    for name in sources:
        with h5py.File(f"{folder}/{name}") as lima:
            frames += list(lima[LIMA_DATASET][()])
    return frames, [f"{folder}/{n}" for n in sources], monitor


def run_ok(config_path) -> dict:
    result = run_cli("run", config_path, "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return last_json(result.stdout)


def read_output(path: str, entry: str):
    with h5py.File(path) as h5:
        data = h5[f"{entry}/integrated"]
        return {name: data[name][()] for name in data}, dict(data.attrs)


def assert_rows_equal(output: dict, references: list):
    assert output["I"].shape[0] == len(references)
    for row, ref in enumerate(references):
        np.testing.assert_allclose(output["I"][row], ref.intensity, rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(output["I_errors"][row], ref.sigma, rtol=1e-4, atol=1e-9)


def assert_corrected_equal_preproc(output, entry, frames, ai, mask, monitor=None, **corrections):
    """Stored corrected frames and masks against pyFAI's own preproc on the same raw frames."""
    from pyFAI.engines.preproc import preproc

    shape = frames[0].shape
    with h5py.File(output) as h5:
        corrected = h5[f"{entry}/reduction/corrected"]
        data, flags = corrected["data"], corrected["mask"]
        assert data.shape == (len(frames), *shape) and data.dtype == np.float32
        assert flags.shape == data.shape and flags.dtype == np.uint8
        assert data.fletcher32 and flags.fletcher32 and data.chunks == (1, *shape)
        for i, frame in enumerate(frames):
            dummy, delta_dummy = ai.detector.get_dummies(frame)
            expected = preproc(
                frame,
                solidangle=ai.solidAngleArray(shape, 3),
                mask=mask,
                dummy=dummy,
                delta_dummy=delta_dummy,
                normalization_factor=1.0 if monitor is None else float(monitor[i]),
                empty=np.nan,
                dtype=np.float32,
                **corrections,
            )
            np.testing.assert_allclose(data[i], expected, rtol=1e-6, equal_nan=True)
            expected_flags = np.where(mask != 0, 1, np.where(np.isfinite(expected), 0, 2))
            np.testing.assert_array_equal(flags[i], expected_flags)
        return {
            name: [fid for fid, _ in pipeline(h5[f"{entry}/reduction/corrected/{name}"])]
            for name in ("data", "mask")
        }


def peak_positions(x: np.ndarray, y: np.ndarray, n: int) -> list[float]:
    """Centroids of the n strongest well-separated peaks, above a local background."""
    from scipy.signal import find_peaks

    idx, _ = find_peaks(y, prominence=0.05 * np.nanmax(y), distance=10)
    idx = sorted(idx[np.argsort(y[idx])[::-1][:n]])
    centres = []
    for i in idx:
        window = slice(i - 4, i + 5)
        w = y[window] - np.min(y[window])
        centres.append(float(np.sum(x[window] * w) / np.sum(w)))
    return centres


def integrator_range(poni: str, unit: str) -> tuple[float, float]:
    """The integrator's radial range for an empty radial_range, on a separate integrator:
    min and max of the pixel centres (2theta in degrees, or q in 1/A from qArray)."""
    ai = pyFAI.load(poni)
    if unit == "2th_deg":
        values = np.degrees(ai.center_array(unit="2th_rad"))
    else:
        assert unit == "q_A^-1"
        values = ai.qArray() / 10
    return float(values.min()), float(values.max())


def assert_pyfai_config_is_the_run(stored: dict, ai) -> None:
    """The stored pyFAI configuration loads in pyFAI's own worker as the integration run."""
    from pyFAI.worker import Worker

    worker = Worker()
    worker.set_config(stored)
    assert (worker.unit.name, worker.nbpt_rad, worker.nbpt_azim) == ("2th_deg", 1000, 1)
    method = worker.method
    assert (method.split, method.algo, method.impl) == ("bbox", "csr", "cython")
    assert worker.polarization_factor == 0.99 and worker.correct_solid_angle
    assert worker.error_model.as_str() == "poisson"
    assert worker.ai.dist == pytest.approx(ai.dist) and worker.ai.rot1 == pytest.approx(ai.rot1)
    assert stored["monitor_name"] == "mon" and stored["mask_file"]


def test_2th_bbox_with_monitor_equals_pyfai(small_demo, tmp_path):
    config = edit_config(
        small_demo.config,
        {"output": {"location": str(tmp_path / "out"), "save_corrected": "1"}},
        tmp_path / "c.ini",
    )
    summary = run_ok(config)
    assert summary["files_total"] == 4 and summary["files_done"] == 4
    assert summary["files_failed"] == [] and summary["frames"] == 16
    assert len(summary["outputs"]) == 2 and summary["job_id"] and summary["seconds"] > 0
    ai = pyFAI.load(small_demo.poni)
    mask = fabio.open(small_demo.mask).data
    for output, entry in zip(sorted(summary["outputs"]), ("1.1", "2.1"), strict=True):
        frames, sources, monitor = scan_frames(small_demo.dataset, entry)
        refs = [
            ai.integrate1d_ng(
                frame,
                1000,
                unit="2th_deg",
                method=("bbox", "csr", "cython"),
                mask=mask,
                polarization_factor=0.99,
                correctSolidAngle=True,
                error_model="poisson",
                normalization_factor=float(monitor[i]),
                radial_range=integrator_range(small_demo.poni, "2th_deg"),
            )
            for i, frame in enumerate(frames)
        ]
        data, attrs = read_output(output, entry)
        assert_rows_equal(data, refs)
        np.testing.assert_allclose(data["radial_axis"], refs[0].radial, rtol=1e-6)
        # frame order and provenance: 4 frames of file 0, then 4 of file 1
        assert [s.decode() for s in data["source_file"]] == [sources[0]] * 4 + [sources[1]] * 4
        assert list(data["source_frame"]) == [0, 1, 2, 3, 0, 1, 2, 3]
        assert attrs["signal"] == "I"
        with h5py.File(output) as h5:
            np.testing.assert_array_equal(h5[f"{entry}/monitor/data"][()], monitor)
        compression = assert_corrected_equal_preproc(
            output, entry, frames, ai, mask, monitor, polarization=ai.polarization(None, 0.99)
        )
        assert compression == {"data": [2, 1, 3], "mask": [1, 3]}  # shuffle, deflate, fletcher32
        with h5py.File(output) as h5:
            for name in ("I", "I_errors"):  # default: deflate 1 + shuffle + fletcher32
                dset = h5[f"{entry}/integrated/{name}"]
                assert (dset.compression, dset.compression_opts) == ("gzip", 1)
                assert dset.shuffle and dset.fletcher32
            assert h5[f"{entry}/measurement/mon"].shape == (8,)
            assert "LaB6" in h5["/"].attrs["default"] or h5["/"].attrs["default"] == entry
            parameters = h5[f"{entry}/reduction/input"]
            assert "[azimuthal integration]" in parameters["configuration"][()].decode()
            assert_pyfai_config_is_the_run(json.loads(parameters["pyfai_config"][()]), ai)
            assert h5[f"{entry}/monitor_applied"][()] and h5[f"{entry}/polarization_applied"][()]
        assert_valid_nexus(output, "NXazint1d")
    assert_quiet_worker_logs(tmp_path / "out" / ".ringflow", frames_per_file=4)


def assert_quiet_worker_logs(workspace: Path, frames_per_file: int) -> None:
    """No banner, no pyFAI INFO noise; a line per file task naming frames, time, worker."""
    logs = sorted(workspace.rglob("worker-gpu*.log"))
    text = "".join(path.read_text() for path in logs)
    assert logs and "[tasks]" not in text and "-------------- [queues]" not in text
    assert "No sensor configuration" not in text and "as JSON file" not in text
    lines = re.findall(rf"\.h5: {frames_per_file} frames in [0-9.]+ s on \S+@\S+", text)
    assert len(lines) == 4, text[-3000:]


def test_lab6_peaks_at_calibrant_positions(small_demo, tmp_path):
    config = edit_config(
        small_demo.config,
        {"output": {"location": str(tmp_path / "out")}, "azimuthal integration": {"n_pts": "3000"}},
        tmp_path / "c.ini",
    )
    summary = run_ok(config)
    data, _ = read_output(sorted(summary["outputs"])[0], "1.1")
    mean = np.nanmean(data["I"], axis=0)
    calibrant = get_calibrant("LaB6")
    calibrant.wavelength = pyFAI.load(small_demo.poni).wavelength
    expected = np.degrees(calibrant.get_2th())
    found = peak_positions(data["radial_axis"], mean, 5)
    assert len(found) == 5
    for position in found:
        assert np.min(np.abs(expected - position)) < 0.02, (position, expected[:8])


def write_image(path, data):
    fabio.edfimage.EdfImage(data=data.astype(np.float32)).write(str(path))
    return str(path)


def test_q_with_mask_dark_flat_polarization_attenuation(small_demo, tmp_path):
    rng = np.random.default_rng(1)
    shape = (1043, 981)
    dark = write_image(tmp_path / "dark.edf", rng.uniform(0, 0.5, shape))
    flat = write_image(tmp_path / "flat.edf", rng.uniform(0.9, 1.1, shape))
    config = edit_config(
        small_demo.config,
        {
            "output": {
                "location": str(tmp_path / "out"),
                "save_corrected": "1",
                "corrected_codec": "bitshuffle_lz4",
            },
            "azimuthal integration": {
                "unit": "q_nm^-1",
                "n_pts": "800",
                "dark_file": dark,
                "flatfield_file": flat,
                "polarization_factor": "0.95",
                "pixel_splitting": "no",
                "monitor_name": "",
                "correct_detector_attenuation": "1",
                "radial_range": "(5, 60)",
            },
            "dataset": {"hdf5_entry": "2.1"},
        },
        tmp_path / "c.ini",
    )
    summary = run_ok(config)
    (output,) = summary["outputs"]
    ai = pyFAI.load(small_demo.poni)
    mu = ALL_MATERIALS["CdTe"].mu(ai.energy, "cm^-1") * 0.1
    absorption = (1 - np.exp(-mu / np.cos(ai.center_array(unit="2th_rad", scale=False)))) / (
        1 - np.exp(-mu)
    )
    frames, _, _ = scan_frames(small_demo.dataset, "2.1")
    refs = [
        ai.integrate1d_ng(
            frame,
            800,
            unit="q_nm^-1",
            method=("no", "csr", "cython"),
            mask=fabio.open(small_demo.mask).data,
            dark=fabio.open(dark).data,
            flat=fabio.open(flat).data,
            polarization_factor=0.95,
            absorption=absorption,
            correctSolidAngle=True,
            error_model="poisson",
            radial_range=(5, 60),
        )
        for frame in frames
    ]
    data, attrs = read_output(output, "2.1")
    assert_rows_equal(data, refs)
    assert list(attrs["axes"]) == [".", "radial_axis"]
    with h5py.File(output) as h5:
        assert h5["2.1/integrated/radial_axis"].attrs["units"] == "1/nm"
    compression = assert_corrected_equal_preproc(
        output,
        "2.1",
        frames,
        ai,
        fabio.open(small_demo.mask).data,
        dark=fabio.open(dark).data,
        flat=fabio.open(flat).data,
        polarization=ai.polarization(None, 0.95),
        absorption=absorption,
    )
    assert compression == {"data": [32008, 3], "mask": [32008, 3]}  # bitshuffle, fletcher32


def test_2d_caking_equals_integrate2d_ng(small_demo, tmp_path):
    config = edit_config(
        small_demo.config,
        {
            "output": {"location": str(tmp_path / "out")},
            "azimuthal integration": {
                "azimuthal_range": "(-180, 180, 36)",
                "n_pts": "300",
                "unit": "q_A^-1",
                "monitor_name": "",
            },
            "dataset": {"hdf5_entry": "1.1"},
        },
        tmp_path / "c.ini",
    )
    summary = run_ok(config)
    (output,) = summary["outputs"]
    ai = pyFAI.load(small_demo.poni)
    frames, _, _ = scan_frames(small_demo.dataset, "1.1")
    refs = [
        ai.integrate2d_ng(
            frame,
            300,
            36,
            unit="q_A^-1",
            method=("bbox", "csr", "cython"),
            mask=fabio.open(small_demo.mask).data,
            polarization_factor=0.99,
            correctSolidAngle=True,
            error_model="poisson",
            azimuth_range=(-180, 180),
            radial_range=integrator_range(small_demo.poni, "q_A^-1"),
        )
        for frame in frames
    ]
    data, attrs = read_output(output, "1.1")
    assert data["I"].shape == (8, 36, 300)
    assert_rows_equal(data, refs)
    np.testing.assert_allclose(data["azimuthal_axis"], refs[0].azimuthal, rtol=1e-6)
    assert list(attrs["axes"]) == [".", "azimuthal_axis", "radial_axis"]
    assert_valid_nexus(output, "NXazint2d")


def test_external_broker_by_url_with_password(small_demo, tmp_path):
    """A password-protected Redis on TCP, given by URL: used as it is, its password never
    shown; the embedded server's own socket URL works the same way."""
    url, prefix = redis_url(), unique_prefix("extbroker")
    server = start_embedded_redis(str(tmp_path / "redis"))
    try:
        brokers = [
            (url, redis.Redis.from_url(url), redis.connection.parse_url(url)["password"]),
            (server.url, server.client(), server.password),
        ]
        for broker, client, secret in brokers:
            config = edit_config(
                small_demo.config,
                {
                    "output": {"location": str(tmp_path / "out" / prefix)},
                    "dataset": {"hdf5_entry": "1.1"},
                    "queue": {"queue_prefix": prefix},
                },
                tmp_path / "c.ini",
            )
            result = run_cli("run", config, "--json", env={"RINGFLOW_BROKER_URL": broker})
            assert result.returncode == 0, result.stderr[-2000:]
            assert secret not in result.stdout + result.stderr
            job_id = last_json(result.stdout)["job_id"]
            assert client.hget(f"{prefix}:job:{job_id}:progress", "files_done") == b"2"
            prefix = unique_prefix("extsock")
    finally:
        server.stop()
