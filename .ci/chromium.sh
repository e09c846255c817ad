#!/usr/bin/env bash
# Headless Chromium for the HTML report test (tests/test_report.py), from Debian's `chromium` package.
# Idempotent: does nothing when /usr/bin/chromium already runs. Never lets a tool download a browser.
# Needs root or password-less sudo; otherwise it exits 1 with a message and the test falls back to
# validating the HTML and its embedded images without a browser.
set -euo pipefail
CHROMIUM=/usr/bin/chromium
if [ -x "$CHROMIUM" ] && "$CHROMIUM" --version >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
else
    echo "chromium.sh: $CHROMIUM missing and neither root nor password-less sudo; install Debian's chromium package" >&2
    exit 1
fi
# Another apt run holding the lock is waited for (up to 5 min), not failed on.
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 update -qq
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq \
    --no-install-recommends chromium >/dev/null
"$CHROMIUM" --version
