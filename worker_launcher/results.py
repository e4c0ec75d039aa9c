"""Looking at a written output: what `ringflow plot` draws and `ringflow export` writes.

The data to show is found the NeXus way, never by dataset name, so any NXdata reads (outputs
of older layouts and other writers too): the root's ``default`` attribute names the entry (or
``--entry``), the entry's ``default`` its NXdata, whose ``signal``, ``axes`` and
``<axis>_indices`` attributes name the intensity and its axes; the errors are
``<signal>_errors`` (NeXus, NXazint's ``I_errors``) or ``errors``. Only where an attribute is
missing does the reading fall back to the first NXentry and NXdata that have them.

The signal is frames x radial (a 1D scan) or frames x azimuthal x radial (a cake). Scans of
10,000 frames and more are read in blocks of whole chunks, at most ``BLOCK_BYTES`` at once,
in one pass that yields both the mean and the rows of the heat map; the heat map keeps at
most ``HEATMAP_ROWS`` rows, and no more than the figure has pixels, evenly strided. A stored
average (an ``NXdata`` beside the shown one or in the entry's ``reduction`` holding the mean
over frames, ``reduction/integrated_mean`` with ``average_xy = mean``) is used instead of
that pass where only the mean is needed.

Errors: :class:`InputDataError` for what a user got wrong (no such file, not HDF5, no NXdata,
unknown entry, frame out of range); a plain :class:`RingflowError` for a file that cannot be
read (permissions, a corrupt chunk); :class:`OutputError` for a figure or text file that
cannot be written.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import h5py
import numpy as np

from tasks import nexus
from tasks.errors import InputDataError, RingflowError
from tasks.writers import os_reason, replacing

BLOCK_BYTES = 8 * 2**20  # rows decompressed and held at once while reducing a scan
HEATMAP_ROWS = 1500  # rows of a heat map at most, and never more than the figure has pixels
FILE_MODE = 0o666  # figures and text files: as any program writes them, less the umask
DPI = 100
MARGINS = {"left": 80, "right": 25, "right_colorbar": 80, "bottom": 55, "top": 45}  # pixels


# --- what is in the file ---------------------------------------------------------------------


@dataclass(frozen=True)
class Axis:
    """One axis of the signal: its values and how to label them."""

    name: str
    values: np.ndarray
    units: str = ""
    long_name: str = ""

    @property
    def label(self) -> str:
        """'long_name (units)', or the long name alone for an axis without units."""
        text = self.long_name or self.name
        return f"{text} ({self.units})" if self.units else text


@dataclass(frozen=True)
class ScanData:
    """Where a scan's integrated data lies in its output, and what its axes are."""

    path: str  # the output file
    entry: str  # the entry (scan) shown
    group: str  # HDF5 path of the NXdata
    signal: str  # HDF5 path of the signal dataset
    errors: str | None  # HDF5 path of its errors, if any
    shape: tuple[int, ...]  # (frames, radial) or (frames, azimuthal, radial)
    radial: Axis
    azimuthal: Axis | None  # None for a 1D scan
    signal_label: str
    stored_mean: str | None  # HDF5 path of an NXdata holding the mean over frames
    title: str = ""  # the entry's title (the scan command), if it has one

    @property
    def frames(self) -> int:
        return self.shape[0]

    @property
    def is_cake(self) -> bool:
        return self.azimuthal is not None


@dataclass(frozen=True)
class Pattern:
    """One frame's row (or cake), or the mean of all of them, with its errors."""

    intensity: np.ndarray  # (radial,) or (azimuthal, radial)
    errors: np.ndarray | None
    what: str  # "frame 12", "mean of 150 frames"
    frame: int | None = None  # None for the mean


@dataclass(frozen=True)
class Overview:
    """A whole 1D scan at a glance: strided rows for a heat map, and the mean pattern."""

    rows: np.ndarray  # (k, radial)
    row_index: np.ndarray  # frame index of each row
    mean: Pattern


@contextmanager
def open_output(path: str) -> Iterator[h5py.File]:
    """``path`` opened for reading, or one error saying why it cannot be: a missing file or
    one that is no HDF5 is a user's mistake, a permission or I/O problem is not."""
    if not os.path.exists(path):
        raise InputDataError(path, "no such file")
    if os.path.isdir(path):
        raise InputDataError(path, "is a folder, not an output file")
    if not os.access(path, os.R_OK):
        raise RingflowError(f"{path}: cannot be read: permission denied")
    if not h5py.is_hdf5(path):
        raise InputDataError(path, "not an HDF5 file")
    try:
        h5 = h5py.File(path, "r")
    except OSError as exc:
        raise RingflowError(f"{path}: cannot be read: {os_reason(exc)}") from None
    with h5:
        yield h5


