"""Reading Lima frames in bounded batches; every error names the file and dataset."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager

import h5py
import hdf5plugin  # noqa: F401  (bitshuffle/LZ4 and other HDF5 filters)
import numpy as np

from .errors import InputDataError, TransientInputError

BATCH_BYTES = 256 * 2**20  # raw frame bytes held per batch: bounds an engine's memory
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
        dset = h5.get(dataset)
        if not isinstance(dset, h5py.Dataset):
            raise InputDataError(path, f"dataset {dataset} not found")
        if dset.ndim != 3:
            raise InputDataError(path, f"{dataset} has shape {dset.shape}, expected 3D frames")
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
    stop = start + count
    if stop > dset.shape[0]:
        raise InputDataError(
            dset.file.filename,
            f"{dset.name} has {dset.shape[0]} frames, the scan expects at least {stop}",
        )
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
