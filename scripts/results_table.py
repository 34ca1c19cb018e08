#!/usr/bin/env python
"""Markdown results table from the workflow's metrics JSON files (no spaCy needed).

Inputs (all under ``metrics/``): ``eval_NAME.json`` written by ``scripts/evaluate.py``
(test-set scores, words/s) and ``train_NAME.json`` written by ``scripts/workflow.sh train``
(training time, steps, dev score); from the ``pretrain`` workflow also
``pretrain_{mlm,elmo,elmo_random}.json`` written by ``scripts/pretrain_steps.py``
(pretraining time, held-out perplexity) and ``plots.json`` written by ``scripts/plots.py``
(the PNG plots to link). Only records made with the current ``corpus/settings.json`` are
used, so a table never mixes runs of different settings.

    python scripts/results_table.py [--metrics metrics] [--settings corpus/settings.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, Iterable, List, Optional

VARIANT_ORDER = ["ner_bert", "ner_bert_frozen", "ner_bert_mlm", "ner_elmo", "ner_elmo_here", "ner_elmo_random",
                 "textcat_bert", "textcat_bert_frozen", "textcat_bert_mlm", "textcat_elmo", "textcat_elmo_here",
                 "textcat_elmo_random"]
TASK_TITLES = {"ner": "NER", "textcat": "textcat"}
#: The pretrain workflow's encoders: (pretrain record, variant suffix, row title), in table order.
PRETRAINED = [("mlm", "bert_mlm", "MiniLM + in-domain MLM"),
              ("elmo", "elmo_here", "ELMo trained here"),
              ("elmo_random", "elmo_random", "ELMo, random weights")]
PRETRAINED_TITLES = {suffix: title for _, suffix, title in PRETRAINED}


def _pct(value: Optional[float]) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _num(value: Optional[float], digits: int = 0) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"


def _order(name: str) -> tuple:
    return (VARIANT_ORDER.index(name), name) if name in VARIANT_ORDER else (len(VARIANT_ORDER), name)


def _suffix(name: str) -> str:
    return name.split("_", 1)[1] if "_" in name else name


def encoder_label(record: dict) -> str:
    encoder = record.get("encoder", "bert")
    kind = "ELMo" if encoder == "elmo" else "MiniLM"
    if _suffix(record.get("name", "")) in PRETRAINED_TITLES:
        kind = PRETRAINED_TITLES[_suffix(record["name"])] + ","
    if encoder == "elmo" or record.get("frozen"):
        return f"{kind} frozen, scalar mix"
    return f"{kind} fine-tuned, last layer"


def load_records(metrics_dir: Path, settings: Optional[dict] = None) -> Dict[str, dict]:
    """``{variant: {"eval": ..., "train": ...}}`` for the evaluated variants of ``settings``."""
    records: Dict[str, dict] = {}
    for path in sorted(metrics_dir.glob("eval_*.json")):
        ev = json.loads(path.read_text(encoding="utf8"))
        if settings is not None and ev.get("settings") != settings:
            continue
        name = ev["name"]
        entry = {"eval": ev, "train": None}
        train_path = metrics_dir / f"train_{name}.json"
        if train_path.exists():
            tr = json.loads(train_path.read_text(encoding="utf8"))
            if settings is None or tr.get("settings") == settings:
                entry["train"] = tr
        records[name] = entry
    return dict(sorted(records.items(), key=lambda item: _order(item[0])))


def load_pretrain_records(metrics_dir: Path, settings: Optional[dict] = None) -> Dict[str, dict]:
    """``{"mlm"|"elmo"|"elmo_random": record}`` of ``pretrain_*.json`` made with ``settings``."""
    out: Dict[str, dict] = {}
    for kind, _, _ in PRETRAINED:
        path = metrics_dir / f"pretrain_{kind}.json"
        if path.exists():
            record = json.loads(path.read_text(encoding="utf8"))
            if settings is None or record.get("settings") == settings:
                out[kind] = record
    return out


def load_plots(metrics_dir: Path, settings: Optional[dict] = None) -> List[dict]:
    """The plots listed in ``plots.json`` (made with ``settings``) whose PNG files exist."""
    path = metrics_dir / "plots.json"
    if not path.exists():
        return []
    index = json.loads(path.read_text(encoding="utf8"))
    if settings is not None and index.get("settings") != settings:
        return []
    return [p for p in index.get("plots", []) if (metrics_dir / p["file"]).exists()]


def heldout_text(record: Optional[dict]) -> str:
    """Held-out score of a pretraining record as a short phrase."""
    held = (record or {}).get("heldout") or {}
    if held.get("forward_ppl") is not None:
        return f"perplexity fwd {held['forward_ppl']:,.1f} / bwd {held['backward_ppl']:,.1f}"
    if held.get("loss") is not None:
        start = held.get("loss_at_step_0")
        ppl = held.get("perplexity")
        text = "MLM loss " + (f"{start:.2f} → " if start is not None else "") + f"{held['loss']:.2f}"
        return text + (f" (pseudo-perplexity {ppl:,.1f})" if ppl is not None else "")
    return "– (no LM)" if record else "–"


def pretrained_section(records: Dict[str, dict], pretrain: Dict[str, dict]) -> List[str]:
    """One row per pretrained encoder (and the embedded MiniLM baseline): both tasks' scores."""
    lines = ["## Pretrained here (pretrain workflow)", "",
             "Pretraining text: the train splits only (WNUT-16 train tweets + BBC train articles); "
             "held-out scores are on a held-out slice of that text, never dev or test. Train time is "
             "the `spacy train` run; pretraining time is extra (the random control costs nothing).", "",
             "| encoder | pretraining (s) | held-out | NER F | textcat macro F | train time NER / textcat (s) "
             "| words/s NER / textcat |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    rows = [("bert", "MiniLM (embedded, no in-domain pretraining)", None)]
    rows += [(suffix, title, pretrain.get(kind)) for kind, suffix, title in PRETRAINED]
    for suffix, title, record in rows:
        ner, cat = records.get(f"ner_{suffix}"), records.get(f"textcat_{suffix}")
        if record is None and ner is None and cat is None:
            continue

        def field(rec, which):
            if rec is None:
                return "–"
            if which == "score":
                key = "ents_f" if rec["eval"]["task"] == "ner" else "cats_macro_f"
                return _pct(rec["eval"]["scores"].get(key))
            if which == "time":
                return _num((rec.get("train") or {}).get("train_seconds"), 1)
            return _num(rec["eval"].get("words_per_second"))

        lines.append("| {} | {} | {} | {} | {} | {} / {} | {} / {} |".format(
            title, _num((record or {}).get("pretrain_seconds"), 1) if record else "–",
            heldout_text(record) if record else "–", field(ner, "score"), field(cat, "score"),
            field(ner, "time"), field(cat, "time"), field(ner, "wps"), field(cat, "wps")))
    lines.append("")
    return lines


def build_table(records: Dict[str, dict], settings: Optional[dict] = None,
                stats: Optional[dict] = None, pretrain: Optional[Dict[str, dict]] = None,
                plots: Optional[List[dict]] = None) -> str:
    """The results as markdown: summary, pretrained encoders, NER per type, textcat per class, plots."""
    settings = settings or {}
    lines: List[str] = []
    title = "# Results"
    if settings.get("setting"):
        title += f" — setting `{settings['setting']}`, seed {settings.get('seed', 0)}"
    lines += [title, ""]
    if settings:
        lines.append(
            "Training: fine-tuned encoders {ms} steps, frozen encoders {fs} steps, "
            "{bw} words per batch. Scores are on the test split (%; P/R/F of exact entity "
            "spans, spaCy's scorer); words/s is the trained pipeline on the test texts "
            "(tokenizer included, CPU unless a GPU was used).".format(
                ms=settings.get("max_steps") or "config", fs=settings.get("frozen_max_steps") or settings.get("max_steps") or "config",
                bw=settings.get("batch_words") or "config"))
    if stats:
        parts = []
        if "ner" in stats:
            s = stats["ner"]["splits"]
            parts.append("WNUT-16 tweets train/dev/test {}/{}/{} docs".format(
                s["train"]["docs"], s["dev"]["docs"], s["test"]["docs"]))
        if "textcat" in stats:
            s = stats["textcat"]["splits"]
            cut = stats["textcat"].get("max_tokens")
            parts.append("BBC News articles train/dev/test {}/{}/{} docs{}".format(
                s["train"]["docs"], s["dev"]["docs"], s["test"]["docs"],
                f" (cut to {cut} tokens)" if cut else ""))
        if parts:
            lines.append("Data: " + "; ".join(parts) + ".")
    lines.append("")

    lines += ["## Summary", "",
              "| variant | task | encoder | steps | train time (s) | dev score | test score | test words/s |",
              "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, rec in records.items():
        ev, tr = rec["eval"], rec.get("train") or {}
        task = ev["task"]
        main = "ents_f" if task == "ner" else "cats_macro_f"
        dev_name = tr.get("dev_score_name", "")
        dev_label = {"ents_f": "F", "cats_score": "macro F"}.get(dev_name, dev_name)
        steps = tr.get("steps") or ((settings.get("frozen_max_steps") if ev.get("frozen") or tr.get("frozen")
                                     else settings.get("max_steps")) if settings else None)
        lines.append("| {} | {} | {} | {} | {} | {} | {} | {} |".format(
            name, TASK_TITLES.get(task, task), encoder_label({**ev, **tr}),
            steps if steps else "–",
            _num(tr.get("train_seconds"), 1),
            f"{dev_label} {_pct(tr.get('dev_score'))}" if tr else "–",
            ("F " if task == "ner" else "macro F ") + _pct(ev["scores"].get(main)),
            _num(ev.get("words_per_second"))))
    lines.append("")
    if pretrain:
        lines += pretrained_section(records, pretrain)

    ner = {n: r["eval"] for n, r in records.items() if r["eval"]["task"] == "ner"}
    if ner:
        gold: Dict[str, int] = {}
        for ev in ner.values():
            for label, n in ev.get("gold_counts", {}).items():
                gold[label] = max(gold.get(label, 0), n)
        types = sorted(set(gold) | {t for ev in ner.values() for t in ev["scores"].get("ents_per_type") or {}})
        header = "| entity type | gold |" + "".join(f" {n} P | R | F |" for n in ner)
        align = "| --- | ---: |" + " ---: | ---: | ---: |" * len(ner)
        lines += ["## NER — WNUT-16 test, P / R / F per entity type", "", header, align]
        for label in types:
            row = f"| {label} | {gold.get(label, 0)} |"
            for ev in ner.values():
                t = (ev["scores"].get("ents_per_type") or {}).get(label, {})
                row += f" {_pct(t.get('p'))} | {_pct(t.get('r'))} | {_pct(t.get('f'))} |"
            lines.append(row)
        row = f"| **all types** | {sum(gold.values())} |"
        for ev in ner.values():
            s = ev["scores"]
            row += f" **{_pct(s.get('ents_p'))}** | **{_pct(s.get('ents_r'))}** | **{_pct(s.get('ents_f'))}** |"
        lines += [row, ""]

    cats = {n: r["eval"] for n, r in records.items() if r["eval"]["task"] == "textcat"}
    if cats:
        labels = sorted({l for ev in cats.values() for l in ev["scores"].get("cats_f_per_type") or {}})
        lines += ["## Text classification — BBC News test (5 exclusive topics)", "",
                  "| variant | accuracy | macro P | macro R | macro F |" + "".join(f" F {l} |" for l in labels),
                  "| --- | ---: | ---: | ---: | ---: |" + " ---: |" * len(labels)]
        for name, ev in cats.items():
            s = ev["scores"]
            per = s.get("cats_f_per_type") or {}
            lines.append(f"| {name} | {_pct(ev.get('accuracy'))} | {_pct(s.get('cats_macro_p'))} | "
                         f"{_pct(s.get('cats_macro_r'))} | {_pct(s.get('cats_macro_f'))} |"
                         + "".join(f" {_pct(per.get(l, {}).get('f'))} |" for l in labels))
        lines.append("")
    if not records:
        lines += ["(no evaluated variants for these settings yet)", ""]
    if plots:
        lines += ["## Plots", ""]
        for plot in plots:
            lines += [f"* [{plot['title']}]({plot['file']})", "", f"![{plot['title']}]({plot['file']})", ""]
    return "\n".join(lines)


def write_results(metrics_dir: Path, settings_path: Optional[Path] = None,
                  stats_path: Optional[Path] = None, output: Optional[Path] = None) -> str:
    settings = json.loads(settings_path.read_text(encoding="utf8")) if settings_path and settings_path.exists() else None
    stats = json.loads(stats_path.read_text(encoding="utf8")) if stats_path and stats_path.exists() else None
    records = load_records(metrics_dir, settings)
    pretrain = load_pretrain_records(metrics_dir, settings)
    table = build_table(records, settings, stats, pretrain, load_plots(metrics_dir, settings))
    output = output or metrics_dir / "results.md"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(table, encoding="utf8")
    summary = {name: {"task": r["eval"]["task"], "test": r["eval"]["scores"],
                      "accuracy": r["eval"].get("accuracy"),
                      "words_per_second": r["eval"].get("words_per_second"),
                      "train_seconds": (r.get("train") or {}).get("train_seconds"),
                      "dev_score": (r.get("train") or {}).get("dev_score")}
               for name, r in records.items()}
    result = {"settings": settings, "variants": summary}
    if pretrain:
        result["pretraining"] = {kind: {"pretrain_seconds": r.get("pretrain_seconds"), "heldout": r.get("heldout"),
                                        "steps": r.get("steps")} for kind, r in pretrain.items()}
    (output.parent / "results.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf8")
    return table


def main(argv: Optional[Iterable[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="write metrics/results.md from metrics/*.json")
    parser.add_argument("--metrics", type=Path, default=Path("metrics"))
    parser.add_argument("--settings", type=Path, default=Path("corpus/settings.json"))
    parser.add_argument("--stats", type=Path, default=Path("corpus/stats.json"))
    args = parser.parse_args(list(argv) if argv is not None else None)
    print(write_results(args.metrics, args.settings, args.stats))


if __name__ == "__main__":
    main()
