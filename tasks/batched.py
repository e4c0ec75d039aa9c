"""Batched integration: pyFAI's own CSR matrix applied to many frames in one product.

pyFAI integrates one frame at a time: every frame streams the whole sparse matrix (millions
of coefficients) from memory. Applying the matrix to a batch instead reads each coefficient
once per batch. Two paths compute the same sums:

- the fused kernel (:mod:`tasks.kernels`, numba): preprocessing and both products in one
  pass over the frames as read, frames split over threads (the default, 2.5-5x faster);
- scipy: the batch transposed to (pixels x frames) float32, then one sparse x dense product
  per row part in threads (without numba, or when a batch has too many dummies to list).

The preprocessing is pyFAI's ``integrate1d_ng``/``integrate2d_ng`` with the cython CSR
engine, written for a batch:

- signal ``raw - dark``; normalization ``flat x polarization x solid angle x absorption``
  times the frame's monitor; Poisson variance ``max(raw, 1)``, plus ``max(dark, 0)`` where
  pyFAI computes the variance before its engine (2D without full splitting: its cython CSR
  engine does not manage the variance there, and ``integrate2d_ng`` adds the dark; an engine
  that manages it adds none);
- the mask is in the matrix (pyFAI builds it without masked pixels); pixels whose
  normalization is 0 or not finite, or whose dark or flat equals the detector's dummy, get no
  coefficient;
- dummy (and, for float frames, non-finite) pixels of a frame are left out of that frame:
  their signal and variance are zeroed and their normalization taken off its bins;
- intensity ``sum(c x signal) / sum(c x norm)``, sigma ``sqrt(sum(c^2 x var)) / sum(c x norm)``,
  empty bins ``empty``.

Sums are float32 products (pyFAI accumulates in float64): results agree to a few 1e-6.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from . import kernels

log = logging.getLogger(__name__)

PIXEL_BLOCK = 1 << 15  # pixels per transposing task: a (block x frames) float32 tile in cache
BAD_LISTED = 1 << 16  # dummies listed per thread and batch by the kernel; more: scipy path
# the error models a batch computes; the others need each frame's azimuthal average first
ERROR_MODELS = ("none", "poisson", "hybrid")


@dataclass(frozen=True)
class BatchResult:
    intensity: np.ndarray  # (frames, npt) or (frames, n_slices, npt), float32
    sigma: np.ndarray | None


@dataclass(frozen=True)
class Preprocessing:
    """Per-pixel arrays as pyFAI's integration sees them, flattened, float32."""

    dark: np.ndarray | None
    normalization: np.ndarray  # flat x polarization x solid angle x absorption
    dark_variance: np.ndarray | None  # added to each pixel's Poisson variance, or None
    dummy: float | None
    delta_dummy: float | None
    poisson: bool  # propagate Poisson variance (error models poisson and hybrid)
    empty: float


@dataclass(frozen=True)
class BatchInputs:
    """What pyFAI gives a batch integrator, before a frame type's dummy is known: its CSR
    matrix (bins x pixels) and the per-pixel arrays of its preprocessing, flattened float32.
    Plain arrays, so an engine can keep them on disk and rebuild without pyFAI."""

    data: np.ndarray  # the CSR matrix's coefficients, column indices and row pointers
    indices: np.ndarray
    indptr: np.ndarray
    pixels: int
    dark: np.ndarray | None
    flat: np.ndarray | None  # for the dummy test only: it is in ``normalization`` already
    normalization: np.ndarray  # flat x polarization x solid angle x absorption
    dark_variance: np.ndarray | None
    poisson: bool
    empty: float
    out_shape: tuple[int, ...]

    def matrix(self) -> sp.csr_matrix:
        shape = (len(self.indptr) - 1, self.pixels)
        return sp.csr_matrix((self.data, self.indices, self.indptr), shape=shape)


