"""What ``ringflow run`` would do with a configuration, found without doing any of it.

``ringflow check`` must never disagree with ``ringflow run``: it calls the very functions
``run`` calls before it starts workers (geometry, corrections, device notes, :func:`plan_job`,
:func:`check_plan`, the broker's check), in the same order. Planning creates the output
folders and removes temporaries a killed run left; here it is given a :class:`DryRun`,
which records what would be created or removed instead, so nothing is written. No broker
and no worker is started: an external broker is pinged, the embedded one is only looked
for.
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import asdict, dataclass, field

from tasks.config import BROKER_ENV, Config, redact_url
from tasks.discovery import Scan
from tasks.errors import BrokerError, OutputError, RingflowError
from tasks.jobs import JobPlan, PlanWrites, check_plan, plan_job
from tasks.outputs import leftover_temporaries, output_path, workspace
from tasks.writers import check_usable_folder, missing_folders

from .broker import check_broker
from .embedded import LOCK, broker_folder

PING_TIMEOUT = 3.0  # seconds: a check answers quickly, the broker's own check waits 10 s
TODO, SKIPPED, PROBLEM = "to do", "skipped", "problem"


@dataclass
class ScanLine:
    """One scan as the plan sees it: to do, kept by existing_output, or refused."""

    scan: str  # master::entry, the scan's key in the job's records
    label: str  # sample_0001.h5 1.1
    state: str  # TODO, SKIPPED or PROBLEM
    files: int = 0  # to process
    frames: int = 0
    skipped_files: int = 0
    skipped_frames: int = 0
    why: str = ""  # why skipped, or the problem
    output: str = ""


@dataclass
class BrokerCheck:
    """The broker ``run`` would use; ``ok`` False when ``run`` would fail for it (exit 1)."""

    kind: str  # "embedded" or "external"
    ok: bool
    message: str  # one line, the URL's secret hidden
    url: str = ""  # redacted; external only


@dataclass
class Memory:
    """One engine's estimated need against what this machine allows (both in bytes)."""

    estimate: int
    limit: int
    limited_by: str


@dataclass
class CheckReport:
    """Everything ``check`` found; ``error`` is the mistake that stops ``run`` (exit 2)."""

    config: str
    scans: list[ScanLine] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # scans or files run would fail
    warnings: list[str] = field(default_factory=list)  # the plan's, as run prints them
    config_warnings: list[str] = field(default_factory=list)  # printed when it loaded
    notes: list[str] = field(default_factory=list)  # local workers other than configured
    workspace: str = ""
    would_create: list[str] = field(default_factory=list)  # folders run would create
    memory: Memory | None = None
    broker: BrokerCheck | None = None
    error: str = ""

    @property
    def needs_broker(self) -> bool:
        """``run`` integrates something: with every scan skipped it ends before any broker
        is needed (exit 0, whatever the broker)."""
        return any(s.state == TODO for s in self.scans)

    @property
    def would_start(self) -> bool:
        broker_ok = self.broker is None or self.broker.ok or not self.needs_broker
        return not self.error and broker_ok

    def totals(self) -> dict[str, int]:
        """Files and frames to process, skipped, and scans by state."""
        count = {state: sum(s.state == state for s in self.scans) for state in (TODO, SKIPPED)}
        return {
            "scans_to_do": count[TODO],
            "scans_skipped": count[SKIPPED],
            "files": sum(s.files for s in self.scans),
            "frames": sum(s.frames for s in self.scans),
            "files_skipped": sum(s.skipped_files for s in self.scans),
            "frames_skipped": sum(s.skipped_frames for s in self.scans),
        }

    def as_dict(self) -> dict:
        data = asdict(self)
        data["warnings"] = self.config_warnings + self.warnings
        del data["config_warnings"]
        return data | self.totals() | {"ok": self.would_start}


