"""The scan callback: once every file of a scan is integrated, write its final NeXus file.

Runs as the body of the scan's chord, on the assembly queue, so it never occupies an
integration engine. A scan with a failed file gets no final file: it is reported incomplete
and its partials are kept for a later requeue.

Output folders the planning created get ``[output] file_mode`` from the assembly that finds
every scan writing into them finished (:func:`finish_folders`).

The scan's payload lives in Redis, which anyone with the broker's password can rewrite: its
output, partials and folders are checked against the worker's own roots
(:mod:`tasks.confine`) before anything is read, written, removed or chmodded.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings

import h5py
import numpy as np

from . import confine, keys, nexus, registry
from .app import app
from .config import Config
from .errors import OutsideJobError, RingflowError
from .partials import PartialHeader, iter_rows, read_block, read_header
from .payloads import ScanTask
from .readers import batch_size, iter_batches, open_frames
from .writers import (
    Applied,
    Average,
    CorrectedFrames,
    OutputStorage,
    ScanResult,
    Stream,
    user_mode,
    write_nexus,
)

log = logging.getLogger(__name__)
AVERAGE_BYTES = 64 * 2**20  # partial rows held at once to average over frames
CORRECTED_BATCH_BYTES = 32 * 2**20  # raw frames read at once for save_corrected


@app.task(name=keys.ASSEMBLE_SCAN)
def assemble_scan(results: list[dict], payload: dict) -> dict:
    try:
        scan = ScanTask.from_dict(_dereference(payload))
        roots = confine.worker_roots()
        _check_paths(scan, roots)
    except RingflowError as exc:
        key = payload.get("ref", {}).get("scan_key")
        if isinstance(exc, OutsideJobError):
            log.error("refused: %s: %s", key, exc)
        return {"status": "failed", "scan": key, "error": type(exc).__name__, "message": str(exc)}
    start = time.monotonic()
    failed = [r for r in results if r.get("status") != "done"]
    if failed:
        return {"status": "incomplete", "scan": scan.scan_key, "failed": failed}
    frames = written_earlier(scan)
    if frames is not None:
        log.info("%s: already written to %s by an earlier delivery", scan.scan_key, scan.output)
        _remove_partials(scan.partials)  # those the earlier delivery had no time to remove
        _finish_scan(payload, scan, scan.config_obj().output.file_mode, roots)
        return {"status": "done", "scan": scan.scan_key, "output": scan.output, "frames": frames}
    try:
        config = scan.config_obj()
        result = build_result(scan, config)
        storage = OutputStorage.from_config(config)
        write_nexus(scan.output, result, storage, config.output.file_mode)
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
    _finish_scan(payload, scan, config.output.file_mode, roots)
    log.info(
        "%s: %d frames written to %s (%s, %d threads) in %.1f s",
        scan.scan_key,
        result.intensity.shape[0],
        scan.output,
        storage.integrated.filters.describe(),
        storage.threads,
        time.monotonic() - start,
    )
    return {
        "status": "done",
        "scan": scan.scan_key,
        "output": scan.output,
        "frames": int(result.intensity.shape[0]),
        "seconds": round(time.monotonic() - start, 3),
    }


def output_entry(scan: ScanTask) -> str:
    """The NXentry of the scan in its output: its entry's name in the master file."""
    return scan.entry or "entry_0000"


def written_earlier(scan: ScanTask) -> int | None:
    """Frames of the output an earlier delivery of this assembly wrote before it removed
    some or all of the partials; None when there is no such output.

    A worker killed while removing the partials, or after and before acknowledging the
    task, gets it again (acks_late): rebuilding would miss the partials already removed.
    The chord runs the assembly only once every file's partial is in, and the output takes
    its final name before the first partial goes, so a partial missing and an output of the
    scan's frame count mean this assembly wrote it.
    """
    if not scan.partials or all(os.path.exists(p) for p in scan.partials):
        return None
    try:
        with h5py.File(scan.output, "r") as h5:
            frames = h5[f"{output_entry(scan)}/{nexus.DATA}/{nexus.SIGNAL}"].shape[0]
    except (OSError, KeyError):
        return None
    return frames if frames == scan.n_frames else None


def _check_paths(scan: ScanTask, roots: confine.WriteRoots | None) -> None:
    """The output and every partial inside the worker's roots, or OutsideJobError."""
    confine.check_output(scan.output, roots)
    for path in scan.partials:
        confine.check_partial(path, roots)


