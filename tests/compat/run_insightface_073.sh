#!/usr/bin/env bash
# Face analysis and pipeline tests against insightface 0.7.3 (the sdist that compiles a Cython
# extension; what many ComfyUI installs still have), next to the 2.x wheels the main venv uses.
#
#   tests/compat/run_insightface_073.sh [extra pytest args]
#
# Creates (or reuses) a separate venv, by default ~/.cache/hyperlora/venv-if073
# (HYPERLORA_IF073_VENV overrides), installs CPU onnxruntime, torch and insightface==0.7.3
# (needs gcc and the Python headers: the wheel is built from the sdist), checks that 0.7.3 is
# really what imports, then runs tests/core/test_faces.py, test_faces_setup.py, test_pipeline.py.
# Exit status: pytest's (non-zero on any failure; "no tests collected" is a failure too);
# 3 when the environment could not be set up (no compiler, a registry not answering).
# Reinstalls only when the package list below changes (stamp file in the venv).
# HYPERLORA_IF073_SETUP_ONLY=1: set the environment up and stop (CI does it while the main tests run).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cache="${HYPERLORA_CACHE:-$HOME/.cache/hyperlora}"
venv="${HYPERLORA_IF073_VENV:-$cache/venv-if073}"
log() { echo "[if073] $*"; }
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
# importing insightface 0.7.3 imports albumentations, which asks pypi.org for updates otherwise
export NO_ALBUMENTATIONS_UPDATE=1

packages=(
  torch==2.14.1 numpy onnx onnxruntime opencv-python-headless scikit-image pytest safetensors
  Pillow einops hypothesis Cython transformers
)
insightface_pin=insightface==0.7.3
stamp_text="${packages[*]} ${insightface_pin}"
stamp="$venv/.hyperlora-if073-stamp"

t_start=$SECONDS
setup_failed() { log "could not set up the insightface 0.7.3 environment: $*"; exit 3; }
if [ ! -x "$venv/bin/python" ]; then
  log "creating venv $venv"
  python3 -m venv "$venv" || setup_failed "python3 -m venv"
fi
py="$venv/bin/python"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$stamp_text" ]; then
  log "reusing $venv (packages unchanged)"
else
  rm -f "$stamp"
  t=$SECONDS
  log "installing ${packages[*]}"
  "$py" -m pip install -q "${packages[@]}" || setup_failed "pip install ${packages[*]}"
  log "  took $((SECONDS - t)) s"
  t=$SECONDS
  command -v gcc >/dev/null 2>&1 || log "warning: no gcc on PATH; building insightface 0.7.3 from its sdist needs one"
  log "installing $insightface_pin (builds a Cython extension)"
  if ! "$py" -m pip install -q "$insightface_pin"; then
    log "build with isolation failed; retrying with --no-build-isolation (numpy and Cython from the venv)"
    "$py" -m pip install -q --no-build-isolation "$insightface_pin" || setup_failed "building $insightface_pin"
  fi
  log "  took $((SECONDS - t)) s"
  echo "$stamp_text" > "$stamp"
fi

# the version that imports must be 0.7.3, with its compiled extension
"$py" - <<'EOF'
import sys
import insightface
from insightface.thirdparty.face3d.mesh.cython import mesh_core_cython  # noqa: F401  (the compiled part)
if insightface.__version__ != "0.7.3":
    sys.exit(f"[if073] expected insightface 0.7.3, got {insightface.__version__} from {insightface.__file__}")
print(f"[if073] insightface {insightface.__version__} from {insightface.__file__}")
EOF
if [ "${HYPERLORA_IF073_SETUP_ONLY:-0}" = "1" ]; then
  log "environment ready in $((SECONDS - t_start)) s (setup only)"
  exit 0
fi

cd "$repo"
t=$SECONDS
log "running the face and pipeline tests"
set +e
"$py" -m pytest -q -p no:cacheprovider \
  tests/core/test_faces.py tests/core/test_faces_setup.py tests/core/test_pipeline.py "$@"
rc=$?
set -e
log "tests took $((SECONDS - t)) s; total $((SECONDS - t_start)) s; pytest exit $rc"
if [ "$rc" -eq 5 ]; then
  log "pytest collected no tests: that is a failure here"
  exit 1
fi
exit "$rc"
