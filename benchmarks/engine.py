"""Engine throughput and memory: ringflow's batched engine against pyFAI's loop.

Engine: the same Pilatus-1M frames (LaB6 rings with Poisson noise, from :mod:`tasks.demo`)
integrated (a) by pyFAI, ``integrate1d_ng`` / ``integrate2d_ng`` one frame at a time with
method ("bbox", "csr", "cython"), its OpenMP on the 2 cores, and (b) by ringflow's
:class:`tasks.engine.Engine` in batches on 2 threads. Same mask, polarization, solid angle,
Poisson error model and monitor. 1D: 1000 bins of 2th_deg; 2D: 360 x 500. Each round runs
both back to back; the ratio is the median of per-round ratios. Every batched row is checked
against pyFAI's: 1e-5 relative on intensity, 1e-4 on sigma.

Memory: the file task's own work (:func:`tasks.integrate.integrate_to_partial`: read ahead,
decompress, integrate, stream the partial) on a 1000-frame and a 100-frame bitshuffle-LZ4
Lima file, each in a fresh process; peak RSS compared. The files are written fast from a few
distinct compressed frames with ``write_direct_chunk``: reading and decompressing them costs
what any such file costs.

    python benchmarks/engine.py            # 64 frames per round, 3 rounds; 1000 vs 100 frames
    python benchmarks/engine.py --short    # CI: 64 frames, 2 rounds; 300 vs 100 frames
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if __package__:
    from .common import Measure, Section, as_dicts, format_table, pin_cores
else:  # run as a script, or imported by a sibling script: benchmarks/ is on sys.path
    if str(Path(__file__).resolve().parent) not in sys.path:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import Measure, Section, as_dicts, format_table, pin_cores  # noqa: E402

from tasks.demo import DemoSpec, write_demo  # noqa: E402  (common put the repo on sys.path)

CORES = 2
FRAMES = {False: 64, True: 64}  # per round, per engine (fewer would split too thin)
ROUNDS = {False: 3, True: 2}
MEMORY_FRAMES = {False: (1000, 100), True: (300, 100)}
TARGETS = {"1D": 5.0, "2D": 3.0, "memory": 1.3}
CASES = {"1D": {}, "2D": {"azimuthal_range": (-180.0, 180.0, 360), "n_pts": 500}}
LIMA = "/entry_0000/measurement/data"


def demo_config(root: str):
    """The demo's configuration (1000 bins, bbox, poisson, polarization 0.99, monitor)."""
    from tasks.config import Config

    files = write_demo(DemoSpec(root, scans=1, files_per_scan=1, frames_per_file=2))
    config = Config.from_file(files.config)
    return files, dataclasses.replace(
        config,
        integration=dataclasses.replace(config.integration, pixel_splitting="bbox"),
        computations=dataclasses.replace(config.computations, cores_per_worker=CORES),
    )


def poisson_frames(files, n: int) -> np.ndarray:
    from tasks.demo import detector_mask, geometry, ideal_pattern

    ai = geometry(DemoSpec(root=""))
    ideal = ideal_pattern(ai, detector_mask(ai))
    rng = np.random.default_rng(0)
    return rng.poisson(ideal * 0.9, size=(n, *ideal.shape)).astype(np.int32)


def pyfai_loop(config, frames: np.ndarray, monitor: np.ndarray):
    """What a scientist writes: the integrator, one frame at a time."""
    import fabio
    import pyFAI

    from tasks.engine import integrator_radial_range

    c = config.integration
    ai = pyFAI.load(c.poni_file)
    kwargs = dict(
        unit=c.unit,
        method=("bbox", "csr", "cython"),
        mask=fabio.open(c.mask_file).data,
        polarization_factor=c.polarization_factor,
        correctSolidAngle=c.correct_solid_angle,
        error_model=c.error_model,
        # an empty radial_range is the integrator's range, which ringflow passes to pyFAI
        radial_range=c.radial_range or integrator_radial_range(c),
    )
    if c.n_slices > 1:
        kwargs["azimuth_range"] = c.azimuthal_range[:2]

        def one(frame, m):
            return ai.integrate2d_ng(frame, c.n_pts, c.n_slices, normalization_factor=m, **kwargs)
    else:

        def one(frame, m):
            return ai.integrate1d_ng(frame, c.n_pts, normalization_factor=m, **kwargs)

    one(frames[0], 1.0)  # builds the CSR matrix: not part of the loop's speed

    def run():
        results = [one(f, float(m)) for f, m in zip(frames, monitor, strict=True)]
        return np.stack([r.intensity for r in results]), np.stack([r.sigma for r in results])

    return run


def batched(config, frames: np.ndarray, monitor: np.ndarray):
    from tasks.engine import Engine

    engine = Engine(config, threads=CORES)
    size = engine.batch_size(frames.dtype.itemsize)
    engine.integrate_batch(frames[:2], monitor[:2])  # builds the batch integrator

    def run():
        parts = [
            engine.integrate_batch(frames[k : k + size], monitor[k : k + size])
            for k in range(0, len(frames), size)
        ]
        return np.concatenate([p.intensity for p in parts]), np.concatenate(
            [p.sigma for p in parts]
        )

    return run, size


def max_relative(actual: np.ndarray, expected: np.ndarray) -> float:
    """Relative to each value, or to 1e-3 of its frame's largest for near-empty bins."""
    rows = np.abs(expected).reshape(len(expected), -1).max(axis=1)
    floor = 1e-3 * rows.reshape((-1,) + (1,) * (expected.ndim - 1))
    return float((np.abs(actual - expected) / np.maximum(np.abs(expected), floor)).max())


