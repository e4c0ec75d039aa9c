"""The scan callback's output: compressed and checksummed, with the partials' values exactly.

``assemble_scan.run`` is the chord callback's own body, called in this process on partial
files written by the same code the integration workers use.
"""

from __future__ import annotations

import shutil
import subprocess
import tracemalloc
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest

from tasks.assemble import assemble_scan, bin_blocks
from tasks.chunk_writer import ChunkWriter, Storage
from tasks.codecs import Filters
from tasks.config import Config
from tasks.partials import SLAB_BYTES, Partial, iter_rows, read_header, write_partial
from tasks.payloads import ScanTask

from .services import unavailable

PONI = "poni_version: 2\nDetector: Pilatus1M\nDistance: 0.2\nPoni1: 0.08\nPoni2: 0.08\n"
PONI += "Rot1: 0\nRot2: 0\nRot3: 0\nWavelength: 1e-10\n"


def provenance(method: str = "bbox/csr/cython batched") -> dict:
    """What an engine stores in its partials (tasks.engine.provenance_of and the method)."""
    return {
        "geometry": {"poni_file": "x.poni", "detector": "Pilatus 1M", "dist": 0.2},
        "pyFAI": "2026.9.0",
        "method": method,
        "radial_range": [0.1, 50.0],
    }


def make_partials(tmp_path, rows_per_file, cake=False, seed=0) -> list[Partial]:
    rng = np.random.default_rng(seed)
    bins = (36, 500) if cake else (1000,)
    parts = []
    for index, rows in enumerate(rows_per_file):
        intensity = (rng.gamma(2.0, 50.0, (rows, *bins))).astype(np.float32)
        intensity[:, 0] = np.nan  # empty bins are NaN in pyFAI's results
        parts.append(
            Partial(
                intensity=intensity,
                sigma=np.sqrt(intensity).astype(np.float32),
                radial=np.linspace(0.1, 50, bins[-1]),
                azimuthal=np.linspace(-175, 175, bins[0]) if cake else None,
                source_file=f"/data/RAW_DATA/sample/scan0001/pilatus_{index:04d}.h5",
                source_dataset="/entry_0000/measurement/data",
                source_frame=np.arange(rows),
                normalization=np.ones(rows),
                provenance=provenance(),
            )
        )
    return parts


def assemble_partials(
    tmp_path,
    parts: list[Partial],
    output: dict[str, str],
    integration: dict | None = None,
    out: str = "",
) -> tuple[dict, str]:
    """The assembly's outcome on ``parts`` written as partials, and its output path (``out``,
    else out/azint_scan.h5 in ``tmp_path``)."""
    payload = scan_payload(tmp_path, parts, output, integration, out)
    for k, part in enumerate(parts):
        write_partial(payload["partials"][k], part)
    return assemble_scan.run([{"status": "done"}] * len(parts), payload), payload["output"]


def scan_payload(
    tmp_path,
    parts: list[Partial],
    output: dict[str, str],
    integration: dict | None = None,
    out: str = "",
) -> dict:
    """The scan task of :func:`assemble_partials` (its partials not written)."""
    (tmp_path / "x.poni").write_text(PONI)
    ai = {"poni_file": str(tmp_path / "x.poni"), "unit": "q_nm^-1"} | (integration or {})
    mapping = {
        "dataset": {"location": str(tmp_path / "*.h5")},
        "azimuthal integration": ai,
        "output": output,
    }
    config = Config.from_mapping(mapping)
    return ScanTask(
        job_id="j",
        prefix="t",
        scan_key="scan",
        master="",
        entry="",
        label="1.1",
        output=out or str(tmp_path / "out" / "azint_scan.h5"),
        n_frames=sum(len(p.intensity) for p in parts),
        partials=[str(tmp_path / "partials" / f"{k:04d}.h5") for k in range(len(parts))],
        config=config.payload_mapping(),
    ).to_dict()


def run_assembly(
    tmp_path, parts: list[Partial], output: dict[str, str], integration: dict | None = None
) -> str:
    outcome, out = assemble_partials(tmp_path, parts, output, integration)
    assert outcome["status"] == "done", outcome
    assert not any((tmp_path / "partials").glob("*.h5"))  # removed once the output exists
    return out


@pytest.mark.parametrize("cake", [False, True])
def test_output_is_compressed_checksummed_and_equal_to_partials(tmp_path, cake):
    parts = make_partials(tmp_path, [7, 5, 9], cake=cake)
    out = run_assembly(tmp_path, parts, {"chunk_frames": "4"})
    with h5py.File(out) as h5:
        data = h5["entry_0000/integrated"]
        for name, expected in (
            ("I", np.concatenate([p.intensity for p in parts])),
            ("I_errors", np.concatenate([p.sigma for p in parts])),
        ):
            dset = data[name]
            assert dset.compression == "gzip" and dset.compression_opts == 1
            assert dset.shuffle and dset.fletcher32
            assert dset.chunks == (4, *expected.shape[1:])  # 21 rows: last chunk partial
            assert dset[()].tobytes() == expected.tobytes()  # bit for bit, NaN included
        files = [s.decode() for s in data["source_file"][()]]
        assert files == [p.source_file for p in parts for _ in range(len(p.intensity))]
        assert list(data["frame_index"]) == list(range(21))
        assert data["source_frame"][()].tolist() == [*range(7), *range(5), *range(9)]


def test_codec_choice_reaches_the_output(tmp_path):
    parts = make_partials(tmp_path, [6, 6], cake=True, seed=2)
    out = run_assembly(tmp_path, parts, {"codec": "zstd", "level": "5", "checksum": "1"})
    with h5py.File(out) as h5:
        dset = h5["entry_0000/integrated/I"]
        plist = dset.id.get_create_plist()
        filters = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
        assert filters == [2, 32015, 3]  # shuffle, zstd, fletcher32
        assert plist.get_filter(1)[2] == (5,)
        expected = np.concatenate([p.intensity for p in parts])
        assert dset[()].tobytes() == expected.tobytes()