def _dereference(payload: dict) -> dict:
    """The scan's payload: given, or read from the job's registry (see payloads.scan_ref)."""
    ref = payload.get("ref")
    if ref is None:
        return payload
    record = registry.read_scan(app.backend.client, ref["prefix"], ref["job_id"], ref["scan_key"])
    if record is None:
        raise RingflowError(f"job {ref['job_id']}: scan {ref['scan_key']} not in the registry")
    return record["scan"]


def build_result(scan: ScanTask, config: Config) -> ScanResult:
    """The scan's output, its large datasets as streams read from the partials when written.

    Geometry, versions, method and radial range come from the partials' provenance (the
    engines had pyFAI loaded; this task does not load it).
    """
    headers = [read_header(path) for path in scan.partials]
    _check_rows(scan, headers)
    first = headers[0]
    n_frames = sum(h.shape[0] for h in headers)
    monitor = config.integration.monitor_name
    provenance = first.provenance
    return ScanResult(
        entry=output_entry(scan),
        intensity=_rows(headers, "intensity", n_frames),
        sigma=_rows(headers, "sigma", n_frames) if first.has_sigma else None,
        radial=first.radial,
        unit=config.integration.unit,
        azimuthal=first.azimuthal,
        source_file=[h.source_file for h in headers for _ in range(h.shape[0])],
        source_frame=np.concatenate([h.source_frame for h in headers]),
        normalization=np.concatenate([h.normalization for h in headers]) if monitor else None,
        configuration=config.as_ini(hide_secrets=True),
        geometry=provenance["geometry"],
        versions=_versions(provenance["pyFAI"]),
        method=_method(headers),
        radial_range=tuple(float(v) for v in provenance["radial_range"]),
        fingerprint=scan.fingerprint,
        metadata=_metadata(scan, config.output.try_metadata),
        average=_average(headers, config.integration.average_xy, n_frames),
        corrected=_corrected(headers, config, n_frames) if config.output.save_corrected else None,
        applied=Applied(
            solid_angle=config.integration.correct_solid_angle,
            polarization=config.integration.polarization_factor is not None,
            monitor=bool(monitor),
        ),
        pyfai_config=provenance.get("pyfai_config", {}),
        instrument=beamline_of(scan.master),
    )


def beamline_of(path: str) -> str:
    """The beamline a Bliss path names: ``{root}/{proposal}/{beamline}/{session}/RAW_DATA/``
    (the folder two above RAW_DATA); "" when the path has no RAW_DATA."""
    parts = os.path.abspath(path).split(os.sep)
    if "RAW_DATA" not in parts:
        return ""
    index = len(parts) - 1 - parts[::-1].index("RAW_DATA")
    return parts[index - 2] if index >= 3 else ""


def _method(headers: list[PartialHeader]) -> str:
    """The pyFAI method that ran; the files of a scan may have run on different workers (an
    OpenCL device each, or a CPU): then every distinct one, in file order, joined by "; "."""
    methods = [str(h.provenance["method"]) for h in headers]
    return "; ".join(dict.fromkeys(methods))


def _check_rows(scan: ScanTask, headers: list[PartialHeader]) -> None:
    rows = sum(h.shape[0] for h in headers)
    if rows != scan.n_frames:
        raise RingflowError(f"{scan.scan_key}: {rows} rows for {scan.n_frames} frames")
    for head in headers[1:]:
        if head.shape[1:] != headers[0].shape[1:]:
            raise RingflowError(
                f"{head.path}: rows of shape {head.shape[1:]}, "
                f"{headers[0].path} has {headers[0].shape[1:]}"
            )


def _rows(headers: list[PartialHeader], name: str, n_frames: int) -> Stream:
    def slabs():
        for head in headers:
            yield from iter_rows(head.path, name)

    first = headers[0]
    return Stream((n_frames, *first.shape[1:]), first.dtype, slabs)


def _average(headers: list[PartialHeader], kind: str, n_frames: int) -> Average | None:
    """``average_xy``: mean or median over all frames of the rows and of their errors."""
    if not kind:
        return None
    errors = _reduce(headers, "sigma", kind, n_frames) if headers[0].has_sigma else None
    return Average(kind, _reduce(headers, "intensity", kind, n_frames), errors)


def _reduce(headers: list[PartialHeader], name: str, kind: str, n_frames: int) -> np.ndarray:
    """nanmean or nanmedian over the frames of dataset ``name`` of the partials, block by
    block over the bins: memory bounded by AVERAGE_BYTES, whatever the scan's length."""
    reduce = np.nanmean if kind == "mean" else np.nanmedian
    shape = headers[0].shape[1:]
    out = np.empty(shape, dtype=np.float32)
    per_bin = n_frames * headers[0].dtype.itemsize
    for where in bin_blocks(shape, per_bin, AVERAGE_BYTES):
        stacked = np.concatenate([read_block(h.path, name, where) for h in headers])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN bins stay NaN
            out[where] = reduce(stacked, axis=0)
    return out


