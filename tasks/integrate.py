"""The file task: integrate every frame of one Lima file into one partial result.

Policy: acks_late with reject_on_worker_lost (set on the app) means a file whose process is
killed is redelivered and redone from the start; its partial is rewritten atomically, so a
redelivery gives the same partial. A transient error (file missing or locked by its writer,
I/O error, broker dropped) is retried with exponential backoff and jitter, up to
``[queue] max_retries``; any other error is caught and returned as a status at once: a raising
chord header would leave the scan's callback failed (Celery's ChordError) or hanging. A
partial outside the worker's job (:mod:`tasks.confine`; messages can be forged) fails at once,
before any folder is made.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import random
import threading
import time
import traceback
from datetime import datetime, timezone

import numpy as np
from celery.signals import worker_init, worker_process_init
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import confine, keys, registry
from .app import app
from .errors import InputDataError, OutsideJobError, RingflowError, TransientInputError
from .gpu import gpu_environment
from .payloads import FileTask

log = logging.getLogger(__name__)
WARM_CONFIG_ENV = "RINGFLOW_WARM_CONFIG"  # the job's INI: processes build its engine at start
# imported by the worker before it forks its processes: what a batched engine loaded from
# the cache uses, and for an engine built from pyFAI the slow, OpenCL-free part of pyFAI's
# imports (scipy.signal parses hundreds of docstrings), paid once instead of in each process
PRELOAD_CACHED = ("scipy.sparse", "h5py", "hdf5plugin", "numba")
PRELOAD = ("scipy.signal", "scipy.stats", *PRELOAD_CACHED)


@worker_init.connect
def _preload(**_) -> None:
    path = os.environ.get(WARM_CONFIG_ENV)
    if not path:
        return
    for module in PRELOAD_CACHED if _engine_cached(path) else PRELOAD:
        with contextlib.suppress(ImportError):
            importlib.import_module(module)


def _engine_cached(path: str) -> bool:
    """The job's engine is in its workspace's cache: its processes will not import pyFAI."""
    from .config import Config
    from .engine_cache import worker_cache

    try:
        cache = worker_cache()
        return cache is not None and cache.holds(Config.from_file(path))
    except (RingflowError, OSError):  # the engine build reports what is wrong
        return False


@worker_process_init.connect
def _warm_engine(**_) -> None:
    """Build the engine while the first task is still on its way (or while the client still
    plans the job); the first task waits for this build instead of starting its own."""
    path = os.environ.get(WARM_CONFIG_ENV)
    if path:
        threading.Thread(
            target=_build_engine, args=(path,), name="ringflow-warm", daemon=True
        ).start()


def _build_engine(path: str) -> None:
    from .config import Config
    from .engine import warm_engine

    try:
        warm_engine(Config.from_file(path))
    except Exception as exc:  # the first file task builds it, and reports what is wrong
        log.info(
            "engine not built ahead from %s: %s",
            path,
            str(exc).splitlines()[0] if str(exc) else exc,
        )


@app.task(name=keys.INTEGRATE_FILE, bind=True)
def integrate_file(self, payload: dict) -> dict:
    task = FileTask.from_dict(payload)
    client = app.backend.client
    start = time.monotonic()
    attempt = self.request.retries + 1
    config = None
    try:
        confine.check_partial(task.partial, confine.worker_roots())  # before any folder
        config = registry.job_config(client, task.prefix, task.job_id, task.config_digest)
        frames = _integrate(task, config, client)
    except Exception as exc:
        failure = _failure(task, exc) | _where(self.request) | {"attempts": attempt, "time": _now()}
        queue = config.queue if config is not None else None
        ttl = _ttl(config)
        if queue is not None and is_transient(exc) and self.request.retries < queue.max_retries:
            delay = backoff(self.request.retries, queue.retry_delay_s, queue.retry_delay_max_s)
            with contextlib.suppress(RedisError):  # the broker itself may be what failed
                registry.mark_retrying(
                    client,
                    task.prefix,
                    task.job_id,
                    task.task_id,
                    failure | {"next_in_s": delay},
                    ttl,
                )
            log.warning(
                "%s: attempt %d failed, retry in %.1f s", failure["message"], attempt, delay
            )
            raise self.retry(countdown=delay, max_retries=queue.max_retries) from None
        if isinstance(exc, OutsideJobError):  # a forged message, or workers of another job
            log.error("refused: %s", failure["message"])
        else:
            log.error("failed after %d attempt(s): %s", attempt, failure["message"])
        registry.durably(
            lambda: registry.mark_failed(
                client, task.prefix, task.job_id, task.task_id, failure, ttl
            )
        )
        return {"status": "failed", "task_id": task.task_id, **failure}
    info = {
        "file": task.path,
        "frames": frames,
        "seconds": round(time.monotonic() - start, 3),
        "attempts": attempt,
        "time_s": round(time.time(), 3),
    }
    where = _where(self.request)
    log.info(
        "%s: %d frames in %.2f s on %s", task.path, frames, info["seconds"], where["worker"]
    )  # beside Celery's received/succeeded lines: the file, its frames, seconds and worker
    registry.durably(
        lambda: registry.mark_done(
            client, task.prefix, task.job_id, task.task_id, info | where, _ttl(config)
        )
    )
    return {"status": "done", "task_id": task.task_id, "file": task.path, "frames": frames}


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: the file may be readable soon, or the broker back."""
    return isinstance(exc, (TransientInputError, RedisConnectionError, RedisTimeoutError))


