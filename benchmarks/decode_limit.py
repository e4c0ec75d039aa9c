"""The decode-only limit of a set of Lima files: every frame's chunk read with h5py's
``read_direct_chunk`` and decoded by bitshuffle's C decoder, nothing else, in ``--processes``
processes (files dealt round-robin), one thread each (``OMP_NUM_THREADS=1``).

No reduction of the same frames can be faster than this on the same CPUs: the end-to-end
benchmark reports ringflow's wall time against it. The time printed runs from the fork of the
processes to their end (interpreter start and imports are not in it).

    OMP_NUM_THREADS=1 python benchmarks/decode_limit.py FILE.h5 [...] [--processes 2]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tasks.readers import bitshuffle_lz4_decode  # noqa: E402

LIMA = "/entry_0000/measurement/data"


def decode_files(paths: list[str]) -> int:
    """Frames decoded from ``paths``, one chunk (a frame) at a time into one buffer."""
    frames = 0
    for path in paths:
        with h5py.File(path, "r") as h5:
            dset = h5[LIMA]
            out = np.empty(dset.shape[1:], dset.dtype)
            for k in range(dset.shape[0]):
                _, raw = dset.id.read_direct_chunk((k, *([0] * (dset.ndim - 1))))
                bitshuffle_lz4_decode(raw, out)
                frames += 1
    return frames


def decode_limit(paths: list[str], processes: int) -> tuple[float, int]:
    """(seconds, frames) of decoding ``paths`` in ``processes`` forked processes."""
    shares = [paths[k::processes] for k in range(processes)]
    started = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        frames = sum(pool.map(decode_files, shares))
    return time.perf_counter() - started, frames


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args(argv)
    if os.environ.get("OMP_NUM_THREADS") != "1":
        print("note: OMP_NUM_THREADS is not 1: bitshuffle's OpenMP team oversubscribes")
    seconds, frames = decode_limit(args.files, args.processes)
    print(json.dumps({"seconds": seconds, "frames": frames, "processes": args.processes}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
