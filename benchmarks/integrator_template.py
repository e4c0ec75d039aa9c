"""ESRF integrator's own template on this machine: ``ringflow run`` wall time, and OpenCL.

Two measurements, each candidate beside its baseline in the same run, rounds alternating:

- the template (``integrator-config --nocomments``, the test fixture) filled only with the
  demo's dataset, detector, mask, PONI and output folder, run unchanged with ``ringflow run``
  on the quick start's dataset (2 scans x 3 Lima files x 50 Pilatus-1M frames): without a GPU
  its ``ai_method = opencl`` runs on the batched CPU engine; beside it the same file with
  ``cpu_fallback = 1``, pyFAI's OpenCL engine on an OpenCL CPU device (PoCL);
- integration alone, frames in memory: pyFAI's OpenCL engine on PoCL, frame by frame, and
  the batched CPU engine (2 threads), on the same frames and configuration.

    python benchmarks/integrator_template.py [--rounds N]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__:
    from .common import ROOT
else:
    from common import ROOT

import numpy as np  # noqa: E402

from tasks.demo import DemoSpec, write_demo  # noqa: E402  (common put the repo on sys.path)
from tests.test_config import filled_template  # noqa: E402
from tests.test_integrator_template import user_values  # noqa: E402


def template_for(demo, folder: Path, **computations: str) -> Path:
    """The integrator's template with only the user's values (and ``computations``) set."""
    changes = user_values(demo, folder / "out")
    folder.mkdir(parents=True, exist_ok=True)
    path = filled_template(folder, changes)
    if computations:  # keys the template lacks go at the end of their section
        lines = path.read_text().replace(
            "[output]", "".join(f"{k} = {v}\n" for k, v in computations.items()) + "\n[output]"
        )
        path.write_text(lines)
    return path


def timed_run(config: Path) -> tuple[float, dict]:
    """``ringflow run`` of ``config`` into a fresh output folder (an existing output would be
    skipped: the template's existing_output is reprocess_if_conffile_more_recent)."""
    shutil.rmtree(config.parent / "out", ignore_errors=True)
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", "run", str(config), "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
    )
    seconds = time.monotonic() - start
    if done.returncode != 0:
        raise SystemExit(f"{config}: exit {done.returncode}\n{done.stderr[-2000:]}")
    return seconds, json.loads(done.stdout.strip().splitlines()[-1])


def per_frame(demo, rounds: int, frames: int = 32) -> dict[str, list[float]]:
    """ms per frame of each engine, integration only, rounds alternating."""
    import h5py

    from tasks.config import Config
    from tasks.engine import Engine

    config = Config.from_file(template_for(demo, Path(tempfile.mkdtemp()) / "engine"))
    lima = sorted(Path(demo.dataset).parent.glob("scan0001/pilatus_*.h5"))[0]
    with h5py.File(lima) as h5:
        data = h5["/entry_0000/measurement/data"][:frames]
    ocl = dataclasses.replace(config.computations, cpu_fallback=True)
    engines = {
        "OpenCL on PoCL, per frame": Engine(dataclasses.replace(config, computations=ocl), 2),
        "batched CPU engine, 2 threads": Engine(
            dataclasses.replace(
                config, integration=dataclasses.replace(config.integration, ai_method="cython")
            ),
            2,
        ),
    }
    ones = np.ones(len(data))
    for engine in engines.values():
        engine.integrate_batch(data[:2], ones[:2])  # build, compile
    times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(rounds):
        for name, engine in engines.items():
            start = time.perf_counter()
            engine.integrate_batch(data, ones)
            times[name].append(1e3 * (time.perf_counter() - start) / len(data))
    for name, engine in engines.items():
        print(f"  {name}: {engine.description()}")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ringflow-template-"))
    demo = write_demo(DemoSpec(str(work / "demo")))
    configs = {
        "template as generated (opencl -> CPU engine)": template_for(demo, work / "cpu"),
        "template + cpu_fallback = 1 (OpenCL on PoCL)": template_for(
            demo, work / "pocl", cpu_fallback="1"
        ),
    }
    walls: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.rounds):
        for name, config in configs.items():
            seconds, summary = timed_run(config)
            walls[name].append(seconds)
    print(f"ringflow run, {summary['frames']} frames, {args.rounds} alternating rounds:")
    for name, values in walls.items():
        print(f"  {name}: {min(values):.1f}-{max(values):.1f} s wall")
    print("integration alone, Pilatus-1M frames, the template's configuration:")
    for name, values in per_frame(demo, args.rounds).items():
        print(f"  {name}: {min(values):.1f}-{max(values):.1f} ms/frame")


if __name__ == "__main__":
    main()
