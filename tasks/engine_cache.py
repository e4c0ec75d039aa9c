"""Engines kept on disk: one integration's CSR matrix and preprocessing, built once and loaded
by every later engine process, of this job and of later ones, without pyFAI.

Building an engine costs each process seconds before its first frame: pyFAI's imports, the
geometry, the CSR matrix (the same in every process), the correction arrays. A cache entry
holds what the batched path needs from all of that as plain ``.npy`` arrays and a JSON
description (read with ``allow_pickle=False``); loading it takes a fraction of a second.
Only batched engines (pyFAI's cython CSR engine) are kept: the per-frame paths need pyFAI.

An entry is a folder ``<workspace>/engines/<key>``, the key a digest of everything that
changes the numbers (the integration section with its input files' dates and sizes, the CPU
fallback, the pyFAI and numpy versions, this format). It is written in a temporary folder and
renamed, so an entry is whole or absent; leftovers of a killed writer are removed by the next
one. The newest :data:`KEEP` entries are kept.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import numpy as np

from .batched import ERROR_MODELS, BatchInputs, BatchIntegrator, BatchResult, batcher_for
from .config import Config

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger(__name__)
FORMAT = 1  # bump when an entry's content changes meaning
KEEP = 4  # entries kept per workspace, newest first
STALE_SECONDS = 600.0  # a temporary folder this old belongs to a writer that died
BUILD_WAIT = 120.0  # seconds an engine process waits for another process's build at most
ENGINES_FOLDER = "engines"  # beside <workspace>/partials
# frame types whose pyFAI dummy is recorded: Lima's integers and floats
DTYPES = tuple(
    np.dtype(t).str
    for t in ("int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64")
    + ("float32", "float64")
)
_ARRAYS = ("data", "indices", "indptr", "dark", "flat", "normalization", "dark_variance")


def cache_key(config: Config) -> str:
    """Digest of what an entry's numbers depend on."""
    content = {
        "integration": config.integration_fingerprint(),
        "cpu_fallback": config.computations.cpu_fallback,
        "versions": _versions(),
        "format": FORMAT,
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


@functools.cache
def _versions() -> dict[str, str]:
    """The installed pyFAI and numpy, read once per process: a key is asked for several times
    per engine (marker, entry, load, save) and each read scans the installed packages."""
    return {name: importlib.metadata.version(name) for name in ("pyFAI", "numpy")}


def batchable(config: Config) -> bool:
    """The configuration's engine is a batched one, as far as the configuration tells (pyFAI
    may still build no CSR matrix): cython CSR, no trimming, an error model a batch keeps."""
    c = config.integration
    return (
        not c.trim_method
        and c.ai_method == "cython"
        and (c.error_model or "none").lower() in ERROR_MODELS
    )


def build_ahead(config: Config, cache: EngineCache) -> str | None:
    """Build ``config``'s engine in this process and keep it, for engine processes that start
    meanwhile (see :meth:`EngineCache.building`); the entry's path, or None.

    An optimisation only: whatever fails here is left to the engines, which build their own
    and report it per file.
    """
    from .engine import Engine

    try:
        return cache.save(config, Engine(config, threads=1))
    except Exception as exc:  # noqa: BLE001  (the engines report it, per file)
        log.info("engine not built ahead: %s", exc)
        return None


def worker_cache() -> EngineCache | None:
    """The cache of this worker's job: ``engines`` beside its partials folder; None outside a
    worker started by ringflow (nothing is written where no job's folders are known)."""
    from .confine import worker_roots
    from .errors import OutsideJobError

    try:
        roots = worker_roots()
    except OutsideJobError:
        return None
    if roots is None or not roots.partials:
        return None
    return EngineCache(os.path.join(os.path.dirname(roots.partials[0]), ENGINES_FOLDER))


def workspace_cache(config: Config) -> EngineCache:
    """The cache of ``config``'s workspace, as the client finds it (the workers find the same
    folder from their write roots)."""
    from .outputs import workspace

    return EngineCache(os.path.join(workspace(config), ENGINES_FOLDER))


@dataclass(frozen=True)
class Snapshot:
    """What a batched engine needs besides its arrays, as JSON."""

    shape: tuple[int, ...]
    row_shape: tuple[int, ...]
    has_sigma: bool
    provenance: dict
    dummies: dict[str, list]  # dtype str -> [dummy, delta] (None: no dummy)
    pixels: int
    poisson: bool
    empty: float
    is_2d: bool


class CachedEngine:
    """A batched engine loaded from the cache: the surface of :class:`tasks.engine.Engine`
    that file tasks use, without pyFAI. A frame type without a recorded dummy builds the
    full engine."""

    why_not_batched = ""

    def __init__(self, config: Config, snapshot: Snapshot, inputs: BatchInputs, axes: tuple):
        from .engine import engine_threads

        self.full_config = config
        self.config = config.integration
        self.threads = engine_threads(config)
        self.fused: bool | None = None
        self.memory = config.computations.engine_memory_mb * 2**20
        self.snapshot = snapshot
        self.inputs = inputs
        self.shape = snapshot.shape
        self.row_shape = snapshot.row_shape
        self.has_sigma = snapshot.has_sigma
        self.is_2d = snapshot.is_2d
        self.provenance = snapshot.provenance
        self.radial, self.azimuthal = axes
        self._batchers: dict[str, BatchIntegrator] = {}
        self._full: Engine | None = None

    def batch_size(self, itemsize: int, buffers: int) -> int:
        from .engine import frames_per_batch

        return frames_per_batch(self, itemsize, buffers)

    def integrate_batch(self, frames: np.ndarray, monitor: np.ndarray) -> BatchResult:
        dtype = frames.dtype.str
        if dtype not in self.snapshot.dummies:
            return self._full_engine().integrate_batch(frames, monitor)
        if dtype not in self._batchers:
            self._batchers.clear()  # one frame type at a time, as the full engine
            dummy, delta = self.snapshot.dummies[dtype]
            self._batchers[dtype] = batcher_for(self.inputs, dummy, delta, self.threads, self.fused)
        return self._batchers[dtype].integrate(frames, monitor)

    def _full_engine(self) -> Engine:
        from .engine import Engine

        if self._full is None:
            self._full = Engine(self.full_config, self.threads, self.fused)
        return self._full


class EngineCache:
    """The entries of one folder."""

    def __init__(self, folder: str):
        self.folder = folder

    def _marker(self, config: Config) -> str:
        return os.path.join(self.folder, f".{cache_key(config)}.building")

    @contextlib.contextmanager
    def building(self, config: Config):
        """This process builds ``config``'s entry: engine processes starting meanwhile wait
        for it (:meth:`wait_for_builder`) instead of each building the same matrix. Yields
        False, and marks nothing, if another live process is building it."""
        path = self._marker(config)
        try:
            os.makedirs(self.folder, mode=0o700, exist_ok=True)
            pid = _builder_pid(path)
            if pid is not None and not _alive(pid):  # not an empty marker: one just made
                with contextlib.suppress(OSError):
                    os.remove(path)  # its builder died
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except OSError:  # another builder, or no workspace to write (planning says why)
            yield False
            return
        with os.fdopen(fd, "w") as out:
            out.write(str(os.getpid()))
        try:
            yield True
        finally:
            with contextlib.suppress(OSError):
                os.remove(path)

    def wait_for_builder(self, config: Config, timeout: float = BUILD_WAIT) -> bool:
        """Wait while a live process builds ``config``'s entry (``timeout`` at most); whether
        the entry is there."""
        path = self._marker(config)
        deadline = time.monotonic() + timeout
        waited = False
        while time.monotonic() < deadline:
            if not _builder_alive(path):
                break
            waited = True
            time.sleep(0.05)
        if waited:
            log.info("waited for process building the engine in %s", self.folder)
        return self.holds(config)

    def holds(self, config: Config) -> bool:
        return os.path.isfile(os.path.join(self.folder, cache_key(config), "meta.json"))

    def shape_of(self, config: Config) -> tuple[int, ...] | None:
        """The detector shape of ``config``'s entry; None without a readable one."""
        try:
            with open(os.path.join(self.folder, cache_key(config), "meta.json")) as src:
                meta = json.load(src)
            return tuple(int(n) for n in meta["shape"]) if meta["format"] == FORMAT else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def load(self, config: Config) -> CachedEngine | None:
        """The cached engine of ``config``, or None (absent, or unreadable: rebuilt)."""
        path = os.path.join(self.folder, cache_key(config))
        if not os.path.isdir(path):
            return None
        try:
            engine = _read_entry(path, config)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("engine cache %s not used (%s): building the engine", path, exc)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # kept among the newest
        log.info("engine loaded from cache %s in pid %d", path, os.getpid())
        return engine

    def save(self, config: Config, engine: Engine) -> str | None:
        """Keep ``engine`` (a batched one) under its key; the entry's path, None if the
        folder cannot be written (the job goes on without a cache)."""
        if engine.why_not_batched:
            return None
        key = cache_key(config)
        path = os.path.join(self.folder, key)
        if os.path.isdir(path):
            return path
        try:
            os.makedirs(self.folder, mode=0o700, exist_ok=True)
            self._remove_leftovers()
            tmp = tempfile.mkdtemp(prefix=f".{key}.", suffix=".tmp", dir=self.folder)
            try:
                _write_entry(tmp, engine)
                os.rename(tmp, path)
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
                if not os.path.isdir(path):  # not another process's entry first: a failure
                    raise
            self._keep_newest()
        except OSError as exc:
            log.warning("engine not kept in %s: %s", self.folder, exc)
            return None
        log.info("engine kept in cache %s", path)
        return path

    def _remove_leftovers(self) -> None:
        now = time.time()
        for name in os.listdir(self.folder):
            path = os.path.join(self.folder, name)
            if name.startswith(".") and name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    if now - os.path.getmtime(path) > STALE_SECONDS:
                        shutil.rmtree(path)
            elif name.endswith(".building") and name.startswith(".") and not _builder_alive(path):
                with contextlib.suppress(OSError):  # its builder died
                    os.remove(path)

    def _keep_newest(self) -> None:
        entries = []
        for name in os.listdir(self.folder):
            path = os.path.join(self.folder, name)
            if not name.startswith(".") and os.path.isdir(path):
                with contextlib.suppress(OSError):
                    entries.append((os.path.getmtime(path), path))
        for _, path in sorted(entries, reverse=True)[KEEP:]:
            shutil.rmtree(path, ignore_errors=True)


def _builder_pid(marker: str) -> int | None:
    try:
        with open(marker) as src:
            return int(src.read().strip() or 0) or None
    except (OSError, ValueError):
        return None


def _builder_alive(marker: str) -> bool:
    """The marker names a process, and that process runs."""
    pid = _builder_pid(marker)
    return pid is not None and _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _private(path: str, mode: str = "wb"):
    """A new file only its user can read, as everything in the workspace."""
    return open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), mode)


