"""Real services for the distributed tests: a password-protected Redis and a SLURM cluster.

CI starts both (.ci/redis-up, .ci/slurm-up) and sets RINGFLOW_REQUIRE_SERVICES=1, which turns
a missing service into a failure instead of a skip. On a developer machine without them,
the tests skip and say which script starts what they need.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid

import pytest

CI_REDIS_URL_FILE = "/var/lib/ringflow-ci/redis.url"
REQUIRE = os.environ.get("RINGFLOW_REQUIRE_SERVICES") == "1"


def unavailable(reason: str):
    if REQUIRE:
        pytest.fail(f"{reason} (RINGFLOW_REQUIRE_SERVICES=1: CI must not skip)")
    pytest.skip(reason)


def redis_url() -> str:
    """URL of the test Redis: $RINGFLOW_TEST_REDIS_URL, else .ci/redis-up's URL file."""
    url = os.environ.get("RINGFLOW_TEST_REDIS_URL", "")
    if not url and os.path.exists(CI_REDIS_URL_FILE):
        with open(CI_REDIS_URL_FILE) as fh:
            url = fh.read().strip()
    if not url:
        unavailable("no test Redis: run `bash .ci/redis-up` (or set RINGFLOW_TEST_REDIS_URL)")
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=3).ping()
    except redis.RedisError as exc:
        unavailable(f"test Redis does not answer ({type(exc).__name__}): run `bash .ci/redis-up`")
    return url


def require_slurm() -> None:
    if not shutil.which("sbatch"):
        unavailable("SLURM is not installed: run `bash .ci/slurm-up` as root")
    deadline = time.monotonic() + 60  # "completing": the last test's jobs are still ending
    while True:
        try:
            states = subprocess.run(
                ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20
            ).stdout.split()
        except subprocess.SubprocessError as exc:
            unavailable(f"sinfo failed ({exc}): run `bash .ci/slurm-up`")
        if any(s in ("idle", "mixed", "allocated") for s in states):
            return
        if "completing" not in states or time.monotonic() > deadline:
            unavailable(f"no usable SLURM node (sinfo: {states}): run `bash .ci/slurm-up`")
        time.sleep(1.0)


def unique_prefix(name: str) -> str:
    """A queue prefix of its own for each test: queues and keys never collide."""
    return f"t{name}{uuid.uuid4().hex[:6]}"


def wait_until(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def squeue_names(prefix: str) -> list[str]:
    out = subprocess.run(
        ["squeue", "--me", "-h", "-o", "%j"], capture_output=True, text=True, timeout=20
    ).stdout
    return [n for n in out.split() if n.startswith(f"ringflow-{prefix}-")]
