from tasks import keys


def test_key_templates_are_pinned():
    assert keys.gpu_queue("ringflow", 0) == "ringflow.gpu0"
    assert keys.gpu_queue("bl", 3) == "bl.gpu3"
    assert keys.assemble_queue("ringflow") == "ringflow.assemble"
    assert keys.job_progress("ringflow", "abc") == "ringflow:job:abc:progress"
    assert keys.job_failed("ringflow", "abc") == "ringflow:job:abc:failed"
    assert keys.job_manifest("ringflow", "abc") == "ringflow:job:abc:manifest"
