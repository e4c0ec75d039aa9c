"""Inputs for tests/test_pyfai_combinations.py: the option axes, a pairwise covering of them,
and a small Pilatus100k dataset (PONI, mask, dark, flat, int32 frames) written to a folder.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DETECTOR = "Pilatus100k"  # 195 x 487 pixels: every case integrates in milliseconds
N_FRAMES = 4
MONITOR = (1.0, 0.8, 1.25, 1.1)

# azimuthal_range (min, max, n_slices) of each value of the "dim" axis
DIMS = {
    "1D": (-180.0, 180.0, 1),
    "1D part": (-90.0, 90.0, 1),
    "2D full": (-180.0, 180.0, 36),
    "2D part": (-45.0, 135.0, 18),
}
N_PTS = {1: 200, 2: 100}  # radial bins, 1D and 2D

# a (min, max) well inside this geometry's range in each unit (2th reaches 13 degrees)
RADIAL_RANGES = {
    "2th_deg": (1.5, 11.0),
    "q_nm^-1": (5.0, 40.0),
    "q_A^-1": (0.5, 4.0),
    "r_mm": (5.0, 40.0),
}

AXES: dict[str, tuple] = {
    "dim": tuple(DIMS),
    "split": ("no", "bbox", "full"),
    "error_model": ("", "poisson", "hybrid"),
    "mask": (False, True),
    "dark": (False, True),
    "flat": (False, True),
    "polarization": (None, 0.99),
    "solid_angle": (False, True),
    "attenuation": (False, True),
    "monitor": (False, True),
    "unit": tuple(RADIAL_RANGES),
    "radial_range": ("empty", "set"),
}


def all_pairs(axes: dict[str, tuple]) -> set[tuple]:
    """Every ((axis, value), (axis, value)) pair of two different axes, axes in order."""
    return {
        ((a, va), (b, vb))
        for a, b in itertools.combinations(axes, 2)
        for va in axes[a]
        for vb in axes[b]
    }


def pairs_of(case: dict, axes: dict[str, tuple]) -> set[tuple]:
    return {((a, case[a]), (b, case[b])) for a, b in itertools.combinations(axes, 2)}


def pairwise(axes: dict[str, tuple], seed: int = 2, candidates: int = 30) -> list[dict]:
    """A small list of cases (one value per axis) in which every pair of values of any two
    axes appears at least once: greedy (each case the candidate covering most pairs not yet
    covered), candidates built from an uncovered pair with a seeded random axis order. Seed 2
    gives 17 cases for :data:`AXES` (16 is the least: 4 dims x 4 units)."""
    rng = random.Random(seed)
    names = list(axes)
    uncovered = all_pairs(axes)
    cases: list[dict] = []
    while uncovered:
        best, best_gain = None, -1
        pool = sorted(uncovered, key=repr)
        for _ in range(candidates):
            (a, va), (b, vb) = rng.choice(pool)
            case = {a: va, b: vb}
            rest = [n for n in names if n not in case]
            rng.shuffle(rest)
            for name in rest:
                gains = []
                for value in axes[name]:
                    gain = sum(_pair(names, (m, case[m]), (name, value)) in uncovered for m in case)
                    gains.append((gain, rng.random(), value))
                case[name] = max(gains, key=lambda g: g[:2])[2]
            case = {n: case[n] for n in names}
            gain = len(pairs_of(case, axes) & uncovered)
            if gain > best_gain:
                best, best_gain = case, gain
        cases.append(best)
        uncovered -= pairs_of(best, axes)
    return cases


def _pair(names: list[str], first: tuple, second: tuple) -> tuple:
    """The pair with its axes in the order of ``names``, as :func:`all_pairs` has it."""
    return (first, second) if names.index(first[0]) < names.index(second[0]) else (second, first)


def case_id(k: int, case: dict) -> str:
    """A readable pytest id: the case number and its options."""
    flags = [name for name in ("mask", "dark", "flat", "solid_angle") if case[name]]
    flags += ["pol"] if case["polarization"] is not None else []
    flags += ["att"] if case["attenuation"] else []
    flags += ["mon"] if case["monitor"] else []
    parts = [
        f"c{k:02d}",
        case["dim"].replace(" ", ""),
        case["split"],
        case["error_model"] or "noerr",
        case["unit"],
        f"range-{case['radial_range']}",
        "+".join(flags) or "bare",
    ]
    return "-".join(parts)


@dataclass(frozen=True)
class Inputs:
    poni: str
    mask: str
    dark: str
    flat: str
    frames: np.ndarray  # (N_FRAMES, 195, 487) int32, distinct, with Pilatus dummies


def geometry():
    """The integrator: beam near the detector's centre, slightly tilted, 41 keV."""
    import pyFAI.detectors
    from pyFAI.integrator.azimuthal import AzimuthalIntegrator

    detector = pyFAI.detectors.detector_factory(DETECTOR)
    rows, cols = detector.shape
    return AzimuthalIntegrator(
        dist=0.2,
        poni1=0.47 * rows * detector.pixel1,
        poni2=0.53 * cols * detector.pixel2,
        rot1=0.01,
        rot2=-0.005,
        rot3=0.0,
        detector=detector,
        wavelength=0.3e-10,
    )


