"""The batched engine's inner loop, compiled by numba: preprocessing fused with the product.

Applying pyFAI's matrix with scipy needs the batch transposed to (pixels x frames) float32,
a signal and a variance copy of it (512 MiB for 64 Pilatus-1M frames), then one pass over
them per product. Here each pixel's values are read from the frames once, converted and
checked in a small tile that stays in cache, and scattered into the bins through the matrix
stored by pixel (CSC): the frames are read once, nothing pixel-sized is written. The loop
runs without the GIL, so a batch's frames split over threads, each filling its own columns.
Sums are float32 in pixel order, the order of scipy's CSR product: the same numbers.
"""

from __future__ import annotations

import numpy as np

try:
    import numba
except ImportError:  # the scipy path of tasks.batched still integrates, slower
    numba = None

TILE = 256  # pixels converted at a time: TILE x frames float32 stays in the L1/L2 cache


def available() -> bool:
    return numba is not None


def _suspect(values, dummy_check, dummy, delta, finite_check) -> bool:
    """Whether any of a pixel's values is a dummy or not finite: a count without branches,
    which vectorises; the values are then looked at one by one only for such a pixel."""
    hits = 0
    if dummy_check:
        for x in values:
            hits += abs(x - dummy) <= delta
    if finite_check:
        for x in values:
            hits += (x - x) != 0  # NaN for NaN and infinities
    return hits > 0


def _accumulate(
    frames: np.ndarray,  # (n, pixels) as read: any integer or float type
    f0: int,
    f1: int,  # this call fills frames f0..f1-1
    indptr: np.ndarray,  # CSC of the (bins x pixels) matrix
    indices: np.ndarray,
    data: np.ndarray,  # float32 coefficients c
    data_sq: np.ndarray,  # float32 c^2; empty without variance
    dark: np.ndarray,  # float32 per pixel; empty without dark
    dark_var: np.ndarray,  # float32 per pixel added to the variance; empty without
    dummy_check: bool,
    dummy: np.float32,
    delta: np.float32,  # |value - dummy| <= delta: the dummy, as pyFAI tests it
    finite_check: bool,  # float frames: NaN and infinities are left out too
    signal: np.ndarray,  # (bins, n) float32 sums of c x (raw - dark), zeroed by the caller
    variance: np.ndarray,  # (bins, n) float32 sums of c^2 x (max(raw, 1) + dark_var); (0, 0)
    bad_pixel: np.ndarray,  # left-out (pixel, frame) pairs, as many as fit
    bad_frame: np.ndarray,
) -> int:
    """Returns how many values were left out (more than ``bad_pixel`` holds: redo the batch)."""
    m = f1 - f0
    pixels = frames.shape[1]
    with_var = variance.shape[0] > 0
    with_dark = dark.shape[0] > 0
    with_dark_var = dark_var.shape[0] > 0
    checks = dummy_check or finite_check
    tile = np.empty((TILE, m), np.float32)  # raw values, pixel-major
    sig = np.empty(m, np.float32)  # one pixel's raw - dark, 0 where left out
    var = np.empty(m, np.float32)  # one pixel's max(raw, 1) + dark_var, 0 where left out
    one = np.float32(1)
    found = 0
    for q0 in range(0, pixels, TILE):
        q1 = min(q0 + TILE, pixels)
        for b in range(m):
            row = frames[f0 + b]
            for j in range(q0, q1):
                tile[j - q0, b] = row[j]
        for j in range(q0, q1):
            k0, k1 = indptr[j], indptr[j + 1]
            if k0 == k1:  # masked: not in the matrix, never checked
                continue
            values = tile[j - q0]
            d = dark[j] if with_dark else np.float32(0)
            for b in range(m):
                sig[b] = values[b] - d
            if with_var:
                dv = dark_var[j] if with_dark_var else np.float32(0)
                for b in range(m):
                    var[b] = max(values[b], one) + dv
            if checks and _suspect(values, dummy_check, dummy, delta, finite_check):
                for b in range(m):
                    x = values[b]
                    if (dummy_check and abs(x - dummy) <= delta) or (
                        finite_check and not np.isfinite(x)
                    ):
                        sig[b] = 0
                        var[b] = 0
                        if found < bad_pixel.shape[0]:
                            bad_pixel[found] = j
                            bad_frame[found] = f0 + b
                        found += 1
            for k in range(k0, k1):
                i = indices[k]
                c = data[k]
                s = signal[i, f0:f1]
                for b in range(m):
                    s[b] += c * sig[b]
                if with_var:
                    c2 = data_sq[k]
                    v = variance[i, f0:f1]
                    for b in range(m):
                        v[b] += c2 * var[b]
    return found


if numba is None:
    accumulate = None
else:
    _suspect = numba.njit(nogil=True, cache=True, inline="always")(_suspect)
    accumulate = numba.njit(nogil=True, cache=True, boundscheck=False)(_accumulate)
