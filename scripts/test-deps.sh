#!/usr/bin/env bash
# Installs what levee's tests need from Debian's packages, when missing.
# Safe to run again: it does nothing when everything is there.
set -euo pipefail

need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
# Headless browser for the dashboard test (tests/it/dashboard.rs).
command -v chromium >/dev/null 2>&1 || need+=(chromium)

if [ ${#need[@]} -eq 0 ]; then
  echo "test-deps: everything is installed"
  exit 0
fi

echo "test-deps: installing ${need[*]} (apt-get)"
"$(dirname "$0")/apt-install.sh" "${need[@]}"
echo "test-deps: installed ${need[*]}"
