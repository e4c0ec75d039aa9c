"""The compression-pool writer: chunks compressed on threads, written in order from one thread.

HDF5 compresses through its filter pipeline on the calling thread, one chunk after another,
and h5py holds one global lock around every call, so a compressed write uses one core. Here
the chunks of a dataset are encoded (shuffle, codec, fletcher32: see :mod:`tasks.codecs`) by
a thread pool while the calling thread keeps producing data and storing finished chunks with
``write_direct_chunk``. At most ``in_flight`` chunks are queued, so memory is bounded by the
chunk size and the slabs handed in, never by the dataset size. Chunks stay queued across
datasets (the pool never idles at a dataset's end); :meth:`ChunkWriter.flush`, or leaving the
context without an error, stores the last of them.
"""

from __future__ import annotations

import itertools
import math
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import h5py
import numpy as np

from .codecs import Filters, chunk_encoder, deflate_library

SMALL_BYTES = 4096  # datasets up to this size are stored contiguous and uncompressed
CHUNK_TARGET_BYTES = 2**20  # automatic chunks hold about this many bytes
FLIGHT_BYTES = 256 * 2**20  # default bound on the raw bytes of queued chunks


@dataclass(frozen=True)
class Storage:
    """How one dataset is stored: its filters and the rows (first axis) per chunk."""

    filters: Filters
    chunk_rows: int = 0  # 0: about CHUNK_TARGET_BYTES per chunk


