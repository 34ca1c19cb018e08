#!/usr/bin/env bash
# The main job from a fresh clone: install into ./.venv, then run the project workflow
# (project.yml) in its short setting on the embedded default model and print the results.
# Extra arguments go to `weasel run all`, e.g. --vars.setting full.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
bash scripts/workflow.sh "$@"
