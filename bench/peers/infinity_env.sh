#!/usr/bin/env bash
# Create (once) a virtual environment for the Infinity peer, outside the repository.
#
#   bench/peers/infinity_env.sh [VENV_DIR]
#
# VENV_DIR defaults to $INFINITY_VENV, else ${XDG_CACHE_HOME:-~/.cache}/modelmora-bench/infinity-0.0.78.
# Infinity 0.0.78 pins older transformers than ModelMora, so it gets an environment of its own.
# torch comes from PyPI (a CUDA build that also runs on CPU; several minutes the first time, cached by uv).
# Prints the venv path on the last line. Idempotent: an existing, working venv is kept.
set -euo pipefail

VENV="${1:-${INFINITY_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/modelmora-bench/infinity-0.0.78}}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
case "$(realpath -m "$VENV")/" in
  "$REPO"/*) echo "refusing to create the Infinity venv inside the repository: $VENV" >&2; exit 2 ;;
esac

if [ -x "$VENV/bin/infinity_emb" ] && "$VENV/bin/python" -c "import infinity_emb" 2>/dev/null; then
  echo "$VENV"
  exit 0
fi

mkdir -p "$(dirname "$VENV")"
uv venv --python 3.11 "$VENV" >&2
VIRTUAL_ENV="$VENV" uv pip install --python "$VENV/bin/python" "infinity-emb[server,torch]==0.0.78" >&2
echo "$VENV"
