"""The batched engine against pyFAI itself, frame by frame, on the same frames.

Intensity must agree to 1e-5 and sigma to 1e-4 (relative, against the row's largest value for
bins near zero); frames come back in order. Every preprocessing option the engine batches is
covered, and options it cannot batch must fall back to pyFAI per frame (and say so once).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import fabio
import h5py
import numpy as np
import pyFAI
import pytest

from tasks import batched, kernels
from tasks.config import Config
from tasks.engine import Engine, integrator_radial_range

from .conftest import ROOT

LIMA = "/entry_0000/measurement/data"


@pytest.fixture(scope="module")
def setup(small_demo, tmp_path_factory):
    """The demo's config, its first Lima file's frames (with dummies in one frame), and dark
    and flat images."""
    config = Config.from_file(small_demo.config)
    folder = tmp_path_factory.mktemp("engine")
    with h5py.File(next(_lima_files(small_demo.dataset))) as h5:
        frames = h5[LIMA][()]
    frames[1, 500, 400:420] = -2  # Pilatus dummies, outside the mask: dropped per frame
    frames[2, 300, 100] = -1
    rng = np.random.default_rng(3)
    shape = frames.shape[1:]
    dark = _write_edf(folder / "dark.edf", rng.uniform(0, 0.5, shape))
    flat = _write_edf(folder / "flat.edf", rng.uniform(0.9, 1.1, shape))
    return config, frames, dark, flat


def _lima_files(master: str):
    with h5py.File(master) as h5:
        entry = sorted(h5)[0]
        sources = sorted(
            {v.file_name for v in h5[f"{entry}/measurement/pilatus"].virtual_sources()}
        )
    folder = master.rsplit("/", 1)[0]
    return (f"{folder}/{name}" for name in sources)


def _write_edf(path, data) -> str:
    fabio.edfimage.EdfImage(data=np.asarray(data, np.float32)).write(str(path))
    return str(path)


def with_integration(config: Config, **changes) -> Config:
    return dataclasses.replace(
        config, integration=dataclasses.replace(config.integration, **changes)
    )


def reference(config: Config, frames, monitor, ai=None, norms: list | None = None):
    """pyFAI's integrate1d_ng/integrate2d_ng, frame by frame, from the user's inputs.

    ``ai``: the engine's own pyFAI integrator. pyFAI builds its full-splitting matrices with
    threads in no fixed order, so two builds differ in the last bits, and in a bin whose
    coefficients nearly cancel (full splitting at the edge of a radial range) that changes
    the sign of pyFAI's own result from one process to the next; the same matrix does not.
    """
    c = config.integration
    ai = ai or pyFAI.load(c.poni_file)
    kwargs = dict(
        unit=c.unit,
        method=c.method,
        mask=fabio.open(c.mask_file).data,
        dark=fabio.open(c.dark_file).data if c.dark_file else None,
        flat=fabio.open(c.flatfield_file).data if c.flatfield_file else None,
        polarization_factor=c.polarization_factor,
        correctSolidAngle=c.correct_solid_angle,
        error_model=c.error_model or None,
        # empty: the integrator's range (checked against its formulas in test_pyfai_combinations)
        radial_range=c.radial_range or integrator_radial_range(c),
    )
    if c.azimuthal_range[:2] != (-180.0, 180.0) or c.n_slices > 1:
        kwargs["azimuth_range"] = c.azimuthal_range[:2]

    def run(frame, monitor):
        if c.n_slices > 1:
            return ai.integrate2d_ng(
                frame, c.n_pts, c.n_slices, normalization_factor=monitor, **kwargs
            )
        return ai.integrate1d_ng(frame, c.n_pts, normalization_factor=monitor, **kwargs)

    results = [run(f, float(m)) for f, m in zip(frames, monitor, strict=True)]
    if norms is not None:  # each bin's sum of coefficient x normalization, as pyFAI had it
        norms.append(np.stack([np.asarray(r.sum_normalization) for r in results]))
    sigma = None if results[0].sigma is None else np.stack([r.sigma for r in results])
    return np.stack([r.intensity for r in results]), sigma


def assert_close(actual, expected, rtol, skip=None):
    """Relative to each value, or to 1e-3 of its row's largest for near-empty bins; ``skip``:
    bins left out (see :func:`cancelling_bins`)."""
    expected = np.asarray(expected, np.float64)
    actual = np.asarray(actual, np.float64)
    if skip is not None:
        actual, expected = np.where(skip, 0, actual), np.where(skip, 0, expected)
    finite_a, finite_e = np.isfinite(actual), np.isfinite(expected)
    assert np.array_equal(finite_a, finite_e), (
        f"{int((finite_a != finite_e).sum())} bins finite on one side only"
    )  # a bin both leave non-finite (a zero normalization) is the same answer
    actual, expected = np.where(finite_a, actual, 0), np.where(finite_e, expected, 0)
    rows = expected.reshape(len(expected), -1)
    floor = 1e-3 * np.abs(rows).max(axis=1).reshape((-1,) + (1,) * (expected.ndim - 1))
    error = np.abs(actual - expected) / np.maximum(np.abs(expected), floor)
    assert error.max() <= rtol, f"max relative error {error.max():.2e} > {rtol:g}"


CASES = {
    "1D bbox poisson": {},
    "1D full splitting": {"pixel_splitting": "full"},
    "1D no splitting, hybrid": {"pixel_splitting": "no", "error_model": "hybrid"},
    "1D no error model": {"error_model": ""},
    "1D q, radial and azimuthal ranges": {
        "unit": "q_nm^-1",
        "radial_range": (5.0, 60.0),
        "azimuthal_range": (-90.0, 90.0, 1),
    },
    "1D no solid angle, no polarization": {
        "correct_solid_angle": False,
        "polarization_factor": None,
    },
    "2D 360 x 500": {"azimuthal_range": (-180.0, 180.0, 360), "n_pts": 500},
    "2D bbox, part of the circle": {"azimuthal_range": (-45.0, 135.0, 36), "n_pts": 300},
}


PATHS = {"fused kernel": True, "scipy": False}


def test_numba_is_installed_so_the_fused_kernel_is_tested():
    assert kernels.available(), "numba is a dependency: pip install -e ."


@pytest.mark.parametrize("fused", PATHS.values(), ids=PATHS.keys())
@pytest.mark.parametrize("changes", CASES.values(), ids=CASES.keys())
def test_batched_equals_pyfai_frame_by_frame(setup, changes, fused):
    config, frames, _, _ = setup
    config = with_integration(config, **changes)
    monitor = np.array([1.0, 0.8, 1.25, 1.1])[: len(frames)]
    engine = Engine(config, threads=2, fused=fused)
    assert engine.why_not_batched == ""
    assert engine._batcher(frames).fused is fused
    result = engine.integrate_batch(frames, monitor)
    intensity, sigma = reference(config, frames, monitor, engine.ai)
    assert result.intensity.shape == intensity.shape
    assert_close(result.intensity, intensity, 1e-5)
    if sigma is None:
        assert result.sigma is None
    else:
        assert_close(result.sigma, sigma, 1e-4)


@pytest.mark.parametrize("fused", PATHS.values(), ids=PATHS.keys())
def test_dark_flat_attenuation_and_monitor(setup, fused):
    config, frames, dark, flat = setup
    config = with_integration(
        config,
        dark_file=dark,
        flatfield_file=flat,
        polarization_factor=0.95,
        correct_detector_attenuation=True,
        unit="q_nm^-1",
    )
    engine = Engine(config, threads=2, fused=fused)
    monitor = np.array([2.0, 1.0, 0.5, 1.5])[: len(frames)]
    batched = engine.integrate_batch(frames, monitor)
    one_by_one = [engine.integrate(f, float(m)) for f, m in zip(frames, monitor, strict=True)]
    # pyFAI's own integration with the attenuation array ringflow computes (tested elsewhere)
    assert_close(batched.intensity, np.stack([r.intensity for r in one_by_one]), 1e-5)
    assert_close(batched.sigma, np.stack([r.sigma for r in one_by_one]), 1e-4)


def test_frame_order_and_batches_of_any_size(setup):
    config, frames, _, _ = setup
    engine = Engine(config, threads=2)
    monitor = np.ones(len(frames))
    whole = engine.integrate_batch(frames, monitor).intensity
    rows = [
        engine.integrate_batch(frames[k : k + 1], monitor[:1]).intensity[0]
        for k in range(len(frames))
    ]
    assert_close(np.stack(rows), whole, 1e-6)
    assert not np.allclose(whole[0], whole[1])  # distinct frames: an order swap would show


@pytest.mark.parametrize("fused", PATHS.values(), ids=PATHS.keys())
def test_unsigned_and_float_frames(setup, fused):
    config, frames, _, _ = setup
    engine = Engine(config, threads=2, fused=fused)
    monitor = np.ones(len(frames))
    unsigned = np.clip(frames, 0, None).astype(np.uint32)
    floats = frames.astype(np.float32)
    floats[0, 200, 200:210] = np.nan  # invalid pixels: dropped from that frame, as pyFAI does
    for data in (unsigned, floats):
        intensity, sigma = reference(config, data, monitor)
        result = engine.integrate_batch(data, monitor)
        assert_close(result.intensity, intensity, 1e-5)
        assert_close(result.sigma, sigma, 1e-4)


def test_more_dummies_than_the_kernel_lists_go_through_scipy(setup, monkeypatch):
    """A frame full of dummies overflows the kernel's list: the batch is redone by scipy."""
    config, frames, _, _ = setup
    frames = frames.copy()
    frames[3, 100:200, :] = -2
    monitor = np.ones(len(frames))
    monkeypatch.setattr(batched, "BAD_LISTED", 64)
    engine = Engine(config, threads=2, fused=True)
    used = []
    scipy_path = batched.BatchIntegrator._integrate_scipy
    monkeypatch.setattr(
        batched.BatchIntegrator,
        "_integrate_scipy",
        lambda self, *a: used.append(1) or scipy_path(self, *a),
    )
    result = engine.integrate_batch(frames, monitor)
    assert used, "the overflowing batch did not go through scipy"
    intensity, sigma = reference(config, frames, monitor)
    assert_close(result.intensity, intensity, 1e-5)
    assert_close(result.sigma, sigma, 1e-4)


