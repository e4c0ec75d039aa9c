"""Where results go: output folders mirroring RAW_DATA, file names, and existing_output policy."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from .config import Config
from .discovery import Scan, expand_locations
from .errors import OutputError
from .writers import read_fingerprint

RAW, PROCESSED = "RAW_DATA", "PROCESSED_DATA"
WORKSPACE_NAME = ".ringflow"  # the workspace's folder where ``workspace_path`` is not set


def output_folder(config: Config, master: str) -> Path:
    """PROCESSED_DATA/<path below RAW_DATA>, or [output] location/<path below RAW_DATA>."""
    folder = Path(master).resolve().parent
    parts = folder.parts
    location = config.output.location
    if RAW in parts:
        cut = len(parts) - 1 - parts[::-1].index(RAW)
        relative = Path(*parts[cut + 1 :]) if cut + 1 < len(parts) else Path()
        root = Path(location) if location else Path(*parts[:cut], PROCESSED)
        return root / relative
    return Path(location) / folder.name if location else folder


def output_root(config: Config, folder: str) -> str:
    """The folder every output of inputs below ``folder`` lies under, by the rule of
    :func:`output_folder`: ``[output] location``, else the experiment's PROCESSED_DATA (beside
    the last RAW_DATA of ``folder``), else ``folder`` itself (outputs beside their inputs)."""
    if config.output.location:
        return config.output.location
    parts = Path(folder).parts
    if RAW in parts:
        cut = len(parts) - 1 - parts[::-1].index(RAW)
        return str(Path(*parts[:cut], PROCESSED))
    return folder


def output_path(config: Config, scan: Scan) -> str:
    """azint_<dataset>_<scan>_<detector>.h5 (azint_<lima file>.h5 for a plain Lima file)."""
    stem = Path(scan.master).stem
    detector = config.integration.detector_name
    if scan.entry:
        name = f"azint_{stem}_{scan.label}" + (f"_{detector}" if detector else "")
    else:
        name = f"azint_{stem}"
    return str(output_folder(config, scan.master) / f"{name}.h5")


def workspace(config: Config) -> str:
    """Folder for the partial results, logs and embedded broker data of a config's jobs.

    Known from the configuration and the first dataset file's path alone, so that ``status``
    and ``requeue`` find a finished run's broker without discovering any scan: the
    ``workspace_path``, else ``.ringflow`` in the output location or the first file's output
    folder.
    """
    if config.computations.workspace_path:
        return config.computations.workspace_path
    if config.output.location:
        return os.path.join(config.output.location, WORKSPACE_NAME)
    files, problems = expand_locations(config.dataset.location)
    if not files:
        raise problems[0]
    return str(output_folder(config, files[0]) / WORKSPACE_NAME)


def must_process(config: Config, path: str, fingerprint: str) -> bool:
    """Apply [output] existing_output to an existing output; raise if it forbids going on."""
    if not os.path.exists(path):
        return True
    policy = config.output.existing_output
    if policy == "overwrite":
        return True
    if policy == "raise":
        raise OutputError(path, "output exists and [output] existing_output = raise")
    if policy == "skip":
        if read_fingerprint(path) == fingerprint:
            return False
        raise OutputError(
            path,
            "output exists but was made with another configuration; existing_output = skip "
            "keeps it: set existing_output = overwrite to reprocess",
        )
    # reprocess_if_conffile_more_recent
    if not config.source or not os.path.exists(config.source):
        return True
    return os.path.getmtime(config.source) > os.path.getmtime(path)


def deployment_dir(config: Config) -> str:
    """Folder of a deployment's worker scripts, SLURM logs and broker URL file.

    Known without discovering any scan, so ``workers submit`` can run before ``enqueue``;
    it must be on a file system the worker nodes share (the home folder by default).
    """
    if config.computations.workspace_path:
        return config.computations.workspace_path
    if config.output.location:
        return os.path.join(config.output.location, WORKSPACE_NAME)
    return os.path.join(os.path.expanduser("~"), WORKSPACE_NAME, config.queue.queue_prefix)


# tempfile.mkstemp's names, as tasks.writers.replacing makes them: ".<name>.XXXXXXXX.tmp"
TEMP_RANDOM = 8
TEMP_EXTRA = len("..") + TEMP_RANDOM + len(".tmp")
NAME_MAX, PATH_MAX = 255, 4096  # Linux's limits where the file system does not say


def temporary_name(name: str) -> str:
    return f".{name}.{'X' * TEMP_RANDOM}.tmp"


def check_path_lengths(paths: list[str], source: str) -> None:
    """Every path ringflow will write for ``source`` (outputs, partials and the temporary
    names they are written under) fits the file system: each name within NAME_MAX bytes, the
    whole within PATH_MAX. Found while planning, not by a worker after the integration."""
    for path in paths:
        folder, name = os.path.split(path)
        name_max, path_max = _limits(folder)  # the name and its temporary: one folder
        for written in (path, os.path.join(folder, temporary_name(name))):
            for part in Path(written).parts:
                size = len(os.fsencode(part))
                if size > name_max:
                    raise OutputError(
                        source,
                        f"the file name {_shortened(part)} it needs is {size} bytes, more than "
                        f"the {name_max} a file name may have (NAME_MAX): shorten its name",
                    )
            size = len(os.fsencode(written))
            if size > path_max:
                raise OutputError(
                    source,
                    f"the path {_shortened(written)} it needs is {size} bytes, more than the "
                    f"{path_max} a path may have (PATH_MAX)",
                )


def _limits(folder: str) -> tuple[int, int]:
    """NAME_MAX and PATH_MAX of the nearest existing folder's file system."""
    path = os.path.abspath(folder)
    while not os.path.isdir(path):
        path = os.path.dirname(path)
    try:
        return os.pathconf(path, "PC_NAME_MAX"), os.pathconf(path, "PC_PATH_MAX")
    except (OSError, ValueError):
        return NAME_MAX, PATH_MAX


