#!/usr/bin/env bash
# `make docker-test`: build the CPU image and check it from the outside, with no container registry.
#
#  1. a Docker engine: Debian's docker.io (installed with apt when missing); dockerd is started in the
#     background when none answers, logging to $DOCKERD_LOG, and stopped again at the end;
#  2. the base image: $BASE_IMAGE, or the debootstrap bookworm + Python 3.11 image of
#     docker/build_base.sh (built once, then reused);
#  3. the CPU image, with BuildKit: `--network host` (apt/pip reach the package registries the way the
#     host does), the host's CA bundle as the `pip_cert` build secret;
#  4. the image holds no torch and runs as a non-root user;
#  5. a container on a free loopback port: docker/smoke_test.py waits for /readyz (<= $READY_TIMEOUT s),
#     posts a fixture to /v1/predict, streams one over WS /v1/stream; then the container is removed.
# Any failure prints the container's logs (and the daemon's tail when the engine did not come up).
#
# Environment: PY (python with the serving deps, default .venv/bin/python), IMAGE (emotion-server:test),
# BASE_IMAGE, PIP_CERT_FILE (CA bundle), READY_TIMEOUT (300), KEEP_DOCKERD=1 (leave a dockerd this
# script started running).
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PY:-.venv/bin/python}"
IMAGE="${IMAGE:-emotion-server:test}"
READY_TIMEOUT="${READY_TIMEOUT:-300}"
DOCKERD_LOG="${DOCKERD_LOG:-/var/log/emotion-dockerd.log}"
T0=$(date +%s)
CONTAINER=""
DOCKERD_PID=""

log() { echo "[docker-test] $(($(date +%s) - T0)) s: $*"; }
die() { echo "[docker-test] FAILED: $*" >&2; exit 1; }

apt_install() {
  log "apt-get install $*"
  mkdir -p var
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"; } >var/docker-apt.log 2>&1 \
    || { tail -n 40 var/docker-apt.log >&2; die "apt-get install $*"; }
}

cleanup() {
  local rc=$?
  if [ -n "$CONTAINER" ]; then
    if [ "$rc" -ne 0 ]; then
      echo "----- container logs ($CONTAINER) -----" >&2
      "$DOCKER" logs --tail 200 "$CONTAINER" >&2 2>&1 || true
      echo "----- end of container logs -----" >&2
    fi
    "$DOCKER" rm -f -v "$CONTAINER" >/dev/null 2>&1 || true
  fi
  if [ -n "$DOCKERD_PID" ] && [ "${KEEP_DOCKERD:-0}" != 1 ]; then
    log "stopping the dockerd this test started (pid $DOCKERD_PID)"
    kill "$DOCKERD_PID" 2>/dev/null || true
    for _ in $(seq 1 30); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 1; done
  fi
  if [ "$rc" -eq 0 ]; then log "passed"; else echo "[docker-test] FAILED (exit $rc) after $(($(date +%s) - T0)) s" >&2; fi
}
trap cleanup EXIT

# --- 1. Docker engine and a client that builds with BuildKit -------------------------------------
command -v dockerd >/dev/null 2>&1 || apt_install docker.io
# A current docker CLI builds with BuildKit only through the buildx plugin; Debian's docker.io client
# (20.10, /usr/bin/docker) has BuildKit built in. Use whichever can.
if docker buildx version >/dev/null 2>&1; then
  DOCKER=docker
elif [ -x /usr/bin/docker ]; then
  DOCKER=/usr/bin/docker
else
  apt_install docker.io
  DOCKER=/usr/bin/docker
fi
export DOCKER_BUILDKIT=1

if ! "$DOCKER" info >/dev/null 2>&1; then
  log "starting dockerd (log: $DOCKERD_LOG)"
  mkdir -p "$(dirname "$DOCKERD_LOG")"
  # setsid + no inherited descriptors: the daemon must not hold the caller's (CI's) output pipes open.
  setsid dockerd </dev/null >>"$DOCKERD_LOG" 2>&1 &
  DOCKERD_PID=$!
  for _ in $(seq 1 60); do "$DOCKER" info >/dev/null 2>&1 && break; sleep 1; done
  "$DOCKER" info >/dev/null 2>&1 || { tail -n 40 "$DOCKERD_LOG" >&2; die "dockerd did not answer within 60 s"; }
fi
log "docker engine $("$DOCKER" version -f '{{.Server.Version}}'), client $DOCKER"

# --- 2. base image ---------------------------------------------------------------------------
if [ -z "${BASE_IMAGE:-}" ]; then
  BASE_IMAGE="$(DOCKER="$DOCKER" docker/build_base.sh)"
fi
log "base image $BASE_IMAGE"

# --- 3. CPU image ----------------------------------------------------------------------------
CA="${PIP_CERT_FILE:-${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}}"
SECRET=()
[ -s "$CA" ] && SECRET=(--secret "id=pip_cert,src=$CA")
log "building $IMAGE (CA bundle: ${CA})"
mkdir -p var
build_t0=$(date +%s)
"$DOCKER" build --progress=plain --network host "${SECRET[@]}" \
  --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg VARIANT=cpu -t "$IMAGE" . \
  >var/docker-build.log 2>&1 || { tail -n 60 var/docker-build.log >&2; die "docker build (full log: var/docker-build.log)"; }
log "built $IMAGE in $(($(date +%s) - build_t0)) s, $("$DOCKER" image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1 / 1e6}')"

# --- 4. what the image holds -----------------------------------------------------------------
"$DOCKER" run --rm --entrypoint python "$IMAGE" -c \
  "import importlib.util as u, sys; sys.exit('torch is installed in the image' if u.find_spec('torch') else 0)"
"$DOCKER" run --rm "$IMAGE" emotion-server --version
# Whisper base assembled at build time (the server user cannot write there: a missing or partial
# model.bin fails here instead of at a user's first EMOTION_ASR_MODEL=base start)
"$DOCKER" run --rm --entrypoint python "$IMAGE" -c \
  "from app.analysis.asr_models import assemble; print('base ASR model:', assemble('base'))"
uid="$("$DOCKER" run --rm --entrypoint id "$IMAGE" -u)"
[ "$uid" != 0 ] || die "the image runs as root"

# --- 5. run it and check it from the outside --------------------------------------------------
PORT="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
CONTAINER="$("$DOCKER" run -d -p "127.0.0.1:$PORT:8000" "$IMAGE")"
log "container ${CONTAINER:0:12} on 127.0.0.1:$PORT"
"$PY" docker/smoke_test.py --url "http://127.0.0.1:$PORT" --container "$CONTAINER" --docker "$DOCKER" \
  --ready-timeout "$READY_TIMEOUT"
health="$("$DOCKER" inspect -f '{{.State.Health.Status}}' "$CONTAINER" 2>/dev/null || echo none)"
log "container health: $health"
# The image stays (its layers are the next run's cache); `docker rmi emotion-server:test` removes it.
