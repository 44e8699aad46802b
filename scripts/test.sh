#!/usr/bin/env bash
# Sets up the ComfyUI host (once) and runs the whole test suite: core tests,
# in-process tests on the real ComfyUI, and end-to-end tests against a real
# ComfyUI server. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/host.sh setup
export HF_HUB_OFFLINE=1
exec "$(bash scripts/host.sh python)" -m pytest -c tests/pytest.ini tests "$@"
