#!/usr/bin/env bash
# Prepares what the end-to-end and browser tests need: ComfyUI 0.8.0 (from ../shared/comfyui beside the
# repository, ComfyUI is not on the package index) with its own Python environment, the ComfyUI-Distributed
# extension for the multi-server test (from ../shared/comfyui_distributed, not on the package index either),
# and Debian's Chromium.
#
#   eval "$(bash .ci/setup_comfyui.sh [WORK_DIR])"      # default WORK_DIR: .comfyui in the repository root
#
# prints the `export COMFYUI_DIR=... COMFYUI_PYTHON=... COMFYUI_DISTRIBUTED_DIR=...` line the tests read;
# progress goes to stderr. Re-running is cheap: existing trees are kept, and the environment is rebuilt only
# when the requirements it was made from changed. ComfyUI gets its own environment because it needs a
# torch/torchvision pair that load together (../shared/comfyui/README.md).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$(mkdir -p "${1:-$ROOT/.comfyui}" && cd "${1:-$ROOT/.comfyui}" && pwd)"
TARBALL="${COMFYUI_TARBALL:-$ROOT/../shared/comfyui/ComfyUI-0.8.0.tar.gz}"
COMFY="$WORK/ComfyUI-0.8.0"
# ComfyUI-Distributed imports nothing beyond ComfyUI's own requirements, so it needs no change to the venv.
DISTRIBUTED_TARBALL="${COMFYUI_DISTRIBUTED_TARBALL:-$ROOT/../shared/comfyui_distributed/ComfyUI-Distributed-a91f9fb.tar.gz}"
DISTRIBUTED="$WORK/$(basename "$DISTRIBUTED_TARBALL" .tar.gz)"  # named by its commit: another tarball, another tree
VENV="$WORK/venv"
TORCH_PAIR="torch==2.14.1 torchvision==0.29.1"

say() { echo "setup_comfyui: $*" >&2; }

if [ ! -f "$COMFY/main.py" ]; then
    [ -f "$TARBALL" ] || { say "$TARBALL not found: put the shared folder beside the repository or set COMFYUI_TARBALL"; exit 1; }
    say "extracting $TARBALL"
    tar xzf "$TARBALL" -C "$WORK"
fi
if [ ! -d "$DISTRIBUTED" ]; then
    [ -f "$DISTRIBUTED_TARBALL" ] || { say "$DISTRIBUTED_TARBALL not found: put the shared folder beside the repository or set COMFYUI_DISTRIBUTED_TARBALL"; exit 1; }
    say "extracting $DISTRIBUTED_TARBALL"
    rm -rf "$DISTRIBUTED.partial" && mkdir "$DISTRIBUTED.partial"  # renamed when complete: no half tree is kept
    tar xzf "$DISTRIBUTED_TARBALL" -C "$DISTRIBUTED.partial" --strip-components=1
    mv "$DISTRIBUTED.partial" "$DISTRIBUTED"
fi

# ComfyUI's requirements without its torch packages (the pair above is installed first).
grep -v -E '^(torch|torchvision|torchaudio)([<>=~ ].*)?$' "$COMFY/requirements.txt" > "$WORK/comfyui-requirements.txt"
STAMP="$( (echo "$TORCH_PAIR"; cat "$WORK/comfyui-requirements.txt" "$ROOT/requirements.txt") | sha256sum | cut -c1-16)"
if [ "$(cat "$VENV/.nextstep-stamp" 2>/dev/null)" != "$STAMP" ]; then
    say "creating the ComfyUI environment in $VENV (a few minutes)"
    python -m venv --clear "$VENV" >&2
    # shellcheck disable=SC2086
    "$VENV/bin/pip" install --quiet $TORCH_PAIR >&2
    "$VENV/bin/pip" install --quiet -r "$WORK/comfyui-requirements.txt" requests >&2  # 0.8.0 imports it unlisted
    "$VENV/bin/pip" install --quiet -r "$ROOT/requirements.txt" >&2
    echo "$STAMP" > "$VENV/.nextstep-stamp"
else
    say "reusing $VENV"
fi

if ! command -v chromium > /dev/null; then
    if [ "$(id -u)" != 0 ]; then
        say "Chromium is missing: sudo apt-get install -y --no-install-recommends chromium chromium-driver"
        exit 1
    fi
    say "installing Debian's chromium"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >&2
fi

echo "export COMFYUI_DIR='$COMFY' COMFYUI_PYTHON='$VENV/bin/python' COMFYUI_DISTRIBUTED_DIR='$DISTRIBUTED'"
