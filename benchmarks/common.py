"""What every throughput benchmark section returns, and how the table is printed.

A section measures its candidate and its baseline in the same run and reports ratios; these
machines are noisy, so absolute times are never compared across runs.
"""

from __future__ import annotations

import os
import resource
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@dataclass
class Measure:
    """One line of the table: a candidate against its same-run baseline."""

    section: str  # "engine 1D", "end to end", "orchestration", "memory"
    name: str  # what ran, e.g. "batched, 64-frame batches"
    value: float  # the candidate's figure
    unit: str  # "frames/s", "ms/file", "s", "MiB"
    baseline: float | None = None  # the baseline's figure, same run, same unit
    baseline_name: str = ""
    ratio: float | None = None  # improvement factor (> 1 is better for the candidate)
    target: float | None = None  # the ratio (or value, see target_is) the issue asks for
    target_is: str = "ratio>="  # "ratio>=", "value<=", "ratio<="
    equal: bool | None = None  # results equal to the baseline's (None: not compared)
    note: str = ""

    @property
    def ok(self) -> bool | None:
        if self.target is None:
            return None
        if self.target_is == "ratio>=":
            return self.ratio is not None and self.ratio >= self.target
        if self.target_is == "ratio<=":
            return self.ratio is not None and self.ratio <= self.target
        return self.value <= self.target


@dataclass
class Section:
    measures: list[Measure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, measure: Measure) -> Measure:
        self.measures.append(measure)
        return measure


def pin_cores(cores: int) -> list[int]:
    """Run on ``cores`` CPUs (the issue's "2 cores"), whatever the machine has."""
    available = sorted(os.sched_getaffinity(0))
    chosen = available[:cores]
    os.sched_setaffinity(0, chosen)
    return chosen


def peak_rss_mib(children: bool = False) -> float:
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss / 1024


def format_table(measures: list[Measure]) -> str:
    header = "| section | candidate | value | baseline | ratio | target | equal | ok |"
    lines = [header, "|" + "---|" * 8]
    for m in measures:
        base = f"{m.baseline_name}: {m.baseline:.4g} {m.unit}" if m.baseline is not None else ""
        ratio = f"{m.ratio:.2f}x" if m.ratio is not None else ""
        if m.target is None:
            target = ""
        elif m.target_is == "value<=":
            target = f"<= {m.target:g} {m.unit}"
        else:
            target = f"{m.target_is[5:]} {m.target:g}x"
        equal = {None: "", True: "yes", False: "NO"}[m.equal]
        ok = {None: "", True: "yes", False: "NO"}[m.ok]
        lines.append(
            f"| {m.section} | {m.name} | {m.value:.4g} {m.unit} | {base} | {ratio} "
            f"| {target} | {equal} | {ok} |"
        )
    return "\n".join(lines)


def as_dicts(measures: list[Measure]) -> list[dict]:
    return [asdict(m) | {"ok": m.ok} for m in measures]
