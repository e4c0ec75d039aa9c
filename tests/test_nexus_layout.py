"""The output's layout as NXazint1d / NXazint2d, checked by the field's own tools.

Outputs written by the real writer (``write_nexus``) from rows made here; the outputs of real
runs are checked the same way in ``test_end_to_end`` (1D with a monitor, and a cake).
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from tasks.chunk_writer import Storage
from tasks.codecs import Filters
from tasks.writers import Applied, Average, OutputStorage, ScanResult, write_nexus

from .nexus_checks import assert_valid_nexus, validator_warnings
from .test_plot_export import rings, stream

FRAMES, NPT, SLICES = 6, 200, 8
WAVELENGTH_M = 0.7e-10


def write_scan(path: Path, unit: str = "2th_deg", cake: bool = False, monitor: bool = True):
    shape = (FRAMES, SLICES, NPT) if cake else (FRAMES, NPT)
    intensity = rings(shape, 4)
    errors = np.sqrt(np.abs(intensity)).astype(np.float32)
    with np.errstate(invalid="ignore"), pytest.warns(RuntimeWarning):  # the empty bin
        mean = Average("mean", np.nanmean(intensity, 0), np.nanmean(errors, 0))
    result = ScanResult(
        entry="1.1",
        intensity=stream(intensity),
        sigma=stream(errors),
        radial=np.linspace(1.0, 40.0, NPT),
        unit=unit,
        azimuthal=np.linspace(-170.0, 170.0, SLICES) if cake else None,
        source_file=["/data/visitor/ma1234/id11/20261201/RAW_DATA/s/s_0001/p.h5"] * FRAMES,
        source_frame=np.arange(FRAMES),
        normalization=np.linspace(1, 2, FRAMES) if monitor else None,
        configuration="[azimuthal integration]\nn_pts = 200\n",
        geometry={"dist": 0.2, "poni1": 0.1, "poni2": 0.1, "rot1": 0.0, "wavelength": WAVELENGTH_M},
        versions={"ringflow": "test", "pyFAI": "2026.9.0"},
        method="bbox/csr/cython batched",
        radial_range=(1.0, 40.0),
        fingerprint="f",
        metadata={
            "title": "ascan x 0 1 5 0.1",
            "positioners": {"x": np.arange(FRAMES, dtype=float)},
        },
        average=mean,
        applied=Applied(solid_angle=True, polarization=True, monitor=monitor),
        pyfai_config={"application": "worker", "nbpt_rad": NPT, "unit": unit},
        instrument="id11",
    )
    deflate = Filters("deflate", 1, True, True)
    storage = OutputStorage(Storage(deflate, 4), Storage(deflate, 1), Storage(deflate, 1), 2)
    write_nexus(str(path), result, storage, 0o644)
    return str(path)


@pytest.mark.parametrize(
    ("unit", "cake", "definition"),
    [("2th_deg", False, "NXazint1d"), ("q_A^-1", True, "NXazint2d")],
)
def test_outputs_in_2theta_or_q_follow_nxazint(tmp_path, unit, cake, definition):
    path = write_scan(tmp_path / "o.h5", unit, cake)
    assert_valid_nexus(path, definition)
    with h5py.File(path) as h5:
        entry = h5["1.1"]
        radial = entry["integrated/radial_axis"]
        assert radial.attrs["long_name"] == ("2theta" if unit.startswith("2th") else "q")
        mono = entry["instrument/monochromator"]
        assert mono["wavelength"][()] == pytest.approx(0.7) and mono["wavelength"].attrs["units"]
        assert mono["energy"][()] == pytest.approx(12.398419843 / 0.7)
        assert mono["energy"].attrs["units"] == "keV"
        assert entry["instrument/name"][()] == b"id11"
        assert entry["reduction/input/dist"].attrs["units"] == "m"
        assert entry["reduction/input/rot1"].attrs["units"] == "rad"
        assert entry["monitor/data"].shape == (FRAMES,)
        assert entry["title"][()] == b"ascan x 0 1 5 0.1"
        assert entry["integrated"].attrs["frame_index_indices"] == 0


def test_a_radial_unit_the_definitions_leave_out_names_no_definition(tmp_path):
    path = write_scan(tmp_path / "o.h5", "r_mm", monitor=False)
    assert_valid_nexus(path, None)  # silx and nexusformat still read it
    with h5py.File(path) as h5:
        radial = h5["1.1/integrated/radial_axis"]
        assert (radial.attrs["long_name"], radial.attrs["units"]) == ("r", "mm")
        assert "monitor" not in h5["1.1"] and not h5["1.1/monitor_applied"][()]


def test_the_validator_still_fails_an_output_missing_what_nxazint_requires(tmp_path):
    """The accepted false positives leave the validator able to fail a file."""
    path = write_scan(tmp_path / "o.h5")
    with h5py.File(path, "a") as h5:
        del h5["1.1/instrument/monochromator/energy"], h5["1.1/reduction/program"]
        h5["1.1/integrated"].attrs["signal"] = "source_frame"
    problems = "\n".join(validator_warnings(path))
    for missing in ("monochromator/energy", "reduction/program", "@signal"):
        assert missing in problems, problems
