"""Which OpenCL device a worker's engines use: the GPU that SLURM (or the user) granted.

SLURM grants a GPU by setting CUDA_VISIBLE_DEVICES (and SLURM_JOB_GPUS); NVIDIA's OpenCL
runtime then shows only that GPU. A runtime that ignores the variable shows every GPU of the
node, and the granted index picks one. No GPU at all is an error unless the configuration
allows the CPU fallback, so a misconfigured job fails loudly instead of running 20x slower.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import WorkerError

log = logging.getLogger(__name__)
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
    devices: list[Device], granted: list[str], allow_cpu: bool, where: str = ""
) -> Device | None:
    """The device for this worker's engines; None means integrate with cython on the CPU."""
    gpus = [d for d in devices if d.kind == "gpu"]
    if gpus:
        first = granted[0] if granted else ""
        if len(gpus) > len(granted) > 0 and first.isdigit() and int(first) < len(gpus):
            return gpus[int(first)]  # the runtime ignores CUDA_VISIBLE_DEVICES
        return gpus[0]
    if not allow_cpu:
        seen = ", ".join(f"{d.name} ({d.kind})" for d in devices) or "none"
        raise WorkerError(
            f"no GPU OpenCL device{where} (granted GPUs: {','.join(granted) or 'none'}; "
            f"OpenCL devices: {seen}); set [computations distribution] cpu_fallback = 1 "
            "to integrate on the CPU, or ai_method = cython"
        )
    cpus = [d for d in devices if d.kind == "cpu"]
    return cpus[0] if cpus else None


def worker_device(allow_cpu: bool) -> Device | None:
    """:func:`choose_device` for this process, logged once per engine build."""
    where = f" on {os.uname().nodename}"
    device = choose_device(opencl_devices(), granted_gpus(), allow_cpu, where)
    if device is None:
        log.warning("no OpenCL device%s: cpu_fallback = 1, integrating with cython", where)
    else:
        log.info("OpenCL device %s (%s) %s, %s", device.target, device.kind, device.name, where)
    return device
