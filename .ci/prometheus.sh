#!/bin/sh
# Install Debian's prometheus (the server and promtool) for the metrics tests
# (tests/test_metrics_prometheus.py, which fail without them), quietly and only when one is
# missing. Needs root (apt-get); does nothing when both are already there. The package's service is
# not started: the test starts its own server on a loopback port.
set -eu
if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends prometheus >/dev/null
command -v prometheus >/dev/null && command -v promtool >/dev/null
