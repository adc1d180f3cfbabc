#!/usr/bin/env bash
# Set-up for a fresh Python (>= 3.11 for the demo corpus): lit_lowrank, its test extras and the
# example plugin, without letting any dependency swap the installed torch for another build.
set -euo pipefail
shopt -s nullglob
cd "$(dirname "$0")/.."

python -m pip install --quiet --upgrade pip
# Keep the torch already installed (say, a CUDA build); else the CPU build 2.13.0.
if ! torch_version=$(python -c "import torch; print(torch.__version__.split('+')[0])" 2>/dev/null); then
    python -m pip install --quiet "torch==2.13.0"
    torch_version=2.13.0
fi
pin=$(mktemp)
echo "torch==${torch_version}" > "$pin"
python -m pip install --quiet -c "$pin" -e ".[dev]"
for plugin in plugins/*/; do  # the example third-party plugin packages, installed as users would
    python -m pip install --quiet -c "$pin" --no-deps -e "$plugin"
done
# litdata pulls PyPI's torchvision, which cannot load beside a CPU-only torch build and then
# breaks `import transformers` ("operator torchvision::nms does not exist"); litdata works
# without it.
if ! python -c "import torchvision" >/dev/null 2>&1; then
    python -m pip uninstall --quiet -y torchvision || true
fi
rm -f "$pin"
