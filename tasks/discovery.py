"""Find the scans of Bliss dataset files and the Lima files (and frame ranges) behind each.

A scan's detector data is ``<entry>/measurement/<detector_name><suffix>``: a virtual dataset
over Lima files, an external link to one, a group of such links, or plain data. A Lima file
given directly is a scan of its own. Problems with one file or entry are collected so that
the good scans of the same job still run. A file ringflow wrote itself (an output or a partial,
caught by a glob that also matches inputs) is never taken as input: it is left out with a
warning.
"""

from __future__ import annotations

import glob
import os
import re
import stat
from dataclasses import dataclass, field

import h5py
import hdf5plugin  # noqa: F401  (registers bitshuffle/LZ4 and others for reading)
import numpy as np

from .config import Config
from .errors import DiscoveryError, InputDataError

LIMA_DATASET = "/entry_0000/measurement/data"
_ENTRY = re.compile(r"^(\d+)\.(\d+)$")
# what numba's kernel and pyFAI integrate: numpy kinds "i", "u" and these floats
FRAME_FLOATS = ("float32", "float64")


@dataclass(frozen=True)
class LimaSlice:
    """Frames ``src_start .. src_start+n_frames`` of one Lima dataset, placed at ``scan_start``."""

    path: str
    dataset: str
    src_start: int
    n_frames: int
    scan_start: int


@dataclass(frozen=True)
class Scan:
    master: str  # the Bliss dataset file, or the Lima file itself
    entry: str  # "1.1"; empty for a Lima file given directly
    slices: tuple[LimaSlice, ...]
    frame_shape: tuple[int, int]
    monitor: tuple[float, ...] | None = None

    @property
    def n_frames(self) -> int:
        return sum(s.n_frames for s in self.slices)

    @property
    def label(self) -> str:
        """scan0001 for entry 1.1, scan0003_2 for 3.2, the file stem for a plain Lima file."""
        match = _ENTRY.match(self.entry)
        if not match:
            return os.path.splitext(os.path.basename(self.master))[0]
        number, sub = int(match.group(1)), int(match.group(2))
        return f"scan{number:04d}" + ("" if sub == 1 else f"_{sub}")

    @property
    def key(self) -> str:
        return f"{self.master}::{self.entry}"


@dataclass
class Discovery:
    scans: list[Scan] = field(default_factory=list)
    problems: list[DiscoveryError] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # files left out, and why


def discover(config: Config) -> Discovery:
    """Every scan of the configured dataset files, in file then scan-number order."""
    found = Discovery()
    files, found.problems = expand_locations(config.dataset.location)
    for path in files:
        try:
            scans = _scans_of_file(path, config)
        except DiscoveryError as exc:
            found.problems.append(exc)
            continue
        if scans is None:
            found.warnings.append(f"{path}: a file ringflow wrote, not taken as input")
            continue
        for scan_or_problem in scans:
            if isinstance(scan_or_problem, DiscoveryError):
                found.problems.append(scan_or_problem)
            else:
                found.scans.append(scan_or_problem)
    return found


def expand_locations(patterns: tuple[str, ...]) -> tuple[list[str], list[DiscoveryError]]:
    """Files matched by ``[dataset] location``, sorted; a problem per pattern matching none."""
    files: list[str] = []
    problems: list[DiscoveryError] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if os.path.lexists(m)]
        if not matches:
            problems.append(DiscoveryError(pattern, "[dataset] location matches no file"))
        files += [os.path.abspath(m) for m in matches if os.path.abspath(m) not in files]
    return files, problems


def _scans_of_file(path: str, config: Config) -> list[Scan | DiscoveryError] | None:
    """The file's scans (or a problem per scan); None for a file ringflow wrote."""
    check_regular_file(path)
    try:
        with h5py.File(path, "r") as h5:
            if written_by_ringflow(h5):
                return None
            entries = _entries(h5, config.dataset.hdf5_entry)
            if not entries and LIMA_DATASET in h5:
                return [_plain_lima_scan(h5, path, config)]
            if not entries:
                raise DiscoveryError(path, "no scan entry (N.1) and no Lima data found")
            return [_scan_or_problem(h5, path, entry, config) for entry in entries]
    except OSError as exc:
        raise InputDataError(path, f"cannot be read: {exc}") from None


