"""Discovery of scans and Lima files: virtual datasets, external links, plain Lima files."""

from __future__ import annotations

import h5py
import numpy as np

from tasks.config import Config
from tasks.discovery import LIMA_DATASET, discover


def config_for(location: str, **ai) -> Config:
    section = {"poni_file": "/x.poni", "detector_name": "pilatus", **ai}
    return Config.from_mapping(
        {"dataset": {"location": location}, "azimuthal integration": section}
    )


def test_demo_virtual_datasets_resolve_to_lima_files_in_order(small_demo):
    found = discover(config_for(small_demo.dataset, monitor_name="mon"))
    assert found.problems == []
    assert [s.entry for s in found.scans] == ["1.1", "2.1"]
    scan = found.scans[0]
    assert scan.label == "scan0001" and scan.n_frames == 8 and scan.frame_shape == (1043, 981)
    assert [s.path.rsplit("/", 2)[-2:] for s in scan.slices] == [
        ["scan0001", "pilatus_0000.h5"],
        ["scan0001", "pilatus_0001.h5"],
    ]
    assert [(s.src_start, s.n_frames, s.scan_start) for s in scan.slices] == [(0, 4, 0), (0, 4, 4)]
    with h5py.File(small_demo.dataset) as h5:
        assert np.allclose(scan.monitor, h5["1.1/measurement/mon"][()])


def _lima(path, frames: np.ndarray):
    with h5py.File(path, "w") as h5:
        h5[LIMA_DATASET] = frames


def test_external_links_instead_of_virtual_dataset(tmp_path):
    frames = np.arange(5 * 4 * 3, dtype=np.int32).reshape(5, 4, 3)
    _lima(tmp_path / "det_0000.h5", frames[:3])
    _lima(tmp_path / "det_0001.h5", frames[3:])
    with h5py.File(tmp_path / "master.h5", "w") as h5:
        group = h5.create_group("1.1/measurement/det")
        # names sort naturally: data_2 before data_10
        group["data_10"] = h5py.ExternalLink("det_0001.h5", LIMA_DATASET)
        group["data_2"] = h5py.ExternalLink("det_0000.h5", LIMA_DATASET)
        h5["3.1/measurement/det"] = h5py.ExternalLink("det_0001.h5", LIMA_DATASET)
    found = discover(config_for(str(tmp_path / "master.h5"), detector_name="det"))
    assert found.problems == []
    first, second = found.scans
    assert [(s.path.rsplit("/", 1)[-1], s.n_frames, s.scan_start) for s in first.slices] == [
        ("det_0000.h5", 3, 0),
        ("det_0001.h5", 2, 3),
    ]
    assert first.frame_shape == (4, 3)
    assert second.entry == "3.1" and second.n_frames == 2


def test_plain_lima_files_given_directly(tmp_path):
    _lima(tmp_path / "eiger_0000.h5", np.zeros((7, 4, 3), dtype=np.uint16))
    found = discover(config_for(str(tmp_path / "eiger_*.h5")))
    (scan,) = found.scans
    assert scan.entry == "" and scan.n_frames == 7 and scan.label == "eiger_0000"


def test_problems_are_collected_per_file_and_entry(tmp_path, small_demo):
    (tmp_path / "notes.h5").write_text("not hdf5")
    with h5py.File(tmp_path / "other.h5", "w") as h5:
        h5.create_group("1.1/measurement/basler")
    location = f"{small_demo.dataset}, {tmp_path}/notes.h5, {tmp_path}/other.h5, {tmp_path}/no*.x"
    found = discover(config_for(location))
    assert len(found.scans) == 2  # the good file's scans are still there
    messages = [str(p) for p in found.problems]
    assert any("notes.h5: not an HDF5 file" in m for m in messages)
    assert any(
        "other.h5" in m and "detector 'pilatus' not found in entry 1.1" in m and "basler" in m
        for m in messages
    )
    assert any("no*.x" in m and "matches no file" in m for m in messages)