def test_azimuthal_error_model_falls_back_to_pyfai_and_says_so_once(setup, caplog):
    config, frames, _, _ = setup
    config = with_integration(config, error_model="azimuthal")
    with caplog.at_level(logging.INFO, logger="tasks.engine"):
        engine = Engine(config, threads=2)
        engine.integrate_batch(frames[:2], np.ones(2))
        engine.integrate_batch(frames[2:], np.ones(len(frames) - 2))
    said = [r for r in caplog.records if "one by one" in r.getMessage()]
    assert len(said) == 1 and "azimuthal" in said[0].getMessage()
    intensity, sigma = reference(config, frames, np.ones(len(frames)))
    result = engine.integrate_batch(frames, np.ones(len(frames)))
    np.testing.assert_array_equal(result.intensity, intensity.astype(np.float32))


def test_opencl_on_pocl_equals_pyfai(setup):
    """ai_method = opencl runs pyFAI's OpenCL engine; CI has PoCL's CPU device."""
    import pyopencl

    try:
        devices = [d for p in pyopencl.get_platforms() for d in p.get_devices()]
    except pyopencl.Error as exc:
        pytest.fail(f"no OpenCL platform (pip install pocl-binary-distribution): {exc}")
    assert devices
    config, frames, _, _ = setup
    config = with_integration(config, ai_method="opencl")
    config = dataclasses.replace(
        config, computations=dataclasses.replace(config.computations, cpu_fallback=True)
    )
    engine = Engine(config, threads=2)
    assert "opencl" in engine.why_not_batched
    result = engine.integrate_batch(frames, np.ones(len(frames)))
    cython = with_integration(config, ai_method="cython")
    intensity, sigma = reference(cython, frames, np.ones(len(frames)))
    assert_close(result.intensity, intensity, 1e-5)
    assert_close(result.sigma, sigma, 1e-4)


