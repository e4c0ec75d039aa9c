"""Where results go: output folders mirroring RAW_DATA, file names, and existing_output policy."""

from __future__ import annotations

import os
from pathlib import Path

from .config import Config
from .discovery import Scan, expand_locations
from .errors import OutputError
from .writers import read_fingerprint

RAW, PROCESSED = "RAW_DATA", "PROCESSED_DATA"


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
        return os.path.join(config.output.location, ".ringflow")
    files, problems = expand_locations(config.dataset.location)
    if not files:
        raise problems[0]
    return str(output_folder(config, files[0]) / ".ringflow")


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
        return os.path.join(config.output.location, ".ringflow")
    return os.path.join(os.path.expanduser("~"), ".ringflow", config.queue.queue_prefix)
