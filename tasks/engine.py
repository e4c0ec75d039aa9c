"""The integration engine: one pyFAI integrator per worker process and configuration.

Built lazily in the worker's child process (never before fork: pyFAI's OpenMP and OpenCL
state are not fork-safe) and reused for every later file with the same configuration.
Each frame goes through pyFAI's own ``integrate1d_ng``/``integrate2d_ng`` with every
configured correction, so results equal pyFAI's by construction.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
import threading
import time
from dataclasses import dataclass

import numpy as np

from . import kernels
from .batched import ERROR_MODELS, BatchInputs, BatchIntegrator, BatchResult, batcher_for
from .config import COMMON_UNITS, Config, ConfigError, IntegrationConfig
from .engine_cache import CachedEngine, worker_cache
from .errors import InputDataError
from .readers import RING, read_image

log = logging.getLogger(__name__)
FULL_CIRCLE = (-180.0, 180.0)
MAX_BATCH = 128  # frames: beyond this a batch only costs memory


@dataclass(frozen=True)
class Corrections:
    mask: np.ndarray | None
    dark: np.ndarray | None
    flat: np.ndarray | None


@dataclass(frozen=True)
class FrameResult:
    intensity: np.ndarray  # (npt,) or (n_slices, npt)
    sigma: np.ndarray | None


def load_geometry(ai_config: IntegrationConfig):
    """The pyFAI integrator of the PONI file, with the configured detector if any."""
    import pyFAI
    import pyFAI.detectors

    check_unit(ai_config.unit)
    poni = ai_config.poni_file
    if not os.path.isfile(poni):
        raise InputDataError(poni, "PONI file not found")
    try:
        ai = pyFAI.load(poni)
    except Exception as exc:  # pyFAI raises assorted types on a broken PONI
        raise InputDataError(poni, f"not a valid PONI file: {exc}") from None
    if ai_config.detector:
        try:
            ai.detector = pyFAI.detectors.detector_factory(ai_config.detector)
        except Exception as exc:
            raise ConfigError(
                "azimuthal integration", "detector", ai_config.detector, f"unknown detector: {exc}"
            ) from None
    if ai.detector.shape is None:
        raise InputDataError(poni, "the PONI file's detector has no shape; set [..] detector")
    check_geometry(ai, poni)
    return ai


GEOMETRY_KEYS = {  # PONI file name of each pyFAI attribute, for messages
    "dist": "Distance",
    "poni1": "Poni1",
    "poni2": "Poni2",
    "rot1": "Rot1",
    "rot2": "Rot2",
    "rot3": "Rot3",
    "wavelength": "Wavelength",
}


def check_geometry(ai, poni: str) -> None:
    """A geometry that cannot place a pixel (NaN, infinite, a distance <= 0) would integrate
    every frame into empty bins or NaN: an error naming the PONI key instead."""
    for attr, key in GEOMETRY_KEYS.items():
        value = getattr(ai, attr)
        if value is None and attr == "wavelength":
            continue  # only q units and the attenuation need it (pyFAI says so there)
        if value is None or not np.isfinite(value):
            raise InputDataError(poni, f"{key}: {value!r} is not a finite number")
    if ai.dist <= 0:
        raise InputDataError(poni, f"Distance: {ai.dist!r} must be > 0")
    if ai.wavelength is not None and ai.wavelength <= 0:
        raise InputDataError(poni, f"Wavelength: {ai.wavelength!r} must be > 0")


def integrator_radial_range(ai_config: IntegrationConfig) -> tuple[float, float]:
    """The radial range ESRF's integrator uses when ``radial_range`` is empty: min and max of
    the pixel centres' radial positions over the whole detector, masked pixels included.

    Its own formulas for its units (r_mm from rArray, 2th_deg from the 2theta centres, q_A^-1
    from qArray), pyFAI's centre array in the unit for the others. Computed on a separate
    integrator: computing them on the one that integrates changes pyFAI's cached binning.
    """
    ai = load_geometry(ai_config)
    unit = ai_config.unit
    if unit == "r_mm":
        values = ai.rArray() * 1e3
    elif unit == "2th_deg":
        values = np.degrees(ai.center_array(unit="2th_rad"))
    elif unit == "q_A^-1":
        values = ai.qArray() / 10
    else:
        values = ai.center_array(ai.detector.shape, unit=unit, scale=True)
    values = np.asarray(values, dtype=np.float64)
    low, high = float(np.nanmin(values)), float(np.nanmax(values))
    if not (np.isfinite(low) and np.isfinite(high) and low < high):
        raise InputDataError(
            ai_config.poni_file, f"no radial range in {unit} from this geometry: {low}..{high}"
        )
    return low, high


def check_unit(unit: str) -> None:
    """The configured radial unit is one pyFAI knows (config parsing only checks its form)."""
    from pyFAI.units import RADIAL_UNITS

    if unit not in RADIAL_UNITS:
        raise ConfigError(
            "azimuthal integration",
            "unit",
            unit,
            f"not a pyFAI radial unit; e.g. {', '.join(COMMON_UNITS)}",
        )


def load_corrections(ai_config: IntegrationConfig, shape: tuple[int, int]) -> Corrections:
    """Mask, dark and flat images, checked against the detector shape."""
    images = {}
    for what, path in (
        ("mask", ai_config.mask_file),
        ("dark", ai_config.dark_file),
        ("flat", ai_config.flatfield_file),
    ):
        if not path:
            images[what] = None
            continue
        image = read_image(path, what)
        if image.shape != tuple(shape):
            raise InputDataError(
                path, f"{what} shape {image.shape} does not match the detector shape {tuple(shape)}"
            )
        images[what] = (image != 0).astype(np.int8) if what == "mask" else image.astype(np.float32)
    return Corrections(**images)


def engine_method(ai_config: IntegrationConfig, cpu_fallback: bool):
    """pyFAI's method: opencl on this worker's device (see :mod:`tasks.gpu`), else as configured.

    pyFAI registers its OpenCL methods when ``pyFAI.integrator.load_engines`` is imported;
    in a fresh worker process nothing has imported it yet, so it is imported here first.
    """
    if ai_config.ai_method != "opencl":
        return ai_config.method
    import pyFAI.integrator.load_engines  # noqa: F401  (registers the OpenCL methods)
    from pyFAI.method_registry import IntegrationMethod

    from .gpu import worker_device

    device = worker_device(allow_cpu=cpu_fallback)
    if device is None:
        return (ai_config.pixel_splitting, "csr", "cython")
    dim = 1 if ai_config.n_slices == 1 else 2
    split = ai_config.pixel_splitting
    found = IntegrationMethod.select_method(dim, split, "csr", "opencl", target=device.target)
    if not found:
        raise ConfigError(
            "azimuthal integration", "ai_method", "opencl", f"pyFAI cannot use {device}"
        )
    return found[0]


def attenuation(ai, ai_config: IntegrationConfig) -> np.ndarray:
    """Sensor efficiency at each pixel's incidence angle relative to normal incidence."""
    from pyFAI.detectors.sensors import ALL_MATERIALS

    if ai.wavelength is None:
        raise InputDataError(
            ai_config.poni_file,
            "no Wavelength: correct_detector_attenuation needs the beam energy",
        )
    mu = ALL_MATERIALS[ai_config.sensor_material].mu(ai.energy, "cm^-1")
    depth = mu * ai_config.sensor_thickness_cm
    cos_tth = np.cos(ai.center_array(ai.detector.shape, unit="2th_rad", scale=False))
    return ((1 - np.exp(-depth / cos_tth)) / (1 - np.exp(-depth))).astype(np.float32)


