"""The scan callback's output: compressed and checksummed, with the partials' values exactly.

``assemble_scan.run`` is the chord callback's own body, called in this process on partial
files written by the same code the integration workers use.
"""

from __future__ import annotations

import shutil
import subprocess

import h5py
import numpy as np
import pytest

from tasks.assemble import assemble_scan
from tasks.config import Config
from tasks.partials import Partial, write_partial
from tasks.payloads import ScanTask

from .services import unavailable

PONI = "poni_version: 2\nDetector: Pilatus1M\nDistance: 0.2\nPoni1: 0.08\nPoni2: 0.08\n"
PONI += "Rot1: 0\nRot2: 0\nRot3: 0\nWavelength: 1e-10\n"


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
            )
        )
    return parts


def run_assembly(tmp_path, parts: list[Partial], output: dict[str, str]) -> str:
    (tmp_path / "x.poni").write_text(PONI)
    mapping = {
        "dataset": {"location": str(tmp_path / "*.h5")},
        "azimuthal integration": {"poni_file": str(tmp_path / "x.poni"), "unit": "q_nm^-1"},
        "output": output,
    }
    config = Config.from_mapping(mapping)
    paths = []
    for k, part in enumerate(parts):
        paths.append(str(tmp_path / "partials" / f"{k:04d}.h5"))
        write_partial(paths[-1], part)
    out = str(tmp_path / "out" / "azint_scan.h5")
    payload = ScanTask(
        job_id="j",
        prefix="t",
        scan_key="scan",
        master="",
        entry="",
        label="1.1",
        output=out,
        n_frames=sum(len(p.intensity) for p in parts),
        partials=paths,
        config=config.payload_mapping(),
    ).to_dict()
    outcome = assemble_scan.run([{"status": "done"}] * len(parts), payload)
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
            ("intensity", np.concatenate([p.intensity for p in parts])),
            ("errors", np.concatenate([p.sigma for p in parts])),
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
        dset = h5["entry_0000/integrated/intensity"]
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
        ["h5ls", "-v", f"{out}/entry_0000/integrated/intensity"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "deflate" in listing and "fletcher32" in listing and "shuffle" in listing


def test_uncompressed_when_asked(tmp_path):
    parts = make_partials(tmp_path, [3, 3])
    out = run_assembly(tmp_path, parts, {"codec": "none", "checksum": "0"})
    with h5py.File(out) as h5:
        dset = h5["entry_0000/integrated/intensity"]
        assert dset.compression is None and not dset.fletcher32
        assert dset[()].tobytes() == np.concatenate([p.intensity for p in parts]).tobytes()
