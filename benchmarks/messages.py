"""What a job puts into Redis: the largest queued file-task message, and the memory of the
job's keys, for a configuration of ordinary size and one with 200 names in try_metadata.

Writes a demo (``--files`` Lima files of ``--frames`` frames, monitor normalisation on),
plans it with ringflow's own ``plan_job`` and submits it with ``submit`` to a fresh embedded
Redis (AOF off), with no worker; then reads the queued messages back (``LRANGE``) and sums
``MEMORY USAGE`` over every key of the job's prefix (queues and registry). Messages name the
configuration and the monitor values by digest, so their size should not follow either.

    python benchmarks/messages.py                  # 1 file of 200 frames
    python benchmarks/messages.py --files 4 --frames 50
"""

from __future__ import annotations

import argparse
import configparser
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NAMES = ",".join(f"sample_environment_counter_{k:03d}" for k in range(200))


def measure(demo_config: str, names: str, folder: Path, url: str) -> tuple[int, int, int]:
    """(largest message bytes, Redis bytes of the job's keys, configuration record bytes)."""
    from tasks import keys
    from tasks.app import configure_for
    from tasks.config import Config
    from tasks.jobs import plan_job, submit

    ini = configparser.ConfigParser(interpolation=None)
    ini.read(demo_config)
    ini["output"]["location"] = str(folder / "out")
    ini["output"]["try_metadata"] = names
    config_path = folder / f"c{len(names)}.ini"
    with open(config_path, "w") as fh:
        ini.write(fh)
    config = Config.from_file(str(config_path))
    app = configure_for(url, config.queue)
    plan = plan_job(config)
    submit(app, plan)
    client, prefix = app.backend.client, config.queue.queue_prefix
    messages = client.lrange(keys.gpu_queue(prefix, 0), 0, -1)
    used = sum(client.memory_usage(k) or 0 for k in client.scan_iter(f"{prefix}*"))
    client.flushdb()
    return max(map(len, messages)), used, len(plan.config_record.text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1)
    parser.add_argument("--frames", type=int, default=200)
    args = parser.parse_args()
    from tasks.demo import DemoSpec, write_demo
    from worker_launcher.redis_server import start_embedded_redis

    with tempfile.TemporaryDirectory(prefix="ringflow-messages-") as tmp:
        folder = Path(tmp)
        spec = DemoSpec(str(folder / "demo"), 1, args.files, args.frames)
        demo = write_demo(spec)
        server = start_embedded_redis(str(folder / "redis"))
        try:
            print(f"{args.files} file(s) x {args.frames} frames, monitor normalisation on")
            print("| try_metadata | configuration | largest message | Redis, job's keys |")
            print("|---|---|---|---|")
            for names in ("", NAMES):
                biggest, used, record = measure(demo.config, names, folder, server.url)
                count = len(names.split(",")) if names else 0
                print(f"| {count} names | {record} B | {biggest} B | {used} B |")
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
