"""An output as the field's own readers see it: pynxtools' validator, silx and nexusformat.

``pynx validate`` (pynxtools 0.16) reports one thing of every file that follows NXazint1d or
NXazint2d: the definitions declare ``units`` as an attribute of ``I``, ``radial_axis`` and
``azimuthal_axis``, and the validator skips ``units`` attributes when it matches a file's
attributes, so it calls them missing however the file is written. Those lines (and the
"NOT valid" verdict they alone cause) are accepted only where the file has that attribute;
any other warning fails.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import h5py

UNITS_NEVER_MATCHED = re.compile(r"The required attribute (/\S+)/@units hasn't been supplied\.")
VERDICT = re.compile(r"Invalid: The entry `[^`]+` in file `[^`]+` is NOT valid according to")


def pynx_command() -> list[str]:
    """``pynx`` beside this Python (the test extra installs pynxtools), else on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "pynx")
    found = beside if os.path.exists(beside) else shutil.which("pynx")
    assert found, "pynx (pynxtools, from the test extra) is not installed"
    return [found, "validate"]


def validator_warnings(path: str) -> list[str]:
    """What ``pynx validate`` warns of ``path``, the known false positives left out."""
    result = subprocess.run(
        [*pynx_command(), path], capture_output=True, text=True, timeout=180, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [
        line.removeprefix("WARNING: ")
        for line in (result.stdout + result.stderr).splitlines()
        if line.startswith("WARNING:")
    ]
    left = []
    with h5py.File(path, "r") as h5:
        for line in lines:
            match = UNITS_NEVER_MATCHED.fullmatch(line)
            if match and "units" in h5[match.group(1)].attrs:
                continue
            left.append(line)
    if len(left) == 1 and VERDICT.match(left[0]):
        return []  # the verdict of the accepted lines alone
    return left


def assert_valid_nexus(path: str, definition: str | None) -> None:
    """``path`` names ``definition`` in every entry and passes the validator, silx's NXdata
    checks and nexusformat's reading."""
    with h5py.File(path, "r") as h5:
        for name, entry in h5.items():
            named = entry["definition"][()].decode() if "definition" in entry else None
            assert named == definition, f"{name}: definition {named!r}"
    if definition:
        problems = validator_warnings(path)
        assert problems == [], f"{path}: {problems}"
    assert_silx_reads(path)
    assert_nexusformat_reads(path)


def assert_silx_reads(path: str) -> None:
    """silx finds the default NXdata, and it is valid, with labelled axes and signal."""
    from silx.io import nxdata
    from silx.io.utils import open as silx_open

    with silx_open(path) as h5:
        for name, entry in h5.items():
            group = nxdata.get_default(entry)
            assert group is not None and group.is_valid, f"{name}: {nxdata.NXdata(entry)}"
            assert group.signal.name.rsplit("/", 1)[-1] == "I"
            assert group.signal_name == "intensity"  # silx's label: the long_name
            assert group.axes_dataset_names[-1] == "radial_axis"
            assert "units" in group.axes[-1].attrs and group.title
            assert group.errors is not None
            for child in ("reduction/integrated_mean", "reduction/corrected"):
                if child in entry:
                    assert nxdata.is_valid_nxdata(entry[child]), f"{name}/{child}"


def assert_nexusformat_reads(path: str) -> None:
    from nexusformat.nexus import nxload

    root = nxload(path, "r")
    try:
        for name in root:
            data = root[name].plottable_data
            assert data is not None and data.nxsignal.nxname == "I", name
    finally:
        root.nxfile.close()
