#!/usr/bin/env bash
# The main job: sets up the ComfyUI host (once), then runs the "segment an
# image" workflow headless on a real ComfyUI server with the embedded default
# model and the shipped demo image, and prints where the masks and preview are.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/host.sh setup
export HF_HUB_OFFLINE=1
exec "$(bash scripts/host.sh python)" scripts/run_demo.py "$@"