def _shortened(text: str, keep: int = 40) -> str:
    return text if len(text) <= 2 * keep else f"{text[:keep]}...{text[-keep:]}"


def leftover_temporaries(outputs: list[str], folders: list[str], since: float) -> list[str]:
    """Temporary files a killed writer left: ``.<name>.XXXXXXXX.tmp`` of each output beside
    it, and of any ``.h5`` partial in ``folders``, last written before ``since`` and open in
    no process of this machine. Their names are ringflow's own: nothing else matches."""
    found = []
    by_folder: dict[str, list[str]] = {}
    for output in outputs:
        by_folder.setdefault(os.path.dirname(output), []).append(os.path.basename(output))
    patterns = [(folder, _temporary_pattern(names)) for folder, names in by_folder.items()]
    partial = re.compile(rf"^\..+\.h5\.[a-z0-9_]{{{TEMP_RANDOM}}}\.tmp$")
    patterns += [(folder, partial) for folder in folders]
    for folder, pattern in patterns:
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        found += [os.path.join(folder, n) for n in names if pattern.match(n)]
    stale = [path for path in found if _written_before(path, since)]
    busy = _open_files(set(stale)) if stale else set()
    return sorted(path for path in stale if path not in busy)


def _temporary_pattern(names: list[str]) -> re.Pattern:
    """The output's own temporaries, and its .xye text files' (azintNN_ for cakes)."""
    stems = []
    for name in names:
        stem = name[:-3] if name.endswith(".h5") else name
        stems += [re.escape(name), re.escape(stem) + r"\.xye"]
        stems.append(re.escape(stem).replace("azint", r"azint\d\d", 1) + r"\.xye")
    return re.compile(rf"^\.(?:{'|'.join(stems)})\.[a-z0-9_]{{{TEMP_RANDOM}}}\.tmp$")


def _written_before(path: str, since: float) -> bool:
    try:
        return os.lstat(path).st_mtime < since
    except OSError:
        return False


def _open_files(paths: set[str]) -> set[str]:
    """Those of ``paths`` some process of this machine holds open (its /proc fds)."""
    busy = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        fds = f"/proc/{pid}/fd"
        try:
            names = os.listdir(fds)
        except OSError:  # gone, or not ours to see
            continue
        for fd in names:
            try:
                link = os.readlink(os.path.join(fds, fd))
            except OSError:
                continue
            if link in paths:
                busy.add(link)
    return busy


def leftover_cutoff(config: Config, started: float) -> float:
    """Temporaries last written before this are a killed writer's. On the embedded broker
    only this machine's processes write the job's files (and :func:`leftover_temporaries`
    sees those that hold one open): the command's start. On a shared broker a worker on
    another node may still be writing one: only those older than the longest a task may run
    (``[queue] task_time_limit``, after which Celery kills it)."""
    return started - (config.queue.task_time_limit if config.queue.broker_url else 0)


def remove_leftovers(outputs: list[str], folders: list[str], since: float | None = None) -> list:
    """Remove :func:`leftover_temporaries`; return those removed."""
    removed = []
    for path in leftover_temporaries(outputs, folders, time.time() if since is None else since):
        try:
            os.unlink(path)
        except OSError:
            continue
        removed.append(path)
    return removed
