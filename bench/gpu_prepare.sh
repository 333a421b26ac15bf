#!/usr/bin/env bash
# Download, on a machine with network, the wheels that bench/gpu.sh installs on the GPU machine
# (Python 3.12, manylinux x86-64, no network). That machine already has torch, transformers,
# accelerate, peft, safetensors, tokenizers, pillow and numpy; what the app's import chain
# (model_manager, settings, generator, vision) needs beyond them comes from here.
#
# Left out on purpose:
#   bitsandbytes      about 60 MB alone: the upload to the GPU machine is capped at 64 MiB;
#                     LLaVA then loads in fp16 (vision.py says so in its notice)
#   llama-cpp-python  no wheel on PyPI; building it with CUDA costs minutes of GPU time
#   faster-whisper, gradio, piper: not on the path these measurements take
#
# Versions follow the local .venv where it has the package (what the app is tested with).
# Usage: bash bench/gpu_prepare.sh [DEST]   (default bench/.gpu-wheels)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-$ROOT/bench/.gpu-wheels}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3

# The app's needs first, then huggingface_hub's tree (diffusers needs a recent hub; the GPU
# machine's transformers may bring an older one). gpu.sh installs only what is missing there.
PACKAGES=(
    diffusers importlib_metadata zipp lazy-importer requests urllib3 idna charset_normalizer certifi
    pydantic pydantic_core annotated_types typing_inspection typing_extensions
    compel pyparsing PyYAML psutil
    huggingface_hub httpx2 httpcore2 h11 anyio truststore click hf-xet filelock fsspec tqdm packaging
)

pinned() {  # NAME==VERSION as installed locally, else NAME
    "$PYTHON" - "$1" <<'EOF'
import importlib.metadata as metadata
import sys

name = sys.argv[1]
try:
    print(f"{name}=={metadata.version(name)}")
except metadata.PackageNotFoundError:
    print(name)
EOF
}

mkdir -p "$DEST"
requirements=()
for package in "${PACKAGES[@]}"; do
    requirements+=("$(pinned "$package")")
done
echo "downloading ${#requirements[@]} wheels for Python 3.12 manylinux x86-64 into $DEST"
"$PYTHON" -m pip download --quiet --disable-pip-version-check --dest "$DEST" --no-deps \
    --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform any \
    "${requirements[@]}" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
ls -1 "$DEST"
total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
echo "total: $((total / 1024 / 1024)) MiB in $(ls "$DEST"/*.whl | wc -l) wheels (upload cap 64 MiB)"
