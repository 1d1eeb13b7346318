#!/usr/bin/env bash
# Installs headless Chromium from Debian for the dashboard's browser test
# (interceptor/tests/dashboard.rs). Needs root for apt-get; does nothing when it is there.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
    chromium --version 2>/dev/null || true
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium >/dev/null
chromium --version 2>/dev/null
