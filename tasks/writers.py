"""The final NeXus file of a scan, every large dataset through the compression pool.

Everything is written under a temporary name in the destination folder and renamed, so
a final name never holds a half-written file.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone

import h5py
import numpy as np

from . import nexus
from .chunk_writer import ChunkWriter, Storage, task_cores
from .codecs import Filters
from .config import Config
from .errors import OutputError

OWNER_RWX = 0o700
PRIVATE_FILE = 0o600  # partial results: the workspace's files are its owner's only


def make_private_folder(folder: str) -> None:
    """``folder`` (and missing parents) 0700 whatever the umask: a workspace's folders are
    their owner's only. An existing folder of another user is left as it is (its owner
    chose its mode; ours could not be set anyway)."""
    os.makedirs(os.path.dirname(os.path.abspath(folder)), exist_ok=True)
    with suppress(FileExistsError):
        os.mkdir(folder, OWNER_RWX)
    with suppress(PermissionError):
        os.chmod(folder, OWNER_RWX)  # the umask filtered the mkdir; an old one was 0755


def private_file(path: str, append: bool = True) -> int:
    """``path`` opened for writing (at its end, or emptied), mode 0600 before any byte is
    written: a workspace file is its owner's only, an older one included."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
    fd = os.open(path, flags, PRIVATE_FILE)
    os.fchmod(fd, PRIVATE_FILE)
    return fd