def _save(folder: str, name: str, array: np.ndarray) -> None:
    with _private(os.path.join(folder, f"{name}.npy")) as out:
        np.save(out, array, allow_pickle=False)


def _write_entry(folder: str, engine: Engine) -> None:
    inputs = engine.batch_inputs
    for name in _ARRAYS:
        array = getattr(inputs, name)
        if array is not None:
            _save(folder, name, array)
    _save(folder, "radial", engine.radial)
    if engine.azimuthal is not None:
        _save(folder, "azimuthal", engine.azimuthal)
    detector = engine.ai.detector
    dummies = {}
    for dtype in DTYPES:
        dummy, delta = detector.get_dummies(np.dtype(dtype))
        dummies[dtype] = [
            None if dummy is None else float(dummy),
            None if delta is None else float(delta),
        ]
    snapshot = Snapshot(
        shape=tuple(engine.shape),
        row_shape=tuple(engine.row_shape),
        has_sigma=engine.has_sigma,
        provenance=engine.provenance,
        dummies=dummies,
        pixels=inputs.pixels,
        poisson=inputs.poisson,
        empty=inputs.empty,
        is_2d=engine.is_2d,
    )
    meta = {f.name: getattr(snapshot, f.name) for f in fields(Snapshot)} | {"format": FORMAT}
    with _private(os.path.join(folder, "meta.json"), "w") as out:
        json.dump(meta, out)


def _read_entry(folder: str, config: Config) -> CachedEngine:
    with open(os.path.join(folder, "meta.json")) as src:
        meta = json.load(src)
    if meta.pop("format", None) != FORMAT:
        raise ValueError("another cache format")
    snapshot = Snapshot(
        **meta | {"shape": tuple(meta["shape"]), "row_shape": tuple(meta["row_shape"])}
    )

    def array(name: str) -> np.ndarray | None:
        path = os.path.join(folder, f"{name}.npy")
        # read whole, writable: numba compiles (and caches) its kernel for writable arrays
        return np.load(path, allow_pickle=False) if os.path.exists(path) else None

    arrays = {name: array(name) for name in _ARRAYS}
    if any(arrays[name] is None for name in ("data", "indices", "indptr", "normalization")):
        raise ValueError("an array is missing")
    inputs = BatchInputs(
        **arrays,
        pixels=snapshot.pixels,
        poisson=snapshot.poisson,
        empty=snapshot.empty,
        out_shape=snapshot.row_shape,
    )
    return CachedEngine(config, snapshot, inputs, (array("radial"), array("azimuthal")))