def test_h5ls_shows_the_filters(tmp_path):
    if not shutil.which("h5ls"):
        unavailable("h5ls is not installed (apt install hdf5-tools); h5py checks above cover it")
    out = run_assembly(tmp_path, make_partials(tmp_path, [5, 5]), {})
    listing = subprocess.run(
        ["h5ls", "-v", f"{out}/entry_0000/integrated/I"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "deflate" in listing and "fletcher32" in listing and "shuffle" in listing


def test_uncompressed_when_asked(tmp_path):
    parts = make_partials(tmp_path, [3, 3])
    out = run_assembly(tmp_path, parts, {"codec": "none", "checksum": "0"})
    with h5py.File(out) as h5:
        dset = h5["entry_0000/integrated/I"]
        assert dset.compression is None and not dset.fletcher32
        assert dset[()].tobytes() == np.concatenate([p.intensity for p in parts]).tobytes()


@pytest.mark.parametrize("kind", ["mean", "median"])
@pytest.mark.parametrize("cake", [False, True])
def test_average_in_small_blocks_equals_numpy_on_everything(tmp_path, monkeypatch, kind, cake):
    """Averages read the partials block by block; a tiny budget forces blocks of a few bins."""
    import tasks.assemble as assemble

    parts = make_partials(tmp_path, [4, 3, 5], cake=cake, seed=4)
    for k, part in enumerate(parts):
        write_partial(str(tmp_path / f"{k}.h5"), part)
    headers = [read_header(str(tmp_path / f"{k}.h5")) for k in range(len(parts))]
    monkeypatch.setattr(assemble, "AVERAGE_BYTES", 12 * 4 * 7)  # 7 bins of 12 frames
    average = assemble._average(headers, kind, 12)
    reduce = np.nanmean if kind == "mean" else np.nanmedian
    for got, name in ((average.intensity, "intensity"), (average.errors, "sigma")):
        stacked = np.concatenate([getattr(p, name) for p in parts])
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            expected = reduce(stacked, axis=0).astype(np.float32)
        np.testing.assert_allclose(got, expected, rtol=1e-6, equal_nan=True)


def test_bin_blocks_cover_every_bin_once():
    for shape, per_bin, budget in [((1000,), 40, 400), ((36, 500), 40, 400), ((36, 500), 4, 8000)]:
        seen = np.zeros(shape, dtype=int)
        for where in bin_blocks(shape, per_bin, budget):
            seen[where] += 1
            assert seen[where].size * per_bin <= max(budget, per_bin)
        assert (seen == 1).all()


def test_streaming_partials_holds_slabs_not_the_dataset(tmp_path):
    """A 64 MiB partial streamed into the pool: peak memory is a slab plus chunks in flight."""
    rows, width = 2048, 8192  # float32: 64 MiB, auto chunks of 32 rows (1 MiB)
    path = str(tmp_path / "p.h5")
    with h5py.File(path, "w") as h5:
        dset = h5.create_dataset("intensity", (rows, width), np.float32)
        for start in range(0, rows, 256):
            dset[start : start + 256] = np.random.default_rng(start).random((256, width))
    filters = Filters("deflate", 1)
    tracemalloc.start()
    try:
        with h5py.File(tmp_path / "out.h5", "w") as h5, ChunkWriter(2, in_flight=2) as pool:
            out = pool.create(h5, "x", (rows, width), np.float32, Storage(filters))
            pool.write(out, iter_rows(path, "intensity"), filters)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * SLAB_BYTES + 8 * 2**20, f"peak {peak / 2**20:.1f} MiB for 64 MiB"
    with h5py.File(tmp_path / "out.h5") as h5, h5py.File(path) as src:
        assert h5["x"][()].tobytes() == src["intensity"][()].tobytes()


def test_an_assembly_delivered_again_after_it_wrote_is_done(tmp_path):
    """A worker killed after the output was written and the partials removed, before the
    task was acknowledged: the redelivered assembly reports the scan done, output intact."""
    parts = make_partials(tmp_path, [3, 4])
    first, out = assemble_partials(tmp_path, parts, {})
    assert first["status"] == "done" and not any((tmp_path / "partials").glob("*.h5"))
    before = Path(out).read_bytes()
    payload = scan_payload(tmp_path, parts, {})  # the same scan, delivered again
    again = assemble_scan.run([{"status": "done"}] * 2, payload)
    assert again == {"status": "done", "scan": "scan", "output": out, "frames": 7}, again
    assert Path(out).read_bytes() == before
    wrong = dict(payload, n_frames=8)  # not this scan's output: rebuilt, and fails (no partial)
    assert assemble_scan.run([{"status": "done"}] * 2, wrong)["status"] == "failed"


def test_an_assembly_killed_while_removing_partials_is_done_when_delivered_again(tmp_path):
    """Killed after the output took its name and the first partial went, the second still
    there: the redelivery keeps the output, removes the rest and reports the scan done."""
    parts = make_partials(tmp_path, [3, 4])
    payload = scan_payload(tmp_path, parts, {})
    first, out = assemble_partials(tmp_path, parts, {})
    assert first["status"] == "done"
    write_partial(payload["partials"][1], parts[1])  # as if the kill came before its unlink
    before = Path(out).read_bytes()
    again = assemble_scan.run([{"status": "done"}] * 2, payload)
    assert again == {"status": "done", "scan": "scan", "output": out, "frames": 7}, again
    assert Path(out).read_bytes() == before
    assert not any((tmp_path / "partials").glob("*.h5"))
