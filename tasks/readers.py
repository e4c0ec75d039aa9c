"""Reading Lima frames in bounded batches; every error names the file and dataset.

:class:`BatchReader` is the engine's read path: it reads the next batch while the caller
integrates the current one. Bitshuffle-LZ4 chunks of whole frames (Lima's layout) are read
raw with ``read_direct_chunk`` and decompressed in a thread pool, straight into the batch
buffer, by the bitshuffle library's own C decoder called through ctypes, which releases the
GIL (its cython wrapper holds it; h5py's filter pipeline runs under h5py's global lock, one
chunk at a time).
Any other layout or filter is read by h5py in the read-ahead thread. Batches live in a ring of
three buffers, reused: memory does not grow with file length. The buffers outlive the file:
the next file of the same shape reads into them (see :class:`BufferPool`).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import queue
import struct
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import h5py
import hdf5plugin  # noqa: F401  (bitshuffle/LZ4 and other HDF5 filters)
import numpy as np

from .discovery import check_frame_dtype
from .errors import InputDataError, TransientInputError

BATCH_BYTES = 256 * 2**20  # raw frame bytes held per batch: bounds an engine's memory
BITSHUFFLE = 32008  # HDF5 filter id; its 5th parameter is 2 for LZ4
RING = 3  # batch buffers: one integrated, one filled, one ready
WAIT_S = 600.0  # longest wait for one batch: a read that hangs this long is an error
# errnos of a file that is not there yet, still locked by its writer, or on a flaky mount
TRANSIENT_ERRNOS = {
    errno.ENOENT, errno.EAGAIN, errno.EBUSY, errno.EINTR, errno.EIO, errno.ESTALE,
    errno.ETIMEDOUT,
}  # fmt: skip


@contextmanager
def open_frames(
    path: str, dataset: str, frame_shape: tuple[int, ...] | None = None
) -> Iterator[h5py.Dataset]:
    """The frames dataset of a Lima file, checked to be a 3D stack of ``frame_shape`` frames."""
    try:
        h5 = h5py.File(path, "r")
    except OSError as exc:
        raise input_error(path, f"cannot open as HDF5: {_reason(exc)}", exc) from None
    with h5:
        try:
            dset = h5.get(dataset)
        except (KeyError, RuntimeError) as exc:  # e.g. a soft-link cycle: "too many links"
            raise InputDataError(path, f"{dataset}: {_reason(exc)}") from None
        if not isinstance(dset, h5py.Dataset):
            raise InputDataError(path, f"dataset {dataset} not found")
        if dset.ndim != 3:
            raise InputDataError(path, f"{dataset} has shape {dset.shape}, expected 3D frames")
        check_frame_dtype(dset.dtype, path, dataset)
        if frame_shape is not None and tuple(dset.shape[1:]) != tuple(frame_shape):
            raise InputDataError(
                path, f"frames are {tuple(dset.shape[1:])}, the detector is {tuple(frame_shape)}"
            )
        yield dset


def batch_size(frame_shape: tuple[int, ...], itemsize: int, budget: int = BATCH_BYTES) -> int:
    return max(1, budget // max(1, int(np.prod(frame_shape)) * itemsize))


def iter_batches(
    dset: h5py.Dataset, start: int, count: int, size: int | None = None
) -> Iterator[tuple[int, np.ndarray]]:
    """(first frame index, frames) for frames start..start+count of ``dset``, in order."""
    _check_range(dset, start, count)
    stop = start + count
    size = size or batch_size(dset.shape[1:], dset.dtype.itemsize)
    for first in range(start, stop, size):
        last = min(first + size, stop)
        try:
            yield first, dset[first:last]
        except OSError as exc:
            raise input_error(
                dset.file.filename,
                f"frames {first}-{last - 1} of {dset.name} unreadable: {_reason(exc)}",
                exc,
            ) from None


class BufferPool:
    """Batch buffers kept from one file to the next in a worker process.

    A fresh buffer (hundreds of MiB) is new memory the kernel zeroes page by page as the first
    batch lands in it: measured 0.1-0.8 s of system time per 200-frame Pilatus-1M file, paid
    again by every file. Only buffers of the last frame shape and type asked for are kept, so
    memory stays what one file needs.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: tuple = ()
        self._free: list[np.ndarray] = []

    def take(self, frames: int, frame_shape: tuple[int, ...], dtype) -> np.ndarray:
        """A buffer of at least ``frames`` frames: slice it to the batch."""
        key = (tuple(frame_shape), np.dtype(dtype).str)
        with self._lock:
            if key != self._key:
                self._key, self._free = key, []
            for k, buffer in enumerate(self._free):
                if buffer.shape[0] >= frames:
                    return self._free.pop(k)
        return np.empty((frames, *frame_shape), dtype=dtype)

    def give(self, buffer: np.ndarray) -> None:
        with self._lock:
            if (buffer.shape[1:], buffer.dtype.str) == self._key:
                self._free.append(buffer)
                self._free.sort(key=len)  # the smallest that fits is taken first
                del self._free[:-RING]

    def clear(self) -> None:
        with self._lock:
            self._free = []


