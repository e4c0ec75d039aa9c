"""ringflow run: integrate a configuration's dataset on this machine."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path

import typer

from tasks.config import Config
from tasks.errors import RingflowError
from tasks.jobs import JobPlan, check_plan, plan_job
from worker_launcher.run import run_plan, services_ahead
from worker_launcher.watch import STOP

from .common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    exit_interrupted,
    fail,
    load_config,
    say,
    say_recovery,
    user_errors,
)
from .progress import job_progress, report, say_phase


def run(
    config: Path = typer.Argument(..., metavar="CONFIG", help="Configuration file (INI)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary as the last line."),
) -> None:
    """Integrate every scan of the configuration with local workers (embedded Redis default).

    Example: ringflow run my.ini
    """
    code = execute(load_config(config), as_json)
    if code == EXIT_INTERRUPTED:
        exit_interrupted()
    raise typer.Exit(code)


def execute(config: Config, as_json: bool = False) -> int:
    """Plan, run and report a job; returns the exit code."""
    install_interrupt_handlers()
    try:
        say_phase("starting the broker and the local workers", as_json)
        with user_errors(), services_ahead(config) as services:
            say_phase("planning: finding the scans and checking the inputs", as_json)
            plan = plan_or_fail(config, check_device=True)
            with job_progress(plan, quiet=as_json) as update:
                summary = run_plan(config, plan, update, services, say_recovery)
    except KeyboardInterrupt:
        ignore_further_interrupts()
        say("interrupted", "workers and broker stopped")
        return EXIT_INTERRUPTED
    report(summary, as_json)
    if plan.scans:
        say(
            "workspace", f"{plan.workspace} (worker logs in {os.path.join(plan.workspace, 'logs')})"
        )
    if not summary.ok and plan.scans:
        say(
            "hint",
            f"see ringflow status {config.source} {summary.job_id}; once the files are "
            f"fixed: ringflow requeue {config.source} {summary.job_id} --failed",
        )
    return 0 if summary.ok else EXIT_FAILED


def plan_or_fail(config: Config, check_device: bool) -> JobPlan:
    """Check geometry and corrections, discover the scans; exit 2 on a user mistake.

    ``check_device``: this machine integrates (``ringflow run``'s one local CPU worker): say
    how its workers will run here (:func:`say_local_notes`).
    """
    try:
        shape = checked_detector_shape(config, build_ahead=check_device)
        if check_device:
            say_local_notes(config, [])
        plan = plan_job(config, detector_shape=shape)
        for warning in plan.warnings:  # inputs left out, leftovers removed
            say("warning", warning)
        check_plan(plan)
    except RingflowError as exc:
        fail(exc, EXIT_USAGE)
    return plan


def checked_detector_shape(config: Config, build_ahead: bool = False) -> tuple[int, ...]:
    """The detector's shape, once the geometry and corrections are checked: by pyFAI, or by
    the engine cached in the workspace (built from these very files, dates and sizes
    included), which spares this process pyFAI's imports while the workers start.

    ``build_ahead`` (``ringflow run``, whose workers are this machine's): without a cached
    engine, build it here while the workers start, once, instead of in each of their
    processes; they wait for it (:meth:`tasks.engine_cache.EngineCache.building`).
    """
    from tasks import engine_cache

    cache = None
    with contextlib.suppress(RingflowError):  # no workspace yet: pyFAI checks, as below
        cache = engine_cache.workspace_cache(config)
        cached = cache.shape_of(config)
        if cached is not None:
            return cached
    if not (build_ahead and cache is not None and engine_cache.batchable(config)):
        return _shape_from_pyfai(config)
    from tasks.engine import check_engine_fits

    with cache.building(config) as mine:
        shape = _shape_from_pyfai(config)
        with contextlib.suppress(RingflowError):  # too big: planning says so, nothing built
            check_engine_fits(config, shape)
            if mine:
                engine_cache.build_ahead(config, cache)
    return shape


def _shape_from_pyfai(config: Config) -> tuple[int, ...]:
    from tasks.engine import load_corrections, load_geometry

    ai = load_geometry(config.integration)
    load_corrections(config.integration, ai.detector.shape)
    return tuple(ai.detector.shape)


def say_local_notes(config: Config, gpus: list[str]) -> None:
    """:func:`worker_launcher.local.local_notes`, each a ``note:`` line; for ``run``,
    ``workers local`` and ``requeue``."""
    from worker_launcher.local import local_notes

    for note in local_notes(config, gpus):
        say("note", note)


def interrupt(signum, frame):
    STOP.set()  # remembered: Python drops a KeyboardInterrupt raised inside a __del__
    raise KeyboardInterrupt


def install_interrupt_handlers() -> None:
    """Ctrl-C and SIGTERM both stop the command cleanly, even if the first raise is lost."""
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    sys.unraisablehook = _quiet_lost_interrupt


def _quiet_lost_interrupt(unraisable) -> None:
    """An interrupt raised inside a finalizer or weakref callback is dropped by Python, which
    prints it with a traceback; STOP remembers it and the command stops at its next check,
    so it is not shown. Anything else is reported as Python would."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt) and STOP.is_set():
        return
    sys.__unraisablehook__(unraisable)


def ignore_further_interrupts() -> None:
    """Once the command is stopping, another Ctrl-C must not turn into a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