def batcher_for(
    inputs: BatchInputs,
    dummy: float | None,
    delta: float | None,
    threads: int,
    fused: bool | None = None,
) -> BatchIntegrator:
    """The batch integrator of frames whose dummy (pyFAI's, from their dtype) is ``dummy``:
    pyFAI leaves out pixels whose dark or flat equals it."""
    norm = np.array(inputs.normalization, dtype=np.float32)
    if dummy is not None:
        for image in (inputs.dark, inputs.flat):
            if image is not None:
                hit = np.abs(np.asarray(image, np.float32) - np.float32(dummy))
                norm[hit <= np.float32(delta or 0.0)] = 0
    prep = Preprocessing(
        dark=inputs.dark,
        normalization=norm,
        dark_variance=inputs.dark_variance,
        dummy=dummy,
        delta_dummy=delta,
        poisson=inputs.poisson,
        empty=inputs.empty,
    )
    return BatchIntegrator(inputs.matrix(), prep, inputs.out_shape, threads, fused)


class BatchIntegrator:
    """One CSR matrix (bins x pixels), its square, and a thread pool to apply them."""

    def __init__(
        self,
        csr: sp.csr_matrix,
        prep: Preprocessing,
        out_shape: tuple[int, ...],
        threads: int,
        fused: bool | None = None,
    ):
        valid = np.isfinite(prep.normalization) & (prep.normalization != 0)
        csr = _drop_columns(csr.astype(np.float32), ~valid)
        if len(out_shape) == 2:  # pyFAI's 2D rows run radial-major: make them slice-major
            slices, npt = out_shape
            csr = csr[(np.arange(npt)[None, :] * slices + np.arange(slices)[:, None]).ravel()]
        self.prep = prep
        delta = np.float32(prep.delta_dummy or 0)
        dummy = np.float32(prep.dummy or 0)
        self.dummy_range = (dummy - delta, dummy + delta)
        self.out_shape = out_shape
        self.pixels = csr.shape[1]
        self.threads = max(1, threads)
        self.normalization = np.where(valid, prep.normalization, 0).astype(np.float32)
        self.csc = csr.astype(np.float64).tocsc()  # to take a frame's dummies off their bins
        self.coefficients = csr.getnnz(axis=1)  # per bin
        self.live = csr.getnnz(axis=0) > 0  # pixels with a coefficient (not masked)
        self.norm_sum = csr.astype(np.float64) @ self.normalization.astype(np.float64)
        with np.errstate(divide="ignore"):
            inverse = np.where(self.norm_sum != 0, 1.0 / self.norm_sum, 0.0)
        self.inverse_norm = inverse.astype(np.float32)[:, None]
        self.empty_bins = self.norm_sum == 0
        self.bins = csr.shape[0]
        self.rows, self.parts = _row_parts(csr, 2 * self.threads)
        self.fused = kernels.available() if fused is None else fused
        if self.fused:
            self.by_pixel = csr.tocsc()
            self.by_pixel.sort_indices()
            self.data_sq = self.by_pixel.data * self.by_pixel.data if prep.poisson else None
            self.parts_sq = []
        else:
            self.parts_sq = [p.multiply(p).tocsr() for p in self.parts] if prep.poisson else []
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="ringflow-batch")
        self._kept: tuple[np.ndarray, np.ndarray | None] | None = None
        self._sums: tuple[np.ndarray, np.ndarray | None] | None = None

    def integrate(self, frames: np.ndarray, monitor: np.ndarray) -> BatchResult:
        """Integrate ``frames`` (n, *detector shape), each divided by its ``monitor`` value."""
        n = frames.shape[0]
        flat = np.ascontiguousarray(frames.reshape(n, self.pixels))
        fused = self._fused_sums(flat) if self.fused else None
        if fused is None:
            return self._integrate_scipy(flat, monitor)
        signal, variance, bad = fused
        intensity = np.empty((n, self.bins), dtype=np.float32)
        sigma = None if variance is None else np.empty_like(intensity)
        scale, per_frame = self._factors(n, monitor, bad)

        def part(k: int) -> None:
            """Rows of part k: averages written frame-first into the results."""
            rows = self.rows[k]
            factor = (self.inverse_norm[rows], per_frame) if scale is None else (scale[rows],)
            self._finish(signal[rows], rows, factor, intensity, root=False)
            if sigma is not None:
                self._finish(variance[rows], rows, factor, sigma, root=True)

        list(self.pool.map(part, range(len(self.parts))))
        return self._result(n, intensity, sigma)

    def _fused_sums(self, flat: np.ndarray):
        """(bins x n) signal and variance sums and the dummies left out, from the kernel;
        None when a thread found more dummies than it can list (the scipy path redoes it)."""
        n = flat.shape[0]
        signal, variance = self._sum_buffers(n)
        prep, matrix = self.prep, self.by_pixel
        empty = np.empty(0, np.float32)
        dark = empty if prep.dark is None else prep.dark
        dark_var = empty if prep.dark_variance is None else prep.dark_variance
        data_sq = empty if self.data_sq is None else self.data_sq
        var_sums = np.empty((0, 0), np.float32) if variance is None else variance
        dummy_check = prep.dummy is not None
        finite_check = bool(np.issubdtype(flat.dtype, np.floating))
        bounds = np.linspace(0, n, min(self.threads, n) + 1).astype(int)

        def run(f0: int, f1: int) -> tuple[int, np.ndarray, np.ndarray]:
            pixels, frames = np.empty(BAD_LISTED, np.int64), np.empty(BAD_LISTED, np.int64)
            found = kernels.accumulate(
                flat, f0, f1, matrix.indptr, matrix.indices, matrix.data,
                data_sq, dark, dark_var, dummy_check, np.float32(prep.dummy or 0),
                np.float32(prep.delta_dummy or 0), finite_check, signal, var_sums, pixels, frames,
            )  # fmt: skip
            return found, pixels[:found], frames[:found]

        runs = list(self.pool.map(run, bounds[:-1], bounds[1:]))
        if any(found > BAD_LISTED for found, _, _ in runs):
            return None
        bad = [(pixels, frames) for found, pixels, frames in runs if found]
        return signal, variance, bad

    def _sum_buffers(self, n: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Zeroed (bins x n) sums, in memory kept between batches."""
        if self._sums is None or self._sums[0].shape[1] != n:
            self._sums = None
            signal = np.zeros((self.bins, n), dtype=np.float32)
            self._sums = (signal, np.zeros_like(signal) if self.prep.poisson else None)
        else:
            for sums in self._sums:
                if sums is not None:
                    sums.fill(0)
        return self._sums

    def _factors(self, n: int, monitor: np.ndarray, bad: list):
        """1 / (sum(c x norm) x monitor), 0 for an empty bin: per bin and frame when some
        frame has dummies; otherwise per bin (``inverse_norm``) times 1 / monitor per frame."""
        scale = self._scale(n, monitor, bad) if bad else None
        per_frame = (1.0 / np.asarray(monitor, dtype=np.float64)).astype(np.float32)[None, :]
        return scale, per_frame

    def _result(self, n: int, intensity: np.ndarray, sigma: np.ndarray | None) -> BatchResult:
        shape = (n, *self.out_shape)
        return BatchResult(
            intensity.reshape(shape), None if sigma is None else sigma.reshape(shape)
        )

    def _integrate_scipy(self, flat: np.ndarray, monitor: np.ndarray) -> BatchResult:
        n = flat.shape[0]
        if self.prep.poisson and not self.parts_sq:
            self.parts_sq = [p.multiply(p).tocsr() for p in self.parts]
        signal, variance = self._buffers(n)
        blocks = range(0, self.pixels, PIXEL_BLOCK)
        found = self.pool.map(lambda p0: self._prepare(flat, signal, variance, p0), blocks)
        bad = [b for b in found if b is not None]
        scale, per_frame = self._factors(n, monitor, bad)
        intensity = np.empty((n, self.bins), dtype=np.float32)
        sigma = None if variance is None else np.empty_like(intensity)

        def part(k: int) -> None:
            """Rows of part k: product, averages, written frame-first into the results."""
            rows = self.rows[k]
            factor = (self.inverse_norm[rows], per_frame) if scale is None else (scale[rows],)
            self._finish(self.parts[k] @ signal, rows, factor, intensity, root=False)
            if sigma is not None:
                self._finish(self.parts_sq[k] @ variance, rows, factor, sigma, root=True)

        list(self.pool.map(part, range(len(self.parts))))
        return self._result(n, intensity, sigma)

    def _finish(self, sums: np.ndarray, rows: slice, factor: tuple, out: np.ndarray, root: bool):
        if root:
            np.sqrt(sums, out=sums)
        for f in factor:
            sums *= f
        if self.prep.empty != 0:
            empty = self.empty_bins[rows] if len(factor) == 2 else factor[0] == 0
            sums[empty] = self.prep.empty
        out[:, rows] = sums.T

    def _buffers(self, n: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(pixels x n) signal and variance arrays in kept memory: fresh arrays cost a page
        fault per page, as much as filling them. A smaller batch uses the front of the same
        memory, still contiguous."""
        size = self.pixels * n
        if self._kept is None or self._kept[0].size < size:
            self._kept = None  # free the old pair first: memory stays at one batch's worth
            signal = np.empty(size, dtype=np.float32)
            self._kept = (signal, np.empty_like(signal) if self.prep.poisson else None)
        return tuple(
            None if kept is None else kept[:size].reshape(self.pixels, n) for kept in self._kept
        )

    def _scale(self, n: int, monitor: np.ndarray, bad: list) -> np.ndarray:
        """(bins x n) float32 factor turning sums into averages: 1 / (sum(c x norm) x
        monitor), and 0 for a bin with no pixel in that frame."""
        norm = np.repeat(self.norm_sum[:, None], n, axis=1)
        if bad:
            pixels = np.concatenate([b[0] for b in bad])
            frames = np.concatenate([b[1] for b in bad])
            self._take_off(norm, pixels, frames)
        norm *= np.asarray(monitor, dtype=np.float64)[None, :]
        with np.errstate(divide="ignore"):
            scale = np.divide(1.0, norm, out=np.zeros_like(norm), where=norm != 0)
        return scale.astype(np.float32)

    def _prepare(self, flat, signal, variance, p0: int):
        """Fill pixels p0.. of the (pixels x frames) signal and variance; (pixels, frames) of
        dummy values found there, or None."""
        p1 = min(p0 + PIXEL_BLOCK, self.pixels)
        tile = signal[p0:p1]
        tile[...] = flat[:, p0:p1].T
        prep = self.prep
        bad = None
        hit = None
        if prep.dummy is not None:
            low, high = self.dummy_range
            if tile.min() <= high and tile.max() >= low:  # cheap test first: usually none
                hit = np.abs(tile - np.float32(prep.dummy)) <= np.float32(prep.delta_dummy or 0)
        if np.issubdtype(flat.dtype, np.floating):
            finite = ~np.isfinite(tile)
            hit = finite if hit is None else hit | finite
        if variance is not None:
            np.maximum(tile, np.float32(1), out=variance[p0:p1])
            if prep.dark_variance is not None:
                variance[p0:p1] += prep.dark_variance[p0:p1, None]
        if prep.dark is not None:
            dark = prep.dark[p0:p1, None]
            tile -= dark
        if hit is not None and hit.any():
            hit &= self.live[p0:p1, None]  # masked pixels are not in the matrix anyway
        if hit is not None and hit.any():
            pixels, frames = np.nonzero(hit)
            tile[pixels, frames] = 0
            if variance is not None:
                variance[p0 + pixels, frames] = 0
            bad = (p0 + pixels, frames)
        return bad

    def _take_off(self, norm: np.ndarray, pixels: np.ndarray, frames: np.ndarray) -> None:
        """Remove the normalization of (pixel, frame) dummies from their frame's bin sums; a
        bin left with no pixel is empty, exactly as in pyFAI."""
        for frame in np.unique(frames):
            cols = pixels[frames == frame]
            sub = self.csc[:, cols]
            norm[:, frame] -= sub @ self.normalization[cols].astype(np.float64)
            norm[self.coefficients == sub.getnnz(axis=1), frame] = 0

    def close(self) -> None:
        self.pool.shutdown(wait=False)


def _drop_columns(csr: sp.csr_matrix, drop: np.ndarray) -> sp.csr_matrix:
    """The matrix with the coefficients of ``drop`` pixels set to zero."""
    if not drop.any():
        return csr
    csr = csr.copy()
    csr.data[drop[csr.indices]] = 0
    csr.eliminate_zeros()
    return csr


def _row_parts(csr: sp.csr_matrix, parts: int) -> tuple[list[slice], list[sp.csr_matrix]]:
    """Row slices with about the same number of coefficients each, and the matrix's rows."""
    bounds = np.searchsorted(csr.indptr, np.linspace(0, csr.nnz, parts + 1)[1:-1])
    edges = [0, *sorted(set(int(b) for b in bounds)), csr.shape[0]]
    rows = [slice(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]
    return rows, [csr[r] for r in rows]
