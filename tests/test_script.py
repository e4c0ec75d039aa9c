"""The worker job script and GPU choice, as text and pure functions (no services needed),
and the script's start-up device check run with bash."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tasks.config import ConfigError
from tasks.errors import WorkerError
from tasks.gpu import Device, choose_device, granted_gpus, opencl_devices
from worker_launcher.local import local_sizing, local_specs, sizing_note
from worker_launcher.script import (
    assemble_spec,
    gpu_spec,
    job_script,
    python_executables,
    slurm_memory,
    slurm_python,
)
from worker_launcher.slurm import SlurmLauncher

from .conftest import edit_config


def config_with(small_demo, tmp_path, integration: dict | None = None, **computations):
    from tasks.config import Config

    changes = {"computations distribution": computations}
    if integration:
        changes["azimuthal integration"] = integration
    path = edit_config(small_demo.config, changes, tmp_path / "c.ini")
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
        "-Q ringflow.gpu2,ringflow.assemble -n",  # its own queue first, then assemblies
    ):
        assert line in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_assembly_job_asks_no_gpu(small_demo, tmp_path):
    config = config_with(small_demo, tmp_path, assemble_cores="3")
    script = job_script(config, assemble_spec(config), "/u", "/l")
    assert "--gres" not in script and "#SBATCH --cpus-per-task=3" in script
    assert "-Q ringflow.assemble -n" in script  # assemblies only


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


CVMFS = "/cvmfs/tomo.esrf.fr/software/packages/ubuntu24.04/x86_64/tomotools/stable/bin/python"


def test_python_executables_is_for_slurm_jobs_only(small_demo, tmp_path):
    """The integrator's template sets a cluster path that does not exist here: SLURM scripts
    run it as is, local workers always run this interpreter."""
    config = config_with(small_demo, tmp_path, python_executables=CVMFS)
    spec = gpu_spec(config, 0)
    assert f"exec {CVMFS} -m celery" in job_script(config, spec, "/u", "/l")
    local = job_script(config, spec, "/u", "/l", local=True)
    assert f"exec {sys.executable} -m celery" in local and CVMFS not in local
    empty = config_with(small_demo, tmp_path, python_executables="")
    assert slurm_python(empty) == sys.executable


def test_python_executables_one_per_partition(small_demo, tmp_path):
    """The integrator's older form: name='path'; entries, the job's partition picks one."""
    value = "nice='/opt/nice/bin/python'; gpu=\"/opt/gpu env/bin/python\";"
    assert python_executables(value) == {
        "nice": "/opt/nice/bin/python",
        "gpu": "/opt/gpu env/bin/python",
    }
    assert python_executables("p9gpu='/opt/p9/python'") == {"p9gpu": "/opt/p9/python"}
    assert python_executables(" /usr/bin/python3 ") == "/usr/bin/python3"
    config = config_with(small_demo, tmp_path, python_executables=value, partition="gpu")
    assert "exec '/opt/gpu env/bin/python' -m celery" in job_script(
        config, gpu_spec(config, 0), "/u", "/l"
    )
    other = config_with(small_demo, tmp_path, python_executables=value, partition="p9gpu")
    with pytest.raises(ConfigError, match="no entry for partition 'p9gpu'.*nice, gpu"):
        job_script(other, gpu_spec(other, 0), "/u", "/l")
    assert sys.executable in job_script(other, gpu_spec(other, 0), "/u", "/l", local=True)
    broken = config_with(small_demo, tmp_path, python_executables="gpu='/a'; /b/python")
    with pytest.raises(ConfigError, match="name='path'"):
        slurm_python(broken)


def test_device_check_only_in_slurm_integration_scripts(small_demo, tmp_path):
    config = config_with(small_demo, tmp_path)
    check = '-m tasks.gpu "$RINGFLOW_WARM_CONFIG"'
    slurm = job_script(config, gpu_spec(config, 0), "/u", "/l")
    assert slurm.count(check) == 1
    assert slurm.index(check) < slurm.index("exec ")  # before the worker, under set -e
    assert check not in job_script(config, assemble_spec(config), "/u", "/l")
    assert check not in job_script(config, gpu_spec(config, 0), "/u", "/l", local=True)


def _run_until_worker(script: str) -> subprocess.CompletedProcess:
    """The job script up to (not including) the Celery worker, run with bash as SLURM would,
    on no granted GPU."""
    head = script.split("# exec:", 1)[0] + "echo started\n"
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES",)}
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    return subprocess.run(["bash"], input=head, text=True, capture_output=True, env=env)


def test_slurm_opencl_job_without_gpu_ends_at_start_with_one_line(small_demo, tmp_path):
    if any(d.kind == "gpu" for d in opencl_devices()):
        pytest.skip("this machine has a GPU OpenCL device: the check passes here")
    config = config_with(small_demo, tmp_path, integration={"ai_method": "opencl"})
    done = _run_until_worker(job_script(config, gpu_spec(config, 0), "/u", "/l"))
    assert done.returncode == 1 and "started" not in done.stdout
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("ringflow worker: ai_method = opencl: no GPU OpenCL device on ")
    assert "cpu_fallback = 1" in line

    fallback = config_with(
        small_demo, tmp_path, integration={"ai_method": "opencl"}, cpu_fallback="1"
    )
    done = _run_until_worker(job_script(fallback, gpu_spec(fallback, 0), "/u", "/l"))
    assert done.returncode == 0 and done.stdout.strip() == "started", done.stderr
    cython = config_with(small_demo, tmp_path)
    done = _run_until_worker(job_script(cython, gpu_spec(cython, 0), "/u", "/l"))
    assert done.returncode == 0 and done.stdout.strip() == "started", done.stderr


@pytest.mark.parametrize(
    "asked,cpus,workers,expected",
    [
        ((8, 4), 2, 1, (2, 1)),  # the integrator's defaults on a 2-core laptop
        ((2, 4), 8, 1, (2, 4)),  # fits: unchanged
        ((8, 4), 32, 1, (8, 4)),
        ((8, 4), 12, 1, (8, 1)),  # engines first, threads from what is left
        ((3, 4), 8, 1, (3, 2)),
        ((8, 4), 8, 2, (4, 1)),  # two local GPU workers share the CPUs
        ((2, 4), 8, 2, (2, 2)),
        ((8, 4), 1, 1, (1, 1)),
        ((4, 2), 2, 3, (1, 1)),  # more workers than CPUs: one engine, one thread each
    ],
)
def test_local_sizing(asked, cpus, workers, expected):
    assert local_sizing(*asked, cpus, workers) == expected


def test_local_specs_are_sized_slurm_ones_are_not(small_demo, tmp_path):
    config = config_with(
        small_demo, tmp_path, ai_engines_per_worker="8", cores_per_worker="4", assemble_cores="3"
    )
    (gpu, _), (assemble, _) = local_specs(config, [], cpus=2)
    assert (gpu.concurrency, gpu.threads, gpu.cpus) == (2, 1, 2)
    assert (assemble.concurrency, assemble.threads) == (1, 3)  # not counted, not scaled
    script = job_script(config, gpu, "/u", "/l", local=True)
    assert "--concurrency=2" in script and "export OMP_NUM_THREADS=1 " in script
    two = local_specs(config, ["0", "1"], cpus=8)
    assert [(s.concurrency, s.threads, env) for s, env in two[:2]] == [
        (4, 1, {"CUDA_VISIBLE_DEVICES": "0"}),
        (4, 1, {"CUDA_VISIBLE_DEVICES": "1"}),
    ]
    for spec in SlurmLauncher(config).specs()[:-1]:  # SLURM jobs ask what is configured
        text = job_script(config, spec, "/u", "/l")
        assert "--concurrency=8" in text and "#SBATCH --cpus-per-task=32" in text


def test_sizing_note_is_one_line_and_only_when_scaled(small_demo, tmp_path):
    config = config_with(small_demo, tmp_path, ai_engines_per_worker="8", cores_per_worker="4")
    assert sizing_note(config, [], cpus=2) == (
        "ai_engines_per_worker = 8 x cores_per_worker = 4 asks for 32 CPUs, this machine "
        "gives 2: running 2 engines x 1 thread"
    )
    assert sizing_note(config, ["0", "1"], cpus=16) == (
        "ai_engines_per_worker = 8 x cores_per_worker = 4 x 2 local GPU workers asks for 64 "
        "CPUs, this machine gives 16: running 8 engines x 1 thread per worker"
    )
    assert sizing_note(config, [], cpus=32) == ""


def test_ended_gpu_jobs_say_why(small_demo, tmp_path):
    """Without squeue: the jobs a launcher submitted, squeue's view, and their logs."""
    from worker_launcher.distributed import raise_if_gpu_jobs_gone
    from worker_launcher.slurm import SlurmJob

    config = config_with(small_demo, tmp_path, n_workers="2", workspace_path=str(tmp_path / "w"))
    launcher = SlurmLauncher(config)
    gpu0, gpu1, assemble = (spec.job_name for spec in launcher.specs())
    launcher.submitted = {gpu0: "11", gpu1: "12", assemble: "13"}
    os.makedirs(launcher.log_dir)
    with open(launcher.log_path(gpu0, "11"), "w") as fh:
        fh.write("ringflow worker: ai_method = opencl: no GPU OpenCL device on n1\n\n")
    with open(launcher.log_path(gpu1, "12"), "w") as fh:
        fh.write("starting\nbash: /cvmfs/x/bin/python: No such file or directory\n")
    jobs = [SlurmJob("13", assemble, "RUNNING", "None", "n1", "0:05")]
    assert launcher.gpu_jobs_gone(jobs)
    assert launcher.why_ended(jobs) == [
        f"{gpu0} (SLURM job 11): ringflow worker: ai_method = opencl: no GPU OpenCL device on n1",
        f"{gpu1} (SLURM job 12): bash: /cvmfs/x/bin/python: No such file or directory",
    ]
    with pytest.raises(WorkerError, match=r"(?s)no GPU worker job .*\n  .*gpu0 \(SLURM job 11\)"):
        raise_if_gpu_jobs_gone(launcher, jobs, "ringflow")
    pending = [*jobs, SlurmJob("12", gpu1, "PENDING", "Resources", "", "0:00")]
    assert not launcher.gpu_jobs_gone(pending)
    raise_if_gpu_jobs_gone(launcher, pending, "ringflow")  # one GPU job may still come up
