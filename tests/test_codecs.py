"""The compression-pool writer against HDF5 itself: round trips, checksums, corruption, memory.

Files are read back through plain h5py + hdf5plugin, i.e. by HDF5's own filter pipeline.
"""

from __future__ import annotations

import struct
import tracemalloc

import h5py
import hdf5plugin  # noqa: F401  (HDF5 reads the non-deflate codecs through it)
import numpy as np
import pytest
from numcodecs.fletcher32 import Fletcher32

from tasks.chunk_writer import ChunkWriter, Storage, chunk_shape
from tasks.codecs import LEVELS, Filters, fletcher32, pipeline
from tasks.config import Config
from tasks.errors import ConfigError

CODECS = list(LEVELS)
DTYPES = ["uint8", "uint16", "uint32", "int32", "float32"]
# (dataset shape, chunk shape): last chunk partial along frames; partial on every axis with
# odd byte counts; one frame per chunk.
SHAPES = [((7, 13, 11), (3, 13, 11)), ((5, 9, 7), (2, 4, 3)), ((4, 33, 31), (1, 33, 31))]


def sample(shape, dtype, seed=0) -> np.ndarray:
    """Detector-like data: Poisson counts with a few extremes, so codecs have work to do."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        data = (rng.poisson(3.0, shape) / rng.uniform(0.8, 1.2, shape)).astype(dtype)
        data.flat[::17] = np.nan
        data.flat[5::23] = -np.inf
        return data
    data = rng.poisson(3.0, shape).astype(dtype)
    info = np.iinfo(dtype)
    data.flat[::19] = info.max
    data.flat[3::29] = info.min
    return data


def write(path, data, filters: Filters, chunks, threads=2, blocks=None, in_flight=0):
    with h5py.File(path, "w") as h5, ChunkWriter(threads, in_flight) as writer:
        dset = writer.create(h5, "x", data.shape, data.dtype, Storage(filters), chunks=chunks)
        writer.write(dset, blocks if blocks is not None else [data], filters)


def read_back(path) -> np.ndarray:
    with h5py.File(path, "r") as h5:
        return h5["x"][()]


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("shape,chunks", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("codec", CODECS)
def test_round_trip_is_bit_exact(tmp_path, codec, dtype, shape, chunks):
    data = sample(shape, dtype)
    filters = Filters(codec=codec, shuffle=dtype != "uint8", checksum=True)
    # uneven slabs: the writer regroups them into chunk bands
    slabs = [data[:1], data[1:3], data[3:]]
    write(tmp_path / "x.h5", data, filters, chunks, blocks=slabs)
    assert same_bits(read_back(tmp_path / "x.h5"), data)
    with h5py.File(tmp_path / "x.h5") as h5:
        ids = [fid for fid, _ in pipeline(h5["x"])]
    assert ids[-1] == 3 and (codec == "none") == (len(ids) == 1)


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("checksum", [False, True])
@pytest.mark.parametrize("codec", ["deflate", "zstd", "blosc"])
def test_shuffle_and_checksum_switches(tmp_path, codec, shuffle, checksum):
    data = sample((6, 40, 30), "uint16", seed=3)
    filters = Filters(codec=codec, level=2, shuffle=shuffle, checksum=checksum)
    write(tmp_path / "x.h5", data, filters, (4, 40, 30))
    assert same_bits(read_back(tmp_path / "x.h5"), data)
    with h5py.File(tmp_path / "x.h5") as h5:
        dset = h5["x"]
        assert dset.fletcher32 == checksum
        assert dset.shuffle == (shuffle and codec != "blosc")  # blosc shuffles inside


def test_fixed_length_strings_round_trip(tmp_path):
    names = np.array([f"/data/scan{i:04d}/pilatus_{i % 3:04d}.h5" for i in range(500)], "S40")
    write(tmp_path / "x.h5", names, Filters(), (64,))
    assert same_bits(read_back(tmp_path / "x.h5"), names)


@pytest.mark.parametrize("data_kind", ["counts", "noise"])
@pytest.mark.parametrize("codec", ["zlib", "zstd", "bitshuffle_lz4", "blosc", "none"])
def test_stored_chunks_are_byte_identical_to_hdf5s_own(tmp_path, codec, data_kind):
    """Same filters: the pool stores exactly the bytes and filter mask HDF5 stores itself,
    including blosc declining incompressible chunks (HDF5 then skips the optional filter)."""
    rng = np.random.default_rng(7)
    data = (
        sample((5, 64, 48), "uint32", seed=7)
        if data_kind == "counts"
        else rng.integers(0, 2**32, (5, 64, 48), dtype=np.uint32)
    )
    filters = Filters(codec, shuffle=codec != "none")
    with h5py.File(tmp_path / "hdf5.h5", "w") as h5:
        h5.create_dataset("x", data=data, chunks=(2, 64, 48), **filters.dataset_options())
    write(tmp_path / "pool.h5", data, filters, (2, 64, 48))
    with h5py.File(tmp_path / "hdf5.h5") as a, h5py.File(tmp_path / "pool.h5") as b:
        for offset in [(0, 0, 0), (2, 0, 0), (4, 0, 0)]:
            assert a["x"].id.read_direct_chunk(offset) == b["x"].id.read_direct_chunk(offset)
    assert same_bits(read_back(tmp_path / "pool.h5"), data)


@pytest.mark.parametrize("size", [1, 2, 3, 7, 8191, 8192, 8193, 99_999, 4 * 2**20 + 1])
@pytest.mark.parametrize("fill", ["random", "ones", "zeros"])
def test_fletcher32_equals_hdf5s(tmp_path, size, fill):
    """On chunks HDF5 wrote and checksummed itself: odd lengths, all-0xFF, large chunks."""
    rng = np.random.default_rng(size)
    data = {
        "random": rng.integers(0, 256, size, dtype=np.uint8),
        "ones": np.full(size, 0xFF, np.uint8),
        "zeros": np.zeros(size, np.uint8),
    }[fill]
    with h5py.File(tmp_path / "f.h5", "w") as h5:
        h5.create_dataset("x", data=data, chunks=(size,), fletcher32=True)
        mask, stored = h5["x"].id.read_direct_chunk((0,))
    assert mask == 0 and stored[:-4] == data.tobytes()
    (expected,) = struct.unpack("<I", stored[-4:])
    assert fletcher32(data.tobytes()) == expected
    assert bytes(Fletcher32().encode(data))[-4:] == stored[-4:]  # numcodecs agrees


@pytest.mark.parametrize("codec", ["deflate", "none", "bitshuffle_lz4"])
def test_flipped_byte_makes_hdf5_raise(tmp_path, codec):
    data = sample((3, 50, 40), "float32", seed=5)
    path = tmp_path / "x.h5"
    write(path, data, Filters(codec=codec), (1, 50, 40))
    with h5py.File(path) as h5:
        info = h5["x"].id.get_chunk_info(1)
        position = info.byte_offset + info.size // 2
    with open(path, "r+b") as fh:
        fh.seek(position)
        byte = fh.read(1)
        fh.seek(position)
        fh.write(bytes([byte[0] ^ 0x01]))
    with h5py.File(path) as h5:
        np.testing.assert_array_equal(h5["x"][0], data[0])  # untouched chunks still read
        with pytest.raises(OSError):
            h5["x"][1]


def test_memory_is_bounded_by_chunks_in_flight(tmp_path):
    """64 MiB written from a generator with 2 chunks of 1 MiB in flight: peak stays small."""
    rows, width = 64, 2**18  # 64 chunks of 1 MiB (float32)
    filters = Filters("deflate", 1)

    def frames():
        rng = np.random.default_rng(0)
        for _ in range(rows):
            yield rng.poisson(2.0, (1, width)).astype(np.float32)

    tracemalloc.start()
    try:
        with h5py.File(tmp_path / "x.h5", "w") as h5, ChunkWriter(2, in_flight=2) as writer:
            dset = writer.create(h5, "x", (rows, width), np.float32, Storage(filters, 1))
            writer.write(dset, frames(), filters)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 12 * 2**20, f"peak {peak / 2**20:.1f} MiB for a 64 MiB dataset"
    with h5py.File(tmp_path / "x.h5") as h5:
        assert h5["x"].shape == (rows, width) and h5["x"].fletcher32


def test_wrong_row_count_is_an_error(tmp_path):
    with h5py.File(tmp_path / "x.h5", "w") as h5, ChunkWriter(1) as writer:
        dset = writer.create(h5, "x", (4, 3), np.uint16, Storage(Filters()))
        with pytest.raises(ValueError, match="3 rows written to a dataset of 4"):
            writer.write(dset, [np.zeros((3, 3), np.uint16)], Filters())


def test_automatic_chunks_are_about_a_mebibyte():
    assert chunk_shape((1000, 2500), 4) == (104, 2500)
    assert chunk_shape((200, 1043, 981), 4) == (1, 1043, 981)
    assert chunk_shape((10, 360, 500), 4, rows=3) == (3, 360, 500)
    assert chunk_shape((2, 10), 8) == (2, 10)


def base_config(tmp_path, **output) -> dict:
    poni = tmp_path / "x.poni"
    poni.write_text("Detector: Pilatus1M\nDistance: 0.1\nWavelength: 1e-10\n")
    return {
        "dataset": {"location": str(tmp_path / "*.h5")},
        "azimuthal integration": {"poni_file": str(poni)},
        "output": {k: str(v) for k, v in output.items()},
    }


@pytest.mark.parametrize(
    "output,key,reason",
    [
        ({"codec": "lzma"}, "codec", "allowed values: none, deflate"),
        ({"codec": "deflate", "level": "12"}, "level", "out of range for deflate (0-9)"),
        ({"codec": "isal", "level": "5"}, "level", "out of range for isal (0-3)"),
        ({"codec": "bitshuffle_lz4", "level": "3"}, "level", "takes no level"),
        ({"corrected_codec": "zstd", "corrected_level": "0"}, "corrected_level", "(1-22)"),
        ({"level": "fast"}, "level", "expected an integer"),
    ],
)
def test_bad_compression_settings_name_key_and_value(tmp_path, output, key, reason):
    with pytest.raises(ConfigError) as err:
        Config.from_mapping(base_config(tmp_path, **output))
    message = str(err.value)
    assert f"[output] {key}" in message and reason in message, message


def test_corrected_compression_inherits_the_general_one(tmp_path):
    config = Config.from_mapping(base_config(tmp_path, codec="zstd", level=4))
    assert config.output.corrected_compression() == ("zstd", 4)
    config = Config.from_mapping(base_config(tmp_path, codec="zstd", corrected_codec="blosc"))
    assert config.output.corrected_compression() == ("blosc", None)
    assert Config.from_mapping(base_config(tmp_path, codec="gzip")).output.codec == "deflate"


# --- the read path: Lima's bitshuffle-LZ4 chunks decoded outside HDF5 ---------------------------


@pytest.mark.parametrize("dtype", [np.int32, np.uint16, np.float32])
@pytest.mark.parametrize("frames_per_chunk", [1, 3])
def test_batch_reader_decodes_like_hdf5(tmp_path, dtype, frames_per_chunk):
    """Direct chunk reads decoded by bitshuffle's C function equal h5py's own reads: frame
    sizes with a tail (37 x 41 = 1517 values, 5 past a multiple of 8), multi-frame chunks,
    a last chunk cut short, batches across chunk edges, with and without read-ahead."""
    from tasks.readers import BatchReader, _bshuf_decompress_lz4

    assert _bshuf_decompress_lz4() is not None, "bitshuffle's C decoder not found: GIL held"
    rng = np.random.default_rng(1)
    data = (rng.poisson(30, (8, 37, 41)) - 2).astype(dtype)
    with h5py.File(tmp_path / "lima.h5", "w") as h5:
        h5.create_dataset(
            "data", data=data, chunks=(frames_per_chunk, 37, 41), **hdf5plugin.Bitshuffle()
        )
    with h5py.File(tmp_path / "lima.h5") as h5:
        dset = h5["data"]
        for ahead in (False, True):
            reader = BatchReader(dset, 1, 7, batch=3, threads=2, ahead=ahead)
            assert reader.direct
            got = [(first, frames.copy()) for first, frames in reader]
            assert [first for first, _ in got] == [1, 4, 7]
            np.testing.assert_array_equal(np.concatenate([f for _, f in got]), data[1:])


@pytest.mark.parametrize("damage", ["huge block length", "cut short", "long"])
def test_corrupt_bitshuffle_chunk_is_an_input_error(tmp_path, damage):
    """Block lengths are checked before the C decoder trusts them: a corrupt chunk is a clean
    InputDataError naming the file and frame, never a read past the chunk's bytes."""
    from tasks.errors import InputDataError
    from tasks.readers import BatchReader

    data = np.random.default_rng(3).poisson(30, (3, 64, 96)).astype(np.int32)
    with h5py.File(tmp_path / "lima.h5", "w") as h5:
        dset = h5.create_dataset("data", data=data, chunks=(1, 64, 96), **hdf5plugin.Bitshuffle())
        raw = bytearray(dset.id.read_direct_chunk((1, 0, 0))[1])
        if damage == "huge block length":
            raw[12:16] = (2**31 - 1).to_bytes(4, "big")
        elif damage == "cut short":
            raw = raw[: len(raw) // 2]
        else:
            raw += bytes(64)
        dset.id.write_direct_chunk((1, 0, 0), bytes(raw))
    with h5py.File(tmp_path / "lima.h5") as h5:
        reader = BatchReader(h5["data"], 0, 3, batch=3, threads=1, ahead=False)
        assert reader.direct
        with pytest.raises(InputDataError, match="chunk at frame 1 of /data is corrupt"):
            list(reader)


@pytest.mark.parametrize("ahead", [False, True])
def test_batch_buffers_are_kept_for_the_next_file(tmp_path, ahead):
    """The second file reads into the first file's buffers (no fresh memory to fault in) and
    still gets its own frames; a file of another frame shape gets buffers of its own."""
    from tasks.readers import BUFFERS, BatchReader

    rng = np.random.default_rng(2)
    stacks = [rng.integers(0, 1000, (6, 16, 24)).astype(np.int32) for _ in range(2)]
    stacks.append(rng.integers(0, 1000, (6, 8, 24)).astype(np.int32))
    for k, data in enumerate(stacks):
        with h5py.File(tmp_path / f"lima{k}.h5", "w") as h5:
            h5.create_dataset(
                "data", data=data, chunks=(1, *data.shape[1:]), **hdf5plugin.Bitshuffle()
            )
    BUFFERS.clear()
    seen = []
    for k, data in enumerate(stacks):
        with h5py.File(tmp_path / f"lima{k}.h5") as h5:
            reader = BatchReader(h5["data"], 0, 6, batch=4, threads=2, ahead=ahead)
            got = []
            for _, frames in reader:
                seen.append((k, frames.base))  # held: no id is reused by another buffer
                got.append(frames.copy())
            np.testing.assert_array_equal(np.concatenate(got), data)
    first = {id(buffer) for k, buffer in seen if k == 0}
    assert {id(buffer) for k, buffer in seen if k == 1} <= first, "second file got new buffers"
    assert not {id(buffer) for k, buffer in seen if k == 2} & first, "other shape, same buffer"
