"""The compression-pool writer: chunks compressed on threads, written in order from one thread.

HDF5 compresses through its filter pipeline on the calling thread, one chunk after another,
and h5py holds one global lock around every call, so a compressed write uses one core. Here
the chunks of a dataset are encoded (shuffle, codec, fletcher32: see :mod:`tasks.codecs`) by
a thread pool while the calling thread keeps producing data and storing finished chunks with
``write_direct_chunk``. At most ``in_flight`` chunks are queued, so memory is bounded by the
chunk size, not by the dataset size.
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

    Use as a context manager; every h5py call stays on the thread that calls :meth:`write`.
    """

    def __init__(self, threads: int = 0, in_flight: int = 0):
        self.threads = threads or task_cores()
        self.in_flight = in_flight or 4 * self.threads
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="ringflow-compress")

    def __enter__(self) -> ChunkWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def save(
        self, group: h5py.Group, name: str, data: np.ndarray, storage: Storage
    ) -> h5py.Dataset:
        """``data`` as dataset ``name``: compressed if larger than a few kB, else plain."""
        data = np.asarray(data)
        if data.ndim == 0 or data.nbytes <= SMALL_BYTES or data.dtype.kind not in "biufS":
            return group.create_dataset(name, data=data)
        dset = self.create(group, name, data.shape, data.dtype, storage)
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

    def write(self, dset: h5py.Dataset, blocks: Iterable[np.ndarray], filters: Filters) -> None:
        """Fill ``dset`` from ``blocks``: consecutive slabs along the first axis, in order.

        The slabs may have any number of rows; they must add up to the dataset's length.
        """
        encode = chunk_encoder(dset, deflate_library(filters))
        pending: deque[tuple[tuple[int, ...], Future]] = deque()
        for offset, chunk in iter_chunks(dset.shape, dset.chunks, dset.dtype, blocks):
            pending.append((offset, self._pool.submit(encode, chunk)))
            while len(pending) >= self.in_flight:
                self._store(dset, *pending.popleft())
        while pending:
            self._store(dset, *pending.popleft())

    @staticmethod
    def _store(dset: h5py.Dataset, offset: tuple[int, ...], future: Future) -> None:
        dset.id.write_direct_chunk(offset, future.result())


def iter_chunks(
    shape: tuple[int, ...], chunks: tuple[int, ...], dtype, blocks: Iterable[np.ndarray]
) -> Iterator[tuple[tuple[int, ...], np.ndarray]]:
    """(chunk offset, full-size chunk) in storage order; edge chunks are zero-padded.

    HDF5 stores every chunk at full size, even where it overhangs the dataset's end.
    """
    dtype = np.dtype(dtype)
    grids = [range(0, n, c) for n, c in zip(shape[1:], chunks[1:], strict=True)]
    for start, band in iter_bands(shape, chunks[0], dtype, blocks):
        for corner in itertools.product(*grids):
            offset = (start, *corner)
            piece = band[tuple(slice(o, o + c) for o, c in zip((0, *corner), chunks, strict=True))]
            yield offset, _padded(piece, chunks, dtype)


def iter_bands(
    shape: tuple[int, ...], rows: int, dtype: np.dtype, blocks: Iterable[np.ndarray]
) -> Iterator[tuple[int, np.ndarray]]:
    """Regroup slabs of any height into bands of ``rows`` rows (the last may be shorter)."""
    held: list[np.ndarray] = []
    count = start = 0
    for block in blocks:
        block = np.asarray(block, dtype=dtype)
        if tuple(block.shape[1:]) != tuple(shape[1:]):
            raise ValueError(f"block of shape {block.shape} for a dataset of shape {shape}")
        held.append(block)
        count += block.shape[0]
        while count >= rows:
            band, held, count = _take(held, rows, count)
            yield start, band
            start += rows
    if count:
        band, held, count = _take(held, count, count)
        yield start, band
        start += band.shape[0]
    if start != shape[0]:
        raise ValueError(f"{start} rows written to a dataset of {shape[0]}")


def _take(held: list[np.ndarray], rows: int, count: int):
    """The first ``rows`` rows of the held slabs, and what is left."""
    stacked = held[0] if len(held) == 1 else np.concatenate(held)
    return stacked[:rows], ([stacked[rows:]] if count > rows else []), count - rows


def _padded(piece: np.ndarray, chunks: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    if piece.shape == tuple(chunks):
        return np.ascontiguousarray(piece)
    full = np.zeros(chunks, dtype=dtype)
    full[tuple(slice(0, n) for n in piece.shape)] = piece
    return full
