#!/usr/bin/env bash
# GPU measurements in one command: swap, peak-memory and throughput figures of the real
# architectures with random weights (bench/gpu_run.py says what and how), no downloads.
#
# On the GPU machine (no network): the Python packages it lacks come from bench/.gpu-wheels,
# made beforehand with bench/gpu_prepare.sh where there is network, and carried along:
#     bash bench/gpu.sh                      # about 7 minutes on an H100/H200
# Here, on a CPU, the same code on test-size configs:
#     bash bench/gpu.sh --device cpu --small
# Arguments go to gpu_run.py (--budget-s, --no-sdxl, --keep, --work). The results (JSON, the table,
# this log) go to $OUT when it is set, else bench/gpu-results/. GPU_TIMEOUT_S bounds the run
# (default 480 s: gpu_run.py starts no step after --budget-s, default 420 s).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
WHEELS="${GPU_WHEELS:-$ROOT/bench/.gpu-wheels}"
SITE="$ROOT/bench/.gpu-site"  # fallback install target when the system Python refuses pip
RESULTS="${OUT:-$ROOT/bench/gpu-results}"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
export GPU_COMMAND="bash bench/gpu.sh $*"
export PYTHONUNBUFFERED=1
mkdir -p "$RESULTS"

# Import name:wheel name of what the app's import chain needs beyond the GPU machine's packages,
# dependencies included (the fallbacks below install without resolving them).
NEEDED="diffusers:diffusers importlib_metadata:importlib_metadata zipp:zipp lazy_importer:lazy_importer
requests:requests urllib3:urllib3 idna:idna charset_normalizer:charset_normalizer certifi:certifi
pydantic:pydantic pydantic_core:pydantic_core annotated_types:annotated_types typing_inspection:typing_inspection
yaml:pyyaml psutil:psutil compel:compel pyparsing:pyparsing typing_extensions:typing_extensions"

missing_packages() {
    local pair module missing=""
    for pair in $NEEDED; do
        module="${pair%%:*}"
        "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$module') is None)" \
            2>/dev/null || missing="$missing ${pair#*:}"
    done
    echo "$missing"
}

install_missing() {
    local missing
    missing="$(missing_packages)"
    if [ -z "$missing" ]; then
        echo "packages: all present"
        return 0
    fi
    echo "packages missing:$missing"
    if [ ! -d "$WHEELS" ]; then
        echo "no $WHEELS: run bash bench/gpu_prepare.sh where there is network, and carry bench/.gpu-wheels"
        return 1
    fi
    local pip=("$PYTHON" -m pip install --quiet --disable-pip-version-check --no-index --find-links "$WHEELS")
    # With dependencies resolved against what is installed; then past PEP 668; then beside the system.
    # shellcheck disable=SC2086
    if "${pip[@]}" $missing || "${pip[@]}" --break-system-packages $missing; then
        return 0
    fi
    echo "pip could not install into this Python; putting the wheels into $SITE instead"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    # shellcheck disable=SC2086
    "${pip[@]}" --no-deps --target "$SITE" $missing && return 0
    unpack_wheels $missing  # no usable pip at all: a wheel is a zip of the installed files
}

unpack_wheels() {
    local name wheel
    mkdir -p "$SITE"
    for name in "$@"; do
        wheel="$(find "$WHEELS" -maxdepth 1 -iname "${name}-*.whl" | head -1)"
        [ -n "$wheel" ] || { echo "no wheel for $name in $WHEELS"; return 1; }
        "$PYTHON" -m zipfile -e "$wheel" "$SITE" || return 1
    done
}

check_imports() {
    "$PYTHON" - <<'EOF'
import importlib
import sys

sys.path.insert(0, ".")
import offline  # noqa: F401

for name in ("torch", "transformers", "diffusers", "accelerate", "pydantic", "huggingface_hub"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')}")
    except Exception as error:
        sys.exit(f"{name} cannot be imported: {error}")
import torch

print(f"CUDA: {torch.cuda.is_available()}" + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""))
for name in ("model_manager", "settings", "generator", "vision"):
    try:
        importlib.import_module(name)
    except Exception as error:
        sys.exit(f"the app's {name} cannot be imported: {type(error).__name__}: {error}")
EOF
}

main() {
    local started=$SECONDS rc
    echo "== $(date -u '+%Y-%m-%d %H:%M:%S UTC') $GPU_COMMAND ($PYTHON)"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv
    install_missing || return 1
    check_imports || return 1
    echo "== setup took $((SECONDS - started)) s"
    timeout --signal=TERM --kill-after=30 "${GPU_TIMEOUT_S:-480}" \
        "$PYTHON" bench/gpu_run.py --out "$RESULTS" "$@"
    rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "== gpu_run.py ended with exit status $rc after $((SECONDS - started)) s (124: out of time)"
        # Killed outright (137) it printed nothing more: the table it saved after its last step.
        if [ "$rc" -eq 137 ] && [ -f "$RESULTS/gpu_table.txt" ]; then
            echo "== the figures measured before it ended:"
            cat "$RESULTS/gpu_table.txt"
        fi
    fi
    return "$rc"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then  # run, not sourced (sourcing gives the functions alone)
    main "$@" 2>&1 | tee "$RESULTS/gpu_log.txt"
    exit "${PIPESTATUS[0]}"
fi
