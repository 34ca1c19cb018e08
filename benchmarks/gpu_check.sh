#!/usr/bin/env bash
# GPU check (issue 10 part 2): (a) the GPU tests, (b) words/s of ctx_bert vs
# spacy-transformers vs raw HF at bert-base size (random weights) in fp32 and bf16 on
# 2,000 BBC documents cut to ~60 words, (c) MFU of the encoder forward, (d) ELMo words/s,
# (e) the saving of stopping after a middle layer. Under 6 minutes on one GPU.
#
#   bash benchmarks/gpu_check.sh                # on a GPU machine
#   bash benchmarks/gpu_check.sh --cpu-smoke    # tiny sizes on the CPU (< 1 minute)
#   bash benchmarks/gpu_check.sh --peak-tflops 989   # any option of benchmarks/gpu_check.py
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then
    # shellcheck disable=SC1091
    . .venv/bin/activate
fi
if [ -z "$(command -v nvidia-smi)" ]; then
    echo "nvidia-smi: not found"
else
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec timeout 360 python benchmarks/gpu_check.py "$@"
