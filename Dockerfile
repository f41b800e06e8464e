# syntax=docker/dockerfile:1
# Speech emotion recognition server (REST + WebSocket), one uvicorn worker.
#
#   docker build -t emotion-server .                                  # CPU: python:3.11-slim
#   docker build --build-arg VARIANT=cuda -t emotion-server:cuda .    # NVIDIA GPU
#   docker run -p 8000:8000 -v emotion-data:/data emotion-server
#
# The image needs no network at run time: faster-whisper tiny.en, MiniLM and the models in
# models/ are all inside it.

ARG VARIANT=cpu
# onnxruntime-gpu 1.31 needs CUDA 13 + cuDNN 9 (CTranslate2, for ASR, brings CUDA 12's cuBLAS below).
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

FROM python:3.11-slim AS base-cpu
RUN python -m venv /opt/venv

FROM ${CUDA_IMAGE} AS base-cuda
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

FROM base-${VARIANT} AS runtime
ARG VARIANT
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LD_LIBRARY_PATH=/opt/cublas12

WORKDIR /srv
COPY pyproject.toml README.md ./
COPY app ./app
COPY models ./models

# Editable install keeps the repository layout (/srv/app, /srv/models) that settings resolve from.
# faster-whisper pulls the CPU `onnxruntime`, which shares its module with `onnxruntime-gpu`:
# remove it and force the GPU build back (it runs on CPU too), exactly as the Makefile does.
RUN pip install -e . \
 && pip uninstall -y onnxruntime \
 && pip install --force-reinstall --no-deps onnxruntime-gpu==1.31.1 \
 && if [ "$VARIANT" = "cuda" ]; then \
      pip install nvidia-cublas-cu12 \
      && ln -s "$(python -c 'import nvidia.cublas as m; print(list(m.__path__)[0])')/lib" /opt/cublas12; \
    fi

RUN useradd --system --uid 10001 --home-dir /srv --shell /usr/sbin/nologin emotion \
 && mkdir -p /data \
 && chown emotion /data
USER emotion

ENV EMOTION_HOST=0.0.0.0 \
    EMOTION_PORT=8000 \
    EMOTION_MODEL_DIR=/srv/models \
    EMOTION_SQLITE_PATH=/data/sessions.db
VOLUME ["/data"]
EXPOSE 8000

# /healthz answers as soon as the process serves; readiness (models warmed up) is /readyz.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('EMOTION_PORT', '8000'), timeout=4)" || exit 1

CMD ["emotion-server", "serve"]
