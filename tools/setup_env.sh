#!/usr/bin/env bash
# Create or reuse the project-local environment at .venv/ with the pinned OpenMMLab stack.
#
#   bash tools/setup_env.sh        # idempotent: a second run finishes in seconds
#
# mmcv 2.1.0 exists on PyPI only as an sdist whose setup.py asks for C++17 while torch 2.14's
# headers need C++20; we build it once (about 6 minutes on 2 cores) with that flag changed and
# cache the wheel under $SEGMAN_CACHE (default ~/.cache/mmseg-segman), keyed by torch version.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
CACHE="${SEGMAN_CACHE:-$HOME/.cache/mmseg-segman}"
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)
BUILD_PINS=("setuptools>=77,<81" wheel ninja)
# onnx and onnxruntime: tools/deployment/export_onnx.py and its tests (the package needs neither)
STACK_PINS=(mmengine==0.10.7 mmsegmentation==1.2.2 mmpretrain==1.2.0 natten==0.21.7
            "numpy<2.3" ftfy regex pytest==8.3.4 pytest-timeout==2.3.1 openmim==0.3.9
            onnx==1.23.2 onnxruntime==1.32.0)
MMCV_VERSION=2.1.0

# Everything that decides the environment's contents; a change makes the next run re-check.
STAMP_KEY="$(printf '%s\n' "${TORCH_PINS[@]}" "${BUILD_PINS[@]}" "${STACK_PINS[@]}" "mmcv==$MMCV_VERSION" \
             "$(cat "$ROOT/setup.py")" | sha1sum | cut -c1-12)"
STAMP="$VENV/.segman-env-$STAMP_KEY"

log() { echo "[setup_env] $*"; }

if [[ -f "$STAMP" ]] && "$VENV/bin/python" -c "import mmseg_segman" 2>/dev/null; then
    log "reusing $VENV"
    exit 0
fi

[[ -x "$VENV/bin/python" ]] || { log "creating $VENV"; "$PY" -m venv "$VENV"; }
VPY="$VENV/bin/python"
pip_install() { "$VPY" -m pip install --disable-pip-version-check -q "$@"; }

log "installing torch, torchvision and build tools"
pip_install "${TORCH_PINS[@]}" "${BUILD_PINS[@]}"

mmcv_ok() {
    "$VPY" - <<'PY' 2>/dev/null
import torch, mmcv
from mmcv.ops import nms  # compiled op: fails if mmcv was built against another torch
assert mmcv.__version__ == "2.1.0"
boxes = torch.tensor([[0., 0., 1., 1.], [0., 0., 1., 1.]]); scores = torch.tensor([0.9, 0.8])
assert nms(boxes, scores, 0.5)[1].tolist() == [0]
PY
}

if ! mmcv_ok; then
    TORCH_TAG="$("$VPY" -c 'import torch, sys; v = torch.__version__.split("+")[0]; print("torch%s-py%d%d" % (v, *sys.version_info[:2]))')"
    WHEEL_DIR="$CACHE/mmcv-$MMCV_VERSION-$TORCH_TAG"
    if ! ls "$WHEEL_DIR"/mmcv-*.whl >/dev/null 2>&1; then
        log "building mmcv $MMCV_VERSION with its ops against $TORCH_TAG (about 6 minutes, once)"
        BUILD="$(mktemp -d)"
        "$VPY" -m pip download --disable-pip-version-check -q --no-deps --no-binary :all: \
            --no-build-isolation "mmcv==$MMCV_VERSION" -d "$BUILD"
        tar -xzf "$BUILD"/mmcv-*.tar.gz -C "$BUILD"
        SRC="$(ls -d "$BUILD"/mmcv-$MMCV_VERSION)"
        sed -i 's/-std=c++17/-std=c++20/g' "$SRC/setup.py"
        mkdir -p "$WHEEL_DIR"
        (cd "$SRC" && MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS="$(nproc)" \
            "$VPY" -m pip wheel --disable-pip-version-check -q --no-build-isolation --no-deps . -w "$WHEEL_DIR")
        rm -rf "$BUILD"
    fi
    log "installing mmcv from $WHEEL_DIR"
    pip_install --no-deps --force-reinstall "$WHEEL_DIR"/mmcv-*.whl
fi

log "installing the OpenMMLab stack and the plugin"
pip_install "${STACK_PINS[@]}" "mmcv==$MMCV_VERSION" "${BUILD_PINS[@]}"
pip_install --no-build-isolation --no-deps -e "$ROOT"
mmcv_ok || { log "mmcv ops do not work in $VENV"; exit 1; }
"$VPY" -c "import mmseg, mmpretrain, natten, onnx, onnxruntime, mmseg_segman" || { log "import check failed"; exit 1; }
rm -f "$VENV"/.segman-env-*
touch "$STAMP"
log "ready: $VENV"
