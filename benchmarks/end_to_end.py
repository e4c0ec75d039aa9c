"""End-to-end throughput: ``ringflow run`` against the script a scientist would write.

Both integrate the same Bliss dataset (Pilatus-1M frames of LaB6 rings with Poisson noise,
bitshuffle-LZ4 Lima files, from :mod:`tasks.demo`) with the same PONI, mask, 1000 bins in
q_nm^-1, method ("bbox", "csr", "cython"), polarization 0.99, solid angle, Poisson error model
and per-frame monitor normalisation, and both write one HDF5 file per scan:

- the baseline, :data:`SCRIPT`: h5py reads each Lima file frame by frame, pyFAI's
  ``ai.integrate1d`` integrates each frame, h5py writes the results with gzip. It runs as
  ``python script.py``: interpreter start and imports are in its time.
- the candidate: ``ringflow run CONFIG`` as a subprocess, planning, embedded Redis and local
  Celery workers (2 engines x 1 core, assembly on 2 threads) included.

Both are pinned to the same 2 CPUs (children inherit the affinity); the baseline keeps
pyFAI's default OpenMP threads (2 on 2 CPUs), as a scientist would. The dataset is cached in
``--data`` between runs and its files are read once before timing, so both start from a warm
page cache. Each round runs the baseline, then ringflow; figures are medians over rounds,
the ratio the median of per-round ratios. Every ringflow output row is compared with the
script's (see :func:`close`): same frames in the same order, intensity and errors equal.

    python benchmarks/end_to_end.py            # 4000 frames; exit 1 if unequal or below 4x
    python benchmarks/end_to_end.py --short    # CI: 400 frames; exit 1 only if unequal
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from string import Template

import h5py
import numpy as np

try:  # imported as benchmarks.end_to_end
    from .common import ROOT, Measure, Section, as_dicts, format_table, pin_cores
except ImportError:  # run as a script, or imported by a sibling run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import ROOT, Measure, Section, as_dicts, format_table, pin_cores

from tasks.demo import DemoSpec, write_demo  # noqa: E402  (common put the repo on sys.path)

SECTION = "end to end"
TARGET = 4.0  # ringflow frames/s over the script's, on 2 cores
CORES = 2
RTOL = 1e-5  # relative tolerance on intensity and errors
FLOOR = 1e-3  # bins below FLOOR x the frame's largest value are compared at that floor
DATA_ROOT = Path(tempfile.gettempdir(), "ringflow-bench-data")
MARKER = "benchmark-dataset.json"
LOG_TAIL = 2000  # characters of a failed command's output kept in the error


@dataclass(frozen=True)
class Mode:
    """Dataset shape: files per scan chosen so both scans keep 2 engines busy."""

    name: str
    scans: int
    files_per_scan: int
    frames_per_file: int

    @property
    def frames(self) -> int:
        return self.scans * self.files_per_scan * self.frames_per_file


FULL = Mode("full", scans=2, files_per_scan=10, frames_per_file=200)  # 4000 frames
SHORT = Mode("short", scans=2, files_per_scan=2, frames_per_file=100)  # 400 frames
JOB = Mode("job", scans=2, files_per_scan=4, frames_per_file=200)  # 1600 frames
SMALL = Mode("small", scans=1, files_per_scan=1, frames_per_file=50)  # one file
MODES = {m.name: m for m in (FULL, JOB, SMALL, SHORT)}
# ringflow over the script asked of each mode (a first job, start-up included); short: none
TARGETS = {"full": TARGET, "job": 6.0, "small": 1.0}
LIMIT_TARGET = 2.5  # a later job's wall time over the decode-only limit, at most


@dataclass(frozen=True)
class Settings:
    """The one integration both sides use: the INI and the script are written from it."""

    n_pts: int = 1000
    unit: str = "q_nm^-1"
    pixel_splitting: str = "bbox"
    ai_method: str = "cython"
    error_model: str = "poisson"
    polarization_factor: float = 0.99
    correct_solid_angle: bool = True
    monitor_name: str = "mon"  # the demo's counter: each frame is divided by its value
    detector_name: str = "pilatus"  # DemoSpec.lima_name
    # 2 CPUs: two single-threaded engines, a file each, keep both CPUs integrating without
    # relying on threads inside a pyFAI call; assembly may compress a scan's file on both.
    ai_engines_per_worker: int = 2
    cores_per_worker: int = 1
    assemble_cores: int = 2

    @property
    def method(self) -> tuple[str, str, str]:
        return (self.pixel_splitting, "csr", self.ai_method)


@dataclass(frozen=True)
class Dataset:
    root: Path
    master: Path
    poni: Path
    mask: Path
    frames: int

    def lima_files(self) -> list[Path]:
        return sorted(self.master.parent.glob("scan*/*.h5"))

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())


@dataclass
class Run:
    """One timed subprocess."""

    seconds: float
    stdout: str
    log_dir: Path | None = None  # ringflow's worker logs
    started: float = 0.0  # time.time() at launch and exit, for the log breakdown
    ended: float = 0.0


@dataclass
class Comparison:
    equal: bool
    frames: int
    # per dataset, the largest |a - b| / max(|b|, FLOOR x row max): equal means <= RTOL
    worst: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


@dataclass
class Round:
    script_s: float
    ringflow_s: float  # a first job: the engine built from pyFAI
    later_s: float  # the same job again, same workspace: the engine loaded from its cache
    limit_s: float  # decode-only limit of the same files
    comparison: Comparison
    note: str


class BenchmarkError(RuntimeError):
    """A run failed or timed out: there is nothing to measure."""


# --- the baseline: the script a scientist would write --------------------------------------------

SCRIPT = Template('''\
"""Integrate every frame of a Bliss dataset with pyFAI; one HDF5 file per scan.

