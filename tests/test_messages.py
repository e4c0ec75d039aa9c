"""File task messages name the job's configuration and their frames' monitor values by
digest: small whatever the configuration's size, and a worker runs with no configuration or
monitor values but the ones they name."""

from __future__ import annotations

import base64
import json

import pytest

from tasks import keys, registry
from tasks.config import Config
from tasks.errors import RingflowError
from tasks.payloads import ConfigRecord

from .conftest import edit_config
from .services import redis_url, unique_prefix

MESSAGE_BYTES = 3000  # a queued file task, as Redis holds it, at most
NAMES = ",".join(f"sample_environment_counter_{k:03d}" for k in range(200))


def large_config(demo, tmp_path, prefix: str = "ringflow") -> Config:
    """The demo's configuration with 200 names in try_metadata (about 7 kB of text)."""
    changes = {
        "output": {"location": str(tmp_path / "out"), "try_metadata": NAMES},
        "queue": {"queue_prefix": prefix},
    }
    return Config.from_file(edit_config(demo.config, changes, tmp_path / "c.ini"))


def test_the_configuration_is_loaded_only_with_its_digest(small_demo, tmp_path):
    config = large_config(small_demo, tmp_path)
    record = ConfigRecord.of(config)
    assert ConfigRecord.of(config) == record  # the same configuration, the same digest
    loaded = ConfigRecord.load(record.text, record.digest, "j")
    assert (
        loaded.as_mapping() == config.payload_mapping() and len(loaded.output.try_metadata) == 200
    )
    tampered = record.text.replace("sample_environment_counter_000", "x")
    with pytest.raises(RingflowError, match="job j: its configuration in the registry is not"):
        ConfigRecord.load(tampered, record.digest, "j")


def test_a_file_task_payload_is_small_whatever_the_configuration(small_demo, tmp_path):
    from tasks.jobs import plan_job

    plan = plan_job(large_config(small_demo, tmp_path))
    assert len(plan.config_record.text) > 7000
    sizes = [len(json.dumps(task.to_dict())) for task in plan.file_tasks]
    assert max(sizes) < 1000, sizes


@pytest.mark.service
def test_queued_messages_are_small_and_name_the_registered_configuration(small_demo, tmp_path):
    """Submitted to a real Redis: each queued message under MESSAGE_BYTES with a 7 kB
    configuration; a worker reads that configuration once, and refuses one rewritten in the
    registry."""
    from tasks.app import configure
    from tasks.jobs import plan_job, submit

    url, prefix = redis_url(), unique_prefix("msg")
    app = configure(url)
    client = app.backend.client
    plan = plan_job(large_config(small_demo, tmp_path, prefix))
    try:
        submit(app, plan)
        messages = client.lrange(keys.gpu_queue(prefix, 0), 0, -1)
        assert len(messages) == len(plan.file_tasks) == 4
        sizes = [len(m) for m in messages]
        assert max(sizes) < MESSAGE_BYTES, sizes
        print(f"queued file task: {max(sizes)} bytes, configuration {len(plan.config_record.text)}")
        digest = plan.config_record.digest
        config = registry.job_config(client, prefix, plan.job_id, digest)
        assert len(config.output.try_metadata) == 200
        registry._configs.clear()  # as a worker process that has not read it yet
        name = keys.job_config(prefix, plan.job_id)
        client.set(name, plan.config_record.text.replace("sample_environment", "forged"))
        with pytest.raises(RingflowError, match="not the one its file tasks name"):
            registry.job_config(client, prefix, plan.job_id, digest)
        client.delete(name)
        with pytest.raises(RingflowError, match="no configuration in the registry"):
            registry.job_config(client, prefix, plan.job_id, digest)
        task = plan.file_tasks[0]  # the demo normalises by a monitor: its values by digest too
        values = registry.file_monitor(
            client, prefix, task.job_id, task.task_id, task.monitor_digest
        )
        assert values == json.loads(plan.monitors[task.task_id]) and len(values) == task.n_frames
        client.hset(keys.job_monitors(prefix, plan.job_id), task.task_id, json.dumps([1.0] * 4))
        with pytest.raises(RingflowError, match="not those its message names"):
            registry.file_monitor(client, prefix, task.job_id, task.task_id, task.monitor_digest)
    finally:
        registry._configs.clear()
        stale = list(client.scan_iter(f"{prefix}*")) + list(client.scan_iter(f"_kombu*{prefix}*"))
        if stale:
            client.delete(*stale)


def _normalised(raw: bytes, group_id: str) -> dict:
    """A queued message with its body decoded; the chord's random group id, the transport's
    delivery tag and the argument reprs Celery's canvas also copies into the properties
    (workers read those of the headers) left out."""
    message = json.loads(raw)
    message["body"] = json.loads(base64.b64decode(message["body"]))
    del message["properties"]["delivery_tag"]
    for name in ("argsrepr", "kwargsrepr"):
        message["properties"].pop(name, None)
    return json.loads(json.dumps(message).replace(group_id, "GROUP"))


@pytest.mark.service
def test_file_task_messages_are_those_of_celerys_own_chord(small_demo, tmp_path):
    """ringflow publishes each scan's chord without Celery's canvas (it costs most of the
    time to enqueue 100,000 files): the queued messages and the chord's size in the backend
    must be what ``chord(header, body).apply_async()`` makes of the same files."""
    from celery import chord

    from tasks.app import configure
    from tasks.jobs import _assembly, _no_result_subscriptions, plan_job, submit

    url, prefix = redis_url(), unique_prefix("chord")
    app = configure(url)
    client = app.backend.client
    plan = plan_job(large_config(small_demo, tmp_path, prefix))
    queue = keys.gpu_queue(prefix, 0)
    chord_keys: list[str] = []
    try:
        callbacks = submit(app, plan)
        ours = client.lrange(queue, 0, -1)
        client.delete(queue)
        manifest = registry.read_manifest(client, prefix, plan.job_id)
        integrate_file = app.tasks[keys.INTEGRATE_FILE]
        for scan, files in plan.scans:
            header = [
                integrate_file.s(manifest[f.task_id]).set(
                    queue=queue, task_id=f.task_id, argsrepr=repr(f.path), kwargsrepr="{}"
                )
                for f in files
            ]
            callback = callbacks[scan.scan_key]
            body = _assembly(
                app.tasks[keys.ASSEMBLE_SCAN], prefix, plan.job_id, scan.scan_key, callback
            )
            with _no_result_subscriptions(app):  # nothing to unsubscribe at exit
                chord(header, body).apply_async()
        celerys = client.lrange(queue, 0, -1)
        assert len(ours) == len(celerys) == len(plan.file_tasks) == 4
        scan_sizes = {f.task_id: len(files) for _, files in plan.scans for f in files}
        for mine, theirs in zip(ours, celerys, strict=True):
            mine_group = json.loads(mine)["headers"]["group"]
            theirs_group = json.loads(theirs)["headers"]["group"]
            assert mine_group != theirs_group  # each sending is a new chord, as Celery's
            assert _normalised(mine, mine_group) == _normalised(theirs, theirs_group)
            for group in (mine_group, theirs_group):
                size_key = app.backend.get_key_for_group(group, ".s")
                chord_keys.append(size_key)
                assert int(client.get(size_key)) == scan_sizes[json.loads(mine)["headers"]["id"]]
    finally:
        stale = list(client.scan_iter(f"{prefix}*")) + chord_keys
        if stale:
            client.delete(*stale)