ENGINE_THREADS_ENV = "RINGFLOW_ENGINE_THREADS"  # set by the job script: its threads per engine


def engine_threads(config: Config) -> int:
    """Threads of one engine: what the job script gives (a local run scales cores_per_worker
    down to the machine's CPUs), else ``cores_per_worker``."""
    given = os.environ.get(ENGINE_THREADS_ENV, "")
    return (
        int(given) if given.isdigit() and int(given) > 0 else config.computations.cores_per_worker
    )


def frames_per_batch(engine, itemsize: int, buffers: int = RING) -> int:
    """Frames per batch so that an engine's batches fit ``engine_memory_mb``: the reader's
    ``buffers`` raw batches (a ring when it reads ahead, else one), the per-bin sums and
    results, and the scipy path's float32 (pixels x frames) signal and variance (the
    fused kernel needs neither)."""
    pixels = int(np.prod(engine.shape))
    bins = int(np.prod(engine.row_shape))
    fused = kernels.available() if engine.fused is None else engine.fused
    transposed = 0 if fused else 4 + 4 * engine.has_sigma
    per_frame = pixels * (buffers * itemsize + transposed) + bins * 4 * 8
    return int(max(1, min(MAX_BATCH, engine.memory // per_frame)))


class Engine:
    """Integrates frames with one configuration; cheap to call once built.

    Batches go through :mod:`.batched` (pyFAI's CSR matrix, many frames per product) when
    pyFAI's cython CSR engine is what the configuration asks for and its error model is one a
    batch can propagate; otherwise each frame goes through pyFAI, as :meth:`integrate` does:
    its OpenCL engine, the azimuthal error model, and trimming (``medfilt1d``,
    ``sigma_clip_ng``, called as ESRF's integrator calls them).
    """

    def __init__(self, config: Config, threads: int | None = None, fused: bool | None = None):
        self.config = config.integration
        self.threads = threads or engine_threads(config)
        self.fused = fused  # None: the numba kernel where numba is installed (tests choose)
        self.memory = config.computations.engine_memory_mb * 2**20
        self.method = engine_method(self.config, config.computations.cpu_fallback)
        self.ai = load_geometry(self.config)
        refuse_memory_fallback(self.ai)
        self.shape = tuple(self.ai.detector.shape)
        self.corrections = load_corrections(self.config, self.shape)
        self.radial_range = self.config.radial_range or integrator_radial_range(self.config)
        self.absorption = attenuation(self.ai, self.config) if self._uses_attenuation() else None
        self.kwargs = self._kwargs()  # once: in 2D it folds absorption into a full-size flat
        self.radial, self.azimuthal = self._axes()
        self.why_not_batched = self._why_not_batched()
        self._batchers: dict[tuple, BatchIntegrator] = {}
        self.provenance = provenance_of(self.config.poni_file) | {
            "method": self.description(),
            "radial_range": list(self.radial_range),
            "pyfai_config": self.pyfai_config(),
        }
        if self.why_not_batched:
            log.info("frames integrated one by one by pyFAI: %s", self.why_not_batched)

    @property
    def is_2d(self) -> bool:
        return self.config.n_slices > 1 and not self.config.trim_method

    def _uses_attenuation(self) -> bool:
        """As the integrator: no attenuation with the median filter (medfilt1d has none)."""
        c = self.config
        return c.correct_detector_attenuation and c.trim_method != "median"

    def _kwargs(self) -> dict:
        c = self.config
        flat = self.corrections.flat
        if flat is None:  # pyFAI's default, made explicit so 2D can fold absorption into it
            flat = self.ai.detector.flatfield
        kwargs = dict(
            unit=c.unit,
            method=self.method,
            mask=self.corrections.mask,
            dark=self.corrections.dark,
            polarization_factor=c.polarization_factor,
            correctSolidAngle=c.correct_solid_angle,
            radial_range=self.radial_range,
        )
        if c.trim_method:
            return kwargs | self._trim_kwargs(flat)
        kwargs["error_model"] = c.error_model or None
        if self.is_2d:
            # integrate2d_ng has no absorption argument: it divides like a flat, so fold it in.
            if self.absorption is not None:
                flat = self.absorption if flat is None else flat * self.absorption
            kwargs["azimuth_range"] = c.azimuthal_range[:2]
        else:
            kwargs["absorption"] = self.absorption
            kwargs["azimuth_range"] = (
                None if c.azimuthal_range[:2] == FULL_CIRCLE else c.azimuthal_range[:2]
            )
        kwargs["flat"] = flat
        return kwargs

    def _trim_kwargs(self, flat) -> dict:
        """The arguments ESRF's integrator gives pyFAI's trimming functions, which run on
        pyFAI's cython engine here (the integrator's azimuthal slices do not apply)."""
        c = self.config
        split = "no" if c.trim_method == "sigma_clip" else c.pixel_splitting
        kwargs = {"flat": flat, "method": (split, "csr", "cython")}
        if c.trim_method == "median":
            kwargs |= {"npt_rad": c.n_pts, "npt_azim": c.trim_n_pts or c.n_pts, "dummy": 0.0}
            if c.trim_bounds:
                kwargs["percentile"] = (
                    c.trim_bounds[0] if len(c.trim_bounds) == 1 else c.trim_bounds
                )
            return kwargs
        kwargs |= {"npt": c.n_pts, "error_model": c.error_model or None}
        kwargs["absorption"] = self.absorption
        if c.trim_bounds:
            kwargs["thres"] = c.trim_bounds[0]
        return kwargs

    def integrate(self, frame: np.ndarray, normalization: float = 1.0) -> FrameResult:
        res = self._pyfai(frame, normalization)
        sigma = None if res.sigma is None else np.asarray(res.sigma, dtype=np.float32)
        return FrameResult(np.asarray(res.intensity, dtype=np.float32), sigma)

    def _pyfai(self, frame: np.ndarray, normalization: float = 1.0, **changes):
        """pyFAI's own result for one frame."""
        c, kwargs = self.config, self.kwargs | changes
        if c.trim_method == "median":
            return self.ai.medfilt1d(frame, normalization_factor=normalization, **kwargs)
        if c.trim_method == "sigma_clip":
            return self.ai.sigma_clip_ng(frame, normalization_factor=normalization, **kwargs)
        if self.is_2d:
            return self.ai.integrate2d_ng(
                frame, c.n_pts, c.n_slices, normalization_factor=normalization, **kwargs
            )
        return self.ai.integrate1d_ng(frame, c.n_pts, normalization_factor=normalization, **kwargs)

    @property
    def row_shape(self) -> tuple[int, ...]:
        c = self.config
        return (c.n_slices, c.n_pts) if self.is_2d else (c.n_pts,)

    @property
    def has_sigma(self) -> bool:
        if self.config.trim_method == "median":
            return False  # the median filter propagates no error
        return bool(self.config.error_model) and self.config.error_model != "none"

    def description(self) -> str:
        """The pyFAI method that actually runs, for the output (e.g. 'bbox/csr/cython batched',
        'no/csr/opencl on Portable Computing Language: cpu-...')."""
        c = self.config
        if c.trim_method:
            split, algo, impl = self.kwargs["method"]
            name = "medfilt1d" if c.trim_method == "median" else "sigma_clip_ng"
            return f"{split}/{algo}/{impl} {name} per frame"
        split, algo, impl = _method_tuple(self.method)
        text = f"{split}/{algo}/{impl}"
        target = getattr(self.method, "target_name", None)
        if target:
            text += f" on {target}"
        return text + (" per frame" if self.why_not_batched else " batched")

    def pyfai_config(self) -> dict:
        """This integration as pyFAI's own configuration (what ``pyFAI-integrate --json`` and
        ``pyFAI.worker.Worker.set_config`` load), for the output: another tool can redo it.

        Trimming (``medfilt1d``, ``sigma_clip_ng``) has no such form: the configuration
        holds the integration it trims, its trimming parameters are in the INI text.
        """
        from pyFAI.io.integration_config import WorkerConfig

        c = self.config
        polarization = None if c.polarization_factor is None else (c.polarization_factor, 0.0)
        azimuth = None if c.azimuthal_range[:2] == FULL_CIRCLE else list(c.azimuthal_range[:2])
        config = WorkerConfig(
            poni=self.ai.get_config(),
            nbpt_rad=c.n_pts,
            nbpt_azim=c.n_slices if self.is_2d else 1,
            unit=c.unit,
            polarization_description=polarization,
            correct_solid_angle=c.correct_solid_angle,
            dark_current=[c.dark_file] if c.dark_file else None,
            flat_field=[c.flatfield_file] if c.flatfield_file else None,
            mask_file=c.mask_file or None,
            error_model=c.error_model or None,
            method=_method_tuple(self.kwargs["method"]),
            azimuth_range=azimuth,
            radial_range=list(self.radial_range),
            monitor_name=c.monitor_name or None,
            shape=list(self.shape),
        )
        return config.as_dict()

    def batch_size(self, itemsize: int, buffers: int = RING) -> int:
        return frames_per_batch(self, itemsize, buffers)

    def integrate_batch(self, frames: np.ndarray, monitor: np.ndarray) -> BatchResult:
        """Integrate ``frames`` (n, *shape), frame k divided by ``monitor[k]``, in order."""
        if self.why_not_batched:
            results = [self.integrate(f, float(m)) for f, m in zip(frames, monitor, strict=True)]
            sigma = None if results[0].sigma is None else np.stack([r.sigma for r in results])
            return BatchResult(np.stack([r.intensity for r in results]), sigma)
        return self._batcher(frames).integrate(frames, monitor)

    def _why_not_batched(self) -> str:
        if self.config.trim_method:
            return f"trim_method {self.config.trim_method} (pyFAI filters each frame)"
        split, algo, impl = _method_tuple(self.method)
        if (algo, impl) != ("csr", "cython"):
            return f"method {split}/{algo}/{impl} (batches need the cython CSR engine)"
        model = (self.config.error_model or "none").lower()
        if model not in ERROR_MODELS:
            return f"error model {model} needs each frame's azimuthal average"
        if self._csr() is None:
            return "pyFAI built no CSR matrix for this configuration"
        return ""

    def _csr(self):
        """pyFAI's own cython CSR engine for this configuration (built by :meth:`_axes`), and
        its method: (method, engine) or None."""
        dim = 2 if self.is_2d else 1
        for method, engine in self.ai.engines.items():
            if (
                getattr(method, "dimension", None) == dim
                and _method_tuple(method)[1:] == ("csr", "cython")
                and getattr(engine, "engine", None) is not None
            ):
                return method, engine.engine
        return None

    def _batcher(self, frames: np.ndarray) -> BatchIntegrator:
        """The batch integrator for this frame type: pyFAI's dummy depends on the dtype."""
        dummy, delta = self.ai.detector.get_dummies(frames[:1])
        key = (None if dummy is None else float(dummy), None if delta is None else float(delta))
        if key not in self._batchers:
            self._batchers.clear()
            self._batchers[key] = self._build_batcher(*key)
        return self._batchers[key]

    def _build_batcher(self, dummy: float | None, delta: float | None) -> BatchIntegrator:
        return batcher_for(self.batch_inputs, dummy, delta, self.threads, self.fused)

    @functools.cached_property
    def batch_inputs(self) -> BatchInputs:
        """pyFAI's CSR matrix of this configuration and the per-pixel arrays of its
        preprocessing (what :class:`tasks.engine_cache.EngineCache` keeps on disk)."""
        c, kw, shape = self.config, self.kwargs, self.shape
        method, csr = self._csr()
        data, indices, indptr = csr.lut
        dark = kw["dark"] if kw["dark"] is not None else self.ai.detector.darkcurrent
        norm = np.ones(int(np.prod(shape)), dtype=np.float32)
        factors = [kw["flat"]]
        if c.polarization_factor is not None:
            factors.append(self.ai.polarization(shape, c.polarization_factor))
        if c.correct_solid_angle:
            factors.append(self.ai.solidAngleArray(shape, True))
        factors.append(kw.get("absorption"))
        for factor in factors:
            if factor is not None:
                norm *= np.ascontiguousarray(factor, dtype=np.float32).ravel()
        poisson = (c.error_model or "none").lower() in ("poisson", "hybrid")
        return BatchInputs(
            data=np.asarray(data),
            indices=np.asarray(indices),
            indptr=np.asarray(indptr),
            pixels=int(csr.size),
            dark=_flat32(dark),
            flat=_flat32(kw["flat"]),
            normalization=norm,
            dark_variance=self._dark_variance(method) if poisson else None,
            poisson=poisson,
            empty=float(self.ai._empty),
            out_shape=self.row_shape,
        )

    def _dark_variance(self, method) -> np.ndarray | None:
        """``max(dark, 0)`` per pixel where pyFAI adds the given dark to the Poisson variance
        before its engine runs: ``integrate2d_ng`` does so for engines that do not manage the
        variance themselves (2D CSR without full splitting); 1D engines manage it."""
        dark = self.corrections.dark
        if dark is None or not self.is_2d or getattr(method, "manage_variance", True):
            return None
        return np.ascontiguousarray(np.maximum(dark, 0), np.float32).ravel()

    def _axes(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Radial (and azimuthal) bin centres, from one integration of a blank frame."""
        blank = np.zeros(self.shape, dtype=np.float32)
        res = (
            self._pyfai(blank) if self.config.trim_method else self._pyfai(blank, error_model=None)
        )
        if self.is_2d:
            return np.asarray(res.radial), np.asarray(res.azimuthal)
        return np.asarray(res.radial), None


def _flat32(image) -> np.ndarray | None:
    return None if image is None else np.ascontiguousarray(image, np.float32).ravel()


class OutOfMemory(Exception):
    """pyFAI ran out of memory building its sparse matrix (not a MemoryError: see below)."""


def refuse_memory_fallback(ai) -> None:
    """Make a MemoryError in pyFAI's sparse-matrix build reach ringflow.

    pyFAI (2026.9) catches it, calls ``reset_engines()`` and falls back on another method; but
    it does so inside the engine's own non-reentrant lock, which ``reset`` takes again: the
    building thread deadlocks for good, holding the engine cache's lock, and every task of
    the process waits for it (until the job's stall timeout). The fallback would also run a
    method other than the one configured. Raised as another type, the error leaves pyFAI
    through its ``with lock`` blocks, which release the lock.
    """
    build = ai.setup_sparse_integrator

    @functools.wraps(build)
    def setup_sparse_integrator(*args, **kwargs):
        try:
            return build(*args, **kwargs)
        except MemoryError as exc:
            raise OutOfMemory(str(exc)) from None

    ai.setup_sparse_integrator = setup_sparse_integrator


def provenance_of(poni_file: str) -> dict:
    """The geometry (values and the PONI file's text) and pyFAI's version, for the output.

    File tasks store it in their partials (their engine has pyFAI loaded): the assembly task
    then needs no pyFAI, whose import costs seconds of CPU beside the engines.
    """
    import pyFAI

    ai = pyFAI.load(poni_file)
    geometry = {"poni_file": poni_file, "detector": ai.detector.name}
    for key in ("dist", "poni1", "poni2", "rot1", "rot2", "rot3", "wavelength"):
        geometry[key] = float(getattr(ai, key))
    with open(poni_file, encoding="utf-8", errors="replace") as fh:
        geometry["poni"] = fh.read()
    return {"geometry": geometry, "pyFAI": pyFAI.version}


def _method_tuple(method) -> tuple[str, str, str]:
    """(split, algo, impl) of a pyFAI IntegrationMethod or of a 3-tuple."""
    if isinstance(method, tuple):
        return tuple(str(m).lower() for m in method)
    return (method.split_lower, method.algo_lower, method.impl_lower)


class Corrector:
    """Corrected frames: each pixel as pyFAI's integration sees it, for ``save_corrected``.

    The same arrays the integration divides by (dark, flat, solid angle, polarization,
    sensor absorption, monitor) and the same mask and dummies, applied by pyFAI's own
    ``preproc``. Masked and invalid pixels are NaN; :meth:`correct` says which is which.
    """

    MASKED, INVALID = 1, 2

    def __init__(self, config: Config):
        c = self.config = config.integration
        self.ai = ai = load_geometry(c)
        self.shape = shape = tuple(ai.detector.shape)
        corrections = load_corrections(c, shape)
        # pyFAI's rules: a mask file replaces the detector's mask; no dark/flat: the detector's
        self.mask = corrections.mask if corrections.mask is not None else ai.mask
        self.dark = corrections.dark if corrections.dark is not None else ai.detector.darkcurrent
        self.flat = corrections.flat if corrections.flat is not None else ai.detector.flatfield
        self.solid_angle = ai.solidAngleArray(shape, True) if c.correct_solid_angle else None
        self.polarization = (
            None if c.polarization_factor is None else ai.polarization(shape, c.polarization_factor)
        )
        self.absorption = attenuation(ai, c) if c.correct_detector_attenuation else None
        self.static = (
            np.zeros(shape, dtype=np.uint8)
            if self.mask is None
            else (np.asarray(self.mask) != 0).astype(np.uint8) * self.MASKED
        )

    def correct(self, frame: np.ndarray, normalization: float = 1.0):
        """(corrected float32 frame, uint8 mask: 0 used, 1 masked, 2 invalid in this frame)."""
        from pyFAI.engines.preproc import preproc

        dummy, delta_dummy = self.ai.detector.get_dummies(frame)
        corrected = preproc(
            frame,
            dark=self.dark,
            flat=self.flat,
            solidangle=self.solid_angle,
            polarization=self.polarization,
            absorption=self.absorption,
            mask=self.mask,
            dummy=dummy,
            delta_dummy=delta_dummy,
            normalization_factor=normalization,
            empty=np.nan,
            dtype=np.float32,
        )
        flags = self.static.copy()
        flags[(flags == 0) & ~np.isfinite(corrected)] = self.INVALID
        return corrected, flags


_ENGINES: dict[str, Engine | CachedEngine] = {}
# configuration -> (when, why) its engine could not be built; forgotten after FAILED_FOR s,
# so a long-lived worker tries again once the memory another job held is free
_FAILED: dict[str, tuple[float, ConfigError]] = {}
FAILED_FOR = 600.0
_ENGINE_LOCK = threading.RLock()


def warm_engine(config: Config) -> None:
    """Build this process's engine for ``config`` and compile (or load) its kernel for
    Lima's int32 frames, all before any task may use it: a task waits for the whole."""
    with _ENGINE_LOCK:
        engine = engine_for(config)
        if not engine.why_not_batched:
            with _out_of_memory(config, config.integration_fingerprint()):
                engine.integrate_batch(np.zeros((1, *engine.shape), np.int32), np.ones(1))


def engine_for(config: Config) -> Engine | CachedEngine:
    """This process's engine for ``config``, built on first use (a task asking while the
    start-up warm-up builds it waits for that build).

    A build that ran out of memory is not tried again for that configuration for
    ``FAILED_FOR`` seconds: every task waiting for the engine, and every later one, fails at
    once with the same line instead of each building (and swapping) again.
    """
    key = config.integration_fingerprint()
    with _ENGINE_LOCK:
        when, error = _FAILED.get(key, (0.0, None))
        if error is not None and time.monotonic() - when < FAILED_FOR:
            raise error
        if key not in _ENGINES:
            _ENGINES.clear()  # one configuration at a time: engines hold large CSR matrices
            _ENGINES[key] = _cached_or_built(config, key)
        return _ENGINES[key]


def _cached_or_built(config: Config, key: str) -> Engine | CachedEngine:
    """The job's cached engine if there is one, else a new one (kept for the next process)."""
    cache = worker_cache()
    with _out_of_memory(config, key):
        engine = cache.load(config) if cache else None
        if engine is None and cache and cache.wait_for_builder(config):
            engine = cache.load(config)  # the client built it while this process started
        if engine is None:
            log.info("building pyFAI engine %s in pid %d", key, os.getpid())
            engine = Engine(config)
            if cache:
                cache.save(config, engine)
    return engine


@contextlib.contextmanager
def _out_of_memory(config: Config, key: str):
    """A MemoryError (pyFAI's or numpy's, often without a message) becomes a ConfigError
    naming the keys that size the engine, remembered for ``key``."""
    try:
        yield
    except (MemoryError, OutOfMemory):
        _ENGINES.pop(key, None)
        gc.collect()  # what the failed build held, before anything else needs memory
        shape = _detector_shape(config.integration)
        error = engine_memory_error(config, shape, "building the engine ran out of memory")
        _FAILED[key] = (time.monotonic(), error)
        raise error from None


def engine_memory_error(
    config: Config, shape: tuple[int, ...], what: str, limit: tuple[int, str] | None = None
) -> ConfigError:
    """An engine that does not fit: the keys that size it, its estimate and the limit."""
    c = config.integration
    key, value = ("n_pts", c.n_pts)
    if c.n_slices > c.n_pts:
        key, value = ("azimuthal_range", c.azimuthal_range)
    more = f", more than {_gib(limit[0])} ({limit[1]})" if limit else ""
    return ConfigError(
        "azimuthal integration",
        key,
        value,
        f"{what}: {c.n_pts} radial x {c.n_slices} azimuthal bins, pixel_splitting = "
        f"{c.pixel_splitting}, {'x'.join(map(str, shape))} pixels and engine_memory_mb = "
        f"{config.computations.engine_memory_mb} need about "
        f"{_gib(engine_memory_estimate(config, shape))}{more}; lower n_pts or the slices",
        config.source,
    )


def _detector_shape(c: IntegrationConfig) -> tuple[int, ...]:
    """The detector's shape, for a message; (1000, 1000) when the PONI cannot say."""
    try:
        return tuple(load_geometry(c).detector.shape)
    except Exception:  # only for a message: never hide the memory error behind another
        return (1000, 1000)


BYTES_PER_PIXEL = 112  # pyFAI's position, corner and correction arrays, ringflow's norm
BYTES_PER_ENTRY = 24  # CSR float32 data + int32 index, in pyFAI's LUT, its CSR and scipy's
BYTES_PER_BIN = 96  # pyFAI's float64 sums, counts, results and axes, per bin
BYTES_PER_BATCH_BIN = 32  # ringflow's per-frame signal, variance, count and result sums
BASE_BYTES = 300 * 2**20  # Python, numpy, scipy, pyFAI and numba imported


def engine_memory_estimate(config: Config, shape: tuple[int, ...]) -> int:
    """Bytes one engine process needs for ``config`` on a detector of ``shape``, roughly.

    The CSR matrix holds one entry per pixel and bin it touches: one without splitting; with
    bbox/pseudo/full splitting a pixel spans about n_pts / sqrt(pixels) radial bins (the
    radial range crosses the detector) and n_slices / (pi sqrt(pixels)) azimuthal ones (a
    pixel at a typical radius of sqrt(pixels)/2 subtends 2 / sqrt(pixels) radians). Measured
    on a Pilatus 1M, 1000 bins, bbox: 1.72 GiB peak RSS; this gives 1.45 GiB.
    """
    c = config.integration
    pixels = int(np.prod(shape))
    slices = c.n_slices if c.n_slices > 1 and not c.trim_method else 1
    bins = c.n_pts * slices
    side = max(1.0, pixels**0.5)
    per_pixel = 1.0
    if str(c.pixel_splitting).lower() not in ("no", "0", "none", ""):
        per_pixel = (1 + c.n_pts / side) * (1 + slices / (np.pi * side))
    entries = pixels * per_pixel
    batch = config.computations.engine_memory_mb * 2**20
    return int(
        BASE_BYTES
        + pixels * BYTES_PER_PIXEL
        + entries * BYTES_PER_ENTRY
        + bins * (BYTES_PER_BIN + BYTES_PER_BATCH_BIN)
        + batch
    )


def memory_limit() -> tuple[int, str]:
    """(bytes, what sets it): the least of this machine's memory, this process's RLIMIT_AS
    and its cgroup's limit (v2 ``memory.max``, or v1). Totals, not what is free now: the
    workers started ahead of the planning may already hold their engines, and the page
    cache of the files just read counts as used; only what can never fit is refused."""
    import resource

    import psutil

    limits = [(psutil.virtual_memory().total, "this machine's memory")]
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        limits.append((soft, "RLIMIT_AS (ulimit -v)"))
    cgroup = _cgroup_limit()
    if cgroup is not None:
        limits.append((cgroup, "the cgroup's memory limit"))
    return min(limits)


def _cgroup_limit() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as fh:
                text = fh.read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:  # v1 says "no limit" with a huge number
            return int(text)
    return None


def check_engine_fits(config: Config, shape: tuple[int, ...]) -> None:
    """Refuse, before any work, an engine that cannot fit in this machine's memory."""
    limit = memory_limit()
    if engine_memory_estimate(config, shape) > limit[0]:
        raise engine_memory_error(config, shape, "one integration engine cannot fit", limit)


def _gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB"
