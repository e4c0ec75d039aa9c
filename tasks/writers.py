"""The final NeXus file of a scan, every large dataset through the compression pool.

Everything is written under a temporary name in the destination folder and renamed, so
a final name never holds a half-written file.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from datetime import datetime, timezone

import h5py
import numpy as np

from .chunk_writer import ChunkWriter, Storage, task_cores
from .codecs import Filters
from .config import Config
from .errors import OutputError


@contextmanager
def atomic_h5(path: str, dir_mode: int = 0o755) -> Iterator[h5py.File]:
    """An HDF5 file that appears at ``path`` only once fully written and closed."""
    folder = os.path.dirname(path) or "."
    make_dirs(folder, dir_mode)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
        os.close(fd)
    except OSError as exc:
        raise OutputError(folder, f"cannot write here: {exc.strerror}") from None
    try:
        with h5py.File(tmp, "w") as h5:
            yield h5
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        _remove(tmp)
        raise OutputError(path, f"cannot be written: {os_reason(exc)}") from None
    except BaseException:
        _remove(tmp)
        raise


def os_reason(exc: OSError) -> str:
    """The operating system's words for ``exc``: HDF5 buries them ("No space left on device")
    deep in a multi-line message, after a timestamp."""
    found = re.search(r"error message = '([^']+)'", str(exc))
    if found:
        return found.group(1)
    return (exc.strerror or str(exc)).splitlines()[0]


def make_dirs(folder: str, mode: int = 0o755) -> None:
    try:
        os.makedirs(folder, mode=mode, exist_ok=True)
    except OSError as exc:
        raise OutputError(folder, f"cannot create folder: {exc.strerror}") from None
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
    fingerprint: str
    metadata: dict  # {"positioners": {...}, "measurement": {...}, "title": ..., ...}
    average: tuple[str, np.ndarray] | None = None
    corrected: CorrectedFrames | None = None


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
    path: str, result: ScanResult, storage: OutputStorage, dir_mode: int = 0o755
) -> None:
    with atomic_h5(path, dir_mode) as h5, ChunkWriter(storage.threads, storage.in_flight) as pool:
        h5.attrs.update(
            NX_class="NXroot",
            default=result.entry,
            creator="ringflow",
            file_time=_now(),
            ringflow_fingerprint=result.fingerprint,
        )
        entry = _group(h5, result.entry, "NXentry", default="integrated")
        for key in ("title", "start_time", "end_time"):
            if key in result.metadata:
                entry[key] = result.metadata[key]
        _write_process(entry, result)
        _write_data(entry, result, pool, storage.integrated)
        _write_metadata(entry, result.metadata, pool, storage.integrated)
        if result.average is not None:
            _write_average(entry, result, pool, storage.integrated)
        if result.corrected is not None:
            _write_corrected(entry, result.corrected, pool, storage)


def _write_process(entry: h5py.Group, result: ScanResult) -> None:
    process = _group(entry, "ai", "NXprocess")
    process["program"] = "ringflow"
    process["version"] = result.versions.get("ringflow", "")
    process["date"] = _now()
    versions = _group(process, "versions", "NXcollection")
    for name, version in result.versions.items():
        versions[name] = version
    config = _group(process, "configuration", "NXnote")
    config["type"] = "text/plain"
    config["description"] = "ringflow configuration (INI)"
    config["data"] = result.configuration
    geometry = _group(process, "geometry", "NXnote")
    geometry["type"] = "text/plain"
    geometry["description"] = "pyFAI PONI geometry"
    geometry["data"] = "\n".join(f"{k}: {v}" for k, v in result.geometry.items())
    for key, value in result.geometry.items():
        geometry[key] = value


def _write_data(entry: h5py.Group, result: ScanResult, pool: ChunkWriter, storage: Storage):
    data = _group(entry, "integrated", "NXdata", signal="intensity")
    radial_name = result.unit
    axes = [".", radial_name] if result.azimuthal is None else [".", "chi_deg", radial_name]
    data.attrs["axes"] = axes
    data.attrs[f"{radial_name}_indices"] = len(axes) - 1
    intensity = _write_stream(data, "intensity", result.intensity, pool, storage)
    intensity.attrs["interpretation"] = "spectrum" if result.azimuthal is None else "image"
    if result.sigma is not None:
        _write_stream(data, "errors", result.sigma, pool, storage)
    radial = pool.save(data, radial_name, result.radial, storage)
    radial.attrs.update(units=_unit_of(result.unit), long_name=result.unit)
    if result.azimuthal is not None:
        chi = pool.save(data, "chi_deg", result.azimuthal, storage)
        chi.attrs.update(units="deg", long_name="azimuthal angle chi")
        data.attrs["chi_deg_indices"] = 1
    names = [name.encode() for name in result.source_file]
    text = h5py.string_dtype("utf-8", max(1, max(map(len, names), default=1)))
    pool.save(data, "source_file", np.array(names, dtype=text), storage, dtype=text)
    pool.save(data, "source_frame", result.source_frame, storage)
    pool.save(data, "frame_index", np.arange(len(result.source_frame)), storage)
    if result.normalization is not None:
        norm = pool.save(data, "normalization", result.normalization, storage)
        norm.attrs["long_name"] = "monitor value each frame was divided by"


def _write_stream(
    group: h5py.Group, name: str, stream: Stream, pool: ChunkWriter, storage: Storage
) -> h5py.Dataset:
    dset = pool.create(group, name, stream.shape, stream.dtype, storage)
    pool.write(dset, stream.slabs(), storage.filters)
    return dset


def _write_corrected(
    entry: h5py.Group, frames: CorrectedFrames, pool: ChunkWriter, storage: OutputStorage
) -> None:
    group = _group(entry, "corrected", "NXdata", signal="data")
    group.attrs["axes"] = [".", ".", "."]
    data = pool.create(group, "data", frames.shape, np.float32, storage.corrected)
    data.attrs.update(
        interpretation="image",
        long_name="(raw - dark) / (flat * solid angle * polarization * absorption * monitor)",
    )
    mask = pool.create(group, "mask", frames.shape, np.uint8, storage.mask)
    mask.attrs.update(
        flag_values=np.array([0, 1, 2], np.uint8),
        flag_meanings="valid masked invalid_in_frame",
        long_name="0: used, 1: masked (mask file or detector), 2: invalid value in this frame",
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
    kind, values = result.average
    data = _group(entry, f"integrated_{kind}", "NXdata", signal="intensity")
    pool.save(data, "intensity", values, storage)
    pool.save(data, result.unit, result.radial, storage)
    data.attrs["axes"] = [result.unit] if result.azimuthal is None else ["chi_deg", result.unit]
    if result.azimuthal is not None:
        pool.save(data, "chi_deg", result.azimuthal, storage)


def _group(parent: h5py.Group, name: str, nx_class: str, **attrs) -> h5py.Group:
    group = parent.create_group(name)
    group.attrs["NX_class"] = nx_class
    group.attrs.update(attrs)
    return group


def _unit_of(unit: str) -> str:
    return {
        "2th_deg": "deg",
        "2th_rad": "rad",
        "q_nm^-1": "1/nm",
        "q_A^-1": "1/angstrom",
        "r_mm": "mm",
        "r_m": "m",
        "chi_deg": "deg",
    }.get(unit, unit.split("_", 1)[-1])


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_fingerprint(path: str) -> str:
    """The configuration fingerprint stored in an existing output, or '' if unreadable."""
    try:
        with h5py.File(path, "r") as h5:
            return str(h5.attrs.get("ringflow_fingerprint", ""))
    except OSError:
        return ""
