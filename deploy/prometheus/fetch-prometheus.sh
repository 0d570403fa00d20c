#!/usr/bin/env bash
# Put Debian's `prometheus` package (prometheus + promtool) under DEST without installing it system-wide:
# no root needed when the apt lists are present, and no system service is started. Does nothing when
# DEST already holds both binaries. Used by `make test` (tests/deploy/ run a real Prometheus).
#   deploy/prometheus/fetch-prometheus.sh [DEST]     (default .tools/prometheus)
set -euo pipefail
dest=${1:-.tools/prometheus}
if [[ -x $dest/usr/bin/prometheus && -x $dest/usr/bin/promtool ]]; then
    exit 0
fi
if ! command -v apt-get >/dev/null || ! command -v dpkg-deb >/dev/null; then
    echo "fetch-prometheus: needs apt-get and dpkg-deb (Debian/Ubuntu); install Prometheus 2.x so that" \
         "prometheus and promtool are on PATH instead" >&2
    exit 1
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if ! (cd "$work" && apt-get download -q prometheus 2>/dev/null); then
    # Fresh machines often have no package lists yet.
    sudo=""
    [[ $(id -u) -ne 0 ]] && sudo="sudo"
    $sudo apt-get update -q
    (cd "$work" && apt-get download -q prometheus)
fi
mkdir -p "$dest"
dpkg-deb -x "$work"/prometheus_*.deb "$dest"
"$dest/usr/bin/promtool" --version | head -1
