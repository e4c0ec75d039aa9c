"""HDF5 filter pipelines computed outside HDF5, so chunks can be compressed on a thread pool.

A :class:`Filters` says what a dataset should carry (codec, level, shuffle, fletcher32); it
turns into h5py ``create_dataset`` options, and :func:`chunk_encoder` turns the filter list
HDF5 actually recorded for a dataset into a function producing, for one chunk, exactly the
bytes that pipeline would have stored. Any HDF5 reader (with hdf5plugin for the non-deflate
codecs) then reads the file as if HDF5 had compressed it itself.

Every codec used here releases the GIL on large buffers (zlib, ISA-L, zstd, blosc, numpy),
except bitshuffle, which is already multi-threaded with OpenMP.
"""

from __future__ import annotations

import importlib
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # configuration parsing checks codecs: h5py is imported where it is used
    import h5py

FILTER_DEFLATE, FILTER_SHUFFLE, FILTER_FLETCHER32 = 1, 2, 3
FILTER_BITSHUFFLE, FILTER_ZSTD, FILTER_BLOSC = 32008, 32015, 32001
FLAG_OPTIONAL = 1  # H5Z_FLAG_OPTIONAL
BITSHUFFLE_LZ4 = 2
BLOSC_CNAMES = {0: "blosclz", 1: "lz4", 2: "lz4hc", 3: "snappy", 4: "zlib", 5: "zstd"}

# codec -> (levels accepted, default level); None: the codec takes no level
LEVELS: dict[str, tuple[range, int] | None] = {
    "none": None,
    "deflate": (range(0, 10), 1),
    "zlib": (range(0, 10), 1),
    "isal": (range(0, 4), 1),
    "bitshuffle_lz4": None,
    "zstd": (range(1, 23), 1),
    "blosc": (range(0, 10), 5),
}
CODEC_ALIASES = {"gzip": "deflate", "bslz4": "bitshuffle_lz4", "bitshuffle": "bitshuffle_lz4"}
ISAL_MAX_LEVEL = 3


@dataclass(frozen=True)
class Filters:
    """The compression of one dataset, as configured in ``[output]``."""

    codec: str = "deflate"
    level: int | None = None  # None: the codec's default
    shuffle: bool = True  # byte shuffle: HDF5's filter, or blosc's own
    checksum: bool = True  # fletcher32

    def __post_init__(self) -> None:
        check_codec(self.codec, self.level)

    @property
    def effective_level(self) -> int:
        spec = LEVELS[self.codec]
        return 0 if spec is None else (spec[1] if self.level is None else self.level)

    def dataset_options(self) -> dict:
        """Keyword arguments of ``h5py.Group.create_dataset`` for this pipeline."""
        import hdf5plugin

        options: dict = {"fletcher32": self.checksum, "shuffle": False}
        level = self.effective_level
        if self.codec in ("deflate", "zlib", "isal"):
            options |= {"compression": "gzip", "compression_opts": level, "shuffle": self.shuffle}
        elif self.codec == "zstd":
            options |= dict(hdf5plugin.Zstd(clevel=level)) | {"shuffle": self.shuffle}
        elif self.codec == "bitshuffle_lz4":
            options |= dict(hdf5plugin.Bitshuffle(nelems=0, cname="lz4"))
        elif self.codec == "blosc":
            shuffle = hdf5plugin.Blosc.SHUFFLE if self.shuffle else hdf5plugin.Blosc.NOSHUFFLE
            options |= dict(hdf5plugin.Blosc(cname="lz4", clevel=level, shuffle=shuffle))
        return options

    def describe(self) -> str:
        parts = [self.codec if self.codec != "deflate" else f"deflate ({deflate_library(self)})"]
        if LEVELS[self.codec] is not None:
            parts.append(f"level {self.effective_level}")
        if self.shuffle and self.codec not in ("none", "bitshuffle_lz4"):
            parts.append("shuffle")
        if self.checksum:
            parts.append("fletcher32")
        return " + ".join(parts)


def check_codec(codec: str, level: int | None) -> None:
    """Raise ValueError naming what is wrong with ``codec``/``level`` on this machine."""
    if codec not in LEVELS:
        raise ValueError(f"unknown codec; allowed: {', '.join(LEVELS)}")
    spec = LEVELS[codec]
    if level is not None and spec is None and level != 0:
        raise ValueError(f"codec {codec} takes no level; leave level empty")
    if level is not None and spec is not None and level not in spec[0]:
        raise ValueError(f"level {level} is out of range for {codec} ({spec[0][0]}-{spec[0][-1]})")
    if codec == "isal" and not has_isal():
        raise ValueError("codec isal needs the isal package: pip install isal")
    if codec == "bitshuffle_lz4" and not has_bitshuffle():
        raise ValueError(
            "codec bitshuffle_lz4 needs the bitshuffle package: pip install bitshuffle"
        )


