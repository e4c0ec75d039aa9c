"""HDF5 writers: per-file partial results and the final NeXus file of a scan.

Everything is written under a temporary name in the destination folder and renamed, so
a final name never holds a half-written file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime, timezone

import h5py
import numpy as np

from .errors import OutputError

STR = h5py.string_dtype()


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
        raise OutputError(path, f"cannot be written: {exc.strerror or exc}") from None
    except BaseException:
        _remove(tmp)
        raise


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


# --- partial results of one Lima file -----------------------------------------------------------


@dataclass
class Partial:
    intensity: np.ndarray  # (n, npt) or (n, slices, npt)
    sigma: np.ndarray | None
    radial: np.ndarray
    azimuthal: np.ndarray | None
    source_file: str
    source_frame: np.ndarray  # frame index in the source file, per row


def write_partial(path: str, part: Partial) -> None:
    with atomic_h5(path) as h5:
        h5["intensity"] = part.intensity
        if part.sigma is not None:
            h5["sigma"] = part.sigma
        h5["radial"] = part.radial
        if part.azimuthal is not None:
            h5["azimuthal"] = part.azimuthal
        h5["source_frame"] = part.source_frame
        h5.attrs["source_file"] = part.source_file


def read_partial(path: str) -> Partial:
    try:
        with h5py.File(path, "r") as h5:
            return Partial(
                intensity=h5["intensity"][()],
                sigma=h5["sigma"][()] if "sigma" in h5 else None,
                radial=h5["radial"][()],
                azimuthal=h5["azimuthal"][()] if "azimuthal" in h5 else None,
                source_file=str(h5.attrs["source_file"]),
                source_frame=h5["source_frame"][()],
            )
    except (OSError, KeyError) as exc:
        raise OutputError(path, f"partial result unreadable: {exc}") from None


# --- the final NeXus file of a scan -------------------------------------------------------------


@dataclass
class ScanResult:
    """Everything the NeXus file of one scan holds, rows in acquisition order."""

    entry: str
    intensity: np.ndarray
    sigma: np.ndarray | None
    radial: np.ndarray
    unit: str
    azimuthal: np.ndarray | None
    source_file: list[str]
    source_frame: np.ndarray
    configuration: str  # INI text, secrets redacted
    geometry: dict  # PONI parameters
    versions: dict
    fingerprint: str
    metadata: dict  # {"positioners": {...}, "measurement": {...}, "title": ..., ...}
    average: tuple[str, np.ndarray] | None = None


def write_nexus(path: str, result: ScanResult, dir_mode: int = 0o755) -> None:
    with atomic_h5(path, dir_mode) as h5:
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
        _write_data(entry, result)
        _write_metadata(entry, result.metadata)
        if result.average is not None:
            _write_average(entry, result)


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


def _write_data(entry: h5py.Group, result: ScanResult) -> None:
    data = _group(entry, "integrated", "NXdata", signal="intensity")
    radial_name = result.unit
    axes = [".", radial_name] if result.azimuthal is None else [".", "chi_deg", radial_name]
    data.attrs["axes"] = axes
    data.attrs[f"{radial_name}_indices"] = len(axes) - 1
    data["intensity"] = result.intensity
    data["intensity"].attrs["interpretation"] = "spectrum" if result.azimuthal is None else "image"
    if result.sigma is not None:
        data["errors"] = result.sigma
    radial = data.create_dataset(radial_name, data=result.radial)
    radial.attrs.update(units=_unit_of(result.unit), long_name=result.unit)
    if result.azimuthal is not None:
        data["chi_deg"] = result.azimuthal
        data["chi_deg"].attrs.update(units="deg", long_name="azimuthal angle chi")
        data.attrs["chi_deg_indices"] = 1
    data.create_dataset("source_file", data=np.array(result.source_file, dtype=object), dtype=STR)
    data["source_frame"] = result.source_frame
    data["frame_index"] = np.arange(len(result.source_frame))


def _write_metadata(entry: h5py.Group, metadata: dict) -> None:
    for name, nx_class in (("positioners", "NXcollection"), ("measurement", "NXcollection")):
        values = metadata.get(name) or {}
        if not values:
            continue
        group = _group(entry, name, nx_class)
        for key, value in values.items():
            group[key] = value


def _write_average(entry: h5py.Group, result: ScanResult) -> None:
    kind, values = result.average
    data = _group(entry, f"integrated_{kind}", "NXdata", signal="intensity")
    data["intensity"] = values
    data[result.unit] = result.radial
    data.attrs["axes"] = [result.unit] if result.azimuthal is None else ["chi_deg", result.unit]
    if result.azimuthal is not None:
        data["chi_deg"] = result.azimuthal


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
