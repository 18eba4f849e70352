#!/usr/bin/env bash
# Installs the named Debian packages with apt-get (through sudo when not root).
# Shared by test-deps.sh and pgo-build.sh; callers decide what is missing.
#   scripts/apt-install.sh PACKAGE...
set -euo pipefail
[ $# -gt 0 ] || exit 0
command -v apt-get >/dev/null 2>&1 || { echo "apt-install: no apt-get here; install $* by hand" >&2; exit 1; }
SUDO=
[ "$(id -u)" -eq 0 ] || SUDO=sudo
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null
