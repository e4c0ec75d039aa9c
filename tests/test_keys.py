from tasks import keys


def test_key_templates_are_pinned():
    assert keys.gpu_queue("ringflow", 0) == "ringflow.gpu0"
    assert keys.gpu_queue("bl", 3) == "bl.gpu3"
    assert keys.assemble_queue("ringflow") == "ringflow.assemble"
    assert keys.job_progress("ringflow", "abc") == "ringflow:job:abc:progress"
    assert keys.job_failed("ringflow", "abc") == "ringflow:job:abc:failed"
    assert keys.job_manifest("ringflow", "abc") == "ringflow:job:abc:manifest"
    assert keys.job_scans("ringflow", "abc") == "ringflow:job:abc:scans"
    assert keys.job_done("ringflow", "abc") == "ringflow:job:abc:done"
    assert keys.job_retries("ringflow", "abc") == "ringflow:job:abc:retries"
    assert keys.job_config("ringflow", "abc") == "ringflow:job:abc:config"
    assert keys.job_monitors("ringflow", "abc") == "ringflow:job:abc:monitors"
    assert keys.jobs("bl") == "bl:jobs"
    assert keys.workers("bl") == "bl:workers"
    assert keys.moving("bl") == "bl:moving"
    assert keys.job_name("bl", "gpu1") == "ringflow-bl-gpu1"
    assert keys.node_name("bl", "gpu1", "j42") == "bl-gpu1-j42"
