#!/usr/bin/env bash
# Sets up the ComfyUI host (once) and runs the whole test suite: core tests,
# in-process tests on the real ComfyUI, and end-to-end tests against a real
# ComfyUI server. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/host.sh setup
# The browser tests drive Debian's Chromium through its chromedriver (no browser download).
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
fi
export HF_HUB_OFFLINE=1
exec "$(bash scripts/host.sh python)" -m pytest -c tests/pytest.ini tests "$@"