Usage: python integrate_scans.py MASTER.h5 OUTPUT_FOLDER
"""

import glob
import os
import sys

import fabio
import h5py
import hdf5plugin  # noqa: F401  (the Lima files are bitshuffle-LZ4)
import numpy as np
import pyFAI

PONI = $poni
MASK = $mask
DETECTOR = $detector
MONITOR = $monitor
N_PTS = $n_pts
UNIT = $unit
METHOD = $method
POLARIZATION_FACTOR = $polarization_factor
CORRECT_SOLID_ANGLE = $correct_solid_angle
ERROR_MODEL = $error_model
RADIAL_RANGE = $radial_range

master, out_dir = sys.argv[1], sys.argv[2]
os.makedirs(out_dir, exist_ok=True)
ai = pyFAI.load(PONI)
mask = fabio.open(MASK).data

with h5py.File(master, "r") as h5:
    scans = sorted((name for name in h5 if name.endswith(".1")), key=float)
    monitors = {name: h5[name]["measurement"][MONITOR][()] for name in scans}

for name in scans:
    scan = f"scan{int(float(name)):04d}"
    pattern = os.path.join(os.path.dirname(master), scan, DETECTOR + "_*.h5")
    lima_files = sorted(glob.glob(pattern))
    intensity, errors, files, frames = [], [], [], []
    for path in lima_files:
        with h5py.File(path, "r") as lima:
            data = lima["entry_0000/measurement/data"]
            for i in range(len(data)):
                result = ai.integrate1d(
                    data[i],
                    N_PTS,
                    unit=UNIT,
                    method=METHOD,
                    mask=mask,
                    polarization_factor=POLARIZATION_FACTOR,
                    correctSolidAngle=CORRECT_SOLID_ANGLE,
                    error_model=ERROR_MODEL,
                    radial_range=RADIAL_RANGE,
                    normalization_factor=float(monitors[name][len(intensity)]),
                )
                intensity.append(result.intensity)
                errors.append(result.sigma)
                files.append(path)
                frames.append(i)
    out_path = os.path.join(out_dir, f"azint_{scan}.h5")
    with h5py.File(out_path, "w") as out:
        out.attrs["entry"] = name
        out.create_dataset("intensity", data=np.array(intensity), compression="gzip")
        out.create_dataset("errors", data=np.array(errors), compression="gzip")
        out.create_dataset("radial", data=result.radial)
        out.create_dataset("source_file", data=np.array(files, dtype=h5py.string_dtype()))
        out.create_dataset("source_frame", data=np.array(frames))
    print(f"{name}: {len(intensity)} frames -> {out_path}")
''')


def script_text(settings: Settings, data: Dataset) -> str:
    """The baseline script with this run's settings written in as constants."""
    return SCRIPT.substitute(
        poni=repr(str(data.poni)),
        mask=repr(str(data.mask)),
        detector=repr(settings.detector_name),
        monitor=repr(settings.monitor_name),
        n_pts=settings.n_pts,
        unit=repr(settings.unit),
        method=repr(settings.method),
        polarization_factor=repr(settings.polarization_factor),
        correct_solid_angle=repr(settings.correct_solid_angle),
        error_model=repr(settings.error_model),
        radial_range=repr(radial_range_of(settings, data)),
    )


