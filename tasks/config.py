"""Typed configuration read from an INI file compatible with ESRF's ``integrator``.

Each INI section is a frozen dataclass; each field carries its INI key, a parser that turns
the text into a typed value (raising ``ValueError`` with the reason), and its documentation,
from which ``ringflow config`` writes the commented template. Read as the integrator reads
its files: no inline comments (a ``#`` or ``;`` inside a value is part of it), a UTF-8 byte
order mark accepted, an empty value meaning "not set" (the key's default; for
``error_model`` and ``polarization_factor``, pyFAI's None), keys in the older sections the
integrator still accepts moved to their section with a warning. Unknown keys are warned
about by name, a key written in the wrong section is an error naming both, and invalid or
unsupported values raise :class:`ConfigError` naming section, key and value. Relative paths
are resolved against the configuration file's folder, ``~`` against the user's home.
"""

from __future__ import annotations

import configparser
import glob
import hashlib
import json
import math
import os
import re
import shlex
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

from .errors import ConfigError

CONFIG_VERSION = 1
BROKER_ENV = "RINGFLOW_BROKER_URL"
PASSWORD_FILE_ENV = "RINGFLOW_BROKER_PASSWORD_FILE"
FLOWER_USER_ENV = "RINGFLOW_FLOWER_USER"
FLOWER_PASSWORD_ENV = "RINGFLOW_FLOWER_PASSWORD"
FLOWER_PASSWORD_FILE_ENV = "RINGFLOW_FLOWER_PASSWORD_FILE"


# --- value parsers: text -> typed value, ValueError with the reason ---------------------------


def _text(value: str) -> str:
    return value.strip()


def _int(minimum: int | None = None) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            number = int(value.strip())
        except ValueError:
            raise ValueError("expected an integer") from None
        if minimum is not None and number < minimum:
            raise ValueError(f"must be >= {minimum}")
        return number

    return parse


def _finite(text: str, what: str = "a number") -> float:
    try:
        number = float(text)
    except ValueError:
        raise ValueError(f"expected {what}") from None
    if not math.isfinite(number):
        raise ValueError(f"expected {what}, not {text.strip()}")
    return number


def _float_or_none(value: str) -> float | None:
    if value.strip().lower() in ("", "none"):
        return None
    return _finite(value, "a finite number or empty")


def _positive_float(value: str) -> float:
    number = _finite(value, "a finite number")
    if number <= 0:
        raise ValueError("must be > 0")
    return number


def _bool(value: str) -> bool:
    text = value.strip().lower()
    if text in ("1", "yes", "y", "true", "on"):
        return True
    if text in ("0", "no", "n", "false", "off", ""):
        return False
    if text.isdigit():
        return int(text) > 0
    raise ValueError("expected 0/1, yes/no or true/false")


def _choice(*allowed: str, aliases: dict[str, str] | None = None) -> Callable[[str], str]:
    table = {a.lower(): a for a in allowed} | {k.lower(): v for k, v in (aliases or {}).items()}

    def parse(value: str) -> str:
        try:
            return table[value.strip().lower()]
        except KeyError:
            raise ValueError(f"allowed values: {', '.join(allowed)}") from None

    return parse


def _numbers(value: str) -> list[float]:
    text = value.strip().strip("()[]").strip()
    if not text:
        return []
    what = "finite numbers separated by commas, e.g. (0.5, 30)"
    return [_finite(part, what) for part in text.split(",") if part.strip()]


def _radial_range(value: str) -> tuple[float, float] | None:
    numbers = _numbers(value)
    if not numbers:
        return None
    if len(numbers) != 2 or not numbers[0] < numbers[1]:
        raise ValueError("expected (min, max) with min < max, or empty")
    return numbers[0], numbers[1]


def _azimuthal_range(value: str) -> tuple[float, float, int]:
    numbers = _numbers(value)
    if len(numbers) != 3 or not numbers[0] < numbers[1]:
        raise ValueError("expected (min, max, n_slices) with min < max, e.g. (-180, 180, 1)")
    if numbers[2] < 1 or numbers[2] != int(numbers[2]):
        raise ValueError("n_slices must be a positive integer")
    return numbers[0], numbers[1], int(numbers[2])


def _globs(value: str) -> tuple[str, ...]:
    items = tuple(part.strip() for part in value.split(",") if part.strip())
    if not items:
        raise ValueError("at least one file or glob is required")
    return items


