"""`ringflow plot` on a long scan: is a 10,000-frame output still a few seconds away?

Writes one 1D output of ``--frames`` frames x ``--bins`` bins (intensity and errors,
float32) with ringflow's own writer and its default storage (DEFLATE level 1, shuffle,
fletcher32, ~1 MiB chunks: what ``ringflow run`` writes), then times, each in a fresh process
as a user runs it: ``ringflow plot`` (the heat map of 1 row in 13, one per pixel of an 800-pixel
figure, over the mean of every frame, computed in one pass of 8 MiB blocks), ``ringflow plot
--frame N/2`` (one row) and, for scale, ``ringflow --help`` (the start-up every command
pays). Each is run ``--runs`` times; each run and the median are printed, with the largest
resident memory of the runs (the scan's intensity alone is frames x bins x 4 bytes: 80 MB
for the default).

    python benchmarks/plot.py                    # 10,000 frames x 2000 bins
    python benchmarks/plot.py --frames 100000    # longer scans
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SLAB = 500  # rows generated and handed to the writer at once


@dataclass(frozen=True)
class Timing:
    """The runs of one command: seconds each, and the largest resident memory among them."""

    name: str
    seconds: list[float]
    max_rss_mib: float

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def rows(frames: int, bins: int, seed: int, errors: bool) -> Iterator[np.ndarray]:
    """Powder rings drifting slowly over the scan, Poisson-like noise; NaN in the first bin
    (an empty bin, as pyFAI leaves it). The same seed gives the errors of the same rows."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, bins)
    for start in range(0, frames, SLAB):
        index = np.arange(start, min(start + SLAB, frames))[:, None]
        shift = 0.01 * np.sin(index / max(frames, 1) * 6)
        peaks = sum(
            h * np.exp(-(((x - c - shift) / 0.003) ** 2))
            for c, h in ((0.15, 900), (0.3, 400), (0.52, 250), (0.71, 120))
        )
        values = 50 + peaks + rng.normal(0, 3, (len(index), bins))
        values[:, 0] = np.nan
        yield (np.sqrt(np.abs(values)) if errors else values).astype(np.float32)


def write_scan(path: str, frames: int, bins: int) -> None:
    """The output as an assembly writes it, through the project's writer and its defaults.

    Run in a child process (:func:`written`): this one stays small, since a child's peak
    memory as ``wait4`` reports it starts at its parent's when it forks."""
    from tasks.config import ComputationsConfig, OutputConfig
    from tasks.writers import OutputStorage, ScanResult, Stream, write_nexus

    shape = (frames, bins)
    config = SimpleNamespace(output=OutputConfig(), computations=ComputationsConfig())
    result = ScanResult(
        entry="1.1",
        intensity=Stream(shape, np.dtype(np.float32), lambda: rows(frames, bins, 0, False)),
        sigma=Stream(shape, np.dtype(np.float32), lambda: rows(frames, bins, 0, True)),
        radial=np.linspace(0.5, 45.0, bins),
        unit="2th_deg",
        azimuthal=None,
        source_file=["/data/RAW_DATA/bench/scan0001/pilatus_0000.h5"] * frames,
        source_frame=np.arange(frames),
        normalization=None,
        configuration="",
        geometry={},
        versions={"ringflow": "benchmark"},
        method="bbox/csr/cython batched",
        radial_range=(0.5, 45.0),
        fingerprint="benchmark",
        metadata={"title": f"benchmark {frames} frames"},
    )
    write_nexus(path, result, OutputStorage.from_config(config), 0o644)


def written(path: str, frames: int, bins: int) -> float:
    """Seconds to write the scan, in a fresh (spawned) process."""
    start = time.perf_counter()
    child = multiprocessing.get_context("spawn").Process(
        target=write_scan, args=(path, frames, bins)
    )
    child.start()
    child.join()
    if child.exitcode != 0:
        raise SystemExit(f"writing {path} failed (exit code {child.exitcode})")
    return time.perf_counter() - start


def timed(name: str, args: list[str], runs: int) -> Timing:
    """``ringflow ARGS`` ``runs`` times, each a fresh process; wall seconds and peak RSS."""
    seconds, rss = [], 0.0
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    for _ in range(runs):
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        _, status, usage = os.wait4(proc.pid, 0)
        seconds.append(time.perf_counter() - start)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"ringflow {' '.join(args)} failed: {proc.stderr.read().decode()}")
        proc.stderr.close()
        rss = max(rss, usage.ru_maxrss / 1024)  # kB on Linux
    return Timing(name, seconds, rss)


def report(timings: list[Timing], frames: int, bins: int, output: str) -> None:
    size = os.path.getsize(output) / 2**20
    print(f"output: {frames} frames x {bins} bins, {size:.1f} MiB on disk ({output})")
    print(f"{'command':42s} {'runs (s)':24s} {'median':>8s} {'max RSS':>9s}")
    for t in timings:
        runs = " ".join(f"{s:.2f}" for s in t.seconds)
        print(f"{t.name:42s} {runs:24s} {t.median:7.2f}s {t.max_rss_mib:6.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=10_000, help="frames of the scan")
    parser.add_argument("--bins", type=int, default=2000, help="radial bins per frame")
    parser.add_argument("--runs", type=int, default=3, help="runs of each command")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ringflow-plot-bench-") as folder:
        output = os.path.join(folder, "azint_bench_scan0001_pilatus.h5")
        print(f"written in {written(output, args.frames, args.bins):.1f} s")
        png = os.path.join(folder, "plot.png")
        frame = str(args.frames // 2)
        timings = [
            timed("ringflow --help (start-up)", ["--help"], args.runs),
            timed("ringflow plot OUTPUT -o plot.png", ["plot", output, "-o", png], args.runs),
            timed(
                f"ringflow plot OUTPUT --frame {frame} -o ...",
                ["plot", output, "--frame", frame, "-o", png],
                args.runs,
            ),
        ]
        report(timings, args.frames, args.bins, output)


if __name__ == "__main__":
    main()
