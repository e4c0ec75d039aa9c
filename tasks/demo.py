"""A small, realistic ESRF dataset: LaB6 rings on a pyFAI detector, Bliss master + Lima files.

Layout (as at ESRF): <root>/RAW_DATA/<sample>/<sample>_0001/<sample>_0001.h5 with entries
1.1, 2.1...; each entry's measurement/<detector> is a virtual dataset over the Lima files
scanNNNN/<detector>_NNNN.h5 (bitshuffle-LZ4, one chunk per frame). Counts are Poisson around
an ideal ring pattern scaled by a fluctuating monitor.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np

MONITOR_MEAN = 1e5


@dataclass(frozen=True)
class DemoSpec:
    root: str
    scans: int = 2
    files_per_scan: int = 3
    frames_per_file: int = 50
    detector: str = "pilatus1m"
    lima_name: str = "pilatus"
    unit: str = "2th_deg"
    n_pts: int = 1000
    sample: str = "sample"
    wavelength: float = 1e-10
    distance: float = 0.2
    seed: int = 0


@dataclass(frozen=True)
class DemoFiles:
    dataset: str
    poni: str
    mask: str
    config: str


def write_demo(spec: DemoSpec) -> DemoFiles:
    """Write the dataset, PONI, mask and a ready configuration; return their paths."""
    raw = Path(spec.root, "RAW_DATA", spec.sample, f"{spec.sample}_0001")
    raw.mkdir(parents=True, exist_ok=True)
    ai = geometry(spec)
    poni = _write_poni(ai, Path(spec.root, "calibration", "LaB6.poni"))
    mask_path, mask = _write_mask(ai, Path(spec.root, "calibration", "mask.edf"))
    ideal = ideal_pattern(ai, mask)
    rng = np.random.default_rng(spec.seed)
    master = raw / f"{spec.sample}_0001.h5"
    with h5py.File(master, "w") as h5:
        h5.attrs.update(NX_class="NXroot", creator="ringflow demo")
        for number in range(1, spec.scans + 1):
            _write_scan(h5, raw, number, spec, ideal, rng)
    config = _write_config(spec, master, poni, mask_path)
    return DemoFiles(str(master), str(poni), str(mask_path), str(config))


def geometry(spec: DemoSpec):
    """The demo's pyFAI integrator: the detector with a slightly tilted beam off centre."""
    import pyFAI.detectors
    from pyFAI.integrator.azimuthal import AzimuthalIntegrator

    detector = pyFAI.detectors.detector_factory(spec.detector)
    rows, cols = detector.shape
    p1, p2 = detector.pixel1, detector.pixel2
    return AzimuthalIntegrator(
        dist=spec.distance,
        poni1=0.47 * rows * p1,
        poni2=0.53 * cols * p2,
        rot1=0.01,
        rot2=-0.005,
        rot3=0.0,
        detector=detector,
        wavelength=spec.wavelength,
    )


