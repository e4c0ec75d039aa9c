"""The throughput benchmark: every section, one table, ratios from this run only.

Sections (each module also runs alone):
- ``engine.py``: batched engine vs pyFAI frame by frame, 1D and 2D; peak RSS of one engine on
  a long vs a short file;
- ``end_to_end.py``: ``ringflow run`` vs the script a scientist would write, start-up included;
- ``orchestration.py``: per-file task overhead, time to enqueue 100,000 file tasks.

    python benchmarks/throughput.py            # full: exit 1 if a target is missed or unequal
    python benchmarks/throughput.py --short    # CI: exit 1 only if results are unequal
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

if __package__:
    from . import end_to_end, engine, orchestration
    from .common import as_dicts, format_table
else:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import end_to_end  # noqa: E402
    import engine  # noqa: E402
    import orchestration  # noqa: E402
    from common import as_dicts, format_table  # noqa: E402


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if "model name" in line)
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} CPUs visible, run on 2"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="CI mode: small data, report only")
    parser.add_argument("--data", default=None, help="end-to-end dataset cache folder")
    parser.add_argument("--json", action="store_true", help="also print one JSON line")
    args = parser.parse_args(argv)
    start = time.monotonic()
    measures = []
    for name, run in (
        ("engine", lambda: engine.measure(args.short)),
        ("end to end", lambda: end_to_end.measure(args.short, args.data)),
        ("orchestration", lambda: orchestration.measure(args.short)),
    ):
        print(f"-- {name} ...", flush=True)
        measures += run().measures
    print(
        f"\n{'short' if args.short else 'full'} run on {machine()}, "
        f"{time.monotonic() - start:.0f} s\n"
    )
    print(format_table(measures))
    for m in measures:
        if m.note:
            print(f"- {m.section}: {m.note}")
    if args.json:
        print(json.dumps(as_dicts(measures)))
    unequal = [m.section for m in measures if m.equal is False]
    missed = [m.section for m in measures if m.ok is False]
    if unequal:
        print(f"results differ from pyFAI's: {', '.join(unequal)}", file=sys.stderr)
        return 1
    if missed and not args.short:
        print(f"targets missed: {', '.join(missed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
