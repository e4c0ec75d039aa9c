"""A job: the scans to process, one file task per Lima slice, one chord per scan.

Planning (discovery, output paths, existing_output) happens in the client before anything is
enqueued; problems with single files or scans are collected so the rest of the job runs.

Output folders are created by the planning, owner-writable while the job runs; each scan's
registry entry names those that hold its output, for the assembly to give them their final
``[output] file_mode`` once every scan writing there is finished (see
:func:`tasks.assemble.finish_folders`).
"""

from __future__ import annotations

import contextlib
import functools
import glob
import json
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from . import confine, keys, registry
from .config import Config
from .confine import WriteRoots, partials_subfolder, write_roots
from .discovery import Scan, discover
from .errors import DiscoveryError, InputDataError, RingflowError
from .outputs import (
    check_path_lengths,
    leftover_cutoff,
    must_process,
    output_path,
    remove_leftovers,
    workspace,
)
from .payloads import ConfigRecord, FileTask, ScanTask, digest_of, scan_ref
from .writers import make_dirs

PUBLISH_BATCH = 500  # Redis commands pipelined per round trip when enqueueing


@dataclass
class JobPlan:
    job_id: str
    config: Config
    workspace: str
    scans: list[tuple[ScanTask, list[FileTask]]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # outputs kept by existing_output
    problems: list[RingflowError] = field(default_factory=list)
    created: list[str] = field(default_factory=list)  # folders the planning created
    warnings: list[str] = field(default_factory=list)  # inputs left out, leftovers removed
    frame_shape: tuple[int, ...] = ()  # of the first scan: sizes the engine
    discovered: list[Scan] = field(default_factory=list)  # every scan found, planned or not
    monitors: dict[str, str] = field(default_factory=dict)  # task id -> its monitor values, JSON

    @property
    def file_tasks(self) -> list[FileTask]:
        return [task for _, tasks in self.scans for task in tasks]

    @property
    def n_frames(self) -> int:
        return sum(scan.n_frames for scan, _ in self.scans)

    @functools.cached_property
    def config_record(self) -> ConfigRecord:
        """The configuration as the registry stores it; file tasks carry its digest."""
        return ConfigRecord.of(self.config)


@dataclass(frozen=True)
class PlanWrites:
    """What planning writes: the output folders it creates (``make_dirs(folder, mode)``) and
    the temporaries of killed runs it removes (``remove_leftovers(outputs, folders,
    since)``). ``ringflow check`` plans with stand-ins that only record them."""

    make_dirs: Callable[..., list[str]] = make_dirs
    remove_leftovers: Callable[..., list[str]] = remove_leftovers


def plan_job(
    config: Config,
    detector_shape: tuple[int, int] | None = None,
    job_id: str | None = None,
    writes: PlanWrites = PlanWrites(),
) -> JobPlan:
    """Discover the scans and build every payload; problems are collected, not raised."""
    job_id = job_id or uuid.uuid4().hex[:12]
    started = time.time()
    found = discover(config)
    fingerprint = config.output_fingerprint()
    todo, skipped, problems, created = [], [], list(found.problems), []
    for scan in found.scans:
        try:
            output = _output_if_needed(config, scan, detector_shape, fingerprint, created, writes)
        except RingflowError as exc:
            problems.append(exc)
            continue
        if output:
            todo.append((scan, output))
        else:
            skipped.append(output_path(config, scan))
    space = workspace(config) if found.scans else ""
    plan = JobPlan(job_id, config, space, skipped=skipped, problems=problems, created=created)
    plan.discovered = list(found.scans)
    plan.warnings = list(found.warnings)
    plan.frame_shape = tuple(found.scans[0].frame_shape) if found.scans else ()
    roots = write_roots(config) if todo else None
    for scan, output in todo:
        payloads = _scan_payloads(plan, scan, output, fingerprint)
        try:
            check_path_lengths(_written_paths(plan, payloads), scan.master)
            check_within_roots(payloads, roots)
        except RingflowError as exc:
            problems.append(exc)
            continue
        plan.scans.append(payloads)
    since = leftover_cutoff(config, started)
    removed = writes.remove_leftovers(*_leftover_places(plan), since=since)
    plan.warnings += [f"{path}: removed, a temporary file left by a killed run" for path in removed]
    return plan


def check_within_roots(payloads: tuple[ScanTask, list[FileTask]], roots: WriteRoots) -> None:
    """The workers will refuse a path outside their roots (:mod:`tasks.confine`): say so
    while planning (a symbolic link in the output tree to another disk, for one), not after
    every file of the scan is integrated."""
    scan, files = payloads
    confine.check_output(scan.output, roots)
    for task in files:
        confine.check_partial(task.partial, roots)


def _written_paths(plan: JobPlan, payloads) -> list[str]:
    """What a scan's tasks write, each under a temporary name too: output, text files, partials."""
    from .writers import average_text_paths

    scan, files = payloads
    paths = [scan.output]
    if plan.config.integration.average_xy:
        paths += average_text_paths(scan.output, plan.config.integration.n_slices)
    return paths + [f.partial for f in files]


def remove_run_leftovers(plan: JobPlan) -> list[str]:
    """Once every scan of ``plan`` has its outcome: the temporaries its killed workers left
    (a process killed mid-write, restarted by the supervisor) and the partial folders of this
    job they kept from being removed; returns the files removed. Only files open in no
    process of this machine go (:func:`tasks.outputs.leftover_temporaries`)."""
    outputs, folders = _leftover_places(plan)
    removed = remove_leftovers(outputs, folders, since=time.time())
    mine = {os.path.dirname(f.partial) for _, files in plan.scans for f in files}
    for folder in sorted(mine & set(folders)):
        with contextlib.suppress(OSError):  # not empty: a failed scan's partials, kept
            os.rmdir(folder)
    return removed


def _leftover_places(plan: JobPlan) -> tuple[list[str], list[str]]:
    """The plan's outputs, and the partial folders of their scans in any earlier job."""
    outputs = [scan.output for scan, _ in plan.scans]
    folders = []
    for _, files in plan.scans:
        if not files:
            continue
        stem_dir = os.path.dirname(files[0].partial)  # <base>/<job id>/<output stem>
        base, stem = os.path.dirname(os.path.dirname(stem_dir)), os.path.basename(stem_dir)
        folders += glob.glob(os.path.join(glob.escape(base), "*", glob.escape(stem)))
    return outputs, sorted(set(folders))


def _output_if_needed(
    config: Config, scan: Scan, shape, fingerprint: str, created: list[str], writes: PlanWrites
) -> str | None:
    """The output path if the scan must be processed, None if existing_output keeps it;
    the folders created for it are added to ``created``."""
    if shape and tuple(scan.frame_shape) != tuple(shape):
        raise InputDataError(
            scan.slices[0].path,
            f"frames are {tuple(scan.frame_shape)}, the detector of the "
            f"PONI / [azimuthal integration] detector is {tuple(shape)}",
        )
    output = output_path(config, scan)
    if not must_process(config, output, fingerprint):
        return None
    created += writes.make_dirs(os.path.dirname(output), config.output.file_mode)
    return output


def scan_folders(plan: JobPlan, output: str) -> list[str]:
    """The folders the planning created that hold ``output``, deepest first: the assembly
    gives them ``file_mode`` once their scans are finished. The workspace and the folders
    above it are left out: its broker data, logs and later jobs' partials are written after
    the job, and a mode without the owner's search bit would cut them off."""
    workspace = os.path.abspath(plan.workspace) if plan.workspace else ""
    folder = os.path.abspath(os.path.dirname(output))
    holders = [
        path
        for path in plan.created
        if _inside(folder, path) and not (workspace and _inside(workspace, path))
    ]
    return sorted(holders, key=len, reverse=True)


def _inside(path: str, folder: str) -> bool:
    """``path`` is ``folder`` or below it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _scan_payloads(plan: JobPlan, scan: Scan, output: str, fingerprint: str):
    config, prefix = plan.config, plan.config.queue.queue_prefix
    mapping = config.payload_mapping()
    partial_dir = _partial_dir(plan, scan, output)
    scan_index = len(plan.scans)
    files = []
    for index, piece in enumerate(scan.slices):
        stem = os.path.splitext(os.path.basename(piece.path))[0]
        task_id = f"{plan.job_id}-{scan_index:04d}-{index:04d}"
        monitor_digest = ""
        if scan.monitor is not None:
            values = scan.monitor[piece.scan_start : piece.scan_start + piece.n_frames]
            plan.monitors[task_id] = json.dumps([float(v) for v in values])
            monitor_digest = digest_of(plan.monitors[task_id])
        files.append(
            FileTask(
                job_id=plan.job_id,
                task_id=task_id,
                prefix=prefix,
                scan_key=scan.key,
                index=index,
                path=piece.path,
                dataset=piece.dataset,
                src_start=piece.src_start,
                n_frames=piece.n_frames,
                scan_start=piece.scan_start,
                partial=os.path.join(partial_dir, f"{index:04d}_{stem}_{piece.src_start}.h5"),
                config_digest=plan.config_record.digest,
                monitor_digest=monitor_digest,
            )
        )
    scan_task = ScanTask(
        job_id=plan.job_id,
        prefix=prefix,
        scan_key=scan.key,
        master=scan.master,
        entry=scan.entry,
        label=scan.label,
        output=output,
        n_frames=scan.n_frames,
        partials=[f.partial for f in files],
        config=mapping,
        config_source=config.source,
        fingerprint=fingerprint,
    )
    return scan_task, files


def _partial_dir(plan: JobPlan, scan: Scan, output: str) -> str:
    sub = partials_subfolder(plan.config.output.partial_files_subfolder)
    base = (
        os.path.join(os.path.dirname(output), sub)
        if sub
        else os.path.join(plan.workspace, "partials")
    )
    return os.path.join(base, plan.job_id, os.path.splitext(os.path.basename(output))[0])


def assign_slots(files: list[FileTask], slots: list[int]) -> dict[str, int]:
    """task id -> GPU slot, balancing frame counts: each file goes to the least-loaded slot.

    Files are taken in scan order, so the first scans finish first on every slot.
    """
    load = {slot: 0 for slot in slots}
    assigned = {}
    for task in files:
        slot = min(load, key=lambda s: (load[s], s))
        assigned[task.task_id] = slot
        load[slot] += task.n_frames
    return assigned


def submit(app, plan: JobPlan, slots: list[int] | None = None) -> dict[str, str]:
    """Register the job, then send one chord per scan; returns scan key -> callback task id.

    File tasks go to the queues of ``slots`` (default: slot 0), balanced by frame count.
    Task ids, not AsyncResult objects: those unsubscribe from Redis when garbage-collected,
    which fails noisily once a private broker is stopped.
    """
    prefix = plan.config.queue.queue_prefix
    placement = assign_slots(plan.file_tasks, slots or [0])
    callbacks = {
        scan.scan_key: f"{files[0].task_id.rsplit('-', 1)[0]}-assemble"
        for scan, files in plan.scans
    }
    manifest = {
        task.task_id: task.to_dict() | {"slot": placement[task.task_id]} for task in plan.file_tasks
    }
    scans = {
        scan.scan_key: {
            "scan": scan.to_dict(),
            "callback": callbacks[scan.scan_key],
            "folders": scan_folders(plan, scan.output),
        }
        for scan, _ in plan.scans
    }
    registry.register_job(
        app.backend.client,
        prefix,
        plan.job_id,
        manifest,
        scans,
        plan.config.queue.job_ttl_s,
        plan.config_record,
        {
            task.task_id: plan.monitors[task.task_id]
            for task in plan.file_tasks
            if task.monitor_digest
        },
    )
    send_chords(
        app,
        prefix,
        plan.job_id,
        [
            (scan.scan_key, [manifest[f.task_id] for f in files], callbacks[scan.scan_key])
            for scan, files in plan.scans
        ],
    )
    return callbacks


def send_chords(app, prefix: str, job_id: str, scans: list[tuple[str, list[dict], str]]) -> None:
    """One chord per scan: (scan key, its file payloads each with its "slot", callback id).

    The callback carries a reference to the scan's registered payload, not the payload; all
    messages go through one producer; the argument repr Celery puts in each message's headers
    is the file's path, not the whole payload. Messages are pipelined, and sent when the
    block ends: an error before then sends none of the unflushed ones.
    """
    app.loader.import_default_modules()  # registers the tasks named in app's include
    assemble_scan = app.tasks[keys.ASSEMBLE_SCAN]
    with _pipelined(app) as producer, _no_result_subscriptions(app):
        for scan_key, payloads, callback in scans:
            body = _assembly(assemble_scan, prefix, job_id, scan_key, callback)
            _send_chord(app, producer, prefix, payloads, body)


def _send_chord(app, producer, prefix: str, payloads: list[dict], body) -> None:
    """Send the chord of ``payloads`` (one file task each) and ``body`` as Celery's own
    ``chord(header, body).apply_async()`` does with the Redis backend, without its canvas.

    The canvas clones and deep-copies every header signature, and ``send_task`` routes and
    wraps each one again: together four fifths of the time to enqueue 100,000 files. What a
    worker needs to count the chord is the same either way: the group's size in the backend,
    set before any file can finish, and in every message the group id, the file's index in
    it and the frozen body. Celery builds and publishes each message itself; a test holds
    the messages equal to those of Celery's chord.
    """
    group_id = str(uuid.uuid4())
    body.freeze(body.options["task_id"], group_id=group_id)
    app.backend.set_chord_size(group_id, len(payloads))
    integrate_file = app.tasks[keys.INTEGRATE_FILE]
    for index, payload in enumerate(payloads):
        message = app.amqp.create_task_message(
            payload["task_id"],
            keys.INTEGRATE_FILE,
            (payload,),
            {},
            group_id=group_id,
            group_index=index,
            chord=body,
            reply_to=app.thread_oid,
            time_limit=integrate_file.time_limit,
            soft_time_limit=integrate_file.soft_time_limit,
            create_sent_event=app.conf.task_send_sent_event,
            root_id=payload["task_id"],
            argsrepr=repr(payload["path"]),
            kwargsrepr="{}",
        )
        app.amqp.send_task_message(
            producer,
            keys.INTEGRATE_FILE,
            message,
            queue=keys.gpu_queue(prefix, payload["slot"]),
            declare=[],  # a Redis queue needs no declaring: its first push makes the list
        )


def send_assembly(app, prefix: str, job_id: str, scan_key: str, results: list, callback: str):
    """Send a scan's chord callback by itself, with the file results it would have been given.

    For a chord whose count Celery lost: a worker killed between storing a file's result and
    counting it in the chord leaves the callback never sent (see
    :class:`worker_launcher.recovery.LostCallbacks`).
    """
    app.loader.import_default_modules()
    body = _assembly(app.tasks[keys.ASSEMBLE_SCAN], prefix, job_id, scan_key, callback)
    with _no_result_subscriptions(app):
        body.apply_async((results,))  # prepended to the scan's reference, as a chord does


def _assembly(assemble_scan, prefix: str, job_id: str, scan_key: str, callback: str):
    """The assembly task of one scan, as a chord body: its results come first."""
    return assemble_scan.s(scan_ref(prefix, job_id, scan_key)).set(
        queue=keys.assemble_queue(prefix), task_id=callback, argsrepr=repr(scan_key)
    )


@contextlib.contextmanager
def _pipelined(app):
    """A producer of the app's pool whose publishes in this block are pipelined (kombu >= 5.7:
    one round trip per PUBLISH_BATCH messages); sent one by one where kombu cannot batch."""
    with app.producer_or_acquire() as producer:
        if not hasattr(producer, "batch"):
            yield producer
            return
        with producer.batch(max_size=PUBLISH_BATCH):
            yield producer


@contextlib.contextmanager
def _no_result_subscriptions(app):
    """Sending a task, and the chord's group result, subscribe the client to each task's
    result channel (a Redis round trip each) for ``AsyncResult.get`` to wait on. ringflow's
    client never waits that way: it polls the registry and the callbacks' metadata. With no
    channel opened, the results' ``__del__`` has nothing to unsubscribe later either (it
    would reconnect, noisily, to a broker that may be gone)."""
    consumer = app.backend.result_consumer
    consumer.consume_from = lambda task_id: None  # this instance only, this block
    try:
        yield
    finally:
        del consumer.consume_from


def check_plan(plan: JobPlan) -> None:
    """Raise the first problem when nothing at all can be processed, or when an engine for
    this configuration cannot fit in this machine's memory (estimated; see
    :func:`tasks.engine.engine_memory_estimate`)."""
    if not plan.scans and not plan.skipped:
        raise (
            plan.problems[0]
            if plan.problems
            else DiscoveryError(", ".join(plan.config.dataset.location), "no scan found")
        )
    if plan.scans and plan.frame_shape:
        from .engine import check_engine_fits

        check_engine_fits(plan.config, plan.frame_shape)
