"""Where each part of an output lies: the one definition the writer and every reader use.

An output follows the NeXus application definitions of azimuthal integration, NXazint1d and
NXazint2d (FAIRmat, from MAX IV's azint writer; pyFAI writes NXazint1d too). They fix the
names inside the entry: one NXdata whose signal is ``I``, with ``I_errors`` and
``radial_axis`` (and ``azimuthal_axis`` for a cake), an NXprocess ``reduction`` whose
``input`` holds the parameters, an NXinstrument with the wavelength and energy, and the
corrections applied as booleans. The definitions allow a single NXdata directly in the entry,
so the other plottable groups (the scan's average, the corrected frames) lie in ``reduction``.

They cover radial axes in 2θ and q only: for any other unit (r_mm, ...) the same layout is
written without ``definition``, since the file would not be valid for it.
"""

from __future__ import annotations

DATA = "integrated"  # the entry's NXdata
SIGNAL = "I"
ERRORS = "I_errors"
RADIAL = "radial_axis"
AZIMUTHAL = "azimuthal_axis"
FRAME = "frame_index"  # the frames' axis: an AXISNAME_indices coordinate of dimension 0
PROCESS = "reduction"
PARAMETERS = f"{PROCESS}/input"
CORRECTED = f"{PROCESS}/corrected"
MONITOR = "monitor"
METHOD = f"{PROCESS}/note"  # the pyFAI method that ran
RADIAL_RANGE = f"{PARAMETERS}/radial_range"
CONFIGURATION = f"{PARAMETERS}/configuration"  # the INI text
PYFAI_CONFIG = f"{PARAMETERS}/pyfai_config"  # JSON pyFAI's worker and pyFAI-integrate load
REFERENCE = "https://doi.org/10.1107/S1600576715004306"  # pyFAI (J. Appl. Cryst. 2015)

# pyFAI's radial units the definitions cover, with the long_name they ask for
DEFINED_RADIAL = {"2th_deg": "2theta", "2th_rad": "2theta", "q_nm^-1": "q", "q_A^-1": "q"}
UNITS = {
    "2th_deg": "deg",
    "2th_rad": "rad",
    "q_nm^-1": "1/nm",
    "q_A^-1": "1/angstrom",
    "r_mm": "mm",
    "r_m": "m",
    "chi_deg": "deg",
}


def average(kind: str) -> str:
    """The group of the scan's ``average_xy`` (mean or median over its frames)."""
    return f"{PROCESS}/{DATA}_{kind}"


def definition(unit: str, two_d: bool) -> str | None:
    """NXazint1d or NXazint2d when ``unit`` is one they cover, else None."""
    if unit not in DEFINED_RADIAL:
        return None
    return "NXazint2d" if two_d else "NXazint1d"


def radial_long_name(unit: str) -> str:
    """``2theta`` or ``q`` as the definitions name them; other units by pyFAI's quantity."""
    return DEFINED_RADIAL.get(unit, unit.split("_", 1)[0])


def units_of(unit: str) -> str:
    """The NeXus ``units`` of a pyFAI unit name."""
    return UNITS.get(unit, unit.split("_", 1)[-1])
