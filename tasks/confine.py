"""Where a worker may write: the folders of the job it was started for, and nowhere else.

Anyone holding the broker's password can rewrite a task message, and the job's registry in
Redis, so neither decides where a worker writes. The client computes the write roots of the
configuration it starts workers for (:func:`write_roots`); the job script hands them to the
worker in ``$RINGFLOW_WRITE_ROOTS``; each path a task writes or deletes is resolved
(symlinks, ``..``) and checked against them first (:func:`check_partial`,
:func:`check_output`). A Celery worker started without that variable writes nothing.

A task body called in this process (``assemble_scan.run``, an eager ``apply``) is not a
worker: its caller chose its paths, and no root applies unless the variable is set.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
from dataclasses import asdict, dataclass, fields

from celery.signals import worker_init

from .config import Config
from .errors import OutsideJobError, RingflowError
from .outputs import WORKSPACE_NAME, output_root, workspace

log = logging.getLogger(__name__)
WRITE_ROOTS_ENV = "RINGFLOW_WRITE_ROOTS"
_in_worker = False


@dataclass(frozen=True)
class WriteRoots:
    """The folders of one configuration's jobs, resolved."""

    outputs: tuple[str, ...]  # every scan's output lies below one of these
    partials: tuple[str, ...]  # <workspace>/partials
    # partials may also lie in <output folder>/<one of these>/... below an output root
    partial_folders: tuple[str, ...] = ()

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls, text: str) -> WriteRoots:
        try:
            data = json.loads(text)
            return cls(**{f.name: tuple(map(str, data.get(f.name, ()))) for f in fields(cls)})
        except (ValueError, TypeError, AttributeError) as exc:
            raise OutsideJobError(f"${WRITE_ROOTS_ENV} is not valid: {exc}") from None

    def describe(self) -> str:
        below = [f"{r}/**/{sub}" for r in self.outputs for sub in self.partial_folders]
        return ", ".join([*self.outputs, *self.partials, *below]) or "none"


def write_roots(config: Config) -> WriteRoots:
    """The roots of ``config``'s jobs, by the rules that place their files: outputs below
    :func:`tasks.outputs.output_root` of each ``[dataset] location``'s fixed (glob-free)
    folder (for an ESRF layout the experiment's PROCESSED_DATA, so workers kept running serve
    every sample of it); partials in ``<workspace>/partials`` and, when set, in
    ``<output folder>/<partial_files_subfolder>``. Without ``workspace_path`` or ``[output]
    location`` the workspace follows the first dataset file, so any ``.ringflow/partials``
    below an output root is a partials folder too. Needs no dataset file to exist."""
    outputs = [output_root(config, _fixed_folder(loc)) for loc in config.dataset.location]
    folders = [partials_subfolder(config.output.partial_files_subfolder)]
    partials = []
    fixed = config.computations.workspace_path or config.output.location
    with contextlib.suppress(RingflowError):  # no dataset file yet
        partials.append(os.path.join(workspace(config), "partials"))
    if not fixed:
        folders.append(os.path.join(WORKSPACE_NAME, "partials"))
    return WriteRoots(
        tuple(dict.fromkeys(os.path.realpath(p) for p in outputs)),
        tuple(os.path.realpath(p) for p in partials),
        tuple(f for f in folders if f),
    )


def partials_subfolder(value: str) -> str:
    """``[output] partial_files_subfolder`` as a relative path (``./p/`` and ``p`` alike)."""
    return os.path.normpath(value).strip(os.sep) if value.strip() else ""


def _fixed_folder(location: str) -> str:
    """The folder above a location's first glob component (a plain file: its folder)."""
    if not glob.has_magic(location):
        return os.path.dirname(os.path.realpath(location))
    parts = location.split(os.sep)
    first = next(k for k, part in enumerate(parts) if glob.has_magic(part))
    return os.path.realpath(os.sep.join(parts[:first]) or os.sep)


@worker_init.connect
def _started_as_worker(**_) -> None:
    """A Celery worker (and the pool processes it forks) is confined; say so at its start."""
    global _in_worker
    _in_worker = True
    try:
        roots = worker_roots()
        log.info("ringflow worker: writes only below %s", roots.describe())
    except OutsideJobError as exc:
        log.error("ringflow worker: %s", exc)


def worker_roots() -> WriteRoots | None:
    """This process's roots: $RINGFLOW_WRITE_ROOTS; None outside a worker without it.

    A worker without it raises: it was not started by the job script, and writes nothing.
    """
    text = os.environ.get(WRITE_ROOTS_ENV, "")
    if text:
        return WriteRoots.from_env(text)
    if _in_worker:
        raise OutsideJobError(
            f"this worker was started without ${WRITE_ROOTS_ENV} (the job script sets it): "
            "it writes nothing; start workers with ringflow"
        )
    return None


def check_inside(path: str, roots: tuple[str, ...], what: str) -> str:
    """``path`` resolved; OutsideJobError unless it lies strictly below one of ``roots``."""
    real = os.path.realpath(path)
    if not any(_below(real, os.path.realpath(root)) for root in roots):
        raise OutsideJobError(
            f"{path}: {what} outside the job's folders (resolved: {real}; allowed: "
            f"{', '.join(roots) or 'none'}); nothing written"
        )
    return real


def check_partial(path: str, roots: WriteRoots | None) -> None:
    """A file task's partial: below ``<workspace>/partials``, or in a partials subfolder of
    an output folder."""
    if roots is None:
        return
    real = os.path.realpath(path)
    for root in roots.outputs:
        rel = os.path.relpath(real, os.path.realpath(root)).split(os.sep)
        if rel[0] != os.pardir and any(_has_run(rel[:-1], f) for f in roots.partial_folders):
            return
    if not roots.partials:
        raise OutsideJobError(
            f"{path}: partial outside the job's folders (resolved: {real}; allowed: "
            f"{roots.describe()}); nothing written"
        )
    check_inside(path, roots.partials, "partial")


def check_output(path: str, roots: WriteRoots | None) -> None:
    """A scan's output (and the .xye files beside it): an .h5 file below an output root."""
    if roots is None:
        return
    if not path.endswith(".h5"):
        raise OutsideJobError(f"{path}: an output is an .h5 file; nothing written")
    check_inside(path, roots.outputs, "output")


def inside_outputs(folder: str, roots: WriteRoots | None) -> bool:
    """``folder`` lies below an output root and neither holds nor is part of a workspace
    (a folder the assembly may chmod: a forged registry must not open the workspace up)."""
    if roots is None:
        return True
    real = os.path.realpath(folder)
    if WORKSPACE_NAME in real.split(os.sep):
        return False
    for partials in roots.partials:
        space = os.path.dirname(partials)
        if real == space or _below(real, space) or _below(space, real):
            return False
    return any(_below(real, os.path.realpath(r)) for r in roots.outputs)


def holds_outputs(folder: str, roots: WriteRoots | None) -> bool:
    """``folder`` is an output root or above one: where the walk up a scan's folders ends
    by design (it holds the workspace, or other jobs' outputs), not a forged path."""
    if roots is None:
        return False
    real = os.path.realpath(folder)
    return any(
        real == os.path.realpath(r) or _below(os.path.realpath(r), real) for r in roots.outputs
    )


def _below(path: str, root: str) -> bool:
    return path != root and path.startswith(root.rstrip(os.sep) + os.sep)


def _has_run(parts: list[str], folder: str) -> bool:
    """``folder``'s components appear, in order, among ``parts``."""
    want = folder.split(os.sep)
    return any(parts[k : k + len(want)] == want for k in range(len(parts) - len(want) + 1))