def has_isal() -> bool:
    return _importable("isal.isal_zlib")


def has_bitshuffle() -> bool:
    return _importable("bitshuffle")


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def deflate_library(filters: Filters) -> str:
    """ISA-L for 'isal', and for 'deflate' at levels it has (0-3) when installed; else zlib."""
    if filters.codec == "isal":
        return "isal"
    if filters.codec == "deflate" and filters.effective_level <= ISAL_MAX_LEVEL and has_isal():
        return "isal"
    return "zlib"


# --- one chunk through a recorded pipeline -----------------------------------------------------

Step = Callable[[np.ndarray | bytes], bytes | np.ndarray]


class Incompressible(Exception):
    """An optional filter declines a chunk: HDF5 then stores it without that filter."""


def recorded_filters(dset: h5py.Dataset) -> list[tuple[int, int, tuple[int, ...]]]:
    """(filter id, flags, client values) of ``dset``, in the order HDF5 applies them."""
    plist = dset.id.get_create_plist()
    return [plist.get_filter(i)[:3] for i in range(plist.get_nfilters())]


def pipeline(dset: h5py.Dataset) -> list[tuple[int, tuple[int, ...]]]:
    """(filter id, client values) of ``dset``, in the order HDF5 applies them on write."""
    return [(fid, values) for fid, _, values in recorded_filters(dset)]


def chunk_encoder(
    dset: h5py.Dataset, deflate: str = "zlib"
) -> Callable[[np.ndarray], tuple[bytes, int]]:
    """A function mapping one full chunk (C-contiguous, dataset dtype) to its stored bytes
    and filter mask: bit k set when optional filter k declined the chunk, as HDF5 does."""
    steps = [
        (_step(fid, values, dset.dtype, deflate), bool(flags & FLAG_OPTIONAL))
        for fid, flags, values in recorded_filters(dset)
    ]

    def encode(chunk: np.ndarray) -> tuple[bytes, int]:
        data: np.ndarray | bytes = chunk
        mask = 0
        for index, (step, optional) in enumerate(steps):
            try:
                data = step(data)
            except Incompressible:
                if not optional:
                    raise
                mask |= 1 << index
        return (data if isinstance(data, bytes) else bytes(_as_bytes(data))), mask

    return encode


def _step(fid: int, values: tuple[int, ...], dtype: np.dtype, deflate: str) -> Step:
    if fid == FILTER_SHUFFLE:
        return partial(byte_shuffle, itemsize=values[0])
    if fid == FILTER_DEFLATE:
        return partial(_deflate, level=values[0], library=deflate)
    if fid == FILTER_FLETCHER32:
        return _append_fletcher32
    if fid == FILTER_ZSTD:
        return partial(_zstd, level=values[0] if values else 3)
    if fid == FILTER_BITSHUFFLE:
        if values[4] != BITSHUFFLE_LZ4:
            raise ValueError(f"bitshuffle compression {values[4]} is not supported (LZ4 only)")
        return partial(_bitshuffle_lz4, block_size=values[3], dtype=dtype)
    if fid == FILTER_BLOSC:
        return partial(
            _blosc, clevel=values[4], shuffle=values[5], cname=BLOSC_CNAMES[values[6]], dtype=dtype
        )
    raise ValueError(f"HDF5 filter {fid} cannot be applied outside HDF5 by ringflow")


def _as_bytes(data) -> memoryview:
    return memoryview(data).cast("B") if isinstance(data, np.ndarray) else memoryview(data)


def byte_shuffle(data, itemsize: int) -> bytes:
    """HDF5's shuffle: byte k of every element, for k = 0..itemsize-1 (a byte transpose)."""
    raw = np.frombuffer(_as_bytes(data), dtype=np.uint8)
    if itemsize <= 1:
        return raw.tobytes()
    whole = raw.size - raw.size % itemsize  # HDF5 copies a trailing remainder as is
    shuffled = raw[:whole].reshape(-1, itemsize).T.tobytes()
    return shuffled + raw[whole:].tobytes()


