"""ESRF integrator's own template, as its integrator-config writes it, run unchanged.

The fixture is ``integrator-config --nocomments`` of esrf-integrator 2026.1.2: its keys and
defaults. Only the values a user must fill in are set (dataset, detector, Lima name, mask,
PONI, output folder); everything else, ``ai_method = opencl``, the cluster's
``python_executables``, 8 engines x 4 cores, the empty trim and range keys, stays as
generated. ``ringflow run`` runs it through the real CLI in fresh processes, and every frame
must equal pyFAI under the integrator's meaning of each key, written out here.
"""

from __future__ import annotations

import fabio
import h5py
import numpy as np
import pyFAI
import pytest
from pyFAI.detectors.sensors import ALL_MATERIALS

from .conftest import last_json, run_cli
from .test_config import filled_template
from .test_end_to_end import read_output, scan_frames

pytestmark = pytest.mark.service


def user_values(demo, out) -> dict[str, dict[str, str]]:
    return {
        "dataset": {"location": demo.dataset},
        "azimuthal integration": {
            "detector": "Pilatus1M",
            "detector_name": "pilatus",
            "mask_file": demo.mask,
            "poni_file": demo.poni,
        },
        "output": {"location": str(out)},
    }


def integrator_reference(demo, frames):
    """pyFAI as the integrator calls it with the template's values: r_mm, 2500 bins, hybrid
    errors, polarization 0.99, solid angle, CdTe 0.1 cm attenuation, no splitting, and the
    radial range of the pixel centres (rArray in mm) computed on a separate integrator."""
    ranges = pyFAI.load(demo.poni)
    radial_mm = ranges.rArray() * 1e3
    ai = pyFAI.load(demo.poni)
    mu_d = ALL_MATERIALS["CdTe"].mu(ai.energy, "cm^-1") * 0.1
    cos_tth = np.cos(ai.center_array(unit="2th_rad", scale=False))
    absorption = (1 - np.exp(-mu_d / cos_tth)) / (1 - np.exp(-mu_d))
    kwargs = dict(
        unit="r_mm",
        method=("no", "csr", "cython"),
        mask=fabio.open(demo.mask).data,
        polarization_factor=0.99,
        correctSolidAngle=True,
        error_model="hybrid",
        radial_range=(float(radial_mm.min()), float(radial_mm.max())),
        absorption=absorption,
    )
    return [ai.integrate1d_ng(frame, 2500, **kwargs) for frame in frames]


def assert_frames_equal(output: dict, references: list) -> None:
    assert output["I"].shape == (len(references), 2500)
    for row, ref in enumerate(references):
        floor = 1e-3 * np.abs(ref.intensity).max()
        error = np.abs(output["I"][row] - ref.intensity)
        assert (error / np.maximum(np.abs(ref.intensity), floor)).max() <= 1e-5, row
        error = np.abs(output["I_errors"][row] - ref.sigma)
        assert (error / np.maximum(np.abs(ref.sigma), 1e-3 * ref.sigma.max())).max() <= 1e-4
    np.testing.assert_allclose(output["radial_axis"], references[0].radial, rtol=1e-6)


@pytest.mark.parametrize("comments", [False, True], ids=["as generated", "with comments"])
def test_the_integrators_template_runs_unchanged(small_demo, tmp_path, comments):
    path = filled_template(tmp_path, user_values(small_demo, tmp_path / "out"))
    if comments:  # comment lines as users write them: above keys, between sections
        text = path.read_text().replace("\n[", "\n# next section\n[")
        path.write_text("# my beamtime, copied from integrator-config\n" + text)
    result = run_cli("run", path, "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    assert len([n for n in notes if "ai_method = opencl" in n]) == 1, result.stderr
    assert not [line for line in result.stderr.splitlines() if "failed" in line.lower()]
    outputs = sorted(last_json(result.stdout)["outputs"])
    assert len(outputs) == 2
    for output, entry in zip(outputs, ("1.1", "2.1"), strict=True):
        frames, _, _ = scan_frames(small_demo.dataset, entry)
        data, _ = read_output(output, entry)
        assert_frames_equal(data, integrator_reference(small_demo, frames))
        with h5py.File(output) as h5:
            assert h5[f"{entry}/reduction/note"][()].decode().endswith("cython batched")
            lo, hi = h5[f"{entry}/reduction/input/radial_range"][()]
        assert lo < hi
