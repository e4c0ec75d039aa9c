"""Which OpenCL device a worker's engines use: the GPU that SLURM (or the user) granted.

SLURM grants a GPU by setting CUDA_VISIBLE_DEVICES (and SLURM_JOB_GPUS); NVIDIA's OpenCL
runtime then shows only that GPU. A runtime that ignores the variable shows every GPU of the
node, and the granted index picks one. Without a GPU:

- ``cpu_fallback = 1``: an OpenCL CPU device (PoCL, Intel's CPU runtime) if there is one,
  else pyFAI's cython engine, batched;
- a local worker (``ringflow run``, ``workers local``: :data:`LOCAL_WORKER_ENV` set): the
  batched cython engine; the client has said so in one line (:func:`local_fallback_note`);
- a SLURM worker: an error, checked when the job starts (``python -m tasks.gpu CONFIG``) so
  that a misconfigured job fails once, loudly, instead of once per file or 20x slower.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import RingflowError, WorkerError

log = logging.getLogger(__name__)
LOCAL_WORKER_ENV = "RINGFLOW_LOCAL_WORKER"  # set by the local launcher: no GPU means the CPU
START_CHECK_MARK = "ringflow worker:"  # starts the line a failed start check writes to its log
GPU_VARS = (
    "CUDA_VISIBLE_DEVICES",
    "SLURM_STEP_GPUS",
    "SLURM_JOB_GPUS",
    "ROCR_VISIBLE_DEVICES",
    "GPU_DEVICE_ORDINAL",
)


@dataclass(frozen=True)
class Device:
    platform: int
    device: int
    name: str
    kind: str  # "gpu", "cpu" or "other"

    @property
    def target(self) -> tuple[int, int]:
        return self.platform, self.device


def gpu_environment(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The GPU-granting variables that are set, for logs and the worker registry."""
    return {var: env[var] for var in GPU_VARS if env.get(var)}


def granted_gpus(env: Mapping[str, str] = os.environ) -> list[str]:
    """GPU ids granted to this process, from the first variable that names any."""
    for var in GPU_VARS:
        value = env.get(var, "").strip()
        if value and value != "NoDevFiles":
            return [part.strip() for part in value.split(",") if part.strip()]
    return []


def opencl_devices() -> list[Device]:
    """Every OpenCL device this process sees; none when pyopencl or a driver is missing."""
    try:
        import pyopencl as cl

        platforms = cl.get_platforms()
    except Exception:  # no pyopencl, no ICD loader or no platform: no device
        return []
    found = []
    for p, platform in enumerate(platforms):
        for d, device in enumerate(platform.get_devices()):
            kind = (
                "gpu"
                if device.type & cl.device_type.GPU
                else "cpu"
                if device.type & cl.device_type.CPU
                else "other"
            )
            found.append(Device(p, d, device.name.strip(), kind))
    return found


def choose_device(
    devices: list[Device], granted: list[str], allow_cpu: bool, where: str = "", local: bool = False
) -> Device | None:
    """The device for this worker's engines; None means integrate with cython on the CPU.

    Without a GPU: an OpenCL CPU device if ``allow_cpu`` (cpu_fallback), None for a
    ``local`` worker, else :class:`WorkerError`.
    """
    gpus = [d for d in devices if d.kind == "gpu"]
    if gpus:
        first = granted[0] if granted else ""
        if len(gpus) > len(granted) > 0 and first.isdigit() and int(first) < len(gpus):
            return gpus[int(first)]  # the runtime ignores CUDA_VISIBLE_DEVICES
        return gpus[0]
    if allow_cpu:
        cpus = [d for d in devices if d.kind == "cpu"]
        return cpus[0] if cpus else None
    if local:
        return None
    raise WorkerError(
        f"ai_method = opencl: no GPU OpenCL device{where} (granted GPUs: "
        f"{','.join(granted) or 'none'}; OpenCL devices: {describe(devices)}); set "
        "[computations distribution] cpu_fallback = 1 to integrate on the CPU, or "
        "ai_method = cython"
    )


def describe(devices: list[Device]) -> str:
    return ", ".join(f"{d.name} ({d.kind})" for d in devices) or "none"


def worker_device(allow_cpu: bool) -> Device | None:
    """:func:`choose_device` for this process, logged once per engine build."""
    where = f" on {os.uname().nodename}"
    local = bool(os.environ.get(LOCAL_WORKER_ENV))
    device = choose_device(opencl_devices(), granted_gpus(), allow_cpu, where, local)
    if device is None:
        log.info("no GPU OpenCL device%s: integrating with pyFAI's cython engine", where)
    else:
        log.info("OpenCL device %s (%s) %s, %s", device.target, device.kind, device.name, where)
    return device


def local_fallback_note(ai_method: str, cpu_fallback: bool) -> str:
    """The one line a local run prints when ai_method = opencl finds no GPU here; "" if none.

    Local workers then integrate with the batched cython engine (the same numbers, and on a
    CPU faster than pyFAI's OpenCL engine on a CPU device). With cpu_fallback = 1 the user
    chose the CPU device already: nothing to say.
    """
    if ai_method != "opencl" or cpu_fallback:
        return ""
    devices = opencl_devices()
    if any(d.kind == "gpu" for d in devices):
        return ""
    return (
        f"ai_method = opencl: no GPU OpenCL device on {os.uname().nodename} (OpenCL devices: "
        f"{describe(devices)}); integrating on the CPU with ringflow's batched engine instead. "
        "Set ai_method = cython to silence this, or cpu_fallback = 1 to use an OpenCL CPU device"
    )


def check_worker_start(config_path: str) -> str:
    """Why this SLURM worker cannot integrate its job's configuration ("" when it can): an
    opencl job with no GPU granted and no cpu_fallback. Checked once, at the job's start."""
    from .config import Config

    config = Config.from_file(config_path)
    if config.integration.ai_method != "opencl" or config.computations.cpu_fallback:
        return ""
    try:
        choose_device(opencl_devices(), granted_gpus(), False, f" on {os.uname().nodename}")
    except WorkerError as exc:
        return str(exc)
    return ""


def main(argv: list[str] | None = None) -> int:
    """``python -m tasks.gpu CONFIG``: exit 1 with one line on stderr if this job's worker has
    no usable device (see :func:`check_worker_start`)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m tasks.gpu CONFIG", file=sys.stderr)
        return 2
    try:
        problem = check_worker_start(args[0])
    except RingflowError as exc:
        problem = str(exc)
    if problem:
        print(f"{START_CHECK_MARK} {problem}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