def locate(h5: h5py.File, entry: str | None = None) -> ScanData:
    """The NXdata to show in ``entry`` (default: the file's default entry), read from the
    NeXus attributes."""
    name = _entry_name(h5, entry)
    group = _nxdata(h5, name)
    signal = _signal(group)
    if signal.ndim not in (2, 3):
        raise InputDataError(
            h5.filename,
            f"{signal.name}: {signal.ndim} dimensions {signal.shape}; expected frames x "
            "radial or frames x azimuthal x radial",
        )
    if signal.shape[0] == 0:
        raise InputDataError(h5.filename, f"{signal.name}: no frames")
    axes = _axis_names(group, signal.ndim)
    errors = _errors(group, signal)
    return ScanData(
        path=h5.filename,
        entry=name,
        group=group.name,
        signal=signal.name,
        errors=None if errors is None else errors.name,
        shape=signal.shape,
        radial=_axis(group, axes[-1], signal.shape[-1]),
        azimuthal=_axis(group, axes[1], signal.shape[1]) if signal.ndim == 3 else None,
        signal_label=_text(signal.attrs.get("long_name", "")) or signal.name.rsplit("/", 1)[-1],
        stored_mean=_stored_mean(group, signal.shape[1:]),
        title=_title(h5[name]),
    )


def _entry_name(h5: h5py.File, wanted: str | None) -> str:
    """The entry asked for, else the root's ``default``, else the first NXentry."""
    entries = [k for k, v in h5.items() if isinstance(v, h5py.Group) and _nx_class(v) == "NXentry"]
    if wanted is not None:
        if wanted not in entries:
            listed = ", ".join(entries) or "none"
            raise InputDataError(
                h5.filename, f"--entry {wanted}: no such entry (entries: {listed})"
            )
        return wanted
    default = _text(h5.attrs.get("default", ""))
    if default in entries:
        return default
    if not entries:
        raise InputDataError(h5.filename, "no NXentry: not a NeXus output")
    return entries[0]


def _nxdata(h5: h5py.File, entry: str) -> h5py.Group:
    """The entry's NXdata: its ``default`` chain followed (it may pass through sub-groups),
    else the first NXdata of the entry that names a signal."""
    group = h5[entry]
    while _nx_class(group) != "NXdata":
        name = _text(group.attrs.get("default", ""))
        child = group.get(name) if name else None
        if not isinstance(child, h5py.Group):
            break
        group = child
    if _nx_class(group) == "NXdata" and "signal" in group.attrs:
        return group
    for child in h5[entry].values():
        if isinstance(child, h5py.Group) and _nx_class(child) == "NXdata" and _has_signal(child):
            return child
    raise InputDataError(h5.filename, f"entry {entry}: no NXdata with a signal to show")


def _signal(group: h5py.Group) -> h5py.Dataset:
    name = _text(group.attrs.get("signal", ""))
    dset = group.get(name) if name else None
    if not isinstance(dset, h5py.Dataset):
        raise InputDataError(group.file.filename, f"{group.name}: signal {name!r} is no dataset")
    return dset


def _has_signal(group: h5py.Group) -> bool:
    name = _text(group.attrs.get("signal", ""))
    return bool(name) and isinstance(group.get(name), h5py.Dataset)


def _axis_names(group: h5py.Group, ndim: int) -> list[str | None]:
    """Per dimension of the signal, the name of its axis dataset (None: no axis): from
    ``<axis>_indices``, else from the ``axes`` list ("." for a dimension without one)."""
    names: list[str | None] = [None] * ndim
    for key, value in group.attrs.items():
        index = np.ravel(value)
        if key.endswith("_indices") and index.size == 1 and key[: -len("_indices")] in group:
            names[int(index[0]) % ndim] = key[: -len("_indices")]
    listed = _texts(group.attrs.get("axes", []))
    if len(listed) == ndim:
        for dim, name in enumerate(listed):
            if names[dim] is None and name != "." and name in group:
                names[dim] = name
    return names