def test_batch_size_follows_the_memory_budget(setup):
    config, _, _, _ = setup
    small = dataclasses.replace(
        config, computations=dataclasses.replace(config.computations, engine_memory_mb=64)
    )
    large = dataclasses.replace(
        config, computations=dataclasses.replace(config.computations, engine_memory_mb=2048)
    )
    pixels = 1043 * 981
    for fused, per_pixel in ((True, 3 * 4), (False, 3 * 4 + 8)):  # raw ring (+ transposed)
        b_small = Engine(small, threads=1, fused=fused).batch_size(4)
        b_large = Engine(large, threads=1, fused=fused).batch_size(4)
        assert 1 <= b_small < b_large <= 128
        assert b_small * pixels * per_pixel <= 64 * 2**20


@pytest.mark.parametrize("fused", PATHS.values(), ids=PATHS.keys())
@pytest.mark.parametrize("split", ["no", "bbox", "full"])
def test_2d_with_a_dark_equals_pyfai(setup, split, fused):
    """integrate2d_ng adds the dark to the Poisson variance where its engine does not manage
    the variance (no/bbox splitting); the batch must do the same, and only there."""
    config, frames, dark, _ = setup
    config = with_integration(
        config,
        dark_file=dark,
        pixel_splitting=split,
        error_model="poisson",
        azimuthal_range=(-180.0, 180.0, 36),
        n_pts=300,
    )
    monitor = np.array([1.0, 0.8, 1.25, 1.1])[: len(frames)]
    engine = Engine(config, threads=2, fused=fused)
    assert engine.why_not_batched == ""
    result = engine.integrate_batch(frames, monitor)
    norms: list = []
    intensity, sigma = reference(config, frames, monitor, engine.ai, norms)
    skip = cancelling_bins(norms[0]).reshape(intensity.shape) if split == "full" else None
    assert skip is None or skip.mean() < 1e-3  # a handful of bins, never a real part
    assert_close(result.intensity, intensity, 1e-5, skip)
    assert_close(result.sigma, sigma, 1e-4, skip)


