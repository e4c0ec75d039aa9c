"""The worker job script and GPU choice, as text and pure functions (no services needed)."""

from __future__ import annotations

import subprocess

import pytest

from tasks.config import ConfigError
from tasks.errors import WorkerError
from tasks.gpu import Device, choose_device, granted_gpus
from worker_launcher.script import assemble_spec, gpu_spec, job_script, slurm_memory

from .conftest import edit_config


def config_with(small_demo, tmp_path, **computations):
    from tasks.config import Config

    path = edit_config(
        small_demo.config, {"computations distribution": computations}, tmp_path / "c.ini"
    )
    return Config.from_file(path)


def test_script_has_directives_and_quoted_values(small_demo, tmp_path):
    config = config_with(
        small_demo,
        tmp_path,
        n_workers="3",
        ai_engines_per_worker="4",
        cores_per_worker="2",
        partition="gpu-a100",
        gres="gpu:a100:1",
        sbatch_options="--account=id15 --qos=high",
        python_executables="/opt/my envs/bin/python",
        time="02:00:00",
        memory_per_worker="64GB",
        warm_shutdown_s="120",
    )
    script = job_script(config, gpu_spec(config, 2), "/ws dir/broker.url", "/ws/logs")
    for line in (
        "#SBATCH --job-name=ringflow-ringflow-gpu2",
        "#SBATCH --partition=gpu-a100",
        "#SBATCH --gres=gpu:a100:1",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=64G",
        "#SBATCH --time=02:00:00",
        "#SBATCH --signal=B:TERM@120",
        "#SBATCH --output=/ws/logs/%x-%j.log",
        "#SBATCH --account=id15",
        "#SBATCH --qos=high",
        "export RINGFLOW_BROKER_URL_FILE='/ws dir/broker.url'",
        "exec '/opt/my envs/bin/python' -m celery",
        "--concurrency=4",
        "-Q ringflow.gpu2",
    ):
        assert line in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_assembly_job_asks_no_gpu(small_demo, tmp_path):
    config = config_with(small_demo, tmp_path, assemble_cores="3")
    script = job_script(config, assemble_spec(config), "/u", "/l")
    assert "--gres" not in script and "#SBATCH --cpus-per-task=3" in script
    assert "-Q ringflow.assemble" in script


def test_hostile_values_are_refused_or_quoted(small_demo, tmp_path):
    with pytest.raises(ConfigError, match="sbatch_options"):
        config_with(small_demo, tmp_path, sbatch_options="--account=x; rm -rf /")
    with pytest.raises(ConfigError, match="partition"):
        config_with(small_demo, tmp_path, partition="gpu --uid=0")
    config = config_with(small_demo, tmp_path, python_executables="python$(touch /tmp/pwned)")
    script = job_script(config, gpu_spec(config, 0), "/u", "/l")
    assert "exec 'python$(touch /tmp/pwned)'" in script


@pytest.mark.parametrize(
    "text,expected", [("100GB", "100G"), ("512mb", "512M"), ("2048", "2048"), ("1T", "1T")]
)
def test_slurm_memory(text, expected):
    assert slurm_memory(text) == expected


GPU0, GPU1 = Device(0, 0, "A100 #0", "gpu"), Device(0, 1, "A100 #1", "gpu")
CPU = Device(1, 0, "pocl", "cpu")


def test_device_is_the_granted_gpu():
    assert choose_device([GPU0], ["3"], allow_cpu=False) == GPU0  # runtime shows only ours
    assert choose_device([GPU0, GPU1], ["1"], allow_cpu=False) == GPU1  # runtime shows all
    assert choose_device([CPU, GPU0], [], allow_cpu=False) == GPU0


def test_no_gpu_is_an_error_unless_cpu_fallback():
    with pytest.raises(WorkerError, match="cpu_fallback"):
        choose_device([CPU], ["0"], allow_cpu=False)
    assert choose_device([CPU], ["0"], allow_cpu=True) == CPU
    assert choose_device([], [], allow_cpu=True) is None  # cython


def test_granted_gpus_from_slurm_variables():
    assert granted_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2", "3"]
    assert granted_gpus({"SLURM_JOB_GPUS": "1"}) == ["1"]
    assert granted_gpus({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}) == []
