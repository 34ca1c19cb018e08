#!/usr/bin/env bash
# Regenerate configs/ from spacy_ctx.training_config (the single source of truth).
set -euo pipefail
cd "$(dirname "$0")/.."
gen() { python -m spacy_ctx init-config "$@" > /dev/null; }
gen configs/ner_bert.cfg --pipeline ner --encoder bert
gen configs/textcat_bert.cfg --pipeline textcat --encoder bert
gen configs/ner_textcat_bert.cfg --pipeline ner+textcat --encoder bert
gen configs/ner_bert_frozen.cfg --pipeline ner --encoder bert --frozen
gen configs/textcat_bert_frozen.cfg --pipeline textcat --encoder bert --frozen
gen configs/ner_elmo.cfg --pipeline ner --encoder elmo
gen configs/textcat_elmo.cfg --pipeline textcat --encoder elmo
ls configs
