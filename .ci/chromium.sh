#!/bin/sh
# Install Debian's chromium for the HTML report test (tests/reports/test_browser.py), quietly and
# only when it is missing. Needs root (apt-get); does nothing when chromium is already there.
set -eu
if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends chromium >/dev/null
command -v chromium >/dev/null