def cancelling_bins(norm: np.ndarray) -> np.ndarray:
    """Bins whose coefficients nearly cancel (sum of coefficient x normalization below 1e-4 of
    the frame's median): pyFAI's full-splitting 2D matrix with a radial range has a few near
    the outer radius, built differently from one process to the next, and a value divided by
    almost zero there is float rounding, in pyFAI as in the batch."""
    norm = np.abs(np.asarray(norm, np.float64)).reshape(len(norm), -1)
    typical = np.array([np.median(row[row > 0]) for row in norm])[:, None]
    return ((norm > 0) & (norm < 1e-4 * typical)).reshape(norm.shape)


def integrator_trim(config: Config, frames, monitor):
    """pyFAI's trimming called as ESRF's integrator calls it (mask, dark and flat given)."""
    c = config.integration
    ai = pyFAI.load(c.poni_file)
    common = dict(
        unit=c.unit,
        polarization_factor=c.polarization_factor,
        correctSolidAngle=c.correct_solid_angle,
        radial_range=integrator_radial_range(c),
        mask=fabio.open(c.mask_file).data,
        dark=fabio.open(c.dark_file).data if c.dark_file else None,
    )
    out = []
    for frame, m in zip(frames, monitor, strict=True):
        if c.trim_method == "median":
            res = ai.medfilt1d(
                frame, npt_rad=c.n_pts, npt_azim=c.trim_n_pts or c.n_pts,
                percentile=c.trim_bounds if len(c.trim_bounds) > 1 else c.trim_bounds[0],
                dummy=0.0, method=(c.pixel_splitting, "csr", "cython"),
                normalization_factor=float(m), **common,
            )  # fmt: skip
        else:
            res = ai.sigma_clip_ng(
                frame, npt=c.n_pts, thres=c.trim_bounds[0], error_model=c.error_model or None,
                method=("no", "csr", "cython"), normalization_factor=float(m), **common,
            )  # fmt: skip
        out.append(res)
    sigma = None if out[0].sigma is None else np.stack([r.sigma for r in out])
    return np.stack([r.intensity for r in out]), sigma


