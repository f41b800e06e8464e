#!/usr/bin/env bash
# Build a local Debian bookworm + Python 3.11 base image without a container registry:
# debootstrap a minimal root file system, add Debian's python3 + python3-venv, and `docker import` it.
#
#   docker/build_base.sh            # prints the image tag (builds it only when missing)
#   docker build --build-arg BASE_IMAGE="$(docker/build_base.sh)" -t emotion-server .
#
# The tag carries a hash of this script, so changing the package list builds a new image and an
# unchanged script reuses the one already imported. Needs root (debootstrap, chroot) and a reachable
# Debian mirror (DEBIAN_MIRROR, default deb.debian.org). It is an equivalent of python:3.11-slim for
# the Dockerfile: `python3 -m venv` works, `useradd` exists, CA certificates are installed.
set -euo pipefail

SUITE=bookworm
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SECURITY_MIRROR="${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
PACKAGES=python3,python3-venv,ca-certificates
REPO="${BASE_REPO:-emotion-base}"
HASH="$(sha256sum "$0" | cut -c1-12)"
TAG="$REPO:$SUITE-py311-$HASH"

DOCKER="${DOCKER:-docker}"
log() { echo "build_base: $*" >&2; }

if "$DOCKER" image inspect "$TAG" >/dev/null 2>&1; then
  log "$TAG exists, reused"
  echo "$TAG"
  exit 0
fi

ROOT="$(mktemp -d /var/tmp/emotion-base.XXXXXX)"
chmod 755 "$ROOT"  # apt in the chroot downloads as the unprivileged _apt user
LOG="$ROOT.log"    # apt and debootstrap chatter; its tail is printed when a step fails
cleanup() {
  # debootstrap may leave /proc and /sys mounted inside the root on failure.
  for m in proc sys dev/pts dev; do umount -l "$ROOT/$m" 2>/dev/null || true; done
  rm -rf --one-file-system "$ROOT"
  rm -f "$LOG"
}
trap cleanup EXIT
quiet() {
  "$@" >>"$LOG" 2>&1 || { tail -n 40 "$LOG" >&2; log "failed: $*"; exit 1; }
}

started=$(date +%s)
if ! command -v debootstrap >/dev/null 2>&1; then
  log "installing debootstrap (apt)"
  quiet apt-get update -qq
  quiet env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap
fi

log "debootstrap $SUITE ($PACKAGES) from $MIRROR into $ROOT"
quiet debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$ROOT" "$MIRROR"

# Security and point-release updates, as a registry image would have them.
cat >"$ROOT/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $SECURITY_MIRROR $SUITE-security main
EOF
cp /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true
log "apt-get upgrade from $SUITE-updates and $SUITE-security"
quiet chroot "$ROOT" /bin/sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get upgrade -y -qq'
quiet chroot "$ROOT" apt-get clean
rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/*.bin "$ROOT"/var/log/*.log "$ROOT"/tmp/*
: >"$ROOT/etc/resolv.conf"  # docker bind-mounts its own at run time

# Documentation and man pages are not needed at run time.
rm -rf "$ROOT"/usr/share/doc/* "$ROOT"/usr/share/man/* "$ROOT"/usr/share/info/*

log "docker import -> $TAG"
tar --numeric-owner -C "$ROOT" -c . | "$DOCKER" import \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["/bin/bash"]' \
  --message "debootstrap $SUITE minbase + $PACKAGES (docker/build_base.sh)" \
  - "$TAG" >&2
log "built $TAG in $(($(date +%s) - started)) s"
echo "$TAG"