def engine_case(name: str, config, frames, monitor, rounds: int) -> Measure:
    config = dataclasses.replace(
        config, integration=dataclasses.replace(config.integration, **CASES[name])
    )
    loop = pyfai_loop(config, frames, monitor)
    fast, size = batched(config, frames, monitor)
    ratios, loop_fps, fast_fps, worst_i, worst_s = [], [], [], 0.0, 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        ref_i, ref_s = loop()
        t1 = time.perf_counter()
        got_i, got_s = fast()
        t2 = time.perf_counter()
        loop_fps.append(len(frames) / (t1 - t0))
        fast_fps.append(len(frames) / (t2 - t1))
        ratios.append((t1 - t0) / (t2 - t1))
        worst_i = max(worst_i, max_relative(got_i, ref_i))
        worst_s = max(worst_s, max_relative(got_s, ref_s))
    c = config.integration
    shape = f"{c.n_slices} x {c.n_pts}" if c.n_slices > 1 else f"{c.n_pts} bins"
    return Measure(
        section=f"engine {name}",
        name=f"batched, {CORES} threads, batches of {size} ({shape})",
        value=statistics.median(fast_fps),
        unit="frames/s",
        baseline=statistics.median(loop_fps),
        baseline_name="pyFAI frame by frame",
        ratio=statistics.median(ratios),
        target=TARGETS[name],
        equal=worst_i <= 1e-5 and worst_s <= 1e-4,
        note=f"max rel. diff intensity {worst_i:.1e}, sigma {worst_s:.1e}",
    )


# --------------------------------------------------------------------------- memory


def write_lima(path: str, frames: np.ndarray, n: int) -> None:
    """A bitshuffle-LZ4 Lima file of n frames cycling through ``frames``, chunk per frame."""
    import h5py
    import hdf5plugin

    with h5py.File(path + ".seed", "w") as seed:
        seed.create_dataset(
            "d", data=frames, chunks=(1, *frames.shape[1:]), **hdf5plugin.Bitshuffle(cname="lz4")
        )
    with h5py.File(path + ".seed", "r") as seed, h5py.File(path, "w") as h5:
        chunks = [seed["d"].id.read_direct_chunk((k, 0, 0)) for k in range(len(frames))]
        dset = h5.create_dataset(
            LIMA,
            (n, *frames.shape[1:]),
            frames.dtype,
            chunks=(1, *frames.shape[1:]),
            **hdf5plugin.Bitshuffle(cname="lz4"),
        )
        for k in range(n):
            mask, raw = chunks[k % len(chunks)]
            dset.id.write_direct_chunk((k, 0, 0), raw, mask)
    os.remove(path + ".seed")


MEMORY_CHILD = """
import json, resource, sys
sys.path.insert(0, sys.argv[1])
from tasks.config import Config
from tasks.integrate import integrate_to_partial
from tasks.payloads import FileTask
config = Config.from_file(sys.argv[2])
n = int(sys.argv[4])
task = FileTask(job_id="bench", task_id="bench-0", prefix="bench", scan_key="s", index=0,
    path=sys.argv[3], dataset="/entry_0000/measurement/data", src_start=0, n_frames=n,
    scan_start=0, partial=sys.argv[5], config_digest="")
integrate_to_partial(task, config)
print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def peak_rss(config_path: str, lima: str, n: int, partial: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_CHILD, str(Path(__file__).resolve().parents[1])]
        + [config_path, lima, str(n), partial],
        capture_output=True,
        text=True,
        timeout=1200,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mib"]


def memory_case(files, frames: np.ndarray, short: bool, tmp: str) -> Measure:
    large, small = MEMORY_FRAMES[short]
    rss = {}
    for n in (large, small):
        lima = os.path.join(tmp, f"lima_{n}.h5")
        write_lima(lima, frames[:8], n)
        rss[n] = peak_rss(files.config, lima, n, os.path.join(tmp, f"partial_{n}.h5"))
        os.remove(lima)
    return Measure(
        section="memory",
        name=f"one engine, peak RSS, {large}-frame file",
        value=rss[large],
        unit="MiB",
        baseline=rss[small],
        baseline_name=f"{small}-frame file",
        ratio=rss[large] / rss[small],
        target=TARGETS["memory"],
        target_is="ratio<=",
        note="engine_memory_mb = 1024 (default); batches of 52 Pilatus-1M frames",
    )


def measure(short: bool) -> Section:
    section = Section()
    pin_cores(CORES)
    with tempfile.TemporaryDirectory(prefix="ringflow-bench-engine-") as tmp:
        files, config = demo_config(tmp)
        frames = poisson_frames(files, FRAMES[short])
        monitor = np.linspace(0.9, 1.1, len(frames))
        for name in CASES:
            section.add(engine_case(name, config, frames, monitor, ROUNDS[short]))
        section.add(memory_case(files, frames, short, tmp))
    return section


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="CI mode: fewer frames")
    parser.add_argument("--json", action="store_true", help="print the section as JSON")
    args = parser.parse_args(argv)
    section = measure(args.short)
    print(format_table(section.measures))
    for m in section.measures:
        print(f"{m.section}: {m.note}")
    if args.json:
        print(json.dumps(as_dicts(section.measures)))
    unequal = any(m.equal is False for m in section.measures)
    missed = any(m.ok is False for m in section.measures)
    return 1 if unequal or (missed and not args.short) else 0


if __name__ == "__main__":
    sys.exit(main())
