"""Every pair of integration options, through every engine path, against pyFAI frame by frame.

tests/test_engine.py checks options one or two at a time; corrections interact (a dark with an
error model, attenuation folded into a 2D flat, a part circle with a radial range), so here
the options are crossed: a generated pairwise covering of the axes in
:mod:`tests.combinations_data` (every pair of values of any two axes is in some case; a test
below holds the list to that). Each case runs the fused kernel, the scipy product, the engine's
per-frame pyFAI path and pyFAI's OpenCL engine on PoCL, and each must give pyFAI's own
``integrate1d_ng``/``integrate2d_ng`` of the same frames: intensity to 1e-5 and sigma to 1e-4,
relative (against 1e-3 of the row's largest value for bins near zero), frames in order.

An empty radial range is the ESRF integrator's: (min, max) of the unit's pixel-centre values
over the whole detector, masked pixels included; the engine passes it to pyFAI explicitly and
exposes it as ``Engine.radial_range``. The detector is a Pilatus100k, so the file runs in
seconds.
"""

from __future__ import annotations

import gc

import fabio
import numpy as np
import pyFAI
import pytest

from tasks.config import Config, IntegrationConfig
from tasks.engine import Engine, attenuation

from .combinations_data import (
    AXES,
    DIMS,
    MONITOR,
    N_FRAMES,
    N_PTS,
    RADIAL_RANGES,
    all_pairs,
    case_id,
    pairs_of,
    pairwise,
    write_inputs,
)

