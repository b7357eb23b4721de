# ffscale for GPU nodes: CUDA 12.8 (torch 2.9.1's PyPI build), DeepSpeed, DALI (CUDA 12 variant).
# Build:  docker build -t ffscale:0.1.0 .      Run: docker run --gpus all ffscale:0.1.0
FROM nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev ninja-build libaio-dev \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

# Heavy, rarely changing layers first: torch, then the pinned stack.
RUN pip install torch==2.9.1
# hadolint ignore=DL3059
RUN pip install deepspeed==0.19.8 nvidia-dali-cuda120==2.4.0 webdataset==1.0.2 omegaconf==2.4.0 \
      mlflow==3.17.2 psutil==7.2.2 safetensors==0.8.0 pillow==13.0.0 pyyaml==6.0.4 nvidia-ml-py==13.615.71

WORKDIR /opt/ffscale
COPY pyproject.toml README.md ./
COPY ffscale ./ffscale
COPY configs ./configs
RUN pip install --no-deps . \
 && useradd --create-home --uid 1000 ffscale \
 && mkdir -p /runs /data && chown ffscale:ffscale /runs

USER 1000
ENV TORCH_EXTENSIONS_DIR=/home/ffscale/.cache/torch_extensions
CMD ["ffscale", "--help"]
