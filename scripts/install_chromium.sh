#!/usr/bin/env bash
# Debian's Chromium for the browser test (tests/test_web_page.py drives it with Playwright).
# Needs root (or password-less sudo) and Debian's package registry; does nothing when installed.
set -euo pipefail
command -v chromium >/dev/null 2>&1 && exit 0
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo -n"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
command -v chromium >/dev/null