def _axis(group: h5py.Group, name: str | None, length: int) -> Axis:
    """The axis dataset ``name`` as an :class:`Axis`; bin numbers where there is none."""
    dset = group.get(name) if name else None
    if not isinstance(dset, h5py.Dataset) or dset.shape != (length,):
        return Axis("bin", np.arange(length, dtype=np.float64), "", "bin")
    return Axis(
        name=name,
        values=dset[()].astype(np.float64),
        units=_text(dset.attrs.get("units", "")),
        long_name=_text(dset.attrs.get("long_name", "")) or name,
    )


def _errors(group: h5py.Group, signal: h5py.Dataset) -> h5py.Dataset | None:
    """``<signal>_errors`` (NeXus), else ``errors`` (ringflow's layout), of the signal's
    shape."""
    base = signal.name.rsplit("/", 1)[-1]
    for name in (f"{base}_errors", "errors"):
        dset = group.get(name)
        if isinstance(dset, h5py.Dataset) and dset.shape == signal.shape:
            return dset
    return None


def _stored_mean(group: h5py.Group, shape: tuple[int, ...]) -> str | None:
    """An NXdata beside ``group``, or in the entry's ``reduction``, holding the mean over the
    frames: named ``<group>_mean`` or its signal's long_name saying "mean", and a signal of
    one frame's ``shape``."""
    base = group.name.rsplit("/", 1)[-1]
    process = group.parent.get(nexus.PROCESS)
    places = [group.parent] + ([process] if isinstance(process, h5py.Group) else [])
    children = [item for place in places for item in place.items()]
    for name, child in children:
        if not isinstance(child, h5py.Group) or child.name == group.name:
            continue
        if _nx_class(child) != "NXdata" or not _has_signal(child):
            continue
        signal = _signal(child)
        named = name == f"{base}_mean" or _text(signal.attrs.get("long_name", "")).startswith(
            "mean "
        )
        if named and signal.shape == shape:
            return child.name
    return None


def _title(entry: h5py.Group) -> str:
    """The entry's ``title`` dataset (NXentry's; Bliss stores the scan command there)."""
    dset = entry.get("title")
    if not isinstance(dset, h5py.Dataset) or dset.shape not in ((), (1,)):
        return ""
    return _text(dset[()])


def _nx_class(obj: h5py.HLObject) -> str:
    return _text(obj.attrs.get("NX_class", ""))


def _text(value: object) -> str:
    """An attribute as text: HDF5 strings arrive as str, bytes or 0-d/1-element arrays."""
    if isinstance(value, np.ndarray):
        value = value.ravel()[0] if value.size == 1 else ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _texts(value: object) -> list[str]:
    if isinstance(value, (str, bytes)):
        return [_text(value)]
    return [_text(v) for v in np.ravel(value)]


# --- reading rows ----------------------------------------------------------------------------


def read_frame(h5: h5py.File, scan: ScanData, frame: int) -> Pattern:
    """Row ``frame`` of the scan (a pattern, or a cake) and its errors."""
    if not 0 <= frame < scan.frames:
        raise InputDataError(
            scan.path,
            f"--frame {frame}: out of range, entry {scan.entry} has {scan.frames} frames "
            f"(0 to {scan.frames - 1})",
        )
    intensity = _read(h5[scan.signal], frame)
    errors = None if scan.errors is None else _read(h5[scan.errors], frame)
    return Pattern(intensity, errors, f"frame {frame}", frame)


def read_mean(h5: h5py.File, scan: ScanData) -> Pattern:
    """The NaN-ignoring mean over every frame: the stored one if the output has it, else
    computed in blocks (the errors reduced the same way, as ``average_xy`` does)."""
    if scan.stored_mean is not None:
        group = h5[scan.stored_mean]
        signal = _signal(group)
        errors = _errors(group, signal)
        return Pattern(
            _read(signal, ()),
            None if errors is None else _read(errors, ()),
            f"mean of {scan.frames} frames",
        )
    return _reduce(h5, scan, step=0)[1]


def read_overview(h5: h5py.File, scan: ScanData, max_rows: int = HEATMAP_ROWS) -> Overview:
    """Every ``step``-th row (at most ``max_rows``) and the mean, in one pass over the scan;
    only the strided rows when the mean is stored."""
    step = max(1, math.ceil(scan.frames / max_rows))
    index = np.arange(0, scan.frames, step)
    if scan.stored_mean is not None:
        return Overview(_read(h5[scan.signal], slice(None, None, step)), index, read_mean(h5, scan))
    rows, mean = _reduce(h5, scan, step, with_errors=False)
    return Overview(rows, index, mean)


