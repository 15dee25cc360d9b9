#!/usr/bin/env bash
# Make sure the system programs the local stack needs are present:
#   redis-server (Debian package redis-server) and PostgreSQL server binaries
#   under /usr/lib/postgresql/*/bin (Debian package postgresql), and chromium
#   (with a font) for the dashboard's browser tests, which drive it through Playwright.
# As root, installs what is missing with apt-get and says so; otherwise prints
# the exact command to run and exits non-zero.
set -euo pipefail

missing=()
command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ] || missing+=(redis-server)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ] || missing+=(chromium)
[ -d /usr/share/fonts/truetype/dejavu ] || missing+=(fonts-dejavu-core)

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "tickwise: missing system packages: ${missing[*]}" >&2
  echo "tickwise: run this once, then try again:" >&2
  echo "    sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi

echo "tickwise: installing missing system packages with apt-get: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# policy-rc.d 101 stops Debian's postinst from starting system-wide services:
# Tickwise runs its own private Redis and Postgres under .run/ on free ports.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"; created_policy=1
fi
# Not silent: the first install takes a while, so apt shows each package as it fetches and sets it up.
apt-get install -y -q --no-install-recommends "${missing[@]}"
[ "$created_policy" -eq 1 ] && rm -f "$policy"
echo "tickwise: installed ${missing[*]}"