def process_umask() -> int:
    """This process's umask, read without changing it (``os.umask`` sets it to read it, a
    race with any thread creating a file meanwhile)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def user_mode(mode: int) -> int:
    """``mode`` as the user's umask lets it be: ``[output] file_mode`` never gives more than
    the user's umask allows (under umask 077 an output is its owner's only)."""
    return mode & ~process_umask()


@contextmanager
def replacing(path: str, file_mode: int) -> Iterator[str]:
    """A temporary name beside ``path`` to write; renamed to ``path`` with mode ``file_mode``
    (less what the umask takes away, :func:`user_mode`) if the block ends well, removed
    otherwise.

    The temporary is in the destination folder, so the rename is atomic; the mode is set by
    chmod before the rename (the rename needs only the folder's permission), so even 0o000
    is exact, and nobody else can read the file while it is written (mkstemp: 0600).
    """
    folder = os.path.dirname(path) or "."
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
        os.close(fd)
    except OSError as exc:
        raise OutputError(folder, f"cannot write here: {exc.strerror}") from None
    try:
        yield tmp
        os.chmod(tmp, user_mode(file_mode))
        os.replace(tmp, path)
    except OSError as exc:
        _remove(tmp)
        raise OutputError(path, f"cannot be written: {os_reason(exc)}") from None
    except BaseException:
        _remove(tmp)
        raise


@contextmanager
def atomic_h5(path: str, file_mode: int = PRIVATE_FILE) -> Iterator[h5py.File]:
    """An HDF5 file that appears at ``path`` only once fully written and closed.

    A missing folder is created 0700: output folders are created, with ``[output]
    file_mode``, by the planning (:func:`tasks.jobs.plan_job`); folders created here are the
    workspace's partial folders, their owner's only.
    """
    make_dirs(os.path.dirname(path) or ".", OWNER_RWX)
    with replacing(path, file_mode) as tmp, h5py.File(tmp, "w") as h5:
        yield h5


def os_reason(exc: OSError) -> str:
    """The operating system's words for ``exc``: HDF5 buries them ("No space left on device")
    deep in a multi-line message, after a timestamp."""
    found = re.search(r"error message = '([^']+)'", str(exc))
    if found:
        return found.group(1)
    return (exc.strerror or str(exc)).splitlines()[0]


def make_dirs(folder: str, mode: int | None = None) -> list[str]:
    """Create ``folder`` and its missing parents; return those created, outermost first.

    With ``mode``, each folder created here is chmod-ed to ``mode | 0o700``: the group and
    others bits of ``mode`` at once, but the owner's read, write and search kept while the
    job runs, so that a mode like 0o555 or 0o077 cannot make the job's later files in it
    fail. Its final ``mode`` comes once nothing more is written there
    (:func:`tasks.assemble.finish_folders`). By chmod, not ``os.makedirs(mode=)``: that
    one is filtered by the umask. A folder that existed is never touched.
    """
    missing, _ = missing_folders(folder)
    created = []
    for path in missing:
        try:
            os.mkdir(path)
        except FileExistsError:  # made meanwhile by someone else: not ours
            continue
        except OSError as exc:
            raise OutputError(folder, f"cannot create folder: {exc.strerror}") from None
        created.append(path)
        if mode is not None:
            os.chmod(path, user_mode(mode) | OWNER_RWX)
    check_usable_folder(folder)
    return created


def missing_folders(folder: str, planned: Collection[str] = ()) -> tuple[list[str], str]:
    """``folder`` and its parents that neither exist nor are in ``planned``, outermost
    first, and the nearest that does or is (what :func:`make_dirs` creates, and where)."""
    path, missing = os.path.abspath(folder), []
    while not (os.path.lexists(path) or path in planned):
        missing.append(path)
        path = os.path.dirname(path)
    return missing[::-1], path


def check_usable_folder(folder: str) -> None:
    """``folder`` is a folder this process can write in, or the OutputError saying why."""
    if not os.path.isdir(folder):
        raise OutputError(folder, "cannot create folder: not a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(folder, "folder is not writable")


def _remove(path: str) -> None:
    with suppress(FileNotFoundError):
        os.unlink(path)


# --- the final NeXus file of a scan -------------------------------------------------------------


@dataclass(frozen=True)
class Stream:
    """A per-frame dataset produced in slabs, in frame order, never held whole."""

    shape: tuple[int, ...]
    dtype: np.dtype
    slabs: Callable[[], Iterator[np.ndarray]]


@dataclass(frozen=True)
class CorrectedFrames:
    """Corrected frames (float32) and their per-frame masks (uint8), computed together."""

    shape: tuple[int, int, int]
    slabs: Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]


@dataclass(frozen=True)
class Average:
    """``average_xy``: the mean or median over a scan's frames of its integrated rows and of
    their errors (sigma), as ESRF's integrator reduces its stack."""

    kind: str  # "mean" or "median"
    intensity: np.ndarray  # (npt,) or (slices, npt)
    errors: np.ndarray | None  # same shape; None without an error model


@dataclass(frozen=True)
class Applied:
    """The corrections the integration applied, as NXazint states them."""

    solid_angle: bool = True
    polarization: bool = False
    monitor: bool = False
    normalization: bool = True  # pyFAI's rows are per-pixel averages: always


@dataclass
class ScanResult:
    """Everything the NeXus file of one scan holds, rows in acquisition order."""

    entry: str
    intensity: Stream  # (frames, npt), or the cake (frames, slices, npt)
    sigma: Stream | None
    radial: np.ndarray
    unit: str
    azimuthal: np.ndarray | None
    source_file: list[str]
    source_frame: np.ndarray
    normalization: np.ndarray | None  # per-frame monitor values, when a monitor is used
    configuration: str  # INI text, secrets redacted
    geometry: dict  # PONI parameters
    versions: dict
    method: str  # the pyFAI method that ran, as the engine named it
    radial_range: tuple[float, float]  # passed to pyFAI, in ``unit``
    fingerprint: str
    metadata: dict  # {"positioners": {...}, "measurement": {...}, "title": ..., ...}
    average: Average | None = None
    corrected: CorrectedFrames | None = None
    applied: Applied = field(default_factory=Applied)
    pyfai_config: dict = field(default_factory=dict)  # pyFAI's integration configuration
    instrument: str = ""  # the beamline, when the data's path names it


@dataclass(frozen=True)
class OutputStorage:
    """Compression of each kind of dataset, and the pool that applies it."""

    integrated: Storage  # integrated rows and cakes, and every other large dataset
    corrected: Storage
    mask: Storage
    threads: int
    in_flight: int = 0

    @classmethod
    def from_config(cls, config: Config) -> OutputStorage:
        out = config.output
        codec, level = out.compression()
        corrected_codec, corrected_level = out.corrected_compression()
        corrected = Filters(corrected_codec, corrected_level, out.shuffle, out.checksum)
        threads = out.writer_threads or min(task_cores(), config.computations.assemble_cores)
        return cls(
            integrated=Storage(Filters(codec, level, out.shuffle, out.checksum), out.chunk_frames),
            corrected=Storage(corrected, out.corrected_chunk_frames),
            mask=Storage(replace(corrected, shuffle=False), out.corrected_chunk_frames),
            threads=threads,
            in_flight=out.chunks_in_flight,
        )


def write_nexus(
    path: str, result: ScanResult, storage: OutputStorage, file_mode: int = 0o755
) -> None:
    """The scan's NeXus file at ``path`` and, with ``average_xy``, its .xye text files.

    The text files are written once every dataset of the HDF5 file is, and before its
    rename: the .h5 under its final name (what ``existing_output`` looks at) means the whole
    scan is written. Every file gets ``file_mode`` before it takes its final name.
    """
    with atomic_h5(path, file_mode) as h5:
        with ChunkWriter(storage.threads, storage.in_flight) as pool:
            _write_content(h5, result, pool, storage)
        if result.average is not None:
            write_average_text(path, result, file_mode)


def _write_content(
    h5: h5py.File, result: ScanResult, pool: ChunkWriter, storage: OutputStorage
) -> None:
    h5.attrs.update(
        NX_class="NXroot",
        default=result.entry,
        creator="ringflow",
        file_time=_now(),
        ringflow_fingerprint=result.fingerprint,
    )
    entry = _group(h5, result.entry, "NXentry", default=nexus.DATA)
    definition = nexus.definition(result.unit, result.azimuthal is not None)
    if definition:
        entry["definition"] = definition
    entry["title"] = _title(result)
    for key in ("start_time", "end_time"):
        if key in result.metadata:
            entry[key] = result.metadata[key]
    _write_applied(entry, result.applied)
    _write_instrument(entry, result)
    _write_process(entry, result)
    _write_data(entry, result, pool, storage.integrated)
    _write_metadata(entry, result.metadata, pool, storage.integrated)
    if result.average is not None:
        _write_average(entry, result, pool, storage.integrated)
    if result.corrected is not None:
        _write_corrected(entry, result.corrected, pool, storage)


def _title(result: ScanResult) -> str:
    """The Bliss scan's title (its command), else the entry's name."""
    return str(result.metadata.get("title") or f"azimuthal integration, {result.entry}")


def _write_applied(entry: h5py.Group, applied: Applied) -> None:
    entry["solid_angle_applied"] = applied.solid_angle
    entry["polarization_applied"] = applied.polarization
    entry["normalization_applied"] = applied.normalization
    entry["monitor_applied"] = applied.monitor


def _write_instrument(entry: h5py.Group, result: ScanResult) -> None:
    """Beamline, wavelength (angstrom) and energy (keV); the source as far as it is known."""
    instrument = _group(entry, "instrument", "NXinstrument")
    instrument["name"] = result.instrument or "unknown"
    wavelength_m = result.geometry.get("wavelength")
    if wavelength_m:
        mono = _group(instrument, "monochromator", "NXmonochromator")
        _field(mono, "wavelength", wavelength_m * 1e10, "angstrom")
        _field(mono, "energy", HC_KEV_ANGSTROM / (wavelength_m * 1e10), "keV")
    source = _group(instrument, "source", "NXsource")
    source["name"] = "unknown"
    source["type"] = "Synchrotron X-ray Source"
    source["probe"] = "x-ray"


HC_KEV_ANGSTROM = 12.398419843320026  # h c in keV angstrom (CODATA 2018)
GEOMETRY_UNITS = {"dist": "m", "poni1": "m", "poni2": "m", "wavelength": "m"} | {
    f"rot{k}": "rad" for k in (1, 2, 3)
}


def _write_process(entry: h5py.Group, result: ScanResult) -> None:
    process = _group(entry, nexus.PROCESS, "NXprocess")
    process["program"] = "ringflow"
    process["version"] = result.versions.get("ringflow", "")
    process["date"] = _now()
    process["reference"] = nexus.REFERENCE
    entry[nexus.METHOD] = result.method
    versions = _group(process, "versions", "NXcollection")
    for name, version in result.versions.items():
        versions[name] = version
    parameters = _group(entry, nexus.PARAMETERS, "NXparameters")
    radial_range = np.asarray(result.radial_range, np.float64)
    _field(entry, nexus.RADIAL_RANGE, radial_range, nexus.units_of(result.unit))
    entry[nexus.CONFIGURATION] = result.configuration
    entry[nexus.CONFIGURATION].attrs["description"] = "ringflow configuration (INI)"
    entry[nexus.PYFAI_CONFIG] = json.dumps(result.pyfai_config)
    entry[nexus.PYFAI_CONFIG].attrs["description"] = (
        "pyFAI's integration configuration (JSON: pyFAI-integrate --json, pyFAI.worker.Worker)"
    )
    for key, value in result.geometry.items():
        _field(parameters, key, value, GEOMETRY_UNITS.get(key))


def _write_data(entry: h5py.Group, result: ScanResult, pool: ChunkWriter, storage: Storage):
    data = _group(entry, nexus.DATA, "NXdata", signal=nexus.SIGNAL)
    data["title"] = _title(result)  # NXdata's own: plots (silx) take their title from it
    two_d = result.azimuthal is not None
    axes = [".", nexus.AZIMUTHAL, nexus.RADIAL] if two_d else [".", nexus.RADIAL]
    data.attrs.update(axes=axes, interpretation="image" if two_d else "spectrum")
    data.attrs[f"{nexus.FRAME}_indices"] = 0
    intensity = _write_stream(data, nexus.SIGNAL, result.intensity, pool, storage)
    intensity.attrs.update(long_name="intensity", units="arbitrary units")
    if result.sigma is not None:
        errors = _write_stream(data, nexus.ERRORS, result.sigma, pool, storage)
        errors.attrs.update(long_name="estimated intensity error", units="arbitrary units")
    _write_axes(data, result, pool, storage)
    names = [name.encode() for name in result.source_file]
    text = h5py.string_dtype("utf-8", max(1, max(map(len, names), default=1)))
    pool.save(data, "source_file", np.array(names, dtype=text), storage, dtype=text)
    pool.save(data, "source_frame", result.source_frame, storage)
    frames = pool.save(data, nexus.FRAME, np.arange(len(result.source_frame)), storage)
    frames.attrs["long_name"] = "frame"
    if result.normalization is not None:
        monitor = _group(entry, nexus.MONITOR, "NXmonitor")
        pool.save(monitor, "data", result.normalization, storage)  # what each frame was divided by


def _write_axes(data: h5py.Group, result: ScanResult, pool: ChunkWriter, storage: Storage):
    radial = pool.save(data, nexus.RADIAL, result.radial, storage)
    radial.attrs.update(
        units=nexus.units_of(result.unit), long_name=nexus.radial_long_name(result.unit)
    )
    if result.azimuthal is not None:
        chi = pool.save(data, nexus.AZIMUTHAL, result.azimuthal, storage)
        chi.attrs.update(units="deg", long_name="azimuthal bin center")


def _write_stream(
    group: h5py.Group, name: str, stream: Stream, pool: ChunkWriter, storage: Storage
) -> h5py.Dataset:
    dset = pool.create(group, name, stream.shape, stream.dtype, storage)
    pool.write(dset, stream.slabs(), storage.filters)
    return dset


def _write_corrected(
    entry: h5py.Group, frames: CorrectedFrames, pool: ChunkWriter, storage: OutputStorage
) -> None:
    group = _group(entry, nexus.CORRECTED, "NXdata", signal="data")
    group.attrs["axes"] = [".", ".", "."]
    data = pool.create(group, "data", frames.shape, np.float32, storage.corrected)
    data.attrs["long_name"] = (
        "(raw - dark) / (flat * solid angle * polarization * absorption * monitor)"
    )
    mask = pool.create(group, "mask", frames.shape, np.uint8, storage.mask)
    mask.attrs["long_name"] = (
        "0: used, 1: masked (mask file or detector), 2: invalid value in this frame"
    )
    pool.write_many(
        [(data, storage.corrected.filters), (mask, storage.mask.filters)], frames.slabs()
    )


def _write_metadata(entry: h5py.Group, metadata: dict, pool: ChunkWriter, storage: Storage) -> None:
    for name, nx_class in (("positioners", "NXcollection"), ("measurement", "NXcollection")):
        values = metadata.get(name) or {}
        if not values:
            continue
        group = _group(entry, name, nx_class)
        for key, value in values.items():
            pool.save(group, key, value, storage)


def _write_average(
    entry: h5py.Group, result: ScanResult, pool: ChunkWriter, storage: Storage
) -> None:
    average = result.average
    data = _group(entry, nexus.average(average.kind), "NXdata", signal=nexus.SIGNAL)
    two_d = result.azimuthal is not None
    data.attrs["axes"] = [nexus.AZIMUTHAL, nexus.RADIAL] if two_d else [nexus.RADIAL]
    intensity = pool.save(data, nexus.SIGNAL, average.intensity, storage)
    intensity.attrs.update(long_name=f"{average.kind} intensity", units="arbitrary units")
    if average.errors is not None:
        errors = pool.save(data, nexus.ERRORS, average.errors, storage)
        errors.attrs["long_name"] = f"{average.kind} of the errors over the scan's frames"
    _write_axes(data, result, pool, storage)


def average_text_paths(output: str, slices: int) -> list[str]:
    """The .xye files of ``output``, named as ESRF's integrator names them: ``.h5`` replaced
    by ``.xye``; for a cake, one file per azimuthal slice, "azint" replaced by "azint01",
    "azint02"... (only in the file name, whose "azint_" prefix it is)."""
    folder, name = os.path.split(output)
    base = (name[:-3] if name.endswith(".h5") else name) + ".xye"
    if slices == 1:
        return [os.path.join(folder, base)]
    names = [base.replace("azint", f"azint{k:02d}", 1) for k in range(1, slices + 1)]
    return [os.path.join(folder, name) for name in names]


def write_average_text(output: str, result: ScanResult, file_mode: int) -> list[str]:
    """The average as text beside ``output``: columns radial, I and, with errors, error;
    "%.5f", no header (numpy.savetxt, as the integrator writes it). Each file is written
    under a temporary name and renamed."""
    average = result.average
    intensity = average.intensity.reshape(-1, average.intensity.shape[-1])  # slices x npt
    errors = None if average.errors is None else average.errors.reshape(intensity.shape)
    paths = average_text_paths(output, 1 if result.azimuthal is None else len(intensity))
    for k, path in enumerate(paths):
        columns = [result.radial, intensity[k]] + ([] if errors is None else [errors[k]])
        with replacing(path, file_mode) as tmp:
            np.savetxt(tmp, np.transpose(columns), fmt="%.5f")
    return paths


def _group(parent: h5py.Group, name: str, nx_class: str, **attrs) -> h5py.Group:
    group = parent.create_group(name)  # a path: its parents exist already
    group.attrs["NX_class"] = nx_class
    group.attrs.update(attrs)
    return group


def _field(group: h5py.Group, name: str, value, units: str | None = None) -> h5py.Dataset:
    dset = group.create_dataset(name, data=value)
    if units:
        dset.attrs["units"] = units
    return dset


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_fingerprint(path: str) -> str:
    """The configuration fingerprint stored in an existing output, or '' if unreadable."""
    try:
        with h5py.File(path, "r") as h5:
            return str(h5.attrs.get("ringflow_fingerprint", ""))
    except OSError:
        return ""
