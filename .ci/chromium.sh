#!/usr/bin/env bash
# Headless Chromium for the HTML report test (tests/test_report.py), from Debian's `chromium` package.
# Idempotent: does nothing when /usr/bin/chromium already runs. Never lets a tool download its own browser.
# Needs root (CI runs as root); exits 1 with a message otherwise, and the test falls back to
# validating the HTML and its embedded images.
set -euo pipefail
CHROMIUM=/usr/bin/chromium
if [ -x "$CHROMIUM" ] && "$CHROMIUM" --version >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "chromium.sh: $CHROMIUM missing and not root; install Debian's chromium package" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
# A lock held by another apt run is waited for rather than failed on.
apt-get -o DPkg::Lock::Timeout=300 update -qq
apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends chromium >/dev/null
"$CHROMIUM" --version