def check_regular_file(path: str) -> None:
    """A readable regular HDF5 file, or a one-line error. Checked before anything opens it:
    a FIFO would block the open forever, a directory or a dangling link has no content."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise DiscoveryError(
                path, f"symbolic link to {os.readlink(path)}, which does not exist"
            ) from None
        raise DiscoveryError(path, "does not exist") from None
    except OSError as exc:
        raise InputDataError(path, f"cannot be read: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise DiscoveryError(path, f"not a regular file (a {_file_kind(info.st_mode)})")
    try:
        is_hdf5 = h5py.is_hdf5(path)
    except OSError as exc:  # h5py says why deep in its message: the errno is enough
        raise InputDataError(path, f"cannot be read: {os.strerror(exc.errno or 5)}") from None
    if not is_hdf5:
        raise InputDataError(path, "not an HDF5 file")


def _file_kind(mode: int) -> str:
    kinds = [
        (stat.S_ISDIR, "directory"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
    ]
    return next((name for test, name in kinds if test(mode)), "special file")


def written_by_ringflow(h5: h5py.File) -> bool:
    """A ringflow output (its root says ``creator = ringflow`` with a fingerprint) or a
    partial (its root names the Lima file and dataset it integrated, with provenance)."""
    attrs = h5.attrs
    if attrs.get("creator") == "ringflow" and "ringflow_fingerprint" in attrs:
        return True
    return all(key in attrs for key in ("source_file", "source_dataset", "provenance"))


def _entries(h5: h5py.File, wanted: str) -> list[str]:
    if wanted:
        if wanted not in h5:
            raise DiscoveryError(h5.filename, f"[dataset] hdf5_entry {wanted} is not in the file")
        return [wanted]
    names = [name for name in h5 if _ENTRY.match(name) and name.endswith(".1")]
    return sorted(names, key=lambda n: tuple(int(p) for p in n.split(".")))


def _plain_lima_scan(h5: h5py.File, path: str, config: Config) -> Scan:
    if config.integration.monitor_name:
        raise DiscoveryError(
            path, "a plain Lima file has no counters; remove monitor_name or give the Bliss file"
        )
    dset = _frames_dataset(h5[LIMA_DATASET], path, LIMA_DATASET)
    slices = (LimaSlice(path, LIMA_DATASET, 0, dset.shape[0], 0),)
    return Scan(path, "", slices, tuple(dset.shape[1:]))


def _scan_or_problem(h5: h5py.File, path: str, entry: str, config: Config):
    try:
        return _bliss_scan(h5, path, entry, config)
    except DiscoveryError as exc:
        return exc
    except (KeyError, RuntimeError) as exc:  # h5py's words for an object it cannot open
        return InputDataError(path, f"entry {entry}: {str(exc).splitlines()[0]}")


def _bliss_scan(h5: h5py.File, path: str, entry: str, config: Config) -> Scan:
    ai = config.integration
    if not ai.detector_name:
        raise DiscoveryError(path, "[azimuthal integration] detector_name is empty")
    data_path = _detector_path(h5, entry, ai.detector_name, ai.detector_suffix)
    slices, shape = _resolve(h5, path, data_path)
    scan = Scan(path, entry, tuple(slices), shape)
    if ai.monitor_name:
        scan = Scan(path, entry, scan.slices, shape, _monitor(h5, entry, ai.monitor_name, scan))
    return scan


def _detector_path(h5: h5py.File, entry: str, name: str, suffix: str) -> str:
    joined = name + (f"_{suffix}" if suffix and not suffix.startswith("_") else suffix)
    candidates = [f"{entry}/measurement/{joined}", f"{entry}/instrument/{joined}/data"]
    for candidate in candidates:
        if h5.get(candidate, getlink=True) is not None:
            return candidate
    present = sorted(h5[f"{entry}/measurement"]) if f"{entry}/measurement" in h5 else []
    raise DiscoveryError(
        h5.filename,
        f"detector '{joined}' not found in entry {entry} (measurement/ has: "
        f"{', '.join(present) or 'nothing'})",
    )


def _resolve(h5: h5py.File, path: str, data_path: str) -> tuple[list[LimaSlice], tuple]:
    """Lima slices in acquisition order, and the frame shape."""
    link = h5.get(data_path, getlink=True)
    if isinstance(link, h5py.ExternalLink):
        target = _source_path(path, link.filename)
        return _slices_of_file(target, link.path, 0), _frame_shape_of(target, link.path)
    obj = _follow(h5, path, data_path, link)
    if isinstance(obj, h5py.Group):
        return _resolve_group(h5, path, data_path)
    dset = _frames_dataset(obj, path, data_path)
    if not dset.is_virtual:
        return [LimaSlice(path, data_path, 0, dset.shape[0], 0)], tuple(dset.shape[1:])
    return _virtual_slices(dset, path), tuple(dset.shape[1:])


def _follow(h5: h5py.File, path: str, data_path: str, link):
    """The object at ``data_path``; a soft link that loops (HDF5: "too many links") or
    points nowhere is an input error naming the link and its target."""
    try:
        return h5[data_path]
    except (KeyError, RuntimeError) as exc:  # h5py raises either, by version
        target = f" -> {link.path}" if isinstance(link, h5py.SoftLink) else ""
        why = "too many links" in str(exc)
        reason = "a soft-link cycle (too many links)" if why else "a link to nothing"
        raise InputDataError(path, f"{data_path}{target}: {reason}") from None


def _resolve_group(h5: h5py.File, path: str, data_path: str):
    slices: list[LimaSlice] = []
    shape = None
    for name in sorted(h5[data_path], key=_natural_key):
        parts, part_shape = _resolve(h5, path, f"{data_path}/{name}")
        if shape is not None and part_shape != shape:
            raise InputDataError(path, f"{data_path}/{name}: frame shape {part_shape} != {shape}")
        shape = part_shape
        offset = sum(s.n_frames for s in slices)
        slices += [
            LimaSlice(s.path, s.dataset, s.src_start, s.n_frames, offset + s.scan_start)
            for s in parts
        ]
    if not slices:
        raise DiscoveryError(path, f"{data_path} is an empty group")
    return slices, shape


def _virtual_slices(dset: h5py.Dataset, path: str) -> list[LimaSlice]:
    slices = []
    for vmap in dset.virtual_sources():
        (dst_start, *_), (dst_end, *_) = vmap.vspace.get_select_bounds()
        src_start = _select_start(vmap.src_space)
        source = path if vmap.file_name == "." else _source_path(path, vmap.file_name)
        if not os.path.exists(source):
            raise DiscoveryError(source, f"Lima file of {dset.name} in {path} does not exist")
        n = dst_end - dst_start + 1
        slices.append(LimaSlice(source, vmap.dset_name, src_start, n, dst_start))
    slices.sort(key=lambda s: s.scan_start)
    return slices


def _select_start(space) -> int:
    """First frame of a dataspace selection (0 when the whole dataspace is selected)."""
    if space.get_select_type() == h5py.h5s.SEL_ALL:
        return 0
    (start, *_), _ = space.get_select_bounds()
    return int(start)


def _slices_of_file(target: str, dataset: str, scan_start: int) -> list[LimaSlice]:
    with _open_source(target) as h5:
        dset = _frames_dataset(h5.get(dataset), target, dataset)
        return [LimaSlice(target, dataset, 0, dset.shape[0], scan_start)]


def _frame_shape_of(target: str, dataset: str) -> tuple:
    with _open_source(target) as h5:
        return tuple(h5[dataset].shape[1:])


def _open_source(target: str) -> h5py.File:
    if not os.path.exists(target):
        raise DiscoveryError(target, "linked Lima file does not exist")
    check_regular_file(target)
    return h5py.File(target, "r")


def _frames_dataset(obj, path: str, data_path: str) -> h5py.Dataset:
    if not isinstance(obj, h5py.Dataset):
        raise InputDataError(path, f"{data_path} is not a dataset")
    if obj.ndim != 3:
        raise InputDataError(
            path, f"{data_path} has shape {obj.shape}, expected frames x rows x cols"
        )
    check_frame_dtype(obj.dtype, path, data_path)
    return obj


def check_frame_dtype(dtype, path: str, data_path: str) -> None:
    """Frames are integers or float32/float64: complex, bool, strings or compound values have
    no meaning as counts (and numba's kernel would fail on them with its own words)."""
    dtype = np.dtype(dtype)
    if dtype.kind in "iu" or dtype.name in FRAME_FLOATS:
        return
    raise InputDataError(
        path,
        f"{data_path.lstrip('/')}: frames of dtype {dtype} cannot be integrated "
        "(expected integer or float)",
    )


def _monitor(h5: h5py.File, entry: str, name: str, scan: Scan) -> tuple[float, ...]:
    key = f"{entry}/measurement/{name}"
    if key not in h5:
        raise DiscoveryError(h5.filename, f"monitor counter '{name}' not found in entry {entry}")
    values = np.asarray(h5[key][()], dtype=float).ravel()
    if values.size < scan.n_frames:
        raise InputDataError(
            h5.filename, f"{key} has {values.size} values for {scan.n_frames} frames"
        )
    values = values[: scan.n_frames]
    check_monitor(values, f"{h5.filename}: {key}")
    return tuple(values.tolist())


def check_monitor(values: np.ndarray, where: str) -> None:
    """Each frame is divided by its monitor value: zero, negative or non-finite values would
    give infinities or sign-flipped rows, never a meaningful result."""
    bad = np.flatnonzero(~(np.isfinite(values) & (values > 0)))
    if bad.size:
        frame = int(bad[0])
        raise InputDataError(
            where,
            f"monitor value {float(values[frame])} at frame {frame} ({bad.size} of "
            f"{values.size} frames not > 0 or not finite): frames cannot be normalised by it",
        )


def _source_path(master: str, name: str) -> str:
    return os.path.normpath(
        name if os.path.isabs(name) else os.path.join(os.path.dirname(master), name)
    )


def _natural_key(name: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