def write_inputs(folder: Path, seed: int = 7) -> Inputs:
    """PONI, mask, dark and flat files in ``folder``, and the frames."""
    ai = geometry()
    shape = ai.detector.shape
    poni = folder / "pilatus100k.poni"
    ai.write(str(poni))
    rng = np.random.default_rng(seed)

    rows, cols = np.ogrid[: shape[0], : shape[1]]
    c1, c2 = ai.poni1 / ai.detector.pixel1, ai.poni2 / ai.detector.pixel2
    mask = np.zeros(shape, np.int8)
    mask[(rows - c1) ** 2 + (cols - c2) ** 2 < 12**2] = 1  # beamstop
    mask[:, 50] = 1  # a dead column
    mask[rng.random(shape) < 0.003] = 1  # scattered hot pixels
    dummies = [(1, 120, slice(200, 220), -2), (2, 60, 300, -1), (3, 150, slice(400, 403), -2)]
    for _, row, col, _ in dummies:
        mask[row, col] = 0  # dummies outside the mask: each frame drops its own
    mask_path = _write_edf(folder / "mask.edf", mask)
    dark = _write_edf(folder / "dark.edf", rng.uniform(0.0, 2.0, shape).astype(np.float32))
    flat = _write_edf(folder / "flat.edf", rng.uniform(0.9, 1.1, shape).astype(np.float32))

    tth = ai.center_array(unit="2th_rad", scale=False)
    rings = sum(np.exp(-0.5 * ((tth - ring) / np.radians(0.04)) ** 2) for ring in lab6_rings(ai))
    ideal = 20.0 + 60.0 * np.exp(-tth / 0.08) + 500.0 * rings
    ideal *= ai.solidAngleArray() * ai.polarization(factor=0.99)
    # frame k has 1 + 0.2 k times the counts: frames out of order would show
    frames = np.stack(
        [rng.poisson(ideal * (1 + 0.2 * k)).astype(np.int32) for k in range(N_FRAMES)]
    )
    for frame, row, col, value in dummies:
        frames[frame, row, col] = value
    return Inputs(str(poni), mask_path, dark, flat, frames)


def lab6_rings(ai) -> list[float]:
    """2theta (rad) of LaB6's first reflections (cubic, a = 4.1569 A) at the beam's energy
    (pyFAI's calibrant module takes seconds to import)."""
    wavelength = ai.wavelength * 1e10
    d = [4.1569 / np.sqrt(n) for n in (1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 16, 17)]
    return [2 * np.arcsin(wavelength / (2 * spacing)) for spacing in d]


def _write_edf(path: Path, data: np.ndarray) -> str:
    import fabio

    fabio.edfimage.EdfImage(data=data).write(str(path))
    return str(path)
