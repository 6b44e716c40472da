#!/usr/bin/env bash
# Install headless Chromium for the report's browser test (tests/test_report_browser.py):
# Debian's `chromium` package, with apt-get, when /usr/bin/chromium is missing and we are root.
# Idempotent: when Chromium is there it only says so. Without root or apt-get it installs
# nothing and says why (the browser test then skips). Exit status: 0, or apt-get's on failure.
set -euo pipefail

say() { printf '[install_browser] %s\n' "$*" >&2; }
BROWSER=/usr/bin/chromium

if [[ -x $BROWSER ]]; then
  say "already installed: $("$BROWSER" --version 2>/dev/null || echo "$BROWSER")"
  exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
  say "not installing: $BROWSER is missing and this is not root (as root: apt-get install -y chromium)"
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  say "not installing: $BROWSER is missing and there is no apt-get (install Chromium, or set CAI_CHROMIUM)"
  exit 0
fi
say "installing Debian's chromium (and fonts-liberation) with apt-get, about 120 MB"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium fonts-liberation >/dev/null
say "installed: $("$BROWSER" --version 2>/dev/null || echo "$BROWSER")"