def radial_range_of(settings: Settings, data: Dataset) -> tuple[float, float]:
    """The radial range ringflow uses for the INI's empty radial_range (the integrator's:
    min and max of the pixel centres), written into the script as a constant."""
    from tasks.config import IntegrationConfig
    from tasks.engine import integrator_radial_range

    return integrator_radial_range(IntegrationConfig(poni_file=str(data.poni), unit=settings.unit))


def ringflow_ini(settings: Settings, data: Dataset, out_dir: Path) -> str:
    """ringflow's configuration for the same integration, writing under ``out_dir``."""
    return f"""\
[dataset]
location = {data.master}

[azimuthal integration]
poni_file = {data.poni}
mask_file = {data.mask}
detector_name = {settings.detector_name}
n_pts = {settings.n_pts}
unit = {settings.unit}
error_model = {settings.error_model}
pixel_splitting = {settings.pixel_splitting}
ai_method = {settings.ai_method}
polarization_factor = {settings.polarization_factor}
correct_solid_angle = {int(settings.correct_solid_angle)}
# the demo's simulated sensor absorbs everything: no attenuation correction (nor in the script)
correct_detector_attenuation = 0
monitor_name = {settings.monitor_name}

[computations distribution]
ai_engines_per_worker = {settings.ai_engines_per_worker}
cores_per_worker = {settings.cores_per_worker}
assemble_cores = {settings.assemble_cores}

[output]
location = {out_dir}
existing_output = overwrite

[pipeline]
# INFO: the workers log each task's receipt and duration, read for the time breakdown
verbosity = 2

[queue]
queue_prefix = bench
"""


# --- the dataset, cached between runs ------------------------------------------------------------


