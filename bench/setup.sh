#!/bin/sh
# Installs the benchmark's system tools: nginx (the fixed-response upstream) and wrk (the load generator).
# Debian/Ubuntu only. `bench/run.py` never installs anything itself; it tells you to run this.
# (Debian 12's `nginx-light` is only `nginx` plus the echo module, and later releases drop it: `nginx` is enough.)
set -eu
missing=""
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing="$missing nginx"
command -v wrk >/dev/null 2>&1 || missing="$missing wrk"
command -v taskset >/dev/null 2>&1 || missing="$missing util-linux"
if [ -z "$missing" ]; then
    echo "bench/setup.sh: nginx, wrk and taskset are already installed"
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
echo "bench/setup.sh: installing:$missing"
$SUDO apt-get update
# policy-rc.d / no init system: the packaged nginx service may fail to start; the benchmark runs its own.
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends $missing