def check_config(config: Config, timeout: float = PING_TIMEOUT) -> CheckReport:
    """What ``run`` would find, in its order: a mistake stops the planning as it stops
    ``run`` (the broker is still checked, so that one check tells both)."""
    report = CheckReport(config.source, config_warnings=list(config.warnings))
    try:
        check_job(config, report)
    except RingflowError as exc:
        report.error = str(exc)
    report.broker = check_broker_of(config, report, timeout)
    return report


def check_job(config: Config, report: CheckReport) -> None:
    """``run``'s checks before it starts workers (:func:`cli.run_cmd.plan_or_fail`), with
    nothing written; the report is filled before :func:`check_plan` may raise."""
    from tasks.engine import load_corrections, load_geometry

    from .local import local_notes

    ai = load_geometry(config.integration)
    shape = tuple(ai.detector.shape)
    load_corrections(config.integration, shape)
    report.notes = local_notes(config, [])  # run's one local CPU worker
    dry = DryRun()
    plan = plan_job(config, shape, writes=PlanWrites(dry.make_dirs, dry.remove_leftovers))
    report.workspace, report.would_create = plan.workspace, dry.would_create
    report.warnings = plan.warnings + [
        f"{path}: a temporary file left by a killed run; run removes it" for path in dry.leftovers
    ]
    report.problems = [str(problem) for problem in plan.problems]
    report.scans = scan_lines(config, plan)
    check_plan(plan)
    report.memory = memory_of(config, plan)
    if plan.scans:  # the broker's and the workers' folder: run creates it for them
        dry.make_dirs(plan.workspace)


def memory_of(config: Config, plan: JobPlan) -> Memory | None:
    """The estimate :func:`check_plan` just accepted, to show how close it is."""
    from tasks.engine import engine_memory_estimate, memory_limit

    if not (plan.scans and plan.frame_shape):
        return None
    limit, why = memory_limit()
    return Memory(engine_memory_estimate(config, plan.frame_shape), limit, why)


def scan_lines(config: Config, plan: JobPlan) -> list[ScanLine]:
    """Every scan discovered, in discovery order, with what the plan decided for it."""
    planned = {task.scan_key: (task, files) for task, files in plan.scans}
    skipped = set(plan.skipped)
    lines = []
    for scan in plan.discovered:
        label = f"{os.path.basename(scan.master)} {scan.entry}".strip()
        line = ScanLine(scan.key, label, PROBLEM, output=output_path(config, scan))
        if scan.key in planned:
            task, files = planned[scan.key]
            line.state, line.files, line.frames = TODO, len(files), task.n_frames
        elif line.output in skipped:
            line.state, line.why = SKIPPED, skip_reason(config)
            line.skipped_files, line.skipped_frames = len(scan.slices), scan.n_frames
        else:
            line.skipped_files, line.skipped_frames = len(scan.slices), scan.n_frames
            line.why = problem_of(scan, plan.problems)
        lines.append(line)
    return lines


def skip_reason(config: Config) -> str:
    """Why existing_output keeps an output (:func:`tasks.outputs.must_process` said so)."""
    if config.output.existing_output == "skip":
        return "output made with this configuration (existing_output = skip)"
    return "output newer than the configuration"


def problem_of(scan: Scan, problems: list[RingflowError]) -> str:
    """The plan's problem that names this scan's file or one of its Lima files."""
    names = {scan.master, *(piece.path for piece in scan.slices)}
    for problem in problems:
        if any(name in str(problem) for name in names):
            return str(problem)
    return "not planned (see the problems)"


def check_broker_of(config: Config, report: CheckReport, timeout: float) -> BrokerCheck:
    """The broker ``run`` would use: an external one pinged (a few seconds at most), the
    embedded one looked for (its server, and whether a run owns the workspace already)."""
    try:
        url = config.broker_url()  # reads broker_password_file
    except RingflowError as exc:  # a ConfigError: run stops with exit 2 too
        report.error = report.error or str(exc)
        return BrokerCheck("external", False, str(exc), redact_url(config.queue.broker_url))
    if url:
        return external_broker(url, timeout)
    return embedded_broker(report.workspace or _workspace_or_empty(config))


