"""Partial results: what one file task leaves for its scan's assembly, and reading them back.

A partial is small, uncompressed HDF5 in the workspace: fast to write from an engine and to
read back in slabs. The scan's final file is compressed once, by the assembly task.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import h5py
import numpy as np

from .errors import OutputError
from .writers import atomic_h5

SLAB_BYTES = 8 * 2**20  # rows read back at a time: what the writer holds besides its chunks
# what the engine that wrote a partial says of itself (tasks.engine): geometry (PONI values
# and text), pyFAI's version, the method that ran and the radial range passed to pyFAI
PROVENANCE_KEYS = ("geometry", "pyFAI", "method", "radial_range")


@dataclass
class Partial:
    """The integrated rows of one Lima file (or part of one), in frame order."""

    intensity: np.ndarray  # (n, npt) or (n, slices, npt)
    sigma: np.ndarray | None
    radial: np.ndarray
    azimuthal: np.ndarray | None
    source_file: str
    source_dataset: str
    source_frame: np.ndarray  # frame index in the source file, per row
    normalization: np.ndarray  # monitor value each row was divided by (1 without monitor)
    provenance: dict  # PROVENANCE_KEYS, from the engine


@dataclass
class PartialHeader:
    """Everything of a partial but its rows, which are read in slabs."""

    path: str
    shape: tuple[int, ...]
    dtype: np.dtype
    has_sigma: bool
    radial: np.ndarray
    azimuthal: np.ndarray | None
    source_file: str
    source_dataset: str
    source_frame: np.ndarray
    normalization: np.ndarray
    provenance: dict  # PROVENANCE_KEYS, from the engine that wrote it


def write_partial(path: str, part: Partial) -> None:
    """A whole partial at once (tests, tools); engines use :func:`partial_writer`."""
    with atomic_h5(path) as h5:
        h5["intensity"] = part.intensity
        if part.sigma is not None:
            h5["sigma"] = part.sigma
        h5["radial"] = part.radial
        if part.azimuthal is not None:
            h5["azimuthal"] = part.azimuthal
        h5["source_frame"] = part.source_frame
        h5["normalization"] = part.normalization
        h5.attrs["source_file"] = part.source_file
        h5.attrs["source_dataset"] = part.source_dataset
        h5.attrs["provenance"] = _provenance_text(part.provenance)


def _provenance_text(provenance: dict) -> str:
    """``provenance`` as JSON; numpy scalars and arrays as plain numbers and lists."""
    return json.dumps(provenance, default=lambda value: np.asarray(value).tolist())


class PartialWriter:
    """A partial written batch by batch: an engine holds one batch of rows, not a file's."""

    def __init__(self, h5: h5py.File, rows: int, row_shape: tuple[int, ...], sigma: bool):
        self.h5 = h5
        self.intensity = h5.create_dataset("intensity", (rows, *row_shape), np.float32)
        self.sigma = h5.create_dataset("sigma", (rows, *row_shape), np.float32) if sigma else None

    def write(self, row: int, intensity: np.ndarray, sigma: np.ndarray | None) -> None:
        self.intensity[row : row + len(intensity)] = intensity
        if self.sigma is not None:
            self.sigma[row : row + len(sigma)] = sigma


@contextmanager
def partial_writer(
    path: str,
    rows: int,
    row_shape: tuple[int, ...],
    sigma: bool,
    *,
    radial: np.ndarray,
    azimuthal: np.ndarray | None,
    source_file: str,
    source_dataset: str,
    source_frame: np.ndarray,
    normalization: np.ndarray,
    provenance: dict,
) -> Iterator[PartialWriter]:
    """Rows go in through the yielded writer; the partial appears at ``path`` complete or not at
    all, as :func:`write_partial`'s. ``provenance`` (PROVENANCE_KEYS, stored as JSON, so any
    key the engine adds travels) spares the assembly task from loading pyFAI to describe the
    geometry and the method."""
    with atomic_h5(path) as h5:
        writer = PartialWriter(h5, rows, row_shape, sigma)
        yield writer
        h5["radial"] = radial
        if azimuthal is not None:
            h5["azimuthal"] = azimuthal
        h5["source_frame"] = source_frame
        h5["normalization"] = normalization
        h5.attrs["source_file"] = source_file
        h5.attrs["source_dataset"] = source_dataset
        h5.attrs["provenance"] = _provenance_text(provenance)


@contextmanager
def _opened(path: str) -> Iterator[h5py.File]:
    """A partial open for reading; any failure to read it names the file."""
    try:
        with h5py.File(path, "r") as h5:
            yield h5
    except (OSError, KeyError) as exc:
        raise OutputError(path, f"partial result unreadable: {exc}") from None


def read_header(path: str) -> PartialHeader:
    """Everything but the rows; a partial without its provenance is an error naming it."""
    with _opened(path) as h5:
        rows = h5["intensity"]
        return PartialHeader(
            path=path,
            shape=rows.shape,
            dtype=rows.dtype,
            has_sigma="sigma" in h5,
            radial=h5["radial"][()],
            azimuthal=h5["azimuthal"][()] if "azimuthal" in h5 else None,
            source_file=str(h5.attrs["source_file"]),
            source_dataset=str(h5.attrs.get("source_dataset", "")),  # older partials
            source_frame=h5["source_frame"][()],
            normalization=(
                h5["normalization"][()] if "normalization" in h5 else np.ones(rows.shape[0])
            ),
            provenance=_provenance(path, h5.attrs.get("provenance")),
        )


def _provenance(path: str, text: str | None) -> dict:
    try:
        provenance = json.loads(text) if text else {}
    except ValueError as exc:
        raise OutputError(path, f"partial result with unreadable provenance: {exc}") from None
    missing = [key for key in PROVENANCE_KEYS if key not in provenance]
    if missing:
        raise OutputError(
            path,
            f"partial result without {', '.join(missing)} in its provenance (written by "
            "another ringflow version): run its scan again",
        )
    return provenance


def iter_rows(path: str, name: str, budget: int = SLAB_BYTES) -> Iterator[np.ndarray]:
    """Dataset ``name`` of a partial, in slabs of at most ``budget`` bytes, in order."""
    with _opened(path) as h5:
        dset = h5[name]
        row_bytes = max(1, dset.dtype.itemsize * int(np.prod(dset.shape[1:])))
        step = max(1, budget // row_bytes)
        for start in range(0, dset.shape[0], step):
            yield dset[start : start + step]


def read_block(path: str, name: str, where: tuple[slice, ...]) -> np.ndarray:
    """Every row of ``name``, restricted to ``where`` along its other axes."""
    with _opened(path) as h5:
        return h5[name][(slice(None), *where)]