def backoff(retries: int, base: float, cap: float) -> float:
    """Exponential delay with jitter: spreads retries of files that failed together."""
    return round(min(cap, base * 2**retries) * random.uniform(0.5, 1.0), 2)


def _ttl(config) -> int:
    return registry.JOB_TTL if config is None else config.queue.job_ttl_s


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _where(request) -> dict:
    """The worker node, the queue the task came from and the GPU grant it ran with."""
    delivery = request.delivery_info or {}
    return {
        "worker": request.hostname,
        "queue": delivery.get("routing_key"),
        "gpus": gpu_environment(),
    }


def _integrate(task: FileTask, config, client) -> int:
    def count(frames: int) -> None:  # a live counter: a broker restarting must not fail a file
        with contextlib.suppress(RedisConnectionError, RedisTimeoutError):
            registry.add_frames(client, task.prefix, task.job_id, task.scan_key, frames)

    monitor = None
    if task.monitor_digest:
        monitor = registry.file_monitor(
            client, task.prefix, task.job_id, task.task_id, task.monitor_digest
        )
    return integrate_to_partial(task, config, count, monitor)


def integrate_to_partial(
    task: FileTask, config, on_frames=None, monitor: list[float] | None = None
) -> int:
    """The file task's work without its bookkeeping: frames in, partial out (benchmarks too).

    ``on_frames(n)`` is told after each batch of n frames is integrated; ``monitor``: the
    frames' monitor values, None for no normalisation.
    """
    from .discovery import check_monitor
    from .engine import engine_for  # pyFAI loads here, in the worker's child process
    from .partials import partial_writer
    from .readers import RING, BatchReader, open_frames

    engine = engine_for(config)
    if task.n_frames == 0:
        raise InputDataError(task.path, f"no frames in {task.dataset}")
    norms = np.ones(task.n_frames) if monitor is None else np.asarray(monitor, float)
    check_monitor(norms, f"{task.path}: monitor")  # planning checked it; a message may be forged
    with open_frames(task.path, task.dataset, engine.shape) as dset:
        # read ahead only with more than one core: on one, a read-ahead thread only takes
        # turns with the integration, and its ring of buffers costs batch size
        ahead = engine.threads > 1
        batch = engine.batch_size(dset.dtype.itemsize, RING if ahead else 1)
        reader = BatchReader(dset, task.src_start, task.n_frames, batch, engine.threads, ahead)
        with partial_writer(
            task.partial,
            task.n_frames,
            engine.row_shape,
            engine.has_sigma,
            radial=engine.radial,
            azimuthal=engine.azimuthal,
            source_file=task.path,
            source_dataset=task.dataset,
            source_frame=np.arange(task.src_start, task.src_start + task.n_frames),
            normalization=norms,
            provenance=engine.provenance,
        ) as out:
            for first, frames in reader:
                row = first - task.src_start
                result = engine.integrate_batch(frames, norms[row : row + len(frames)])
                out.write(row, result.intensity, result.sigma)
                if on_frames is not None:
                    on_frames(len(frames))
    return task.n_frames


def _failure(task: FileTask, exc: Exception) -> dict:
    if isinstance(exc, RingflowError):  # named after the file it failed, if it is not yet
        message = str(exc) if task.path in str(exc) else f"{task.path}: {exc}"
    else:  # not a user mistake: keep the traceback for the registry and the worker log
        log.exception("unexpected error integrating %s", task.path)
        message = f"{task.path}: {type(exc).__name__}: {exc}"
    return {
        "file": task.path,
        "scan": task.scan_key,
        "error": type(exc).__name__,
        "message": message.splitlines()[0] if message else type(exc).__name__,
        "traceback": "".join(traceback.format_exception(exc)[-3:]),
    }
