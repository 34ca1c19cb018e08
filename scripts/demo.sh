#!/usr/bin/env bash
# The main job on the embedded default model (all-MiniLM-L6-v2), from a fresh clone.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
python -m spacy_ctx demo "$@"
