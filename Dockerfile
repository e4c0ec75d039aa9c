# ringflow image for compose.yaml: `ringflow flower ...` and `ringflow workers local ...`.
# CPU integration (ai_method = cython) works anywhere; with the NVIDIA container toolkit
# (compose/gpu.yaml) the driver's OpenCL library is mounted in and ai_method = opencl works.
FROM python:3.11-slim

# The user that runs ringflow and owns the outputs: build with the data owner's ids
# (compose passes RINGFLOW_UID/RINGFLOW_GID).
ARG RINGFLOW_UID=1000
ARG RINGFLOW_GID=1000

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# pyopencl's wheel brings its own ICD loader; this entry lets it find the NVIDIA OpenCL
# library that the container toolkit mounts on GPU hosts (nothing happens without one).
RUN mkdir -p /etc/OpenCL/vendors \
    && echo libnvidia-opencl.so.1 > /etc/OpenCL/vendors/nvidia.icd \
    && groupadd --non-unique --gid "${RINGFLOW_GID}" ringflow \
    && useradd --non-unique --uid "${RINGFLOW_UID}" --gid "${RINGFLOW_GID}" \
        --create-home --shell /bin/bash ringflow \
    && install -d -o ringflow -g ringflow -m 0750 /var/lib/ringflow

WORKDIR /opt/ringflow
COPY pyproject.toml README.md ./
COPY tasks ./tasks
COPY worker_launcher ./worker_launcher
COPY cli ./cli
# flower: `ringflow flower` runs Celery Flower, which pyproject.toml does not list.
RUN pip install --no-cache-dir . "flower>=2.0" \
    && rm -rf build ./*.egg-info

USER ${RINGFLOW_UID}:${RINGFLOW_GID}
WORKDIR /home/ringflow
ENTRYPOINT ["ringflow"]
CMD ["--help"]
