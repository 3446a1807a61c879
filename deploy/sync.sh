#!/bin/bash
# The image builder's install step: `modelmora-sync deps|project cpu|cuda` (run from /app, with uv.lock).
#   deps     the locked dependencies, not the project (a layer that changes only with the lock)
#   project  the project itself, as a regular (not editable) install
# cuda installs exactly what uv.lock pins (torch's CUDA build and its nvidia-* libraries, which also
# run on a CPU). cpu leaves torch and its CUDA-only dependencies out and installs torch's CPU build
# (the locked version, or TORCH_VERSION) from TORCH_INDEX_URL and any wheels under /wheels.
set -euo pipefail

step=${1:?usage: modelmora-sync deps|project cpu|cuda}
variant=${2:?usage: modelmora-sync deps|project cpu|cuda}
exclude=()
if [[ $variant == cpu ]]; then
    locked=$(uv export --locked --no-dev --no-hashes --no-annotate --no-header --no-emit-project)
    for name in $(grep -E '^(torch|triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+)==' <<<"$locked" | cut -d= -f1); do
        exclude+=(--no-install-package "$name")
    done
elif [[ $variant != cuda ]]; then
    echo "modelmora-sync: VARIANT must be cpu or cuda, not '$variant'" >&2
    exit 2
fi

case $step in
deps)
    uv sync --locked --no-dev --no-install-project "${exclude[@]}"
    if [[ $variant == cpu ]]; then
        version=${TORCH_VERSION:-$(sed -n 's/^torch==\([^ ;]*\).*/\1/p' <<<"$locked")}
        source=(--find-links /wheels)
        if [[ -n ${TORCH_INDEX_URL:-} ]]; then source+=(--index-url "$TORCH_INDEX_URL"); else source+=(--no-index); fi
        # its other dependencies (filelock, sympy, networkx...) are locked and installed above
        uv pip install --python /app/.venv/bin/python --no-deps "${source[@]}" "torch==${version}"
        /app/.venv/bin/python -c 'import torch; assert not torch.version.cuda, torch.version.cuda; print("torch", torch.__version__, "(CPU)")'
    fi
    ;;
project)
    # --inexact: keep the CPU torch installed in the deps step
    uv sync --locked --no-dev --no-editable --inexact "${exclude[@]}"
    ;;
*)
    echo "modelmora-sync: unknown step '$step'" >&2
    exit 2
    ;;
esac
