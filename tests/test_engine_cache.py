"""Engines kept on disk: a fresh process loads one without pyFAI and integrates what pyFAI
does; a changed input is a new entry; a broken entry is rebuilt, never used; writers leave no
half-written entry behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tasks import engine_cache
from tasks.config import Config
from tasks.engine import Engine
from tasks.engine_cache import CachedEngine, EngineCache, cache_key

from .conftest import ROOT
from .test_engine import assert_close, reference, setup, with_integration  # noqa: F401

LOAD_AND_INTEGRATE = """
import json, sys
from pathlib import Path

import numpy as np
from tasks.config import Config
from tasks.engine_cache import EngineCache
folder, mapping, frames, monitor, out = sys.argv[1:]
engine = EngineCache(folder).load(Config.from_mapping(json.loads(mapping)))
result = engine.integrate_batch(np.load(frames), np.load(monitor))
np.save(out + ".intensity.npy", result.intensity)
if result.sigma is not None:
    np.save(out + ".sigma.npy", result.sigma)
print(json.dumps({"type": type(engine).__name__, "pyFAI": "pyFAI" in sys.modules}))
"""

CASES = {
    "1D bbox poisson, dark and flat": dict(error_model="poisson", pixel_splitting="bbox"),
    "2D no splitting with a dark": dict(
        error_model="poisson", pixel_splitting="no", azimuthal_range=(-180.0, 180.0, 36)
    ),
}


@pytest.mark.parametrize("changes", CASES.values(), ids=CASES.keys())
def test_a_fresh_process_integrates_from_the_cache_without_pyfai(setup, tmp_path, changes):  # noqa: F811
    config, frames, dark, flat = setup
    config = with_integration(config, dark_file=dark, flatfield_file=flat, n_pts=300, **changes)
    monitor = np.array([1.0, 0.8, 1.25, 1.1])[: len(frames)]
    built = Engine(config, threads=1)
    assert built.why_not_batched == ""
    assert EngineCache(str(tmp_path / "engines")).save(config, built)
    np.save(tmp_path / "frames.npy", frames)
    np.save(tmp_path / "monitor.npy", monitor)
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_AND_INTEGRATE, str(tmp_path / "engines")]
        + [json.dumps(config.as_mapping()), str(tmp_path / "frames.npy")]
        + [str(tmp_path / "monitor.npy"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=os.environ | {"RINGFLOW_ENGINE_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    said = json.loads(proc.stdout.strip().splitlines()[-1])
    assert said == {"type": "CachedEngine", "pyFAI": False}
    intensity, sigma = reference(config, frames, monitor)
    assert_close(np.load(tmp_path / "out.intensity.npy"), intensity, 1e-5)
    assert_close(np.load(tmp_path / "out.sigma.npy"), sigma, 1e-4)


def test_the_cached_engine_describes_the_output_as_the_built_one(setup, tmp_path):  # noqa: F811
    config = setup[0]
    built = Engine(config, threads=1)
    cache = EngineCache(str(tmp_path))
    cache.save(config, built)
    loaded = cache.load(config)
    assert isinstance(loaded, CachedEngine)
    assert (loaded.shape, loaded.row_shape, loaded.has_sigma) == (
        built.shape,
        built.row_shape,
        built.has_sigma,
    )
    assert loaded.provenance == json.loads(json.dumps(built.provenance))
    assert np.array_equal(loaded.radial, built.radial)
    assert loaded.batch_size(4, 1) == built.batch_size(4, 1)


def test_a_changed_mask_is_another_entry(setup, tmp_path):  # noqa: F811
    config = setup[0]
    mask = tmp_path / "mask.edf"
    shutil.copy(config.integration.mask_file, mask)
    config = with_integration(config, mask_file=str(mask))
    before = cache_key(config)
    os.utime(mask, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert cache_key(config) != before


def test_a_broken_entry_is_not_used(setup, tmp_path, caplog):  # noqa: F811
    config = setup[0]
    cache = EngineCache(str(tmp_path))
    path = cache.save(config, Engine(config, threads=1))
    (Path(path) / "meta.json").write_text("{not json")
    assert cache.load(config) is None
    assert "not used" in caplog.text
    os.remove(os.path.join(path, "meta.json"))
    assert cache.load(config) is None


def test_leftovers_are_removed_and_the_newest_entries_kept(setup, tmp_path, monkeypatch):  # noqa: F811
    config = setup[0]
    cache = EngineCache(str(tmp_path))
    stale = tmp_path / ".0123456789abcdef.x.tmp"
    stale.mkdir()
    (stale / "data.npy").write_bytes(b"half")
    old = time.time() - 2 * engine_cache.STALE_SECONDS
    os.utime(stale, (old, old))
    fresh = tmp_path / ".fedcba9876543210.y.tmp"  # another writer, still writing
    fresh.mkdir()
    for k in range(engine_cache.KEEP):
        entry = tmp_path / f"{k:016x}"
        entry.mkdir()
        os.utime(entry, (old + k, old + k))
    path = cache.save(config, Engine(config, threads=1))
    names = sorted(os.listdir(tmp_path))
    assert stale.name not in names and fresh.name in names
    kept = [n for n in names if not n.startswith(".")]
    assert len(kept) == engine_cache.KEEP and os.path.basename(path) in kept
    assert f"{0:016x}" not in kept  # the oldest went


def test_outside_a_worker_nothing_is_cached(monkeypatch):
    monkeypatch.delenv("RINGFLOW_WRITE_ROOTS", raising=False)
    assert engine_cache.worker_cache() is None


def test_a_worker_caches_beside_its_partials(monkeypatch, tmp_path):
    from tasks.confine import WriteRoots

    roots = WriteRoots((str(tmp_path),), (str(tmp_path / ".ringflow" / "partials"),))
    monkeypatch.setenv("RINGFLOW_WRITE_ROOTS", roots.to_env())
    assert engine_cache.worker_cache().folder == str(tmp_path / ".ringflow" / "engines")


def test_config_round_trips_for_the_subprocess(setup):  # noqa: F811
    config = setup[0]
    assert Config.from_mapping(config.as_mapping()).integration == config.integration


def test_an_engine_process_waits_for_the_builder(setup, tmp_path):  # noqa: F811
    """While a live process builds the entry, another waits for it, then loads it."""
    config = setup[0]
    cache = EngineCache(str(tmp_path))
    found: list[bool] = []
    with cache.building(config) as mine:
        assert mine
        with cache.building(config) as again:
            assert not again  # one builder at a time
        waiter = threading.Thread(target=lambda: found.append(cache.wait_for_builder(config)))
        waiter.start()
        time.sleep(0.3)
        assert waiter.is_alive() and not found  # still waiting
        cache.save(config, Engine(config, threads=1))
    waiter.join(30)
    assert found == [True]
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".building")]


def test_a_dead_builder_is_not_waited_for(setup, tmp_path):  # noqa: F811
    config = setup[0]
    cache = EngineCache(str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    marker = tmp_path / f".{cache_key(config)}.building"
    marker.write_text(str(dead.pid))
    started = time.monotonic()
    assert cache.wait_for_builder(config, timeout=30) is False
    assert time.monotonic() - started < 5
    with cache.building(config) as mine:
        assert mine and marker.read_text() == str(os.getpid())
    assert not marker.exists()


def test_no_marker_where_the_workspace_cannot_be_written(setup, tmp_path):  # noqa: F811
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with EngineCache(str(blocker / "engines")).building(setup[0]) as mine:
        assert mine is False
