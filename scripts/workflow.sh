#!/usr/bin/env bash
# The spaCy project workflow (project.yml) in one command, and its training wrapper.
#
#   bash scripts/workflow.sh                        # short setting: python -m weasel run all, then
#                                                   # print metrics/results.md (~10 min on 2 CPU cores)
#   bash scripts/workflow.sh --vars.setting full    # any extra arguments go to `weasel run all`
#   WORKFLOW=all-elmo bash scripts/workflow.sh --vars.elmo_options O.json --vars.elmo_weights W.hdf5
#
#   bash scripts/workflow.sh train NAME CONFIG TASK [--gpu-id N] [--elmo OPTIONS WEIGHTS] [--encoder DIR]
#       one timed `python -m spacy train` run (what project.yml's train-* commands call):
#       reads corpus/settings.json (written by scripts/preprocess.py) for the steps, seed and
#       encoder directory, trains into training/NAME and writes metrics/train_NAME.json.
#       --encoder DIR: the transformer checkpoint to use instead of settings.json's encoder
#       (the pretrain workflow passes its MLM-adapted MiniLM).
#
# Python: $PYTHON if set, else ./.venv/bin/python, else the active virtualenv, else python3.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ -n "${PYTHON:-}" ]; then
    PY="$PYTHON"
elif [ -x "$ROOT/.venv/bin/python" ]; then
    PY="$ROOT/.venv/bin/python"
elif [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
    PY="$VIRTUAL_ENV/bin/python"
else
    PY="$(command -v python3 || command -v python)"
fi
export PYTHON="$PY"
# so that `python` inside weasel/spaCy commands is this interpreter too
export PATH="$(dirname "$PY"):$PATH"

die() { echo "workflow.sh: $*" >&2; exit 1; }

train() {
    [ $# -ge 3 ] || die "usage: workflow.sh train NAME CONFIG TASK [--gpu-id N] [--elmo OPTIONS WEIGHTS] [--encoder DIR]"
    local name="$1" config="$2" task="$3"
    shift 3
    local gpu_id=-1 elmo_options="" elmo_weights="" is_elmo=0 encoder_arg=""
    while [ $# -gt 0 ]; do
        case "$1" in
            --gpu-id) gpu_id="$2"; shift 2 ;;
            --elmo) is_elmo=1; elmo_options="${2:-}"; elmo_weights="${3:-}"; shift 3 || shift $# ;;
            --encoder) encoder_arg="${2:-}"; shift 2 || shift $# ;;
            *) die "unknown option $1" ;;
        esac
    done
    [ -f "$config" ] || die "no config $config"
    if grep -q '^factory = "ctx_elmo"' "$config"; then is_elmo=1; fi
    local paths=()
    if [ "$is_elmo" = 1 ]; then
        if [ -z "$elmo_options" ] || [ -z "$elmo_weights" ]; then
            die "the ELMo variant needs an ELMo model: pass both vars, e.g.
    python -m weasel run all-elmo . --vars.elmo_options /path/options.json --vars.elmo_weights /path/weights.hdf5
(AllenNLP options.json + weights.hdf5; a small test model: shared/refdata/elmo-allennlp-fixture beside this repo)"
        fi
        [ -f "$elmo_options" ] || die "ELMo options file not found: $elmo_options"
        [ -f "$elmo_weights" ] || die "ELMo weights file not found: $elmo_weights"
        paths+=(--paths.elmo_options "$elmo_options" --paths.elmo_weights "$elmo_weights")
    fi

    [ -f corpus/settings.json ] || die "corpus/settings.json is missing: run the preprocess step first"
    for split in train dev; do
        [ -f "corpus/$task/$split.spacy" ] || die "corpus/$task/$split.spacy is missing: run preprocess"
    done

    # Resolved settings (steps, seed, encoder) from preprocess; frozen encoders get their own steps.
    local frozen=0
    if grep -q '^frozen = true' "$config"; then frozen=1; fi
    local settings
    settings="$("$PY" - "$frozen" <<'EOF'
import json, sys
s = json.load(open("corpus/settings.json"))
frozen = sys.argv[1] == "1"
steps = s.get("frozen_max_steps" if frozen else "max_steps") or s.get("max_steps") or 0
freq = s.get("frozen_eval_frequency" if frozen else "eval_frequency") or s.get("eval_frequency") or 0
print(int(steps), int(freq), int(s.get("seed", 0)), int(s.get("batch_words") or 0),
      float(s.get("encoder_learn_rate") or 0), s.get("encoder") or "")