def _reduce(
    h5: h5py.File, scan: ScanData, step: int, with_errors: bool = True
) -> tuple[np.ndarray | None, Pattern]:
    """One pass over the scan, whole chunks at a time: the NaN-ignoring mean of the signal
    (and of the errors) and, with ``step``, every ``step``-th row of the signal."""
    intensity, kept = _Sum(scan.shape[1:]), []
    for start, block in _blocks(h5[scan.signal]):
        intensity.add(block)
        if step:
            kept.append(block[(-start) % step :: step].copy())  # a view would keep the block
    errors = None
    if with_errors and scan.errors is not None:
        errors = _Sum(scan.shape[1:])
        for _, block in _blocks(h5[scan.errors]):
            errors.add(block)
    rows = np.concatenate(kept) if step else None
    mean = None if errors is None else errors.mean()
    return rows, Pattern(intensity.mean(), mean, f"mean of {scan.frames} frames")


class _Sum:
    """A running NaN-ignoring sum and count per bin, in float64: ``nanmean`` by blocks."""

    def __init__(self, shape: tuple[int, ...]):
        self.total = np.zeros(shape, np.float64)
        self.count = np.zeros(shape, np.int64)

    def add(self, block: np.ndarray) -> None:
        finite = ~np.isnan(block)
        self.total += np.where(finite, block, 0).sum(axis=0, dtype=np.float64)
        self.count += finite.sum(axis=0)

    def mean(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count > 0, self.total / np.maximum(self.count, 1), np.nan)


def _blocks(dset: h5py.Dataset) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, rows) of ``dset`` in blocks of whole chunks, at most ``BLOCK_BYTES`` each
    (at least one chunk): each chunk is decompressed once."""
    row_bytes = max(1, math.prod(dset.shape[1:]) * dset.dtype.itemsize)
    chunk = dset.chunks[0] if dset.chunks else 1
    rows = max(chunk, BLOCK_BYTES // row_bytes // chunk * chunk)
    for start in range(0, dset.shape[0], rows):
        yield start, _read(dset, slice(start, start + rows))


def _read(dset: h5py.Dataset, where: object) -> np.ndarray:
    """``dset[where]``, a read error (a corrupt chunk, a checksum) named by file and
    dataset."""
    try:
        return dset[where]
    except OSError as exc:
        reason = os_reason(exc)
        raise RingflowError(
            f"{dset.file.filename}: {dset.name}: cannot be read: {reason}"
        ) from None


# --- figures ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FigureSize:
    """A figure's size in pixels: the PNG has exactly these."""

    width: int = 1200
    height: int = 800

    def inches(self) -> tuple[float, float]:
        return self.width / DPI, self.height / DPI


@dataclass(frozen=True)
class PlotRequest:
    """What `ringflow plot` was asked for."""

    output: str
    image: str
    entry: str | None = None
    frame: int | None = None
    size: FigureSize = FigureSize()


def plot_output(request: PlotRequest) -> str:
    """The figure of one output: a frame, the mean cake, or a 1D scan's overview; the path
    written."""
    with open_output(request.output) as h5:
        scan = locate(h5, request.entry)
        if request.frame is not None:
            fig = draw_pattern(scan, read_frame(h5, scan, request.frame), request.size)
        elif scan.is_cake:
            fig = draw_cake(scan, read_mean(h5, scan), request.size)
        else:
            rows = min(HEATMAP_ROWS, request.size.height)
            fig = draw_overview(scan, read_overview(h5, scan, rows), request.size)
    return save_figure(fig, request.image)