def bin_blocks(shape: tuple[int, ...], per_bin: int, budget: int) -> list[tuple[slice, ...]]:
    """Index blocks covering ``shape`` (bins, or slices x bins), each at most ``budget`` bytes
    when a bin costs ``per_bin``: whole rows of the last axis when they fit, else pieces."""
    width = max(1, budget // max(1, per_bin))
    last = shape[-1]
    if len(shape) == 1 or width < last:
        rows = [(s,) for s in range(shape[0])] if len(shape) == 2 else [()]
        return [
            (*(slice(r, r + 1) for r in row), slice(b, b + width))
            for row in rows
            for b in range(0, last, width)
        ]
    step = width // last
    return [(slice(s, s + step), slice(None)) for s in range(0, shape[0], step)]


def _corrected(headers: list[PartialHeader], config: Config, n_frames: int) -> CorrectedFrames:
    """Each source frame corrected as the integration saw it, re-read from its Lima file."""
    from .engine import Corrector

    corrector = Corrector(config)
    batch = batch_size(corrector.shape, 4, CORRECTED_BATCH_BYTES)

    def slabs():
        for head in headers:
            yield from _corrected_slabs(corrector, head, batch)

    return CorrectedFrames((n_frames, *corrector.shape), slabs)


def _corrected_slabs(corrector, head: PartialHeader, batch: int):
    start, count = int(head.source_frame[0]), len(head.source_frame)
    if not head.source_dataset:
        raise RingflowError(f"{head.path}: partial from an older ringflow; requeue its file")
    with open_frames(head.source_file, head.source_dataset, corrector.shape) as dset:
        for first, frames in iter_batches(dset, start, count, size=batch):
            corrected = np.empty(frames.shape, dtype=np.float32)
            flags = np.empty(frames.shape, dtype=np.uint8)
            for k, frame in enumerate(frames):
                norm = float(head.normalization[first - start + k])
                corrected[k], flags[k] = corrector.correct(frame, norm)
            yield corrected, flags


def _versions(pyfai: str) -> dict:
    import celery

    from . import __version__

    return {
        "ringflow": __version__,
        "pyFAI": pyfai,
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


def _finish_scan(payload: dict, scan: ScanTask, mode: int, roots=None) -> None:
    """Mark the scan finished in the job's registry, then give ``mode`` to the folders whose
    scans are all finished. Without a registry (a payload given whole) there is nothing to
    do. A failure here leaves folders writable, never fails the written scan."""
    ref = payload.get("ref")
    if ref is None:
        return
    try:
        client = app.backend.client
        scans = registry.mark_scan_finished(client, ref["prefix"], ref["job_id"], scan.scan_key)
        finish_folders(scans, scan.scan_key, mode, roots)
    except Exception as exc:
        log.warning("%s: output folders keep their working mode: %s", scan.scan_key, exc)


def finish_folders(
    scans: dict[str, dict], scan_key: str, mode: int, roots: confine.WriteRoots | None = None
) -> list[str]:
    """chmod ``mode`` (within the umask) on the folders of ``scan_key`` that no unfinished
    scan writes into.

    ``scans`` is the job's registry (scan key -> entry). Each entry's "folders" are those
    the planning created for its output, deepest first (:func:`tasks.jobs.scan_folders`);
    they were kept owner-writable (:func:`tasks.writers.make_dirs`) until now. A scan is
    "finished" once its output and text files are in and its partials removed, so nothing
    more of the job is written into a folder whose scans all are. A scan that failed never
    is, until a requeue completes it: its folders keep their working mode meanwhile. The
    walk stops at the first folder still in use, whose parents then are too, or at the first
    outside the worker's output roots (``roots``: a registry rewritten to name others).
    """
    done = []
    for folder in scans[scan_key].get("folders", []):
        if not confine.inside_outputs(folder, roots):
            if not confine.holds_outputs(folder, roots):  # the output root itself: no alarm
                log.error("refused: %s: chmod of %s, outside the job's outputs", scan_key, folder)
            break
        users = [entry for entry in scans.values() if folder in entry.get("folders", ())]
        if not all(entry.get("finished") for entry in users):
            break
        try:
            os.chmod(folder, user_mode(mode))
        except PermissionError:  # a parent closed by another scan finishing at the same time
            break
        done.append(folder)
    return done


def _remove_partials(paths: list[str]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    folders = {os.path.dirname(p) for p in paths}
    for folder in folders:
        with contextlib.suppress(OSError):
            os.rmdir(folder)