EOF
)"
    local steps freq seed batch_words encoder_lr encoder
    read -r steps freq seed batch_words encoder_lr encoder <<< "$settings"
    local overrides=(--system.seed "$seed")
    [ "$steps" -gt 0 ] && overrides+=(--training.max_steps "$steps")
    [ "$freq" -gt 0 ] && overrides+=(--training.eval_frequency "$freq")
    [ "$batch_words" -gt 0 ] && overrides+=(--training.batcher.size "$batch_words")
    if [ "$is_elmo" = 0 ]; then
        if [ -n "$encoder_arg" ]; then
            [ -f "$encoder_arg/config.json" ] || die "--encoder $encoder_arg: no config.json there (a Hugging Face-format checkpoint folder)"
            encoder="$encoder_arg"
        fi
        [ -n "$encoder" ] || encoder="$("$PY" -m spacy_ctx model-path)"
        paths+=(--paths.encoder "$encoder")
    fi
    # Fine-tuned encoders: warm up for 10% of the run and decay to zero at its end
    # (the config's schedule is written for 20,000 steps).
    if [ "$steps" -gt 0 ] && grep -q '^\[components\.ctx_bert\.optimizer\.learn_rate\]' "$config"; then
        local warmup=$(( steps / 10 > 0 ? steps / 10 : 1 ))
        overrides+=(--components.ctx_bert.optimizer.learn_rate.total_steps "$steps"
                    --components.ctx_bert.optimizer.learn_rate.warmup_steps "$warmup")
        if [ "$encoder_lr" != "0.0" ]; then
            overrides+=(--components.ctx_bert.optimizer.learn_rate.initial_rate "$encoder_lr")
        fi
    fi

    local out="training/$name"
    rm -rf "$out"
    mkdir -p metrics training
    local cmd=("$PY" -m spacy train "$config" --output "$out"
               --paths.train "corpus/$task/train.spacy" --paths.dev "corpus/$task/dev.spacy"
               "${paths[@]}" "${overrides[@]}" --gpu-id "$gpu_id")
    echo "+ ${cmd[*]}"
    local start end
    start="$(date +%s.%N)"
    "${cmd[@]}"
    end="$(date +%s.%N)"
    "$PY" - "$name" "$config" "$task" "$start" "$end" "$frozen" "$is_elmo" "$steps" "$freq" "${cmd[*]}" <<'EOF'
import json, sys
from pathlib import Path
name, config, task, start, end, frozen, is_elmo, steps, freq, cmd = sys.argv[1:]
settings = json.load(open("corpus/settings.json"))
meta = json.load(open(f"training/{name}/model-best/meta.json"))
perf = meta.get("performance", {})
key = "ents_f" if task == "ner" else "cats_score"
record = {
    "name": name, "task": task, "config": config,
    "encoder": "elmo" if is_elmo == "1" else "bert",
    "frozen": frozen == "1",
    "train_seconds": round(float(end) - float(start), 2),
    "steps": int(steps) or None, "eval_frequency": int(freq) or None,
    "dev_score_name": key, "dev_score": perf.get(key),
    "dev_scores": {k: v for k, v in perf.items() if not isinstance(v, dict) and not k.endswith("_loss")},
    "model_best": f"training/{name}/model-best",
    "command": cmd, "settings": settings,
}
Path("metrics").mkdir(exist_ok=True)
Path(f"metrics/train_{name}.json").write_text(json.dumps(record, indent=2) + "\n")
print(f"{name}: trained in {record['train_seconds']:.1f}s, dev {key} = {record['dev_score']}")
EOF
}

if [ "${1:-}" = "train" ]; then
    shift
    train "$@"
    exit 0
fi

workflow="${WORKFLOW:-all}"
mkdir -p metrics
times_file="metrics/workflow_times_${workflow}.txt"
start="$(date +%s)"
# Run the workflow; time each step from weasel's "=== step ===" dividers.
set +e
PYTHONUNBUFFERED=1 "$PY" -m weasel run "$workflow" . "$@" 2>&1 | {
    step="" step_start="$start"
    : > "$times_file.tmp"
    while IFS= read -r line; do
        printf '%s\n' "$line"
        [[ "$line" == *"=========="* ]] || continue
        plain="$(printf '%s' "$line" | sed 's/\x1b\[[0-9;]*m//g')"
        if [[ "$plain" =~ ^=+\ ([A-Za-z0-9_.-]+)\ =+$ ]]; then
            now="$(date +%s)"
            [ -n "$step" ] && printf '%-28s %5ds\n' "$step" $(( now - step_start )) >> "$times_file.tmp"
            step="${BASH_REMATCH[1]}" step_start="$now"
        fi
    done
    [ -n "$step" ] && printf '%-28s %5ds\n' "$step" $(( $(date +%s) - step_start )) >> "$times_file.tmp"
}
status=("${PIPESTATUS[@]}")
set -e
total=$(( $(date +%s) - start ))
printf '%-28s %5ds\n' "total" "$total" >> "$times_file.tmp"
mv "$times_file.tmp" "$times_file"
echo
echo "time per step ($times_file; steps whose outputs were up to date are skipped by weasel):"
cat "$times_file"
echo
if [ -f metrics/results.md ]; then
    cat metrics/results.md
fi
exit "${status[0]}"