def draw_overview(scan: ScanData, overview: Overview, size: FigureSize):
    """A 1D scan: heat map of the frames over the mean pattern, sharing the radial axis
    (stacked, so that a ring's column and its peak line up)."""
    from matplotlib.colors import LogNorm

    fig, grid = _figure(scan, overview.mean.what, size, rows=(3, 1.3))
    heat = fig.add_subplot(grid[0, 0])
    mean = fig.add_subplot(grid[1, 0], sharex=heat)
    step = int(overview.row_index[1]) if len(overview.row_index) > 1 else 1
    image = heat.imshow(
        overview.rows,
        aspect="auto",
        origin="lower",
        interpolation="antialiased",  # 2000 bins on 1000 pixels: a ring never falls between
        extent=(*_extent(scan.radial.values), -0.5, overview.row_index[-1] + step - 0.5),
        norm=_norm(overview.rows),
    )
    fig.colorbar(image, cax=fig.add_subplot(grid[0, 1]), label=scan.signal_label)
    if isinstance(image.norm, LogNorm):  # weak rings visible below the strong ones, as above
        mean.set_yscale("log")
    heat.set_ylabel("frame" if step == 1 else f"frame (1 row in {step} shown)")
    heat.tick_params(labelbottom=False)
    mean.plot(scan.radial.values, overview.mean.intensity, lw=1)
    mean.set_xlabel(scan.radial.label)
    mean.set_ylabel(f"mean {scan.signal_label}")
    mean.grid(alpha=0.3)
    return fig


def draw_cake(scan: ScanData, pattern: Pattern, size: FigureSize):
    """One cake (a frame's or the mean): azimuthal angle against the radial axis."""
    fig, grid = _figure(scan, pattern.what, size)
    ax = fig.add_subplot(grid[0, 0])
    image = ax.imshow(
        pattern.intensity,
        aspect="auto",
        origin="lower",
        interpolation="antialiased",
        extent=(*_extent(scan.radial.values), *_extent(scan.azimuthal.values)),
        norm=_norm(pattern.intensity),
    )
    fig.colorbar(image, cax=fig.add_subplot(grid[0, 1]), label=scan.signal_label)
    ax.set_xlabel(scan.radial.label)
    ax.set_ylabel(scan.azimuthal.label)
    return fig