def _deflate(data, level: int, library: str) -> bytes:
    if library == "isal" and level <= ISAL_MAX_LEVEL:
        from isal import isal_zlib

        return isal_zlib.compress(_as_bytes(data), level)
    return zlib.compress(_as_bytes(data), level)


def _zstd(data, level: int) -> bytes:
    import numcodecs

    return bytes(numcodecs.Zstd(level=level).encode(np.frombuffer(_as_bytes(data), np.uint8)))


def _bitshuffle_lz4(data, block_size: int, dtype: np.dtype) -> bytes:
    """The bitshuffle filter's chunk: 8-byte size and 4-byte block bytes (big-endian), blocks."""
    import bitshuffle

    array = np.frombuffer(_as_bytes(data), dtype=np.dtype(f"V{dtype.itemsize}"))
    if array.dtype.itemsize in (1, 2, 4, 8):
        array = array.view(f"u{dtype.itemsize}")
    block = block_size or default_bitshuffle_block(dtype.itemsize)
    header = struct.pack(">QI", array.nbytes, block * dtype.itemsize)
    return header + bitshuffle.compress_lz4(array, block).tobytes()


def default_bitshuffle_block(itemsize: int) -> int:
    """bitshuffle's own default: 8 kB blocks, a multiple of 8 elements, at least 128."""
    return max(128, (8192 // itemsize) // 8 * 8)


def _blosc(data, clevel: int, shuffle: int, cname: str, dtype: np.dtype) -> bytes:
    import numcodecs

    raw = np.frombuffer(_as_bytes(data), dtype=np.uint8)
    typed = raw.view(dtype) if dtype.itemsize and raw.size % dtype.itemsize == 0 else raw
    codec = numcodecs.Blosc(cname=cname, clevel=clevel, shuffle=shuffle, blocksize=0)
    encoded = bytes(codec.encode(typed))
    if len(encoded) > raw.size:  # the HDF5 filter's output buffer is the input's size
        raise Incompressible
    return encoded


def _append_fletcher32(data) -> bytes:
    raw = _as_bytes(data)
    return b"".join((raw, struct.pack("<I", fletcher32(raw))))  # one copy


# --- fletcher32, vectorised --------------------------------------------------------------------

_ROW = 4096  # words per row of the summation grid
_COLUMN_WEIGHTS = np.arange(_ROW, dtype=np.uint64)


def fletcher32(data: bytes | memoryview | np.ndarray) -> int:
    """HDF5's H5_checksum_fletcher32 of ``data``, with numpy sums instead of a byte loop.

    Words are big-endian 16-bit (an odd last byte is the high byte of a zero-padded word).
    sum1 = sum(w_i) and sum2 = sum((n - i) * w_i) reduced mod 65535, where HDF5's folding
    maps a non-zero multiple of 65535 to 65535 and an all-zero input to 0.
    """
    raw = np.frombuffer(_as_bytes(data), dtype=np.uint8)
    n = (raw.size + 1) // 2
    rows = raw.size // (2 * _ROW)
    s1 = s2 = 0
    if rows:
        grid = raw[: rows * 2 * _ROW].view(">u2").reshape(rows, _ROW)
        s1, s2 = _grid_sums(grid, n, 0)
    tail = raw[rows * 2 * _ROW :]
    if tail.size:
        words = np.zeros((tail.size + 1) // 2, dtype=">u2")
        words.view(np.uint8)[: tail.size] = tail
        t1, t2 = _grid_sums(words.reshape(1, -1), n, rows * _ROW)
        s1, s2 = s1 + t1, s2 + t2
    if not raw.any():
        return 0
    return (((s2 - 1) % 65535 + 1) << 16) | ((s1 - 1) % 65535 + 1)


def _grid_sums(grid: np.ndarray, n: int, first: int) -> tuple[int, int]:
    """(sum w, sum (n - i) w) mod 65535 over a grid of words whose first has index ``first``.

    For word (r, c), i = first + r * width + c, so the weighted sum splits into row sums times
    (n - first - r * width) minus column sums times c: two plain reductions over the data.
    """
    width = grid.shape[1]
    row_sums = grid.sum(axis=1, dtype=np.uint64) % 65535
    col_sums = grid.sum(axis=0, dtype=np.uint64) % 65535
    row_weights = (n - first - np.arange(grid.shape[0], dtype=np.uint64) * width) % 65535
    weighted = int((row_weights * row_sums).sum()) - int((_COLUMN_WEIGHTS[:width] * col_sums).sum())
    return int(row_sums.sum()) % 65535, weighted % 65535