@pytest.mark.parametrize(
    "changes",
    [
        {"trim_method": "median", "trim_bounds": (10.0, 90.0), "trim_n_pts": 90},
        {"trim_method": "median", "trim_bounds": (50.0,), "pixel_splitting": "full"},
        {"trim_method": "sigma_clip", "trim_bounds": (3.0,), "error_model": "poisson"},
        {"trim_method": "sigma_clip", "trim_bounds": (4.0,), "error_model": "hybrid"},
    ],
    ids=["median 10-90", "median 50 full", "sigma_clip poisson", "sigma_clip hybrid"],
)
def test_trimming_equals_pyfai_called_as_the_integrator_does(setup, changes):
    config, frames, dark, _ = setup
    config = with_integration(
        config, dark_file=dark, correct_detector_attenuation=False, n_pts=500, **changes
    )
    monitor = np.array([1.0, 0.8, 1.25, 1.1])[: len(frames)]
    engine = Engine(config, threads=2)
    assert "trim_method" in engine.why_not_batched
    result = engine.integrate_batch(frames, monitor)
    intensity, sigma = integrator_trim(config, frames, monitor)
    assert_close(result.intensity, intensity, 1e-5)
    assert engine.has_sigma == (sigma is not None)
    if sigma is not None:
        assert_close(result.sigma, sigma, 1e-4)
    assert engine.provenance["method"].endswith("per frame")


def test_opencl_works_in_a_fresh_process(setup, tmp_path):
    """The engine built in a process that never imported pyFAI's integrators (as in a new
    worker process) finds pyFAI's OpenCL methods and runs on PoCL's CPU device."""
    import subprocess
    import sys

    config, frames, _, _ = setup
    np.save(tmp_path / "frames.npy", frames[:2])
    ini = tmp_path / "opencl.ini"
    text = config.as_ini().replace("ai_method = cython", "ai_method = opencl")
    ini.write_text(text.replace("cpu_fallback = 0", "cpu_fallback = 1"))
    script = (
        "import sys, numpy as np\n"
        "from tasks.config import Config\nfrom tasks.engine import Engine\n"
        f"engine = Engine(Config.from_file({str(ini)!r}), threads=1)\n"
        f"frames = np.load({str(tmp_path / 'frames.npy')!r})\n"
        "result = engine.integrate_batch(frames, np.ones(2))\n"
        f"np.save({str(tmp_path / 'out.npy')!r}, result.intensity)\n"
        "print(engine.provenance['method'])\n"
    )  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
        cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "/csr/opencl on " in done.stdout and "per frame" in done.stdout
    cython = with_integration(Config.from_file(ini), ai_method="cython")
    intensity, _ = reference(cython, frames[:2], np.ones(2))
    assert_close(np.load(tmp_path / "out.npy"), intensity, 1e-5)


@pytest.mark.parametrize(
    ("line", "key"),
    [("Distance: nan", "Distance"), ("Poni1: inf", "Poni1"), ("Distance: -0.1", "Distance")],
)
def test_a_geometry_that_cannot_be_right_is_an_error(setup, tmp_path, line, key):
    from tasks.engine import load_geometry
    from tasks.errors import InputDataError

    config, _, _, _ = setup
    poni = Path(config.integration.poni_file).read_text().splitlines()
    name = line.split(":")[0]
    broken = [line if row.startswith(f"{name}:") else row for row in poni]
    path = tmp_path / "broken.poni"
    path.write_text("\n".join(broken) + "\n")
    with pytest.raises(InputDataError, match=rf"broken.poni: {key}: "):
        load_geometry(dataclasses.replace(config.integration, poni_file=str(path)))


def test_engine_threads_follow_the_job_script(setup, monkeypatch):
    """A local run scales cores_per_worker down; the job script says so to each engine."""
    from tasks.engine import ENGINE_THREADS_ENV, engine_threads

    config, _, _, _ = setup
    monkeypatch.delenv(ENGINE_THREADS_ENV, raising=False)
    assert engine_threads(config) == config.computations.cores_per_worker
    monkeypatch.setenv(ENGINE_THREADS_ENV, "3")
    assert engine_threads(config) == 3