def draw_pattern(scan: ScanData, pattern: Pattern, size: FigureSize):
    """One frame of a 1D scan: intensity against the radial axis, with error bars (a few
    hundred of them at most, so they stay readable on 2,000 bins)."""
    if scan.is_cake:
        return draw_cake(scan, pattern, size)
    fig, grid = _figure(scan, pattern.what, size, colorbar=False)
    ax = fig.add_subplot(grid[0, 0])
    x, y = scan.radial.values, pattern.intensity
    if pattern.errors is None:
        ax.plot(x, y, lw=1)
    else:
        every = max(1, len(x) // 300)
        ax.errorbar(x, y, yerr=pattern.errors, lw=1, elinewidth=0.6, errorevery=every)
    ax.set_xlim(*_extent(x))
    ax.set_xlabel(scan.radial.label)
    ax.set_ylabel(scan.signal_label)
    ax.grid(alpha=0.3)
    return fig


def save_figure(fig, path: str) -> str:
    """The figure at ``path``, written under a temporary name and renamed; the format from
    the suffix (PNG when it names none matplotlib knows)."""
    suffix = os.path.splitext(path)[1].lstrip(".").lower()
    fmt = suffix if suffix in fig.canvas.get_supported_filetypes() else "png"
    with replacing(path, FILE_MODE) as tmp:
        fig.savefig(tmp, format=fmt, dpi=DPI)
    return path


def _figure(
    scan: ScanData, what: str, size: FigureSize, rows: tuple[float, ...] = (1,), colorbar=True
):
    """A figure titled by the file, entry and ``what``, and its grid: ``rows`` panels (by
    relative height) and a narrow column for a colour bar. Built without pyplot (no global
    state, no display: the Agg canvas); margins fixed in pixels, as the fonts are, rather
    than computed by matplotlib's constrained layout, which took ~1 s per figure here."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=size.inches(), dpi=DPI)
    title = f" ({scan.title})" if scan.title else ""
    text = f"{os.path.basename(scan.path)}, entry {scan.entry}{title}: {what}"
    fig.suptitle(text, y=1 - 12 / size.height, va="top", fontsize=_title_points(text, size))
    right = MARGINS["right_colorbar" if colorbar else "right"]
    grid = fig.add_gridspec(
        len(rows),
        2,
        width_ratios=(1, 0.022 if colorbar else 1e-6),
        height_ratios=rows,
        left=MARGINS["left"] / size.width,
        right=1 - right / size.width,
        bottom=MARGINS["bottom"] / size.height,
        top=1 - MARGINS["top"] / size.height,
        wspace=0.015 * 1200 / size.width,
        hspace=0.08 * 800 / size.height,
    )
    return fig, grid


def _title_points(text: str, size: FigureSize) -> float:
    """The title's font size: 12 points, less when that would not fit the figure's width (a
    character of DejaVu Sans is about 0.8 pixel per point wide at 100 dpi)."""
    return max(6.0, min(12.0, 0.95 * size.width / (0.8 * max(len(text), 1))))


def _extent(values: np.ndarray) -> tuple[float, float]:
    """Outer edges of bins centred on ``values``."""
    if len(values) < 2:
        return float(values[0]) - 0.5, float(values[0]) + 0.5
    half = (values[-1] - values[0]) / (len(values) - 1) / 2
    return float(values[0] - half), float(values[-1] + half)


def _norm(values: np.ndarray):
    """Colour scale from the 1st to the 99.5th percentile: a few hot pixels or empty bins
    do not wash the image out; logarithmic when the values span decades (Bragg rings)."""
    from matplotlib.colors import LogNorm, Normalize

    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return Normalize(0, 1)
    low, high = np.percentile(finite, [1, 99.5])
    if low > 0 and high / low > 30:
        return LogNorm(low, high, clip=True)
    return Normalize(low, high if high > low else low + 1)


# --- text files ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextFile:
    """One text file to write: its path, column headings and columns."""

    path: str
    headings: tuple[str, ...]
    columns: tuple[np.ndarray, ...]


def text_files(scan: ScanData, pattern: Pattern, fmt: str, dest: str | None) -> list[TextFile]:
    """The files a pattern becomes: one, or for a cake one per azimuthal slice (``_chiNN``
    in the name, from 01); columns radial, intensity and, when the output has them,
    errors."""
    cake = pattern.intensity.reshape(-1, pattern.intensity.shape[-1])
    errors = None if pattern.errors is None else pattern.errors.reshape(cake.shape)
    paths = _text_paths(scan, pattern, fmt, dest, len(cake) if scan.is_cake else 0)
    headings = (scan.radial.label, scan.signal_label) + (() if errors is None else ("errors",))
    files = []
    for k, path in enumerate(paths):
        columns = (scan.radial.values, cake[k]) + (() if errors is None else (errors[k],))
        files.append(TextFile(path, headings, columns))
    return files


def _text_paths(scan: ScanData, pattern: Pattern, fmt: str, dest: str | None, slices: int):
    """``<output stem>_mean.<fmt>`` or ``_frame<N>`` beside the output, or ``dest`` (a file
    name, or a folder for the default names); ``_chiNN`` added per slice of a cake."""
    what = "mean" if pattern.frame is None else f"frame{pattern.frame}"
    stem = os.path.splitext(os.path.basename(scan.path))[0]
    default = f"{stem}_{what}.{fmt}"
    if dest is None:
        base = os.path.join(os.path.dirname(scan.path), default)
    else:
        base = os.path.join(dest, default) if os.path.isdir(dest) else dest
    if not slices:
        return [base]
    root, suffix = os.path.splitext(base)
    return [f"{root}_chi{k:02d}{suffix}" for k in range(1, slices + 1)]


def write_text(file: TextFile, fmt: str) -> str:
    """``file`` as .xye (space-separated, no header) or .csv (a header line naming each
    column and its units), written under a temporary name and renamed. 9 significant
    digits: a float32 value reads back exactly."""
    table = np.column_stack(file.columns)
    with replacing(file.path, FILE_MODE) as tmp:
        if fmt == "csv":
            header = ",".join(h.replace(",", ";") for h in file.headings)
            np.savetxt(tmp, table, fmt="%.9g", delimiter=",", header=header, comments="")
        else:
            np.savetxt(tmp, table, fmt="%.9g")
    return file.path


@dataclass(frozen=True)
class ExportRequest:
    """What `ringflow export` was asked for."""

    output: str
    fmt: str = "xye"  # "xye" or "csv"
    frame: int | None = None  # None: the mean over frames
    dest: str | None = None  # a file, a folder, or None: beside the output
    entry: str | None = None


def export_output(request: ExportRequest) -> list[str]:
    """A frame's pattern, or the mean, of one output as text files; the paths written."""
    with open_output(request.output) as h5:
        scan = locate(h5, request.entry)
        if request.frame is None:
            pattern = read_mean(h5, scan)
        else:
            pattern = read_frame(h5, scan, request.frame)
    files = text_files(scan, pattern, request.fmt, request.dest)
    return [write_text(file, request.fmt) for file in files]
