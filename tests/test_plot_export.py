"""`ringflow plot` and `ringflow export` on real outputs, written by ringflow's own writer.

A 1D scan (frames x radial, with errors, NaN in its first bin as pyFAI leaves empty bins) and
a cake (frames x azimuthal x radial), written by :func:`tasks.writers.write_nexus` as an
assembly writes them. The figures are read back: their pixel size, and not blank. The text
files are read back with numpy and compared with numpy's own reductions of the datasets.
A scan's plot and its export run as a user runs them (a fresh process each); the other
cases, the mistakes among them, through Click's runner in this process (a fresh process
costs ~2 s of imports on this machine, and the file would take a minute).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from tasks.chunk_writer import Storage
from tasks.codecs import Filters
from tasks.writers import Average, OutputStorage, ScanResult, Stream, write_nexus

from .conftest import run_cli

FRAMES, NPT, SLICES = 7, 300, 12
RTOL = 1e-6


def stream(values: np.ndarray) -> Stream:
    """A dataset's rows handed to the writer in two slabs, as partials hand them."""
    half = len(values) // 2
    return Stream(values.shape, values.dtype, lambda: iter([values[:half], values[half:]]))


def rings(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Rows of Bragg-like peaks on a background, each frame scaled differently, float32."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, shape[-1])
    peaks = sum(np.exp(-(((x - c) / 0.004) ** 2)) * h for c, h in ((0.2, 50), (0.45, 20), (0.7, 9)))
    scale = np.linspace(1, 3, shape[0]).reshape(-1, *[1] * (len(shape) - 1))
    values = (10 + 100 * peaks) * scale + rng.normal(0, 0.5, shape)
    values[..., 0] = np.nan  # an empty bin
    return values.astype(np.float32)


def write_output(
    path: Path, intensity: np.ndarray, cake: bool = False, average: bool = False
) -> Path:
    """``intensity`` (and its errors) as ringflow writes a scan's output."""
    errors = np.sqrt(np.abs(intensity)).astype(np.float32)
    mean = None
    if average:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            reduced = [np.nanmean(a, axis=0).astype(np.float32) for a in (intensity, errors)]
        mean = Average("mean", *reduced)
    result = ScanResult(
        entry="1.1",
        intensity=stream(intensity),
        sigma=stream(errors),
        radial=np.linspace(1.0, 40.0, intensity.shape[-1]),
        unit="2th_deg",
        azimuthal=np.linspace(-165.0, 165.0, intensity.shape[1]) if cake else None,
        source_file=["/data/RAW_DATA/s/scan0001/pilatus_0000.h5"] * len(intensity),
        source_frame=np.arange(len(intensity)),
        normalization=None,
        configuration="",
        geometry={"dist": 0.2},
        versions={"ringflow": "test"},
        method="bbox/csr/cython batched",
        radial_range=(1.0, 40.0),
        fingerprint="f",
        metadata={"title": "ascan test"},
        average=mean,
    )
    deflate = Filters("deflate", 1, True, True)
    storage = OutputStorage(Storage(deflate, 4), Storage(deflate, 1), Storage(deflate, 1), 2)
    write_nexus(str(path), result, storage, 0o644)
    return path


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("outputs")
    one = write_output(folder / "azint_s_scan0001_pilatus.h5", rings((FRAMES, NPT), 1))
    cake = write_output(
        folder / "azint_s_scan0002_pilatus.h5", rings((4, SLICES, 200), 2), cake=True
    )
    stored = write_output(
        folder / "azint_s_scan0003_pilatus.h5", rings((FRAMES, NPT), 3), average=True
    )
    return {"1d": one, "cake": cake, "stored": stored}


def stack(path: Path, name: str, entry: str = "1.1") -> np.ndarray:
    with h5py.File(path) as h5:
        return h5[f"{entry}/integrated/{name}"][()]


def nanmean(values: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values.astype(np.float64), axis=0)


def read_png(path: Path) -> np.ndarray:
    from matplotlib.image import imread

    return imread(str(path))  # rows x columns x RGBA, floats in [0, 1]


def assert_drawn(image: np.ndarray, size: tuple[int, int]) -> None:
    """The requested pixels, and something drawn: not a blank or single-colour canvas."""
    assert image.shape[:2] == (size[1], size[0])
    assert image[..., :3].std() > 0.05


def assert_heat_map(image: np.ndarray) -> None:
    """The upper half (where the heat map or cake is) holds many colours, not a flat area."""
    height, width = image.shape[:2]
    area = image[height // 5 : height // 2, width // 5 : 3 * width // 5, :3]
    assert area.std() > 0.05
    assert len(np.unique(area.reshape(-1, 3), axis=0)) > 8


# --- plot ------------------------------------------------------------------------------------


def test_a_1d_scan_is_a_heat_map_over_its_mean(outputs, tmp_path):
    png = tmp_path / "scan.png"
    result = run_cli("plot", outputs["1d"], "-o", png, "--size", "900x700")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(png)
    image = read_png(png)
    assert_drawn(image, (900, 700))
    assert_heat_map(image)
    assert not [p for p in os.listdir(tmp_path) if p != "scan.png"]  # no temporary left


def test_a_cake_is_its_mean_cake(outputs, tmp_path):
    png = tmp_path / "cake.png"
    result = invoke("plot", outputs["cake"], "-o", png, "--width", "640", "--height", "480")
    assert result.exit_code == 0, result.output
    image = read_png(png)
    assert_drawn(image, (640, 480))
    assert_heat_map(image)


def test_one_frame_with_its_error_bars_and_one_frame_of_a_cake(outputs, tmp_path):
    png = tmp_path / "frame.png"
    result = invoke("plot", outputs["1d"], "-o", png, "--frame", "3")
    assert result.exit_code == 0, result.output
    assert_drawn(read_png(png), (1200, 800))
    runner = invoke("plot", outputs["cake"], "-o", tmp_path / "c.png", "--frame", "2")
    assert runner.exit_code == 0, runner.output
    assert_heat_map(read_png(tmp_path / "c.png"))


# --- export ----------------------------------------------------------------------------------


def test_the_mean_as_xye_is_numpys_mean_over_every_frame(outputs, tmp_path):
    result = run_cli("export", outputs["1d"], "-o", tmp_path / "mean.xye")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [str(tmp_path / "mean.xye")]
    assert os.listdir(tmp_path) == ["mean.xye"]  # written under a temporary name, renamed
    table = np.loadtxt(tmp_path / "mean.xye")
    assert table.shape == (NPT, 3)
    with h5py.File(outputs["1d"]) as h5:
        radial = h5["1.1/integrated/radial_axis"][()]
    np.testing.assert_allclose(table[:, 0], radial, rtol=RTOL)
    np.testing.assert_allclose(table[:, 1], nanmean(stack(outputs["1d"], "I")), rtol=RTOL)
    np.testing.assert_allclose(table[:, 2], nanmean(stack(outputs["1d"], "I_errors")), rtol=RTOL)
    assert np.isnan(table[0, 1])  # an empty bin stays empty


def test_a_frame_as_csv_names_its_columns_and_units(outputs, tmp_path):
    result = invoke("export", outputs["1d"], "--frame", "4", "--format", "csv")
    assert result.exit_code == 0, result.output
    (path,) = result.stdout.splitlines()
    assert path == str(outputs["1d"]).replace(".h5", "_frame4.csv")  # beside the output
    header = Path(path).read_text().splitlines()[0]
    assert header == "2theta (deg),intensity,errors"
    table = np.loadtxt(path, delimiter=",", skiprows=1)
    np.testing.assert_allclose(table[:, 1], stack(outputs["1d"], "I")[4], rtol=RTOL)
    np.testing.assert_allclose(table[:, 2], stack(outputs["1d"], "I_errors")[4], rtol=RTOL)
    os.unlink(path)


def test_a_stored_average_is_what_is_exported(outputs, tmp_path):
    runner = invoke("export", outputs["stored"], "--mean", "-o", tmp_path)
    assert runner.exit_code == 0, runner.output
    (path,) = runner.stdout.splitlines()
    assert path == str(tmp_path / "azint_s_scan0003_pilatus_mean.xye")
    table = np.loadtxt(path)
    with h5py.File(outputs["stored"]) as h5:
        stored = h5["1.1/reduction/integrated_mean/I"][()]
    np.testing.assert_array_equal(table[:, 1].astype(np.float32), stored)  # 9 digits: exact
    np.testing.assert_allclose(table[:, 1], nanmean(stack(outputs["stored"], "I")), RTOL)


def test_a_cake_gives_one_file_per_slice(outputs, tmp_path):
    runner = invoke("export", outputs["cake"], "-o", tmp_path / "cake.xye")
    assert runner.exit_code == 0, runner.output
    paths = runner.stdout.splitlines()
    assert paths == [str(tmp_path / f"cake_chi{k:02d}.xye") for k in range(1, SLICES + 1)]
    mean = nanmean(stack(outputs["cake"], "I"))
    for k, path in enumerate(paths):
        np.testing.assert_allclose(np.loadtxt(path)[:, 1], mean[k], rtol=RTOL)


def test_a_chosen_entry(outputs, tmp_path):
    path = tmp_path / "two.h5"
    path.write_bytes(outputs["1d"].read_bytes())
    with h5py.File(path, "a") as h5:
        h5.copy("1.1", "2.1")
        h5["2.1/integrated/I"][...] = h5["2.1/integrated/I"][()] * 2
    runner = invoke("export", path, "--entry", "2.1", "--frame", "1", "-o", tmp_path / "e.xye")
    assert runner.exit_code == 0, runner.output
    expected = stack(outputs["1d"], "I")[1] * 2
    np.testing.assert_allclose(np.loadtxt(tmp_path / "e.xye")[:, 1], expected, rtol=RTOL)
    assert invoke("plot", path, "--entry", "2.1", "-o", tmp_path / "e.png").exit_code == 0


def test_the_data_is_found_by_nexus_attributes_not_by_names(tmp_path):
    """An NXazint1d-like layout: other names, ``<signal>_errors``, ``<axis>_indices`` only,
    the root's default naming the second entry."""
    path = tmp_path / "other.h5"
    values = rings((5, 80), 6)
    with h5py.File(path, "w") as h5:
        h5.attrs.update(NX_class="NXroot", default="scan_b")
        h5.create_group("scan_a").attrs["NX_class"] = "NXentry"
        entry = h5.create_group("scan_b")
        entry.attrs.update(NX_class="NXentry", default="result")
        data = entry.create_group("result")
        data.attrs.update(NX_class="NXdata", signal="I", q_indices=1)
        data["I"] = values
        data["I_errors"] = values / 10
        data["q"] = np.linspace(2, 30, 80)
        data["q"].attrs["units"] = "1/nm"
    runner = invoke("export", path, "--frame", "2", "--format", "csv", "-o", tmp_path / "o.csv")
    assert runner.exit_code == 0, runner.output
    assert (tmp_path / "o.csv").read_text().splitlines()[0] == "q (1/nm),I,errors"
    table = np.loadtxt(tmp_path / "o.csv", delimiter=",", skiprows=1)
    np.testing.assert_allclose(table[:, 0], np.linspace(2, 30, 80), rtol=RTOL)
    np.testing.assert_allclose(table[:, 2], values[2] / 10, rtol=RTOL)


def test_an_output_without_errors_gives_two_columns(tmp_path):
    path = write_output(tmp_path / "azint.h5", rings((3, 50), 4))
    with h5py.File(path, "a") as h5:
        del h5["1.1/integrated/I_errors"]
    runner = invoke("export", path, "-o", tmp_path / "m.csv")
    assert runner.exit_code == 0, runner.output
    assert (tmp_path / "m.csv").read_text().splitlines()[0] == "2theta (deg),intensity"
    assert np.loadtxt(tmp_path / "m.csv", delimiter=",", skiprows=1).shape == (50, 2)


# --- mistakes: one line each, exit 2 ---------------------------------------------------------


def invoke(*args):
    from cli.main import app

    return CliRunner().invoke(app, [str(a) for a in args], prog_name="ringflow")


def no_nxdata(tmp_path: Path) -> Path:
    path = tmp_path / "empty.h5"
    with h5py.File(path, "w") as h5:
        h5.attrs["default"] = "1.1"
        h5.create_group("1.1").attrs["NX_class"] = "NXentry"
    return path


MISTAKES = {
    "missing file": (lambda p, o: [p / "nope.h5"], "nope.h5: no such file"),
    "not HDF5": (lambda p, o: [write_text(p / "x.h5")], "x.h5: not an HDF5 file"),
    "no NXdata": (lambda p, o: [no_nxdata(p)], "entry 1.1: no NXdata with a signal to show"),
    "frame out of range": (
        lambda p, o: [o["1d"], "--frame", "7"],
        "--frame 7: out of range, entry 1.1 has 7 frames (0 to 6)",
    ),
    "negative frame": (lambda p, o: [o["cake"], "--frame", "-1"], "--frame -1: out of range"),
    "unknown entry": (
        lambda p, o: [o["1d"], "--entry", "9.1"],
        "--entry 9.1: no such entry (entries: 1.1)",
    ),
}


def write_text(path: Path) -> Path:
    path.write_text("not hdf5\n")
    return path


@pytest.mark.parametrize("command", ["plot", "export"])
@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_mistakes_are_one_line_and_exit_2(outputs, tmp_path, command, mistake):
    make, message = MISTAKES[mistake]
    args = make(tmp_path, outputs)
    extra = ["-o", tmp_path / "x.png"] if command == "plot" else []
    result = invoke(command, *args, *extra)
    assert result.exit_code == 2, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit)  # no traceback
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    if mistake in ("missing file", "not HDF5", "no NXdata"):
        assert str(args[0]) in lines[0]  # the file is named
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob("*.xye"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--size", "big"], "--size big: expected WIDTHxHEIGHT in pixels"),
        (["--size", "800x600", "--width", "10"], "give one or the other"),
        (["--width", "50"], "--width 50: expected 100 to 10000 pixels"),
    ],
)
def test_bad_sizes_are_one_line(outputs, tmp_path, args, message):
    result = invoke("plot", outputs["1d"], "-o", tmp_path / "x.png", *args)
    assert result.exit_code == 2 and message in result.stderr, result.output


def test_export_usage_mistakes(outputs):
    both = invoke("export", outputs["1d"], "--mean", "--frame", "1")
    assert both.exit_code == 2 and "--mean and --frame" in both.stderr
    fmt = invoke("export", outputs["1d"], "--format", "txt")
    assert fmt.exit_code == 2 and "--format txt: expected one of xye, csv" in fmt.stderr


def test_an_unreadable_output_exits_1(outputs, tmp_path):
    path = tmp_path / "broken.h5"
    data = bytearray(outputs["1d"].read_bytes())
    with h5py.File(outputs["1d"]) as h5:
        offset = h5["1.1/integrated/I"].id.get_chunk_info(0).byte_offset
    data[offset + 10 : offset + 200] = bytes(190)  # a damaged chunk: its checksum fails
    path.write_bytes(bytes(data))
    result = invoke("export", path, "--frame", "0")
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)
    assert result.stderr.startswith(f"error: {path}: /1.1/integrated/I: cannot be read")