def dataset(mode: Mode, folder: Path) -> Dataset:
    """The mode's dataset in ``folder``: reused if its marker matches, else written anew.

    Written in a sibling folder and renamed, so an interrupted write is never reused.
    """
    wanted = {"mode": asdict(mode)}
    marker = folder / MARKER
    if marker.is_file():
        recorded = json.loads(marker.read_text())
        if recorded.get("mode") == wanted["mode"]:
            return _dataset_at(folder, recorded, mode)
        shutil.rmtree(folder)  # ours (it has the marker), for another mode
    elif folder.exists() and any(folder.iterdir()):
        raise BenchmarkError(f"{folder}: not empty and not a benchmark dataset; use --data")
    partial = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        recorded = wanted | _write(mode, partial)
        (partial / MARKER).write_text(json.dumps(recorded, indent=1))
        if folder.exists():
            folder.rmdir()
        partial.rename(folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return _dataset_at(folder, recorded, mode)


def _write(mode: Mode, root: Path) -> dict:
    spec = DemoSpec(
        root=str(root),
        scans=mode.scans,
        files_per_scan=mode.files_per_scan,
        frames_per_file=mode.frames_per_file,
    )
    start = time.perf_counter()
    print(f"writing the {mode.name} dataset ({mode.frames} frames) into {root}", file=sys.stderr)
    files = write_demo(spec)
    Path(files.config).unlink()  # its paths name the partial folder; the benchmark writes its own
    relative = {
        k: str(Path(getattr(files, k)).relative_to(root)) for k in ("dataset", "poni", "mask")
    }
    return {"paths": relative, "write_s": round(time.perf_counter() - start, 1)}


def _dataset_at(folder: Path, recorded: dict, mode: Mode) -> Dataset:
    paths = {k: folder / v for k, v in recorded["paths"].items()}
    return Dataset(folder, paths["dataset"], paths["poni"], paths["mask"], mode.frames)


def warm_page_cache(data: Dataset) -> None:
    """Read every Lima file once so neither side pays for a cold disk the other does not."""
    for path in data.lima_files():
        with open(path, "rb") as fh:
            while fh.read(16 * 2**20):
                pass


# --- running and timing --------------------------------------------------------------------------


def run_timed(cmd: list[str], work: Path, name: str, timeout: float, env: dict) -> Run:
    """Wall time of ``cmd`` from launch to exit; its stdout and stderr go to files in ``work``.

    On a timeout the command gets SIGTERM first (ringflow then stops its broker and workers,
    which run in sessions of their own), then its process group SIGKILL.
    """
    out_path, err_path = work / f"{name}.out", work / f"{name}.err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        started = time.time()
        start = time.perf_counter()
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _stop(proc)
            raise BenchmarkError(f"{name} ran past {timeout:.0f} s: {_tail(err_path)}") from None
        except BaseException:  # Ctrl-C: leave nothing running
            _stop(proc)
            raise
        seconds = time.perf_counter() - start
    if code != 0:
        raise BenchmarkError(f"{name} exited with {code}: {_tail(err_path)}")
    return Run(seconds, out_path.read_text(), started=started, ended=time.time())


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-LOG_TAIL:].strip() or "(no output)"


def _timeout(frames: int) -> float:
    """Generous (about 0.06 s/frame today on either side): only a hang should trip it."""
    return 120 + 0.5 * frames


def run_script(settings: Settings, data: Dataset, work: Path) -> Run:
    script = work / "integrate_scans.py"
    script.write_text(script_text(settings, data))
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}  # defaults
    cmd = [sys.executable, str(script), str(data.master), str(work / "script")]
    return run_timed(cmd, work, "script", _timeout(data.frames), env)


