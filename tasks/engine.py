"""The integration engine: one pyFAI integrator per worker process and configuration.

Built lazily in the worker's child process (never before fork: pyFAI's OpenMP and OpenCL
state are not fork-safe) and reused for every later file with the same configuration.
Each frame goes through pyFAI's own ``integrate1d_ng``/``integrate2d_ng`` with every
configured correction, so results equal pyFAI's by construction.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np

from .config import Config, ConfigError, IntegrationConfig
from .errors import InputDataError
from .readers import read_image

log = logging.getLogger(__name__)
FULL_CIRCLE = (-180.0, 180.0)


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
    return ai


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


def check_opencl(ai_config: IntegrationConfig, cpu_fallback: bool = False) -> None:
    """Fail clearly if ai_method = opencl and this machine has no OpenCL device."""
    if ai_config.ai_method != "opencl" or cpu_fallback:
        return
    from pyFAI.method_registry import IntegrationMethod

    dim = 1 if ai_config.n_slices == 1 else 2
    found = IntegrationMethod.select_method(dim, ai_config.pixel_splitting, "csr", "opencl")
    if not found:
        raise ConfigError(
            "azimuthal integration",
            "ai_method",
            "opencl",
            f"no OpenCL device on {os.uname().nodename}; install an OpenCL driver "
            "(e.g. pip install pocl-binary-distribution) or set ai_method = cython",
        )


def engine_method(ai_config: IntegrationConfig, cpu_fallback: bool):
    """pyFAI's method: opencl on this worker's granted GPU (see tasks.gpu), else as configured."""
    if ai_config.ai_method != "opencl":
        return ai_config.method
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

    mu = ALL_MATERIALS[ai_config.sensor_material].mu(ai.energy, "cm^-1")
    depth = mu * ai_config.sensor_thickness_cm
    cos_tth = np.cos(ai.center_array(ai.detector.shape, unit="2th_rad", scale=False))
    return ((1 - np.exp(-depth / cos_tth)) / (1 - np.exp(-depth))).astype(np.float32)


class Engine:
    """Integrates frames with one configuration; cheap to call once built."""

    def __init__(self, config: Config):
        self.config = config.integration
        self.method = engine_method(self.config, config.computations.cpu_fallback)
        self.ai = load_geometry(self.config)
        self.shape = tuple(self.ai.detector.shape)
        self.corrections = load_corrections(self.config, self.shape)
        self.absorption = (
            attenuation(self.ai, self.config) if self.config.correct_detector_attenuation else None
        )
        self.kwargs = self._kwargs()  # once: in 2D it folds absorption into a full-size flat
        self.radial, self.azimuthal = self._axes()

    @property
    def is_2d(self) -> bool:
        return self.config.n_slices > 1

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
            error_model=c.error_model or None,
            radial_range=c.radial_range,
        )
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

    def integrate(self, frame: np.ndarray, normalization: float = 1.0) -> FrameResult:
        kwargs = self.kwargs
        c = self.config
        if self.is_2d:
            res = self.ai.integrate2d_ng(
                frame, c.n_pts, c.n_slices, normalization_factor=normalization, **kwargs
            )
        else:
            res = self.ai.integrate1d_ng(
                frame, c.n_pts, normalization_factor=normalization, **kwargs
            )
        sigma = None if res.sigma is None else np.asarray(res.sigma, dtype=np.float32)
        return FrameResult(np.asarray(res.intensity, dtype=np.float32), sigma)

    def _axes(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Radial (and azimuthal) bin centres, from one integration of a blank frame."""
        blank = np.zeros(self.shape, dtype=np.float32)
        c = self.config
        kwargs = self.kwargs | {"error_model": None}
        if self.is_2d:
            res = self.ai.integrate2d_ng(blank, c.n_pts, c.n_slices, **kwargs)
            return np.asarray(res.radial), np.asarray(res.azimuthal)
        res = self.ai.integrate1d_ng(blank, c.n_pts, **kwargs)
        return np.asarray(res.radial), None


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


_ENGINES: dict[str, Engine] = {}


def engine_for(config: Config) -> Engine:
    """This process's engine for ``config``, built on first use."""
    key = config.integration_fingerprint()
    if key not in _ENGINES:
        log.info("building pyFAI engine %s in pid %d", key, os.getpid())
        _ENGINES.clear()  # one configuration at a time: engines hold large CSR matrices
        _ENGINES[key] = Engine(config)
    return _ENGINES[key]
