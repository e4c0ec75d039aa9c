"""Output paths and the existing_output policy."""

from __future__ import annotations

import os
import time

import pytest

from tasks.config import Config
from tasks.discovery import LimaSlice, Scan
from tasks.errors import OutputError
from tasks.outputs import must_process, output_folder, output_path
from tasks.writers import atomic_h5


def make_config(tmp_path, policy="skip", location=""):
    ini = tmp_path / "c.ini"
    ini.write_text(
        f"[dataset]\nlocation = x.h5\n[azimuthal integration]\nponi_file = p.poni\n"
        f"detector_name = pilatus\n[output]\nexisting_output = {policy}\n"
        f"location = {location}\n"
    )
    return Config.from_file(ini)


def test_processed_data_mirrors_raw_data(tmp_path):
    config = make_config(tmp_path)
    master = "/data/visitor/ma1/id15a/20261124/RAW_DATA/sampleA/sampleA_0001/sampleA_0001.h5"
    assert str(output_folder(config, master)) == (
        "/data/visitor/ma1/id15a/20261124/PROCESSED_DATA/sampleA/sampleA_0001"
    )
    scan = Scan(master, "3.1", (LimaSlice("l.h5", "/d", 0, 1, 0),), (2, 2))
    assert output_path(config, scan).endswith("sampleA_0001/azint_sampleA_0001_scan0003_pilatus.h5")
    located = make_config(tmp_path, location=str(tmp_path / "out"))
    assert output_folder(located, master) == tmp_path / "out" / "sampleA" / "sampleA_0001"


def write_output(path, fingerprint):
    with atomic_h5(str(path)) as h5:
        h5.attrs["ringflow_fingerprint"] = fingerprint


def test_existing_output_policies(tmp_path):
    out = tmp_path / "o.h5"
    assert must_process(make_config(tmp_path, "skip"), str(out), "abc")  # nothing there yet
    write_output(out, "abc")
    assert not must_process(make_config(tmp_path, "skip"), str(out), "abc")
    with pytest.raises(OutputError, match="another configuration"):
        must_process(make_config(tmp_path, "skip"), str(out), "other")
    assert must_process(make_config(tmp_path, "overwrite"), str(out), "abc")
    with pytest.raises(OutputError, match="existing_output = raise"):
        must_process(make_config(tmp_path, "raise"), str(out), "abc")
    config = make_config(tmp_path, "reprocess_if_conffile_more_recent")
    past = time.time() - 100
    os.utime(config.source, (past, past))
    assert not must_process(config, str(out), "abc")  # output newer than the config
    os.utime(config.source, (time.time() + 100, time.time() + 100))
    assert must_process(config, str(out), "abc")


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "final.h5"
    with pytest.raises(RuntimeError), atomic_h5(str(target)) as h5:
        h5["x"] = 1
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
