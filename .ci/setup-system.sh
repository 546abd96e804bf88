#!/usr/bin/env bash
# System tools the tests need: systemd-analyze (tests/test_deploy.py checks the units), the
# shell linter for deploy/install.sh, and ip (network-namespace tests). Idempotent: apt runs
# only when something is missing. Installing the systemd package starts nothing in a container.
set -euo pipefail

missing=()
command -v systemd-analyze >/dev/null || missing+=(systemd)
command -v ip >/dev/null || missing+=(iproute2)
command -v shellcheck >/dev/null || missing+=(shellcheck)
if ((${#missing[@]} == 0)); then
	exit 0
fi
if ((EUID != 0)); then
	echo "setup-system.sh: need root to apt-get install ${missing[*]}" >&2
	exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