def external_broker(url: str, timeout: float = PING_TIMEOUT) -> BrokerCheck:
    source = f"${BROKER_ENV}" if os.environ.get(BROKER_ENV, "").strip() else "[queue] broker_url"
    shown = redact_url(url)
    try:
        check_broker(url, timeout)
    except BrokerError as exc:  # its message hides the secret
        return BrokerCheck("external", False, str(exc), shown)
    return BrokerCheck("external", True, f"broker {shown} ({source}) reachable", shown)


def embedded_broker(space: str) -> BrokerCheck:
    """What ``run`` would start; it refuses a workspace whose broker another run owns."""
    from .redis_server import server_executable, server_version

    try:
        server = server_executable()
    except BrokerError as exc:
        return BrokerCheck("embedded", False, str(exc))
    where = f" in {broker_folder(space)}" if space else ""
    owner = lock_holder(os.path.join(broker_folder(space), LOCK)) if space else 0
    if owner:
        return BrokerCheck(
            "embedded",
            False,
            f"{broker_folder(space)}: the job broker of this workspace is in use by ringflow "
            f"process {owner}; wait for it to end (ringflow status shows it)",
        )
    return BrokerCheck(
        "embedded", True, f"embedded broker ({server_version(server)}) would start{where}"
    )


def _workspace_or_empty(config: Config) -> str:
    try:
        return workspace(config)
    except RingflowError:
        return ""


def lock_holder(path: str) -> int:
    """The process holding the flock of an owner file (0: none), from /proc/locks: trying the
    lock would take it, for an instant, from a run starting at that moment. The owner writes
    its pid in the file: a lock of another file with the same inode number does not count."""
    try:
        inode = os.stat(path).st_ino
        with open(path, encoding="ascii") as fh:
            owner = fh.read().strip()
        with open("/proc/locks", encoding="ascii") as fh:
            lines = fh.read().splitlines()
    except (OSError, ValueError):
        return 0
    for line in lines:
        parts = line.split()  # 1: FLOCK  ADVISORY  WRITE 4242 fe:00:131077 0 EOF
        ours = len(parts) > 5 and parts[1] == "FLOCK" and parts[5].endswith(f":{inode}")
        if ours and parts[4] == owner:
            return int(owner)
    return 0


@dataclass
class DryRun:
    """Stands in for what :func:`plan_job` would write (its :class:`PlanWrites`), and
    records it instead."""

    would_create: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)

    def make_dirs(self, folder: str, mode: int | None = None) -> list[str]:
        """:func:`tasks.writers.make_dirs`'s answer, creating nothing: the folders it would
        create, outermost first, or the error it would raise."""
        missing, parent = missing_folders(folder, self.would_create)
        if missing:
            _check_can_create(folder, parent, parent in self.would_create)
        elif parent not in self.would_create:
            check_usable_folder(folder)
        self.would_create += missing
        return missing

    def remove_leftovers(self, outputs: list[str], folders: list[str], since=None) -> list:
        """Those :func:`tasks.outputs.remove_leftovers` would remove, kept."""
        cutoff = time.time() if since is None else since
        self.leftovers += leftover_temporaries(outputs, folders, cutoff)
        return []


def _check_can_create(folder: str, parent: str, planned: bool) -> None:
    """mkdir in ``parent`` would work (the error :func:`tasks.writers.make_dirs` gives)."""
    if planned:
        return
    if not os.path.isdir(parent):
        reason = errno.ENOTDIR
    elif not os.access(parent, os.W_OK | os.X_OK):
        read_only = os.statvfs(parent).f_flag & os.ST_RDONLY
        reason = errno.EROFS if read_only else errno.EACCES
    else:
        return
    raise OutputError(folder, f"cannot create folder: {os.strerror(reason)}")
