"""The scan callback: once every file of a scan is integrated, write its final NeXus file.

Runs as the body of the scan's chord, on the assembly queue, so it never occupies an
integration engine. A scan with a failed file gets no final file: it is reported incomplete
and its partials are kept for a later requeue.
"""

from __future__ import annotations

import contextlib
import logging
import os

import h5py
import numpy as np

from .app import app
from .errors import RingflowError
from .payloads import ScanTask
from .writers import ScanResult, read_partial, write_nexus

log = logging.getLogger(__name__)


@app.task(name="ringflow.assemble_scan")
def assemble_scan(results: list[dict], payload: dict) -> dict:
    scan = ScanTask.from_dict(payload)
    failed = [r for r in results if r.get("status") != "done"]
    if failed:
        return {"status": "incomplete", "scan": scan.scan_key, "failed": failed}
    try:
        config = scan.config_obj()
        result = build_result(scan, config)
        write_nexus(scan.output, result, config.output.file_mode)
    except Exception as exc:
        if not isinstance(exc, RingflowError):
            log.exception("unexpected error assembling %s", scan.scan_key)
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return {
            "status": "failed",
            "scan": scan.scan_key,
            "error": type(exc).__name__,
            "message": f"{scan.output}: {message}" if scan.output not in message else message,
        }
    _remove_partials(scan.partials)
    return {
        "status": "done",
        "scan": scan.scan_key,
        "output": scan.output,
        "frames": int(result.intensity.shape[0]),
    }


def build_result(scan: ScanTask, config) -> ScanResult:
    parts = [read_partial(path) for path in scan.partials]
    intensity = np.concatenate([p.intensity for p in parts])
    if intensity.shape[0] != scan.n_frames:
        raise RingflowError(
            f"{scan.scan_key}: {intensity.shape[0]} rows for {scan.n_frames} frames"
        )
    sigma = None if parts[0].sigma is None else np.concatenate([p.sigma for p in parts])
    return ScanResult(
        entry=scan.entry or "entry_0000",
        intensity=intensity,
        sigma=sigma,
        radial=parts[0].radial,
        unit=config.integration.unit,
        azimuthal=parts[0].azimuthal,
        source_file=[p.source_file for p in parts for _ in range(len(p.intensity))],
        source_frame=np.concatenate([p.source_frame for p in parts]),
        configuration=config.as_ini(hide_secrets=True),
        geometry=_geometry(config.integration.poni_file),
        versions=_versions(),
        fingerprint=scan.fingerprint,
        metadata=_metadata(scan, config.output.try_metadata),
        average=_average(intensity, config.integration.average_xy),
    )


def _average(intensity: np.ndarray, kind: str):
    if not kind:
        return None
    reduce = np.nanmean if kind == "mean" else np.nanmedian
    return kind, reduce(intensity, axis=0).astype(np.float32)


def _geometry(poni_file: str) -> dict:
    import pyFAI

    ai = pyFAI.load(poni_file)
    geometry = {"poni_file": poni_file, "detector": ai.detector.name}
    for key in ("dist", "poni1", "poni2", "rot1", "rot2", "rot3", "wavelength"):
        geometry[key] = float(getattr(ai, key))
    with open(poni_file, encoding="utf-8", errors="replace") as fh:
        geometry["poni"] = fh.read()
    return geometry


def _versions() -> dict:
    import celery
    import pyFAI

    from . import __version__

    return {
        "ringflow": __version__,
        "pyFAI": pyFAI.version,
        "h5py": h5py.__version__,
        "numpy": np.__version__,
        "celery": celery.__version__,
    }


def _metadata(scan: ScanTask, wanted: tuple[str, ...]) -> dict:
    """Title, times, positioners and per-frame counters of the Bliss entry."""
    if not scan.entry:
        return {}
    meta: dict = {"positioners": {}, "measurement": {}}
    with h5py.File(scan.master, "r") as h5:
        entry = h5[scan.entry]
        for key in ("title", "start_time", "end_time"):
            if key in entry:
                meta[key] = _scalar(entry[key][()])
        for group, target in (
            ("instrument/positioners", "positioners"),
            ("measurement", "measurement"),
        ):
            if group not in entry:
                continue
            for name, obj in entry[group].items():
                if _copyable(obj, scan.n_frames) and (not wanted or name in wanted):
                    meta[target][name] = obj[()]
    return meta


def _copyable(obj, n_frames: int) -> bool:
    """Scalars and 1D per-frame arrays; never the detector images."""
    if not isinstance(obj, h5py.Dataset) or obj.dtype.kind not in "iufb":
        return False
    return obj.ndim == 0 or (obj.ndim == 1 and obj.shape[0] <= 10 * max(n_frames, 1))


def _scalar(value):
    return value.decode() if isinstance(value, bytes) else value


def _remove_partials(paths: list[str]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    folders = {os.path.dirname(p) for p in paths}
    for folder in folders:
        with contextlib.suppress(OSError):
            os.rmdir(folder)