BUFFERS = BufferPool()


class BatchReader:
    """Frames ``start .. start + count`` of ``dset`` as (first index, frames) batches, in order.

    A batch stays valid until the next one is asked for (its buffer is then reused).
    """

    def __init__(
        self,
        dset: h5py.Dataset,
        start: int,
        count: int,
        batch: int,
        threads: int = 1,
        ahead: bool = True,
    ):
        _check_range(dset, start, count)
        self.dset, self.start, self.stop = dset, start, start + count
        self.batch = max(1, min(batch, count))
        self.threads = max(1, threads)
        self.direct = whole_frame_chunks(dset) and bitshuffle_lz4(dset)
        self.path = dset.file.filename
        self.ahead = ahead

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        if not self.ahead:
            yield from self._in_turn()
            return
        free: queue.Queue = queue.Queue()
        ready: queue.Queue = queue.Queue()
        stop = threading.Event()
        frame = self.dset.shape[1:]
        buffers = [
            BUFFERS.take(self.batch, frame, self.dset.dtype)
            for _ in range(min(RING, -(-(self.stop - self.start) // self.batch)))
        ]
        for buffer in buffers:
            free.put(buffer)
        pool = ThreadPoolExecutor(self.threads, "ringflow-read", initializer=_one_omp_thread)
        reader = threading.Thread(
            target=self._read_ahead, args=(free, ready, stop, pool), daemon=True
        )
        reader.start()
        try:
            for _ in range(self.start, self.stop, self.batch):
                first, frames, buffer, error = _get(ready, reader, self.path)
                if error is not None:
                    raise error
                yield first, frames
                free.put(buffer)
        finally:
            stop.set()
            free.put(None)  # wakes a reader waiting for a buffer
            reader.join(WAIT_S)
            pool.shutdown(wait=True)
            if not reader.is_alive():  # a stuck reader may still write into its buffer
                for buffer in buffers:
                    BUFFERS.give(buffer)

    def _in_turn(self) -> Iterator[tuple[int, np.ndarray]]:
        """Each batch read when asked for, in the caller's thread, into one kept buffer."""
        buffer = BUFFERS.take(self.batch, self.dset.shape[1:], self.dset.dtype)
        try:
            for first in range(self.start, self.stop, self.batch):
                last = min(first + self.batch, self.stop)
                frames = buffer[: last - first]
                self._fill(first, last, frames, None)
                yield first, frames
        finally:
            BUFFERS.give(buffer)

    def _fill(self, first: int, last: int, frames: np.ndarray, pool) -> None:
        try:
            if self.direct:
                self._decompress(first, frames, pool)
            else:
                self.dset.read_direct(frames, np.s_[first:last])
        except OSError as exc:
            reason = f"frames {first}-{last - 1} of {self.dset.name} unreadable"
            raise input_error(self.path, f"{reason}: {_reason(exc)}", exc) from None

    def _read_ahead(self, free, ready, stop, pool) -> None:
        try:
            for first in range(self.start, self.stop, self.batch):
                buffer = free.get(timeout=WAIT_S)
                if buffer is None or stop.is_set():
                    return
                last = min(first + self.batch, self.stop)
                frames = buffer[: last - first]
                self._fill(first, last, frames, pool)
                ready.put((first, frames, buffer, None))
        except BaseException as exc:  # handed to the consumer, which raises it
            ready.put((0, None, None, exc))

    def _decompress(self, first: int, frames: np.ndarray, pool: ThreadPoolExecutor) -> None:
        """Chunks of ``frames`` read raw here, decompressed into ``frames`` by the pool."""
        per_chunk = self.dset.chunks[0]
        index = first
        jobs = []
        while index < first + len(frames):
            chunk = index - index % per_chunk
            mask, raw = self.dset.id.read_direct_chunk((chunk, *([0] * (self.dset.ndim - 1))))
            take = slice(index - chunk, min(chunk + per_chunk, first + len(frames)) - chunk)
            out = frames[index - first : index - first + take.stop - take.start]
            if pool is None:
                self._unpack(raw, mask, out, take, chunk)
            else:
                jobs.append(pool.submit(self._unpack, raw, mask, out, take, chunk))
            index = chunk + take.stop
        for job in jobs:
            job.result()

    def _unpack(self, raw: bytes, mask: int, out: np.ndarray, take: slice, chunk: int) -> None:
        dset = self.dset
        shape = (min(dset.chunks[0], dset.shape[0] - chunk), *dset.shape[1:])
        full = (dset.chunks[0], *dset.shape[1:])
        whole = out.shape == full and out.flags.c_contiguous  # the chunk is exactly ``out``
        try:
            if mask & 1:  # HDF5 stored this chunk unfiltered
                data = np.frombuffer(raw, dtype=dset.dtype).reshape(full)
            elif whole:
                bitshuffle_lz4_decode(raw, out)
                return
            else:
                data = bitshuffle_lz4_decode(raw, np.empty(full, dtype=dset.dtype))
        except (ValueError, struct.error) as exc:
            raise InputDataError(
                self.path, f"chunk at frame {chunk} of {dset.name} is corrupt: {_reason(exc)}"
            ) from None
        out[...] = data[: shape[0]][take]


def whole_frame_chunks(dset: h5py.Dataset) -> bool:
    return dset.chunks is not None and tuple(dset.chunks[1:]) == tuple(dset.shape[1:])


def bitshuffle_lz4(dset: h5py.Dataset) -> bool:
    """Bitshuffle with LZ4 is the dataset's only filter, and the bitshuffle library is here."""
    filters = dset.id.get_create_plist()
    if filters.get_nfilters() != 1:
        return False
    code, _flags, values, _name = filters.get_filter(0)
    if code != BITSHUFFLE or len(values) < 5 or values[4] != 2:
        return False
    try:
        import bitshuffle  # noqa: F401
    except ImportError:
        return False
    return True


def bitshuffle_lz4_decode(raw: bytes, out: np.ndarray) -> np.ndarray:
    """Decode a chunk as the HDF5 bitshuffle filter stores it (8-byte size and 4-byte block
    size in bytes, big-endian, then the LZ4 blocks) into ``out``, C-contiguous, its size."""
    size, block = struct.unpack(">QI", raw[:12])
    itemsize = out.dtype.itemsize
    if size != out.nbytes:
        raise ValueError(f"chunk says {size} bytes, the dataset {out.nbytes}")
    if block == 0 or block % itemsize:
        raise ValueError(f"block of {block} bytes for {itemsize}-byte values")
    payload = np.frombuffer(raw, dtype=np.uint8, offset=12)
    per_block = block // itemsize
    decode = _bshuf_decompress_lz4()
    if decode is None:  # no C symbol: the cython wrapper (same decoder, holds the GIL)
        import bitshuffle

        out[...] = bitshuffle.decompress_lz4(payload, out.shape, out.dtype, per_block)
        return out
    tail = (out.size % per_block) % 8 * itemsize  # the last values, stored as they are
    if _block_walker()(payload, lz4_blocks(out.size, per_block)) + tail != payload.size:
        raise ValueError("an LZ4 block length runs past the chunk, or short of it")
    used = decode(payload.ctypes.data, out.ctypes.data, out.size, itemsize, per_block)
    if used != payload.size:
        raise ValueError(f"LZ4 stream of {payload.size} bytes, decoding used {used}")
    return out


def lz4_blocks(values: int, block: int) -> int:
    """LZ4 blocks of a chunk of ``values`` in blocks of ``block`` values: the last one holds
    the rest rounded down to a multiple of 8 (bitshuffle's unit), if any."""
    return values // block + (values % block >= 8)


def _walk_blocks(payload, blocks):
    """Offset just past ``blocks`` LZ4 blocks (each a 4-byte big-endian length, then that
    many bytes), or -1 where a length runs past the payload. The C decoder trusts these
    lengths: a corrupt chunk must fail here, not make it read past the buffer."""
    end = payload.shape[0]
    offset = 0
    for _ in range(blocks):
        if offset + 4 > end:
            return -1
        length = 0
        for k in range(4):
            length = length * 256 + np.int64(payload[offset + k])
        offset += 4 + length
        if offset > end:
            return -1
    return offset


@functools.cache
def _block_walker():
    """:func:`_walk_blocks` compiled (500 blocks per Pilatus-1M frame; microseconds)."""
    import numba

    return numba.njit(nogil=True, cache=True)(_walk_blocks)


@functools.cache
def _bshuf_decompress_lz4():
    """bitshuffle's ``bshuf_decompress_lz4`` from its extension module, through ctypes: a
    foreign call releases the GIL, so decoding threads run beside the integration."""
    try:
        import bitshuffle.ext

        function = ctypes.CDLL(bitshuffle.ext.__file__).bshuf_decompress_lz4
    except (ImportError, OSError, AttributeError):
        return None
    function.restype = ctypes.c_int64  # bytes consumed, negative on error
    function.argtypes = [ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_size_t] * 3
    return function


def _one_omp_thread() -> None:
    """The bitshuffle library parallelises with OpenMP; our pool already has a thread per core."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="openmp")


def _get(ready: queue.Queue, reader: threading.Thread, path: str):
    """The next batch; an error if the read-ahead thread died or made no progress for WAIT_S."""
    try:
        return ready.get(timeout=WAIT_S)
    except queue.Empty:
        alive = "is stuck" if reader.is_alive() else "died"
        raise TransientInputError(path, f"reading {alive}: no batch in {WAIT_S:.0f} s") from None


def _check_range(dset: h5py.Dataset, start: int, count: int) -> None:
    if start + count > dset.shape[0]:
        raise InputDataError(
            dset.file.filename,
            f"{dset.name} has {dset.shape[0]} frames, the scan expects at least {start + count}",
        )


def input_error(path: str, reason: str, exc: OSError) -> InputDataError:
    """Transient when the OS says so (errno); HDF5 format errors carry none: corrupt data."""
    transient = exc.errno in TRANSIENT_ERRNOS
    return (TransientInputError if transient else InputDataError)(path, reason)


def read_image(path: str, what: str) -> np.ndarray:
    """A mask, dark or flat image through fabio (EDF, TIFF, NPY, HDF5...)."""
    import fabio

    try:
        return np.asarray(fabio.open(path).data)
    except FileNotFoundError:
        raise InputDataError(path, f"{what} file not found") from None
    except Exception as exc:  # fabio raises many types for unreadable files
        raise InputDataError(path, f"{what} file unreadable: {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