CASES = pairwise(AXES)
IDS = [case_id(k, case) for k, case in enumerate(CASES)]
CHECKS = ("radial_range", "fused", "scipy", "per_frame", "opencl")
RUNS = [
    pytest.param(k, check, id=f"{IDS[k]}-{check}") for k in range(len(CASES)) for check in CHECKS
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_inputs(tmp_path_factory.mktemp("combinations"))


@pytest.fixture(scope="module")
def frozen_garbage(inputs):
    """pyFAI runs a full garbage collection for each integrator it loads (three per engine),
    50-80 ms with numba, scipy and pyopencl loaded: they are loaded once here (an engine of
    each kind integrates) and the objects then alive frozen, so collections skip them."""
    for ai_method, fused in (("cython", True), ("cython", False), ("opencl", None)):
        engine = Engine(config_of(CASES[0], inputs, ai_method), threads=2, fused=fused)
        engine.integrate_batch(inputs.frames, np.ones(N_FRAMES))
    del engine
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture(scope="module")
def engines(inputs, frozen_garbage):
    """The engines of one case, built once for its checks: cython (fused kernel, scipy; the
    fused one also for the per-frame path) and OpenCL. Those of the previous case are let
    go, so memory holds one case's matrices."""
    held: dict[tuple[int, str], Engine] = {}

    def get(k: int, kind: str) -> Engine:
        if (k, kind) not in held:
            for key in [key for key in held if key[0] != k]:
                del held[key]
            if kind == "opencl":
                held[k, kind] = Engine(config_of(CASES[k], inputs, ai_method="opencl"), threads=2)
            else:
                held[k, kind] = Engine(
                    config_of(CASES[k], inputs), threads=2, fused=kind == "fused"
                )
        return held[k, kind]

    return get


def config_of(case: dict, inputs, ai_method: str = "cython") -> Config:
    """The case as a user's configuration ([azimuthal integration] keys as INI text)."""
    low, high, slices = DIMS[case["dim"]]
    radial = RADIAL_RANGES[case["unit"]] if case["radial_range"] == "set" else None
    polarization = case["polarization"]
    section = {
        "poni_file": inputs.poni,
        "mask_file": inputs.mask if case["mask"] else "",
        "dark_file": inputs.dark if case["dark"] else "",
        "flatfield_file": inputs.flat if case["flat"] else "",
        "n_pts": str(N_PTS[2 if slices > 1 else 1]),
        "unit": case["unit"],
        "azimuthal_range": f"({low}, {high}, {slices})",
        "radial_range": "" if radial is None else f"({radial[0]}, {radial[1]})",
        "error_model": case["error_model"] or "none",
        "pixel_splitting": case["split"],
        "ai_method": ai_method,
        "polarization_factor": "" if polarization is None else str(polarization),
        "correct_solid_angle": "1" if case["solid_angle"] else "0",
        "correct_detector_attenuation": "1" if case["attenuation"] else "0",
        "sensor_material": "Si",  # 450 um of Si at 41 keV: efficiency varies by ~2 %
        "sensor_thickness_cm": "0.045",
    }
    return Config.from_mapping(
        {
            "dataset": {"location": inputs.poni.rsplit("/", 1)[0] + "/none.h5"},
            "azimuthal integration": section,
            "computations distribution": {"cpu_fallback": "1"},
        }
    )


def monitor_of(case: dict) -> np.ndarray:
    return np.array(MONITOR if case["monitor"] else (1.0,) * N_FRAMES)


def full_radial_range(c: IntegrationConfig) -> tuple[float, float]:
    """The ESRF integrator's range for an empty radial_range, on an integrator of its own."""
    ai = pyFAI.load(c.poni_file)
    if c.unit == "r_mm":
        values = ai.rArray() * 1e3
    elif c.unit == "2th_deg":
        values = np.degrees(ai.center_array(unit="2th_rad"))
    elif c.unit == "q_A^-1":
        values = ai.qArray() / 10
    else:
        values = ai.center_array(ai.detector.shape, unit=c.unit, scale=True)
    return float(values.min()), float(values.max())


def radial_range_of(c: IntegrationConfig) -> tuple[float, float]:
    return tuple(c.radial_range) if c.radial_range else full_radial_range(c)


def reference(c: IntegrationConfig, frames: np.ndarray, monitor: np.ndarray, ai, method=None):
    """pyFAI's integrate1d_ng/integrate2d_ng, frame by frame, from the inputs, on ``ai``: the
    engine's own pyFAI integrator, with ``method`` (default: cython CSR).

    The same integrator, because pyFAI's full-splitting 2D matrices with an explicit radial
    range differ from one build to the next in a few bins near the outer radius (seen with
    OpenMP on 1 thread too), so two integrators disagree there; the same one agrees. OpenCL
    is compared with pyFAI's OpenCL engine: pyFAI's 2D engines differ on the Poisson
    variance with a dark (cython adds the dark, OpenCL does not).
    """
    flat = fabio.open(c.flatfield_file).data if c.flatfield_file else None
    absorption = attenuation(ai, c) if c.correct_detector_attenuation else None
    kwargs = dict(
        unit=c.unit,
        method=method or (c.pixel_splitting, "csr", "cython"),
        mask=fabio.open(c.mask_file).data if c.mask_file else None,
        dark=fabio.open(c.dark_file).data if c.dark_file else None,
        polarization_factor=c.polarization_factor,
        correctSolidAngle=c.correct_solid_angle,
        error_model=c.error_model or None,
        radial_range=radial_range_of(c),
    )
    if c.n_slices > 1:
        # integrate2d_ng has no absorption argument: absorption divides as a flat does
        if absorption is not None:
            flat = absorption if flat is None else flat * absorption
        kwargs.update(flat=flat, azimuth_range=c.azimuthal_range[:2])
    else:
        kwargs.update(flat=flat, absorption=absorption)
        if c.azimuthal_range[:2] != (-180.0, 180.0):
            kwargs["azimuth_range"] = c.azimuthal_range[:2]

    def run(frame, m):
        if c.n_slices > 1:
            return ai.integrate2d_ng(frame, c.n_pts, c.n_slices, normalization_factor=m, **kwargs)
        return ai.integrate1d_ng(frame, c.n_pts, normalization_factor=m, **kwargs)

    results = [run(f, float(m)) for f, m in zip(frames, monitor, strict=True)]
    sigma = None if results[0].sigma is None else np.stack([r.sigma for r in results])
    return np.stack([r.intensity for r in results]), sigma


def relative_error(actual, expected) -> float:
    """Relative to each value, or to 1e-3 of its row's largest for near-empty bins."""
    expected = np.asarray(expected, np.float64)
    rows = expected.reshape(len(expected), -1)
    floor = 1e-3 * np.abs(rows).max(axis=1).reshape((-1,) + (1,) * (expected.ndim - 1))
    error = np.abs(np.asarray(actual, np.float64) - expected) / np.maximum(np.abs(expected), floor)
    return float(error.max())


def test_cases_cover_every_pair_of_option_values():
    missing = all_pairs(AXES) - set().union(*(pairs_of(case, AXES) for case in CASES))
    assert not missing, f"pairs no case holds: {sorted(missing, key=repr)[:10]}"
    assert len(CASES) == len({tuple(case.values()) for case in CASES})


def test_frames_are_distinct_and_have_dummies(inputs):
    frames = inputs.frames
    assert frames.dtype == np.int32 and len(frames) == N_FRAMES
    sums = frames.clip(0).sum(axis=(1, 2))
    assert np.all(np.diff(sums) > 0)  # each frame brighter than the last: order shows
    assert (frames[1:] < 0).any(axis=(1, 2)).all() and not (frames[0] < 0).any()
    mask = fabio.open(inputs.mask).data != 0
    assert not mask[(frames < 0).any(axis=0)].any()  # every dummy outside the mask


@pytest.mark.parametrize(("k", "check"), RUNS)
def test_combination(inputs, engines, k, check):
    """One case: the radial range the engine uses, or one path's results against pyFAI's."""
    if check == "radial_range":
        engine = engines(k, "fused")
        expected = radial_range_of(engine.config)
        used = tuple(engine.radial_range)
        assert len(used) == 2
        assert used == pytest.approx(expected, rel=1e-9), f"{used} != {expected}"
        return
    case = CASES[k]
    frames, monitor = inputs.frames, monitor_of(case)
    if check == "opencl":
        engine = engines(k, "opencl")
        assert "opencl" in engine.why_not_batched
    else:
        engine = engines(k, "scipy" if check == "scipy" else "fused")
        assert engine.why_not_batched == ""
    if check == "per_frame":
        rows = [engine.integrate(f, float(m)) for f, m in zip(frames, monitor, strict=True)]
        intensity = np.stack([r.intensity for r in rows])
        sigmas = [r.sigma for r in rows]
        assert all(s is None for s in sigmas) or all(s is not None for s in sigmas)
        sigma = None if sigmas[0] is None else np.stack(sigmas)
    else:
        result = engine.integrate_batch(frames, monitor)
        intensity, sigma = result.intensity, result.sigma
    c = engine.config
    method = engine.method if check == "opencl" else None
    expected, expected_sigma = reference(c, frames, monitor, engine.ai, method)
    rows = (N_FRAMES, c.n_slices, c.n_pts) if c.n_slices > 1 else (N_FRAMES, c.n_pts)
    assert expected.shape == rows
    assert intensity.shape == rows
    assert (expected_sigma is None) == (case["error_model"] == "")
    assert (sigma is None) == (case["error_model"] == ""), "sigma exactly with an error model"
    errors = {"intensity": relative_error(intensity, expected)}
    if sigma is not None:
        assert sigma.shape == rows
        errors["sigma"] = relative_error(sigma, expected_sigma)
    tolerance = {"intensity": 1e-5, "sigma": 1e-4}
    failed = {what: e for what, e in errors.items() if e > tolerance[what]}
    assert not failed, "max relative error " + ", ".join(
        f"{what} {e:.2e} > {tolerance[what]:g}" for what, e in failed.items()
    )
