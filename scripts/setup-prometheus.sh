#!/usr/bin/env bash
# Installs Debian's prometheus (includes promtool) for the observability tests, if either is missing.
# --no-install-recommends: 94 MiB instead of 359 MiB; the package is not started on install.
set -euo pipefail
if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends prometheus
prometheus --version | head -1
