#!/usr/bin/env bash
# Set up everything fnq needs on this machine, idempotently:
#   Debian packages (docker.io, redis-server, postgresql, debootstrap),
#   a running docker engine, the virtualenv with fnq installed, the function images.
# Usage: scripts/setup.sh [--no-images]
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'fnq setup: %s\n' "$*" >&2; exit 1; }

build_images=1
[ "${1:-}" = "--no-images" ] && build_images=0

PACKAGES=(docker.io redis-server redis-tools postgresql debootstrap iproute2 iptables openssl)
PYTHON=${PYTHON:-python3}

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo "$@"
    else return 1
    fi
}

install_packages() {
    local missing=()
    for pkg in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing Debian packages: ${missing[*]}"
    if ! as_root true; then
        die "missing packages: ${missing[*]}; install them as root: apt-get install -y ${missing[*]}"
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
}

docker_answers() { timeout 10 docker info >/dev/null 2>&1; }

start_docker() {
    if docker_answers; then return 0; fi
    as_root true || die "no docker engine answers, and starting one needs root: start dockerd"
    command -v dockerd >/dev/null || die "dockerd is not installed: apt-get install -y docker.io"
    log "starting dockerd (overlay2, no iptables, no bridge)"
    as_root mkdir -p /var/log/fnq
    # In a session of its own: whatever ends the caller's process group (a test run's
    # clean-up, a CI step) leaves the engine running.
    # shellcheck disable=SC2024
    as_root setsid nohup dockerd --storage-driver=overlay2 --iptables=false --ip-masq=false --bridge=none \
        >/var/log/fnq/dockerd.log 2>&1 &
    for _ in $(seq 1 60); do
        docker_answers && return 0
        sleep 0.5
    done
    tail -n 20 /var/log/fnq/dockerd.log >&2 || true
    die "dockerd did not answer within 30 s (log: /var/log/fnq/dockerd.log)"
}

make_venv() {
    local stamp=.venv/.fnq-installed
    local want
    want=$(sha256sum pyproject.toml | cut -d' ' -f1)
    if [ -x .venv/bin/fnq ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then return 0; fi
    log "creating the virtualenv and installing fnq"
    [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null
    .venv/bin/python -m pip install -q -e '.[dev]'
    echo "$want" >"$stamp"
}

install_packages
start_docker
make_venv
if [ "$build_images" = 1 ]; then
    log "building function images (cached)"
    # Its progress (stderr) says what it built; the summary table would say it again.
    .venv/bin/fnq images build scripts/functions/example tests/functions/*/ >/dev/null
fi
log "setup done"