def _names(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _octal(value: str) -> int:
    text = value.strip().lower().removeprefix("0o")
    if not re.fullmatch(r"[0-7]{1,4}", text):
        raise ValueError("expected an octal file mode such as 755")
    return int(text, 8)


def _int_or_none(value: str) -> int | None:
    return None if value.strip().lower() in ("", "none") else _int()(value)


def _codec(value: str) -> str:
    from .codecs import CODEC_ALIASES, LEVELS

    text = value.strip().lower()
    text = CODEC_ALIASES.get(text, text)
    if text not in LEVELS:
        raise ValueError(f"allowed values: {', '.join(LEVELS)}")
    return text


def _codec_or_empty(value: str) -> str:
    return _codec(value) if value.strip() else ""


def _hdf5_entry(value: str) -> str:
    text = value.strip()
    if text and not re.fullmatch(r"\d+\.\d+", text):
        raise ValueError("expected an entry name such as 1.1, or empty for every N.1 entry")
    return text


def _timelimit(value: str) -> str:
    text = value.strip()
    if not re.fullmatch(r"(\d+-)?\d{1,2}(:\d{2}){0,2}", text):
        raise ValueError("expected a SLURM time such as 01:00:00 or 1-00:00:00")
    return text


def _memory(value: str) -> str:
    text = value.strip()
    if not re.fullmatch(r"\d+\s*[KMGT]?B?", text, flags=re.IGNORECASE):
        raise ValueError("expected a size such as 100GB")
    return text


def _unit(value: str) -> str:
    """A name only: pyFAI's import (1-2 s) would delay every command, and ``ringflow run``
    starts its workers before it plans. :func:`tasks.engine.load_geometry` checks it is one of
    pyFAI's radial units, for the job's planning and in each engine. The integrator's alias
    ``q_a^-1`` is its ``q_A^-1``."""
    text = value.strip()
    if not text or any(c.isspace() for c in text):
        raise ValueError(f"not a radial unit name; e.g. {', '.join(COMMON_UNITS)}")
    return UNIT_ALIASES.get(text, text)


COMMON_UNITS = ("r_mm", "q_A^-1", "q_nm^-1", "2th_deg", "2th_rad", "d*2_A^-2")
UNIT_ALIASES = {"q_a^-1": "q_A^-1"}


def _trim_method(value: str) -> str:
    aliases = {"none": "", "default": "", "medfilt": "median", "sigmaclip": "sigma_clip"}
    aliases["sigma-clip"] = "sigma_clip"
    return _choice("", "median", "sigma_clip", aliases=aliases)(value)


def _error_model(value: str) -> str:
    return _choice("poisson", "hybrid", "azimuthal", "", aliases={"none": "", "no": ""})(value)


def _pixel_splitting(value: str) -> str:
    return _choice("no", "bbox", "pseudo", "full", aliases={"0": "no", "": "no", "none": "no"})(
        value
    )


def _average_xy(value: str) -> str:
    aliases = {"0": "", "no": "", "false": "", "none": "", "1": "mean"}
    return _choice("", "mean", "median", aliases=aliases)(value)


def _subfolder(value: str) -> str:
    """A folder below the output folder: relative, and never climbing out with '..'."""
    text = value.strip()
    if text.startswith("/") or ".." in text.split("/"):
        raise ValueError("a relative folder below the output folder (no leading / and no ..)")
    return text


def _broker_url(value: str) -> str:
    text = value.strip()
    if text and not re.match(r"^(redis|rediss|redis\+socket)://", text):
        raise ValueError("expected redis://, rediss:// or redis+socket:// (empty: embedded Redis)")
    return url_password_in_query(text) if text else text


def _sbatch_value(value: str) -> str:
    text = value.strip()
    if not re.fullmatch(r"[A-Za-z0-9_.:,=+\-]*", text):
        raise ValueError("letters, digits and . : , = + - _ only")
    return text


def _sbatch_options(value: str) -> tuple[str, ...]:
    try:
        items = tuple(shlex.split(value))
    except ValueError as exc:
        raise ValueError(f"cannot split into options: {exc}") from None
    for item in items:
        if not item.startswith("-") or not re.fullmatch(r"[A-Za-z0-9_.:,=+/@%\-]+", item):
            raise ValueError(f"{item!r} is not an option like --account=name")
    return items


def _queue_prefix(value: str) -> str:
    text = value.strip()
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", text):
        raise ValueError("letters, digits, '_' and '-' only")
    return text


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if value is None:
        return ""
    if isinstance(value, tuple):
        if value and all(isinstance(v, str) for v in value):
            return ", ".join(value)
        return "(" + ", ".join(repr(v) for v in value) + ")" if value else ""
    return str(value)


# --- the schema --------------------------------------------------------------------------------


def option(key: str, parse: Callable[[str], Any], doc: str, default: Any = MISSING, fmt=None):
    """A dataclass field bound to INI ``key``; ``fmt`` writes a value back as INI text."""
    meta = {"key": key, "parse": parse, "doc": doc, "fmt": fmt or _format}
    if default is MISSING:
        return field(metadata=meta)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: default, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class DatasetConfig:
    location: tuple[str, ...] = option(
        "location", _globs, "Bliss dataset HDF5 files or Lima files; comma-separated globs."
    )
    hdf5_entry: str = option(
        "hdf5_entry", _hdf5_entry, "One scan entry such as 1.1; empty: every N.1 entry.", ""
    )
    layout: str = option(
        "layout",
        _choice("ID15A", "ID11", "ID31", aliases={"id15": "ID15A"}),
        "Folder layout (ID11, ID15A, ID31): all mirror RAW_DATA into PROCESSED_DATA.",
        "ID15A",
    )


@dataclass(frozen=True)
class IntegrationConfig:
    poni_file: str = option("poni_file", _text, "pyFAI calibration (PONI) file. Required.")
    n_pts: int = option("n_pts", _int(1), "Number of radial bins.", 2500)
    unit: str = option("unit", _unit, "Radial unit (pyFAI name: r_mm, q_A^-1, 2th_deg...).", "r_mm")
    detector: str = option(
        "detector", _text, "pyFAI detector name or detector file; empty: the PONI's detector.", ""
    )
    detector_name: str = option(
        "detector_name", _text, "Lima detector name in the Bliss files (e.g. pilatus).", ""
    )
    detector_suffix: str = option(
        "detector_suffix",
        _text,
        "Suffix after the detector name in measurement/ (e.g. raw_frame -> pilatus_raw_frame).",
        "",
    )
    mask_file: str = option(
        "mask_file", _text, "Mask image (non-zero = masked), any fabio format.", ""
    )
    flatfield_file: str = option("flatfield_file", _text, "Flat-field image (fabio format).", "")
    dark_file: str = option("dark_file", _text, "Dark-current image (fabio format).", "")
    error_model: str = option(
        "error_model", _error_model, "Error model: hybrid, poisson, azimuthal or none.", "hybrid"
    )
    azimuthal_range: tuple[float, float, int] = option(
        "azimuthal_range",
        _azimuthal_range,
        "(min, max, n_slices) in degrees; n_slices > 1 gives 2D caking (frames x slices x n_pts).",
        (-180.0, 180.0, 1),
    )
    radial_range: tuple[float, float] | None = option(
        "radial_range",
        _radial_range,
        "(min, max) in `unit`; empty: min and max of the pixel centres over the detector.",
        None,
    )
    ai_method: str = option(
        "ai_method",
        _choice("opencl", "cython", "python"),
        "Integration implementation: opencl (GPU/OpenCL device), cython (CPU) or python.",
        "opencl",
    )
    polarization_factor: float | None = option(
        "polarization_factor", _float_or_none, "Polarization factor in [-1, 1]; empty: none.", 0.99
    )
    correct_solid_angle: bool = option(
        "correct_solid_angle", _bool, "Correct for the solid angle of each pixel (0/1).", True
    )
    correct_detector_attenuation: bool = option(
        "correct_detector_attenuation",
        _bool,
        "Correct the sensor's angle-dependent absorption efficiency (0/1).",
        True,
    )
    sensor_material: str = option(
        "sensor_material",
        _choice("CdTe", "Si", "Ge", "GaAs", "CZT", "Se", "Gd2O2S"),
        "ringflow: sensor material for the attenuation correction.",
        "CdTe",
    )
    sensor_thickness_cm: float = option(
        "sensor_thickness_cm",
        _positive_float,
        "ringflow: sensor thickness in cm (attenuation).",
        0.1,
    )
    monitor_name: str = option(
        "monitor_name",
        _text,
        "ringflow: counter in measurement/ to normalise each frame by; empty: no normalisation.",
        "",
    )
    average_xy: str = option(
        "average_xy",
        _average_xy,
        "Also store the mean or median over frames (0, mean, median).",
        "",
    )
    pixel_splitting: str = option(
        "pixel_splitting", _pixel_splitting, "Pixel splitting: no, bbox, pseudo, full.", "no"
    )
    trim_method: str = option(
        "trim_method",
        _trim_method,
        "Outlier removal: empty (none), median (pyFAI's medfilt1d) or sigma_clip (pyFAI's "
        "sigma_clip_ng); one azimuthal slice only.",
        "",
    )
    trim_n_pts: int = option(
        "trim_n_pts", _int(0), "Azimuthal bins of the median filter; empty: n_pts.", 0
    )
    trim_bounds: tuple[float, ...] = option(
        "trim_bounds",
        lambda v: tuple(_numbers(v)),
        "median: percentile or (low, high) percentiles [50]; sigma_clip: threshold [5].",
        (),
    )

    @property
    def n_slices(self) -> int:
        return self.azimuthal_range[2]

    @property
    def method(self) -> tuple[str, str, str]:
        return (self.pixel_splitting, "csr", self.ai_method)


@dataclass(frozen=True)
class ComputationsConfig:
    partition: str = option("partition", _sbatch_value, "SLURM partition.", "gpu")
    n_workers: int = option("n_workers", _int(1), "SLURM jobs (one GPU each).", 4)
    ai_engines_per_worker: int = option(
        "ai_engines_per_worker", _int(1), "Integration processes per worker (per GPU).", 8
    )
    cores_per_worker: int = option(
        "cores_per_worker", _int(1), "CPU threads per integration process.", 4
    )
    engine_memory_mb: int = option(
        "engine_memory_mb",
        _int(64),
        "ringflow: memory one integration process may hold for frame batches (read ahead, "
        "converted and integrated); sets the batch size.",
        1024,
    )
    time: str = option("time", _timelimit, "SLURM time limit per worker job.", "01:00:00")
    memory_per_worker: str = option(
        "memory_per_worker", _memory, "SLURM memory per worker job.", "100GB"
    )
    python_executables: str = option(
        "python_executables",
        _text,
        "Python of the SLURM worker jobs; empty: this Python. Local workers always use the "
        "Python ringflow runs in.",
        "",
    )
    workspace_path: str = option(
        "workspace_path",
        _text,
        "Folder shared with workers (partials, logs, broker data); empty: <output>/.ringflow.",
        "",
    )
    gres: str = option(
        "gres",
        _sbatch_value,
        "ringflow: SLURM generic resource of one worker job (one GPU); empty: none (CPU only).",
        "gpu:1",
    )
    cpus_per_worker: int = option(
        "cpus_per_worker",
        _int(0),
        "ringflow: CPUs of one worker job; 0: ai_engines_per_worker x cores_per_worker.",
        0,
    )
    assemble_cores: int = option(
        "assemble_cores",
        _int(1),
        "ringflow: CPUs of the job that assembles and compresses each scan's final file.",
        2,
    )
    sbatch_options: tuple[str, ...] = option(
        "sbatch_options",
        _sbatch_options,
        "ringflow: extra sbatch options, e.g. --account=id15 --qos=high.",
        (),
        fmt=" ".join,
    )
    warm_shutdown_s: int = option(
        "warm_shutdown_s",
        _int(10),
        "ringflow: seconds before the time limit at which SLURM asks a worker to stop taking "
        "files and finish (or hand back) the ones it holds.",
        300,
    )
    cpu_fallback: bool = option(
        "cpu_fallback",
        _bool,
        "ringflow: 1 lets an opencl worker that sees no GPU integrate on the CPU; 0: it fails.",
        False,
    )


@dataclass(frozen=True)
class OutputConfig:
    location: str = option(
        "location", _text, "Output folder; empty: PROCESSED_DATA beside RAW_DATA.", ""
    )
    existing_output: str = option(
        "existing_output",
        _choice("skip", "overwrite", "raise", "reprocess_if_conffile_more_recent"),
        "If a scan's output exists: skip (if made with the same configuration), overwrite, "
        "raise, or reprocess_if_conffile_more_recent.",
        "reprocess_if_conffile_more_recent",
    )
    repack_output: bool = option(
        "repack_output", _bool, "1: one self-contained file per scan (the only mode).", True
    )
    partial_files_subfolder: str = option(
        "partial_files_subfolder",
        _subfolder,
        "Subfolder of the output folder for partial files.",
        "",
    )
    file_mode: int = option(
        "file_mode",
        _octal,
        "Permissions (octal, applied with chmod, less what the umask takes away) of the output "
        "folders and files ringflow creates.",
        0o755,
        fmt=lambda mode: format(mode, "03o"),
    )
    try_metadata: tuple[str, ...] = option(
        "try_metadata",
        _names,
        "Positioners/counters to copy into the output; empty: all those of the scan.",
        (),
    )
    codec: str = option(
        "codec",
        _codec,
        "ringflow: compression of the output datasets: deflate (ISA-L when installed, else "
        "zlib; any HDF5 reader), zlib, isal, bitshuffle_lz4, zstd, blosc (hdf5plugin) or none.",
        "deflate",
    )
    level: int | None = option(
        "level", _int_or_none, "ringflow: compression level; empty: the codec's default.", None
    )
    shuffle: bool = option(
        "shuffle", _bool, "ringflow: byte-shuffle before compressing (deflate, zstd, blosc).", True
    )
    checksum: bool = option(
        "checksum", _bool, "ringflow: fletcher32 checksum on every compressed chunk.", True
    )
    chunk_frames: int = option(
        "chunk_frames",
        _int(0),
        "ringflow: frames per chunk of the integrated results; 0: about 1 MiB per chunk.",
        0,
    )
    save_corrected: bool = option(
        "save_corrected",
        _bool,
        "ringflow: also store the corrected frames (float32) and a per-frame uint8 mask.",
        False,
    )
    corrected_codec: str = option(
        "corrected_codec",
        _codec_or_empty,
        "ringflow: codec of the corrected frames and masks; empty: same as codec.",
        "",
    )
    corrected_level: int | None = option(
        "corrected_level", _int_or_none, "ringflow: their level; empty: as for codec.", None
    )
    corrected_chunk_frames: int = option(
        "corrected_chunk_frames", _int(1), "ringflow: frames per chunk of corrected frames.", 1
    )
    writer_threads: int = option(
        "writer_threads",
        _int(0),
        "ringflow: threads compressing output chunks; 0: the CPUs the assembly task may use.",
        0,
    )
    chunks_in_flight: int = option(
        "chunks_in_flight",
        _int(0),
        "ringflow: most chunks queued for compression (bounds memory); 0: 4 per thread, "
        "at most 256 MiB of them.",
        0,
    )

    def compression(self) -> tuple[str, int | None]:
        """(codec, level) of the integrated results and every other compressed dataset."""
        return self.codec, self.level

    def corrected_compression(self) -> tuple[str, int | None]:
        """(codec, level) of the corrected frames and masks: corrected_* over the defaults."""
        if self.corrected_codec:
            return self.corrected_codec, self.corrected_level
        return self.codec, self.level if self.corrected_level is None else self.corrected_level


@dataclass(frozen=True)
class PipelineConfig:
    verbosity: int = option("verbosity", _int(0), "0 terse ... 3 debug.", 2)


@dataclass(frozen=True)
class QueueConfig:
    broker_url: str = option(
        "broker_url",
        _broker_url,
        f"Redis URL (redis://:password@host:port/db, rediss:// for TLS); empty: an embedded "
        f"private Redis. ${BROKER_ENV} overrides it.",
        "",
    )
    queue_prefix: str = option(
        "queue_prefix", _queue_prefix, "Prefix of queue names and Redis keys.", "ringflow"
    )
    task_time_limit: int = option(
        "task_time_limit", _int(60), "Seconds one file task may run; also sets redelivery.", 7200
    )
    worker_start_timeout: int = option(
        "worker_start_timeout", _int(5), "Seconds to wait for local workers to start.", 120
    )
    stall_timeout: int = option(
        "stall_timeout", _int(10), "Seconds without any progress before a run gives up.", 900
    )
    broker_password_file: str = option(
        "broker_password_file",
        _text,
        f"File holding the Redis password, for a broker_url without one. "
        f"${PASSWORD_FILE_ENV} overrides it.",
        "",
    )
    stranded_after: int = option(
        "stranded_after",
        _int(1),
        "Seconds a GPU queue may hold files with no live worker before they move to live ones.",
        60,
    )
    max_retries: int = option(
        "max_retries",
        _int(0),
        "ringflow: retries of a file after a transient error (file missing or locked by its "
        "writer, I/O error, broker dropped); corrupt data fails at once.",
        3,
    )
    retry_delay_s: int = option(
        "retry_delay_s",
        _int(1),
        "ringflow: first retry delay in seconds; doubles each time, with random jitter.",
        2,
    )
    retry_delay_max_s: int = option(
        "retry_delay_max_s", _int(1), "ringflow: longest retry delay in seconds.", 60
    )
    job_ttl_days: int = option(
        "job_ttl_days",
        _int(1),
        "ringflow: days a job's records (manifest, done, failed files) stay in Redis.",
        7,
    )
    security_key: str = option(
        "security_key",
        _text,
        "ringflow: PEM RSA private key (mode 0600) that signs task messages; with the two "
        "keys below, workers refuse unsigned or wrongly signed messages. Empty: no signing.",
        "",
    )
    security_certificate: str = option(
        "security_certificate", _text, "ringflow: PEM certificate of security_key.", ""
    )
    security_cert_store: str = option(
        "security_cert_store",
        _text,
        "ringflow: folder (or glob) of the PEM certificates whose signatures workers accept.",
        "",
    )

    def __post_init__(self) -> None:
        """Signing files checked once their paths are resolved (absolute): a missing or
        unreadable file, or a key others can read, is an error at load, not in a worker."""
        paths = (self.security_key, self.security_certificate, self.security_cert_store)
        if not any(paths) or not all(os.path.isabs(p) for p in paths if p):
            return
        for key, path in zip(SECURITY_KEYS, paths, strict=True):
            if not path:
                reason = f"message signing needs all of {', '.join(SECURITY_KEYS)}"
                raise ConfigError("queue", key, "", reason)
        _check_readable("security_key", self.security_key)
        if os.stat(self.security_key).st_mode & 0o077:
            mode = oct(os.stat(self.security_key).st_mode & 0o777)
            reason = f"the private key is readable by group or others ({mode}): chmod 600 it"
            raise ConfigError("queue", "security_key", self.security_key, reason)
        _check_readable("security_certificate", self.security_certificate)
        store = self.security_cert_store
        found = glob.glob(os.path.join(store, "*") if os.path.isdir(store) else store)
        if not found:
            raise ConfigError("queue", "security_cert_store", store, "no certificate there")
        for path in found:
            _check_readable("security_cert_store", path)

    @property
    def job_ttl_s(self) -> int:
        return self.job_ttl_days * 86400


SECURITY_KEYS = ("security_key", "security_certificate", "security_cert_store")


def _check_readable(key: str, path: str) -> None:
    """``path`` is a file this process can read, or ConfigError naming ``[queue] key``."""
    if not os.path.isfile(path):
        raise ConfigError("queue", key, path, "no such file")
    if not os.access(path, os.R_OK):
        raise ConfigError("queue", key, path, "not readable")


@dataclass(frozen=True)
class MonitoringConfig:
    flower_address: str = option(
        "flower_address", _text, "ringflow: address Flower listens on.", "127.0.0.1"
    )
    flower_port: int = option("flower_port", _int(1), "ringflow: Flower's port.", 5555)
    flower_user: str = option(
        "flower_user",
        _sbatch_value,
        f"ringflow: Flower user name (basic authentication). ${FLOWER_USER_ENV} overrides it.",
        "ringflow",
    )
    flower_password_file: str = option(
        "flower_password_file",
        _text,
        f"ringflow: file holding Flower's password. ${FLOWER_PASSWORD_ENV} (the password) or "
        f"${FLOWER_PASSWORD_FILE_ENV} override it.",
        "",
    )


SECTIONS: dict[str, type] = {
    "dataset": DatasetConfig,
    "azimuthal integration": IntegrationConfig,
    "computations distribution": ComputationsConfig,
    "output": OutputConfig,
    "pipeline": PipelineConfig,
    "queue": QueueConfig,
    "monitoring": MonitoringConfig,
}
_ATTRS = {
    "dataset": "dataset",
    "azimuthal integration": "integration",
    "computations distribution": "computations",
    "output": "output",
    "pipeline": "pipeline",
    "queue": "queue",
    "monitoring": "monitoring",
}
PATH_KEYS = {
    "azimuthal integration": ("poni_file", "mask_file", "flatfield_file", "dark_file"),
    "computations distribution": ("workspace_path",),
    "output": ("location",),
    "queue": ("broker_password_file", *SECURITY_KEYS),
    "monitoring": ("flower_password_file",),
}


@dataclass(frozen=True)
class Config:
    dataset: DatasetConfig
    integration: IntegrationConfig
    computations: ComputationsConfig = field(default_factory=ComputationsConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)
    source: str = ""  # the INI file it was read from, if any
    warnings: tuple[str, ...] = ()

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Config:
        path = Path(path)
        if not path.is_file():
            raise ConfigError("", "", str(path), "configuration file not found")
        # as the integrator: no inline comments, so a '#' in a path stays part of it
        parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=None)
        parser.optionxform = str  # keep the keys' case for messages
        try:
            parser.read(path, encoding="utf-8-sig")
        except (configparser.Error, UnicodeDecodeError) as exc:
            first_line = str(exc).splitlines()[0]
            raise ConfigError("", "", str(path), f"not a valid INI file: {first_line}") from None
        mapping = {name: dict(parser.items(name)) for name in parser.sections()}
        return cls.from_mapping(mapping, source=str(path.resolve()))

    @classmethod
    def from_mapping(cls, mapping: dict[str, dict[str, str]], source: str = "") -> Config:
        """Build from ``{section: {key: text}}``: the INI content, or :meth:`as_mapping`'s."""
        base = Path(source).parent if source else Path.cwd()
        warnings = [f"unknown section [{s}] ignored" for s in mapping if s not in SECTIONS]
        values_of = _moved_keys(_normalised(mapping), warnings)
        _check_misplaced(values_of, source)
        sections = {}
        for name, section_cls in SECTIONS.items():
            values = values_of.get(name, {})
            sections[_ATTRS[name]] = _build_section(name, section_cls, values, source, warnings)
        ai = sections["integration"]
        if ai.trim_method == "sigma_clip" and ai.pixel_splitting != "no":
            warnings.append(
                "trim_method = sigma_clip runs without pixel splitting (as the integrator "
                "does): pixel_splitting ignored"
            )
        config = cls(**sections, source=source, warnings=tuple(warnings))
        config = _resolve_paths(config, base)
        env_url = os.environ.get(BROKER_ENV, "").strip()
        if env_url:
            url = _parse_one("queue", "broker_url", env_url, _broker_url, f"${BROKER_ENV}")
            config = replace(config, queue=replace(config.queue, broker_url=url))
        env_file = os.environ.get(PASSWORD_FILE_ENV, "").strip()
        if env_file:
            config = replace(config, queue=replace(config.queue, broker_password_file=env_file))
        _check_supported(config)
        return config

    def broker_url(self) -> str:
        """The configured broker URL with the password of broker_password_file put in.

        Empty when the embedded Redis is to be used. Read at each call: the file is the
        secret's only home, so it is never stored in payloads, logs or job scripts.
        """
        url, path = self.queue.broker_url, self.queue.broker_password_file
        if not url or not path:
            return url
        try:
            with open(path, encoding="utf-8") as fh:
                password = fh.read().strip()
        except OSError as exc:
            raise ConfigError(
                "queue", "broker_password_file", path, f"cannot read: {exc.strerror}", self.source
            ) from None
        if not password:
            raise ConfigError("queue", "broker_password_file", path, "file is empty", self.source)
        return with_password(url, password)

    def payload_mapping(self) -> dict[str, dict[str, str]]:
        """:meth:`as_mapping` without secrets: what travels in task messages and manifests."""
        mapping = self.as_mapping()
        mapping["queue"]["broker_url"] = redact_url(mapping["queue"]["broker_url"])
        return mapping

    def as_mapping(self) -> dict[str, dict[str, str]]:
        """The configuration as INI text values: JSON-safe, and parsed back by from_mapping."""
        return {
            name: {
                f.metadata["key"]: f.metadata["fmt"](getattr(getattr(self, _ATTRS[name]), f.name))
                for f in fields(cls)
            }
            for name, cls in SECTIONS.items()
        }

    def as_ini(self, hide_secrets: bool = True) -> str:
        mapping = self.as_mapping()
        if hide_secrets:
            mapping["queue"]["broker_url"] = redact_url(mapping["queue"]["broker_url"])
        lines = []
        for name, values in mapping.items():
            lines.append(f"[{name}]")
            lines += [f"{key} = {value}" for key, value in values.items()]
            lines.append("")
        return "\n".join(lines)

    def integration_fingerprint(self) -> str:
        """Hash of everything that changes the integrated numbers, input files' dates included."""
        payload = self.as_mapping()["azimuthal integration"]
        for key in PATH_KEYS["azimuthal integration"]:
            if payload[key] and os.path.exists(payload[key]):
                stat = os.stat(payload[key])
                payload[key] += f"@{stat.st_mtime_ns}:{stat.st_size}"
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def output_fingerprint(self) -> str:
        """Hash of what the output holds: the integration, and whether corrected frames are in.

        Compression settings are left out: they change the bytes, never the values.
        """
        if not self.output.save_corrected:  # as before save_corrected existed
            return self.integration_fingerprint()
        content = {"integration": self.integration_fingerprint(), "save_corrected": True}
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def _parse_one(section: str, key: str, text: str, parse, source: str):
    try:
        return parse(text)
    except ValueError as exc:
        shown = redact_url(text) if "url" in key else text  # a URL's secret is never shown
        raise ConfigError(section, key, shown, str(exc), source) from None


