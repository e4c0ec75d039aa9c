"""A ringflow worker whose engine is a stand-in: for ``benchmarks/scale.py`` only.

``celery -A benchmarks.scale_worker worker`` is ringflow's own worker (``tasks.app``, its
file task, registry records, partial files and chord bookkeeping) with one difference: the
engine that turns frames into rows is :class:`StandInEngine`, which waits
``$RINGFLOW_STANDIN_MS_PER_FRAME`` per frame (a GPU engine's time, during which its process
holds no CPU) and returns a row cut from each frame, instead of loading pyFAI. What the
benchmark measures is then everything around the integration.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import numpy as np
from celery.signals import worker_init

import tasks.engine
from tasks.app import app
from tasks.batched import BatchResult

COST_ENV = "RINGFLOW_STANDIN_MS_PER_FRAME"
PROVENANCE_ENV = "RINGFLOW_STANDIN_PROVENANCE"  # JSON: what a real engine would record
SHAPE_ENV = "RINGFLOW_STANDIN_SHAPE"  # the detector's "rows,columns"
BINS = 100
BATCH = 64  # frames

__all__ = ["app"]


@dataclass(frozen=True)
class StandInEngine:
    """What :func:`tasks.integrate.integrate_to_partial` uses of an engine, and nothing else."""

    shape: tuple[int, int]
    ms_per_frame: float
    provenance: dict
    threads: int = 1
    has_sigma: bool = False
    azimuthal: None = None

    @property
    def row_shape(self) -> tuple[int]:
        return (BINS,)

    @property
    def radial(self) -> np.ndarray:
        return np.linspace(0.5, BINS - 0.5, BINS)

    def batch_size(self, itemsize: int, buffers: int = 1) -> int:
        return BATCH

    def integrate_batch(self, frames: np.ndarray, monitor: np.ndarray) -> BatchResult:
        if self.ms_per_frame:
            time.sleep(self.ms_per_frame * len(frames) / 1e3)
        rows = frames.reshape(len(frames), -1)[:, :BINS].astype(np.float32)
        return BatchResult(rows / monitor[:, None].astype(np.float32), None)


def stand_in_engine(config) -> StandInEngine:
    rows, columns = (int(v) for v in os.environ[SHAPE_ENV].split(","))
    return StandInEngine(
        shape=(rows, columns),
        ms_per_frame=float(os.environ.get(COST_ENV, "0")),
        provenance=json.loads(os.environ[PROVENANCE_ENV]),
    )


@worker_init.connect
def _use_stand_in(**_) -> None:
    """In the worker only (importing this module changes nothing elsewhere): the file task
    imports ``engine_for`` from ``tasks.engine`` at each call."""
    tasks.engine.engine_for = stand_in_engine