def _write_poni(ai, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    ai.write(str(path))
    return path


def _write_mask(ai, path: Path) -> tuple[Path, np.ndarray]:
    import fabio

    mask = detector_mask(ai)
    fabio.edfimage.EdfImage(data=mask).write(str(path))
    return path, mask


def detector_mask(ai) -> np.ndarray:
    """Module gaps of the detector plus a beamstop disc around the beam centre."""
    shape = ai.detector.shape
    mask = np.zeros(shape, dtype=np.int8)
    if ai.detector.mask is not None:
        mask |= (ai.detector.mask != 0).astype(np.int8)
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    c1, c2 = ai.poni1 / ai.detector.pixel1, ai.poni2 / ai.detector.pixel2
    mask[(rows - c1) ** 2 + (cols - c2) ** 2 < 25**2] = 1
    return mask


def ideal_pattern(ai, mask: np.ndarray) -> np.ndarray:
    """Expected counts at the mean monitor: LaB6 rings over a smooth background."""
    from pyFAI.calibrant import get_calibrant

    calibrant = get_calibrant("LaB6")
    calibrant.wavelength = ai.wavelength
    rings = calibrant.fake_calibration_image(ai, Imax=1.0, resolution=0.03)
    tth = ai.center_array(unit="2th_rad", scale=False)
    expected = 2.0 + 20.0 * np.exp(-tth / 0.3) + 400.0 * rings
    expected *= ai.solidAngleArray() * ai.polarization(factor=0.99)
    expected[mask != 0] = 0
    return expected.astype(np.float64)


def _write_scan(h5: h5py.File, raw: Path, number: int, spec: DemoSpec, ideal, rng) -> None:
    n_frames = spec.files_per_scan * spec.frames_per_file
    scan_dir = raw / f"scan{number:04d}"
    scan_dir.mkdir(exist_ok=True)
    frame = np.arange(n_frames)
    monitor = MONITOR_MEAN * (1 + 0.05 * np.sin(frame / 7.0 + number))
    layout = h5py.VirtualLayout(shape=(n_frames, *ideal.shape), dtype=np.int32)
    for index in range(spec.files_per_scan):
        lima = scan_dir / f"{spec.lima_name}_{index:04d}.h5"
        rows = slice(index * spec.frames_per_file, (index + 1) * spec.frames_per_file)
        _write_lima(lima, spec.lima_name, ideal, monitor[rows], rng)
        source = h5py.VirtualSource(
            f"scan{number:04d}/{lima.name}",
            "/entry_0000/measurement/data",
            shape=(spec.frames_per_file, *ideal.shape),
        )
        layout[rows] = source
    entry = h5.create_group(f"{number}.1")
    entry.attrs["NX_class"] = "NXentry"
    start = datetime(2026, 11, 24, 10, 0, tzinfo=timezone.utc) + timedelta(minutes=10 * number)
    entry["title"] = f"ascan samy 0 1 {n_frames - 1} 0.1"
    entry["start_time"] = start.isoformat()
    entry["end_time"] = (start + timedelta(seconds=0.1 * n_frames)).isoformat()
    samy = np.linspace(0.0, 1.0, n_frames)
    positioners = entry.create_group("instrument/positioners")
    positioners["samy"], positioners["samz"] = samy, 1.25
    measurement = entry.create_group("measurement")
    measurement.attrs["NX_class"] = "NXcollection"
    measurement["mon"], measurement["samy"] = monitor, samy
    measurement["elapsed_time"] = 0.1 * frame
    measurement.create_virtual_dataset(spec.lima_name, layout, fillvalue=-1)
    entry[f"instrument/{spec.lima_name}/type"] = "lima"


def _write_lima(path: Path, name: str, ideal: np.ndarray, monitor: np.ndarray, rng) -> None:
    with h5py.File(path, "w") as h5:
        data = h5.create_dataset(
            "/entry_0000/measurement/data",
            shape=(len(monitor), *ideal.shape),
            dtype=np.int32,
            chunks=(1, *ideal.shape),
            **hdf5plugin.Bitshuffle(cname="lz4"),
        )
        for i, mon in enumerate(monitor):
            data[i] = rng.poisson(ideal * (mon / MONITOR_MEAN)).astype(np.int32)
        h5[f"/entry_0000/instrument/{name}/data"] = data


def _write_config(spec: DemoSpec, master: Path, poni: Path, mask: Path) -> Path:
    path = Path(spec.root, "demo.ini")
    workers = max(1, min(4, os.cpu_count() or 1))
    path.write_text(
        f"""# ringflow demo configuration (written by `ringflow demo`)
[dataset]
location = {master}

[azimuthal integration]
poni_file = {poni}
mask_file = {mask}
detector_name = {spec.lima_name}
n_pts = {spec.n_pts}
unit = {spec.unit}
error_model = poisson
pixel_splitting = bbox
# the demo runs anywhere: cython needs no OpenCL device
ai_method = cython
polarization_factor = 0.99
correct_solid_angle = 1
# the simulated sensor absorbs everything: no attenuation correction
correct_detector_attenuation = 0
monitor_name = mon

[computations distribution]
ai_engines_per_worker = {workers}
cores_per_worker = 1

[output]
existing_output = overwrite

[queue]
queue_prefix = ringflow
"""
    )
    return path