# keys the integrator still reads from an older section: (old section, key) -> new section
MOVED_KEYS = {
    ("dataset", "detector"): "azimuthal integration",
    ("dataset", "mask_file"): "azimuthal integration",
}
# an empty value means "not set": the key's default, except for these (pyFAI's None)
EMPTY_IS_NONE = {
    ("azimuthal integration", "error_model"),
    ("azimuthal integration", "polarization_factor"),
}


def _normalised(mapping: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    """Keys stripped and lower-cased; empty values dropped (not set), except EMPTY_IS_NONE."""
    out = {}
    for section, values in mapping.items():
        out[section] = {
            key.strip().lower(): value
            for key, value in values.items()
            if value.strip() or (section, key.strip().lower()) in EMPTY_IS_NONE
        }
    return out


def _moved_keys(values_of: dict[str, dict[str, str]], warnings: list) -> dict:
    """Keys in the older sections the integrator accepts, moved to their section."""
    for (old, key), new in MOVED_KEYS.items():
        if key not in values_of.get(old, {}):
            continue
        value = values_of[old].pop(key)
        target = values_of.setdefault(new, {})
        if key in target:
            warnings.append(f"deprecated [{old}] {key} ignored: [{new}] {key} is set too")
        else:
            target[key] = value
            warnings.append(f"deprecated: [{old}] {key} belongs in [{new}]; moved there")
    return values_of


def _check_misplaced(values_of: dict[str, dict[str, str]], source: str) -> None:
    """A key of another section, written in this one, would otherwise be ignored: a mask or
    a PONI silently left out. An error naming both sections."""
    keys_of = {name: {f.metadata["key"] for f in fields(cls)} for name, cls in SECTIONS.items()}
    for name, values in values_of.items():
        if name not in SECTIONS:
            continue
        for key in values:
            homes = [other for other, keys in keys_of.items() if key in keys]
            if homes and key not in keys_of[name]:
                raise ConfigError(
                    name, key, values[key], f"this key belongs in [{homes[0]}]", source
                )


def _build_section(name: str, cls: type, values: dict[str, str], source: str, warnings: list):
    by_key = {f.metadata["key"]: f for f in fields(cls)}
    unknown = sorted(set(values) - set(by_key))
    warnings += [f"unknown key [{name}] {key} ignored" for key in unknown]
    kwargs = {}
    for key, f in by_key.items():
        if key in values:
            kwargs[f.name] = _parse_one(name, key, values[key], f.metadata["parse"], source)
        elif f.default is MISSING and f.default_factory is MISSING:
            raise ConfigError(name, key, "", "required key is missing or empty", source)
    return cls(**kwargs)


def _resolve_paths(config: Config, base: Path) -> Config:
    for section, keys in PATH_KEYS.items():
        attr = _ATTRS[section]
        sub = getattr(config, attr)
        changes = {
            k: str((base / os.path.expanduser(getattr(sub, k))).resolve())
            for k in keys
            if getattr(sub, k) and "://" not in getattr(sub, k)
        }
        config = replace(config, **{attr: replace(sub, **changes)})
    locations = tuple(str(base / os.path.expanduser(loc)) for loc in config.dataset.location)
    return replace(config, dataset=replace(config.dataset, location=locations))


def _check_supported(config: Config) -> None:
    """Reject values ringflow cannot honour, rather than ignoring them."""
    ai = config.integration
    _check_trim(ai, config.source)
    if ai.polarization_factor is not None and not -1 <= ai.polarization_factor <= 1:
        raise ConfigError(
            "azimuthal integration",
            "polarization_factor",
            ai.polarization_factor,
            "must be between -1 and 1 (or empty for no correction)",
            config.source,
        )
    if not config.output.repack_output:
        raise ConfigError(
            "output",
            "repack_output",
            "0",
            "ringflow always writes one self-contained file per scan; set it to 1 or remove it",
            config.source,
        )
    if not ai.poni_file:
        raise ConfigError(
            "azimuthal integration", "poni_file", "", "a PONI file is required", config.source
        )
    _check_codecs(config)


def _check_trim(ai: IntegrationConfig, source: str) -> None:
    """Trimming as the integrator allows it: one azimuthal slice, percentiles in [0, 100]."""
    if not ai.trim_method:
        return
    if ai.n_slices > 1:
        raise ConfigError(
            "azimuthal integration",
            "azimuthal_range",
            ai.azimuthal_range,
            f"trim_method = {ai.trim_method} integrates one azimuthal slice: set n_slices "
            "(the third number) to 1, or leave trim_method empty",
            source,
        )
    bounds = ai.trim_bounds
    if ai.trim_method == "median":
        fits = len(bounds) <= 2 and all(0 <= b <= 100 for b in bounds)
        reason = "median: one percentile or (low, high) percentiles within 0..100"
    else:
        fits = len(bounds) <= 1 and all(b > 0 for b in bounds)
        reason = "sigma_clip: one threshold > 0 (in standard deviations)"
    if not fits or list(bounds) != sorted(bounds):
        raise ConfigError("azimuthal integration", "trim_bounds", bounds, reason, source)


def _check_codecs(config: Config) -> None:
    """Each codec with its level: a level the codec lacks, or a missing package, is an error."""
    from .codecs import check_codec

    out = config.output
    pairs = (
        ("codec", "level", *out.compression()),
        ("corrected_codec", "corrected_level", *out.corrected_compression()),
    )
    for codec_key, level_key, codec, level in pairs:
        try:
            check_codec(codec, level)
        except ValueError as exc:
            key, value = (level_key, level) if "level" in str(exc) else (codec_key, codec)
            raise ConfigError("output", key, value, str(exc), config.source) from None


_URL_IN_TEXT = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<rest>[^\s'\"<>]*)")
_SECRET_QUERY = re.compile(r"(?i)([?&;](?:password|passwd|pass|pwd|secret|token)=)[^&;#\s]*")


def redact_url(text: str) -> str:
    """``text`` with the secret of every URL in it replaced by ***, safe to print or store.

    Whatever the form: ``user:password@``, ``:password@``, a bare ``secret@``, a password
    that holds ``@``, ``/`` or encoded characters (everything up to the last ``@`` is the
    user part), and ``?password=`` in the query.
    """
    one = text.strip()
    whole = _URL_IN_TEXT.match(one)
    if whole and whole.end() < len(one) and "://" not in one[whole.end() :]:
        # one URL whose password holds a quote, a space or a bracket: all of it is the URL
        return _redact_one(re.match(r"(?P<scheme>[^:]+://)(?P<rest>.*)", one, re.S))
    return _URL_IN_TEXT.sub(_redact_one, text)


def _redact_one(match: re.Match) -> str:
    rest = match["rest"]
    at = rest.rfind("@")
    if at >= 0:
        userinfo, rest = rest[:at], rest[at + 1 :]
        user, colon, _ = userinfo.partition(":")
        safe_user = colon and not re.search(r"[/?#%]", user)
        rest = (f"{user}:***@" if safe_user else "***@") + rest
    return match["scheme"] + _SECRET_QUERY.sub(r"\1***", rest)


def url_password_in_query(url: str) -> str:
    """``url`` with a ``?password=`` query value moved into its user part, where kombu,
    Celery and redis-py all read it (kombu fails with a TypeError on the query form)."""
    base, mark, query_text = url.partition("?")
    query = parse_qsl(query_text, keep_blank_values=True)
    secret = [v for k, v in query if k.lower() == "password"]
    if not mark or not secret:
        return url
    rest = urlencode([(k, v) for k, v in query if k.lower() != "password"])
    return with_password(base, secret[-1]) + (f"?{rest}" if rest else "")


def with_password(url: str, password: str) -> str:
    """``url`` with ``password`` (URL-quoted) in place of any it had."""
    scheme, rest = url.split("://", 1)
    netloc, sep, tail = rest.partition("/")
    user = netloc.rsplit("@", 1)[0].split(":", 1)[0] if "@" in netloc else ""
    host = netloc.rsplit("@", 1)[-1]
    return f"{scheme}://{user}:{quote(password, safe='')}@{host}{sep}{tail}"


def template(dataset_glob: str = "") -> str:
    """A commented INI file with every section and key, its default and meaning."""
    lines = [
        "# ringflow configuration (compatible with ESRF integrator files).",
        "# Relative paths are relative to this file's folder. Keys marked 'ringflow:' are",
        "# ringflow additions; everything else has the integrator's meaning.",
        "",
    ]
    for name, cls in SECTIONS.items():
        lines.append(f"[{name}]")
        for f in fields(cls):
            key, doc = f.metadata["key"], f.metadata["doc"]
            lines.append(f"# {doc}")
            if key == "location" and name == "dataset":
                value = dataset_glob or "/path/to/RAW_DATA/sample/sample_0001/sample_0001.h5"
            elif f.default is not MISSING:
                value = f.metadata["fmt"](f.default)
            else:
                value = ""
            lines.append(f"{key} = {value}")
        lines.append("")
    return "\n".join(lines)