def chunk_shape(shape: tuple[int, ...], itemsize: int, rows: int = 0) -> tuple[int, ...]:
    """Chunks span every axis but the first; ``rows`` frames each (0: about 1 MiB)."""
    row_bytes = max(1, math.prod(shape[1:]) * itemsize)
    rows = rows or max(1, CHUNK_TARGET_BYTES // row_bytes)
    return (max(1, min(rows, shape[0])), *shape[1:])


def task_cores() -> int:
    """CPUs this process may run on (SLURM's cgroup, taskset), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class ChunkWriter:
    """Writes datasets chunk by chunk through a pool of ``threads`` compressing threads.

    Use as a context manager, closed before the file; every h5py call stays on the thread
    that calls :meth:`write`. A dataset is complete after :meth:`flush` or a clean exit.
    """

    def __init__(self, threads: int = 0, in_flight: int = 0):
        self.threads = threads or task_cores()
        self.in_flight = in_flight  # 0: default_in_flight() for each write
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="ringflow-compress")
        self._pending: deque[tuple[h5py.Dataset, tuple[int, ...], Future]] = deque()

    def __enter__(self) -> ChunkWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        try:
            if exc_type is None:
                self.flush()
        finally:
            self.close()

    def flush(self) -> None:
        """Store every queued chunk: the datasets written so far are then complete."""
        while self._pending:
            self._store(*self._pending.popleft())

    def close(self) -> None:
        """Stop the pool; chunks not yet stored are dropped (call :meth:`flush` first)."""
        self._pending.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def save(
        self, group: h5py.Group, name: str, data, storage: Storage, dtype=None
    ) -> h5py.Dataset:
        """``data`` as dataset ``name``: compressed if larger than a few kB, else plain.

        ``dtype`` may carry h5py metadata, such as a UTF-8 fixed-length string type.
        """
        data = np.asarray(data)
        small = data.ndim == 0 or data.nbytes <= SMALL_BYTES
        if small or data.dtype.kind not in "biufS":
            return group.create_dataset(name, data=data, dtype=dtype)
        dset = self.create(group, name, data.shape, dtype or data.dtype, storage)
        self.write(dset, [data], storage.filters)
        return dset

    def create(
        self,
        group: h5py.Group,
        name: str,
        shape: tuple[int, ...],
        dtype,
        storage: Storage,
        chunks: tuple[int, ...] | None = None,
    ) -> h5py.Dataset:
        """An empty chunked dataset carrying ``storage``'s filters, for :meth:`write`."""
        dtype = np.dtype(dtype)
        chunks = chunks or chunk_shape(tuple(shape), dtype.itemsize, storage.chunk_rows)
        return group.create_dataset(
            name, shape=shape, dtype=dtype, chunks=chunks, **storage.filters.dataset_options()
        )

    def write(self, dset: h5py.Dataset, slabs: Iterable[np.ndarray], filters: Filters) -> None:
        """Fill ``dset`` from ``slabs``: consecutive pieces along the first axis, in order.

        The slabs may have any number of rows; they must add up to the dataset's length.
        """
        self.write_many([(dset, filters)], ((slab,) for slab in slabs))

    def write_many(
        self,
        targets: list[tuple[h5py.Dataset, Filters]],
        slabs: Iterable[tuple[np.ndarray, ...]],
    ) -> None:
        """Fill several datasets of equal length from one pass: slab k goes to target k.

        For data produced together (corrected frames and their masks), computed once.
        """
        encoders = [chunk_encoder(dset, deflate_library(filters)) for dset, filters in targets]
        bands = [Bands(dset.shape, dset.chunks, dset.dtype) for dset, _ in targets]
        limit = self.in_flight or self.default_in_flight([dset for dset, _ in targets])
        pending = self._pending

        def submit(k: int, chunks: Iterable[tuple[tuple[int, ...], np.ndarray]]) -> None:
            for offset, chunk in chunks:
                pending.append((targets[k][0], offset, self._pool.submit(encoders[k], chunk)))
                while len(pending) >= limit:
                    self._store(*pending.popleft())

        for pieces in slabs:
            if len(pieces) != len(targets):
                raise ValueError(f"{len(pieces)} slabs for {len(targets)} datasets")
            for k, piece in enumerate(pieces):
                submit(k, bands[k].push(piece))
        for k, band in enumerate(bands):
            submit(k, band.finish())

    def default_in_flight(self, datasets: list[h5py.Dataset]) -> int:
        """4 chunks per thread, fewer if they would hold more than FLIGHT_BYTES together."""
        largest = max(math.prod(d.chunks) * d.dtype.itemsize for d in datasets)
        return max(self.threads + 1, min(4 * self.threads, FLIGHT_BYTES // largest))

    @staticmethod
    def _store(dset: h5py.Dataset, offset: tuple[int, ...], future: Future) -> None:
        payload, filter_mask = future.result()
        dset.id.write_direct_chunk(offset, payload, filter_mask)


class Bands:
    """Regroups slabs of any height into full chunks, in storage order.

    Slabs are cut into bands of one chunk's height, and bands into chunks along the other
    axes. HDF5 stores every chunk at full size, so edge chunks are zero-padded.
    """

    def __init__(self, shape: tuple[int, ...], chunks: tuple[int, ...], dtype) -> None:
        self.shape, self.chunks, self.dtype = tuple(shape), tuple(chunks), np.dtype(dtype)
        self._held: list[np.ndarray] = []
        self._count = 0  # rows held
        self._start = 0  # first row not yet cut into chunks

    def push(self, slab: np.ndarray) -> Iterator[tuple[tuple[int, ...], np.ndarray]]:
        slab = np.asarray(slab, dtype=self.dtype)
        if slab.shape[1:] != self.shape[1:]:
            raise ValueError(f"slab of shape {slab.shape} for a dataset of shape {self.shape}")
        self._held.append(slab)
        self._count += slab.shape[0]
        while self._count >= self.chunks[0]:
            yield from self._cut(self.chunks[0])

    def finish(self) -> Iterator[tuple[tuple[int, ...], np.ndarray]]:
        if self._count:
            yield from self._cut(self._count)
        if self._start != self.shape[0]:
            raise ValueError(f"{self._start} rows written to a dataset of {self.shape[0]}")

    def _cut(self, rows: int) -> Iterator[tuple[tuple[int, ...], np.ndarray]]:
        band = self._take(rows)
        start, self._start = self._start, self._start + rows
        if start + rows > self.shape[0]:
            raise ValueError(f"more than {self.shape[0]} rows written to the dataset")
        grids = [range(0, n, c) for n, c in zip(self.shape[1:], self.chunks[1:], strict=True)]
        for corner in itertools.product(*grids):
            where = tuple(slice(o, o + c) for o, c in zip((0, *corner), self.chunks, strict=True))
            yield (start, *corner), _padded(band[where], self.chunks, self.dtype)

    def _take(self, rows: int) -> np.ndarray:
        """The next ``rows`` held rows: a view if one slab has them, else a copy of them only."""
        parts, need = [], rows
        while need:
            head = self._held[0]
            parts.append(head[:need])
            need -= len(parts[-1])
            rest = head[len(parts[-1]) :]
            self._held = ([rest] if len(rest) else []) + self._held[1:]
        self._count -= rows
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _padded(piece: np.ndarray, chunks: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    if piece.shape == tuple(chunks):
        return np.ascontiguousarray(piece)
    full = np.zeros(chunks, dtype=dtype)
    full[tuple(slice(0, n) for n in piece.shape)] = piece
    return full