def run_ringflow(settings: Settings, data: Dataset, work: Path) -> Run:
    """``ringflow run``: the CLI of this checkout (PYTHONPATH), whatever is installed."""
    out_dir = work / "ringflow"
    config = work / "bench.ini"
    config.write_text(ringflow_ini(settings, data, out_dir))
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "cli.main", "run", str(config), "--json"]
    run = run_timed(cmd, work, "ringflow", _timeout(data.frames), os.environ | {"PYTHONPATH": path})
    try:
        summary = json.loads(run.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise BenchmarkError(
            f"ringflow printed no JSON summary: {run.stdout[-LOG_TAIL:]}"
        ) from None
    if summary["frames"] != data.frames or summary["files_failed"]:
        raise BenchmarkError(f"ringflow integrated {summary['frames']} of {data.frames} frames")
    run.log_dir = out_dir / ".ringflow" / "logs"
    return run


# --- equality ------------------------------------------------------------------------------------


def close(a: np.ndarray, b: np.ndarray) -> tuple[bool, float]:
    """(equal, worst) for rows of ``a`` (ringflow) against ``b`` (pyFAI's script).

    |a - b| <= RTOL x max(|b|, FLOOR x max|b| of that frame): relative on every bin that holds
    at least a thousandth of the frame's largest value; below that (empty or near-empty bins
    at the beam stop and the detector's edge) the tolerance stays RTOL x that thousandth, so
    rounding in a bin of almost nothing does not count as a difference. NaN equals NaN.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return False, float("inf")
    diff = np.where(np.isnan(a) & np.isnan(b), 0.0, np.abs(a - b))
    diff = np.nan_to_num(diff, nan=np.inf)  # NaN on one side only
    magnitude = np.abs(np.nan_to_num(b, nan=0.0))
    scale = np.max(magnitude, axis=-1, keepdims=True, initial=0.0)
    denom = np.maximum(np.maximum(magnitude, FLOOR * scale), np.finfo(float).tiny)
    worst = float(np.max(np.where(diff == 0, 0.0, diff / denom), initial=0.0))
    return worst <= RTOL, worst


def compare(ringflow_dir: Path, script_dir: Path, settings: Settings) -> Comparison:
    """ringflow's output of each scan against the script's, frame by frame, in order."""
    ours = {_entry_of(p): p for p in ringflow_dir.rglob("azint_*.h5")}
    theirs = {_entry_of(p): p for p in script_dir.glob("azint_*.h5")}
    result = Comparison(equal=True, frames=0)
    if set(ours) != set(theirs) or not theirs:
        result.problems.append(f"scans differ: ringflow {sorted(ours)}, script {sorted(theirs)}")
    for entry in sorted(set(ours) & set(theirs)):
        _compare_scan(entry, ours[entry], theirs[entry], settings, result)
    result.equal = not result.problems
    return result


def _entry_of(path: Path) -> str:
    with h5py.File(path, "r") as h5:
        return str(h5.attrs.get("entry") or h5.attrs.get("default"))


def _compare_scan(
    entry: str, ours: Path, theirs: Path, settings: Settings, result: Comparison
) -> None:
    with h5py.File(ours, "r") as a, h5py.File(theirs, "r") as b:
        data = a[entry]["integrated"]
        order_a, order_b = _order(data), _order(b)
        if order_a != order_b:
            result.problems.append(f"{entry}: frames or their order differ")
            return
        pairs = [("I", "intensity"), ("I_errors", "errors"), ("radial_axis", "radial")]
        for name_a, name_b in pairs:
            if name_a not in data:
                result.problems.append(f"{entry}: ringflow wrote no {name_a}")
                continue
            equal, worst = close(data[name_a][()], b[name_b][()])
            result.worst[name_b] = max(result.worst.get(name_b, 0.0), worst)
            if not equal:
                result.problems.append(f"{entry}: {name_a} differs (worst {worst:.2e} relative)")
        result.frames += len(order_b)


def _order(group: h5py.Group) -> list[tuple[str, int]]:
    """(Lima file, frame in it) of each row: the frames and their order."""
    files = [os.path.realpath(p.decode()) for p in group["source_file"][()]]
    return list(zip(files, group["source_frame"][()].tolist(), strict=True))


# --- where ringflow's time goes ------------------------------------------------------------------

_TASK = re.compile(
    r"^\[(?P<time>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): [^\]]*\] Task ringflow\."
    r"(?P<task>integrate_file|assemble_scan)\[[^\]]+\] (?P<what>received|succeeded in "
    r"(?P<seconds>[0-9.e-]+)s)"
)


def breakdown(run: Run) -> str:
    """Start-up, integration, assembly and shutdown seconds, from the workers' Celery logs.

    Start-up is launch to the first file task received (interpreter, planning, Redis, workers).
    """
    events = list(_task_events(run.log_dir)) if run.log_dir and run.log_dir.is_dir() else []
    # this run's events only: a later run's workers log into the same folder
    events = [e for e in events if run.started <= e[2] <= run.ended + 1.0]
    received = [t for task, what, t, _ in events if task == "integrate_file" and what == "received"]
    done = [
        (t, s) for task, what, t, s in events if task == "integrate_file" and what != "received"
    ]
    assembled = [t for task, what, t, _ in events if task == "assemble_scan" and what != "received"]
    if not (received and done and assembled):
        return "ringflow time breakdown: unavailable (no task lines in the worker logs)"
    first, last_file = min(received), max(t for t, _ in done)
    last = max(assembled)
    busy = sum(s for _, s in done)
    return (
        f"ringflow {run.seconds:.1f} s = start-up {first - run.started:.1f} s (to the first file "
        f"task) + integration {last_file - first:.1f} s ({len(done)} file tasks, "
        f"{busy:.1f} s of task time, median {statistics.median(s for _, s in done):.2f} s/file)"
        f" + assembly tail {max(0.0, last - last_file):.1f} s + shutdown "
        f"{run.ended - max(last, last_file):.1f} s"
    )


def _task_events(folder: Path) -> Iterator[tuple[str, str, float, float]]:
    """(task, "received" or "succeeded", epoch seconds, task seconds) from Celery's INFO lines."""
    for log in folder.glob("*.log"):
        for line in log.read_text(errors="replace").splitlines():
            match = _TASK.match(line)
            if match:
                stamp = datetime.strptime(match["time"], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                seconds = float(match["seconds"]) if match["seconds"] else 0.0
                yield match["task"], match["what"].split()[0], stamp, seconds


# --- the section ---------------------------------------------------------------------------------


def measure(
    short: bool, data_dir: str | None = None, rounds: int = 1, mode_name: str | None = None
) -> Section:
    """The end-to-end section: ``rounds`` rounds of script then ringflow, on 2 pinned CPUs."""
    mode = MODES[mode_name or ("short" if short else "full")]
    cpus = pin_cores(CORES)
    settings = Settings()
    data = dataset(mode, Path(data_dir) if data_dir else DATA_ROOT / mode.name)
    warm_page_cache(data)
    with tempfile.TemporaryDirectory(prefix="ringflow-e2e-") as tmp:
        results = [one_round(k, settings, data, Path(tmp)) for k in range(rounds)]
    section = Section(summarise(results, settings, data, TARGETS.get(mode.name)))
    section.notes += [
        f"{mode.name}: {mode.scans} scans x {mode.files_per_scan} Lima files x "
        f"{mode.frames_per_file} Pilatus-1M frames, bitshuffle-LZ4, "
        f"{data.disk_bytes() / 1e9:.2f} GB on disk in {data.root}",
        f"both pinned to CPUs {cpus}; {settings.n_pts} bins of {settings.unit}, "
        f"{settings.method}, error model {settings.error_model}, polarization "
        f"{settings.polarization_factor}, solid angle, monitor '{settings.monitor_name}'",
        f"equal: |a - b| <= {RTOL:g} x max(|b|, {FLOOR:g} x the frame's max |b|) on the "
        f"intensity and errors of every frame, frames in the same order (file and frame)",
        *(r.note for r in results),
        *(p for r in results for p in r.comparison.problems),
    ]
    return section


def one_round(k: int, settings: Settings, data: Dataset, tmp: Path) -> Round:
    """The script, ringflow as a first job, the same job again (its engine now cached in the
    workspace), the decode-only limit; each ringflow output compared with the script's.
    The outputs are then removed."""
    work = tmp / f"round{k}"
    work.mkdir()
    script = run_script(settings, data, work)
    first = run_ringflow(settings, data, work)
    comparison = compare(work / "ringflow", work / "script", settings)
    later = run_ringflow(settings, data, work)
    again = compare(work / "ringflow", work / "script", settings)
    comparison = Comparison(
        comparison.equal and again.equal,
        comparison.frames,
        {n: max(v, again.worst.get(n, 0.0)) for n, v in comparison.worst.items()},
        comparison.problems + again.problems,
    )
    limit = run_decode_limit(data, work)
    note = (
        f"round {k + 1}: script {script.seconds:.1f} s; first job: {breakdown(first)}; "
        f"later job: {breakdown(later)}; decode-only limit {limit:.2f} s; worst relative "
        f"differences {_worst_text(comparison.worst)}"
    )
    shutil.rmtree(work)
    return Round(script.seconds, first.seconds, later.seconds, limit, comparison, note)


def run_decode_limit(data: Dataset, work: Path) -> float:
    """Seconds of :mod:`decode_limit` on the dataset's Lima files (2 processes, 1 thread)."""
    cmd = [sys.executable, str(Path(__file__).with_name("decode_limit.py"))]
    cmd += [str(p) for p in data.lima_files()] + ["--processes", str(CORES)]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    run = run_timed(cmd, work, "decode-limit", _timeout(data.frames), env)
    return float(json.loads(run.stdout.strip().splitlines()[-1])["seconds"])


def _worst_text(worst: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.1e}" for name, value in worst.items()) or "none compared"


def summarise(
    results: list[Round], settings: Settings, data: Dataset, target: float | None
) -> list[Measure]:
    """Medians over rounds; a ratio is the median of each round's ratios. Rows: a first job
    and a later one against the script, and the later job against the decode-only limit."""
    worst = max(max(r.comparison.worst.values(), default=float("inf")) for r in results)
    equal = all(r.comparison.equal for r in results)
    name = f"{settings.ai_engines_per_worker} engines x {settings.cores_per_worker} core"
    script = data.frames / statistics.median(r.script_s for r in results)
    limit = data.frames / statistics.median(r.limit_s for r in results)
    later = data.frames / statistics.median(r.later_s for r in results)
    note = (
        f"{data.frames} frames, median of {len(results)} round(s); worst relative "
        f"difference {worst:.1e} (limit {RTOL:g})"
    )
    return [
        Measure(
            section=SECTION,
            name=f"ringflow run, first job ({name})",
            value=data.frames / statistics.median(r.ringflow_s for r in results),
            unit="frames/s",
            baseline=script,
            baseline_name="h5py + pyFAI integrate1d script",
            ratio=statistics.median(r.script_s / r.ringflow_s for r in results),
            target=target,
            target_is="ratio>=",
            equal=equal,
            note=note,
        ),
        Measure(
            section=SECTION,
            name=f"ringflow run, later job, engine cached ({name})",
            value=later,
            unit="frames/s",
            baseline=script,
            baseline_name="h5py + pyFAI integrate1d script",
            ratio=statistics.median(r.script_s / r.later_s for r in results),
            equal=equal,
        ),
        Measure(
            section=SECTION,
            name="later job's wall over the decode-only limit",
            value=later,
            unit="frames/s",
            baseline=limit,
            baseline_name="read_direct_chunk + bitshuffle decode, 2 processes",
            ratio=statistics.median(r.later_s / r.limit_s for r in results),
            target=None if target is None else LIMIT_TARGET,
            target_is="ratio<=",
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help="CI mode: 400 frames, report only")
    parser.add_argument(
        "--mode", choices=sorted(MODES), default=None, help="dataset (default full; job: 1600)"
    )
    parser.add_argument("--data", default=None, help=f"dataset cache (default {DATA_ROOT}/MODE)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of both (medians)")
    parser.add_argument("--json", action="store_true", help="print the section as JSON")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    start = time.perf_counter()
    try:
        section = measure(args.short, args.data, args.rounds, args.mode)
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"measures": as_dicts(section.measures), "notes": section.notes}))
    else:
        print(format_table(section.measures))
        print("\n".join(f"- {note}" for note in section.notes))
        print(f"- benchmark wall time {time.perf_counter() - start:.0f} s")
    short = args.short or args.mode == "short"
    m = section.measures[0]
    return 0 if m.equal and (short or m.ok is not False) else 1


if __name__ == "__main__":
    sys.exit(main())
