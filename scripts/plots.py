#!/usr/bin/env python
"""PNG plots of the workflow's results (matplotlib, Agg backend; no display needed).

* ``metrics/scores_vs_time.png``: each evaluated variant's test score (NER F, textcat
  macro F) against its training time (``spacy train``); for variants whose encoder was
  pretrained here a second, hollow marker at training + pretraining time, joined by a line.
* ``metrics/scalar_mix.png``: the learned scalar-mix weights per layer (softmax of the
  ScalarMix ``weights``) of every trained pipeline that has a scalar-mix listener, with its
  ``gamma`` in the title. The values are also written to ``metrics/scalar_mix.json``.

``metrics/plots.json`` lists the plots made (with ``corpus/settings.json``), which
``scripts/results_table.py`` links from ``metrics/results.md``. Only records of the current
settings are plotted, as in the table.

    python scripts/plots.py [--metrics metrics] [--settings corpus/settings.json] [--training training]

Needs matplotlib: ``pip install -e ".[workflow]"`` (``scripts/setup_env.sh`` installs it).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_table import PRETRAINED, load_pretrain_records, load_records  # noqa: E402

SCORES_PNG = "scores_vs_time.png"
SCALAR_MIX_PNG = "scalar_mix.png"
TASK_KEYS = {"ner": ("ents_f", "NER — WNUT-16 test F"), "textcat": ("cats_macro_f", "BBC News test macro F")}


def _pyplot():
    try:
        import matplotlib
    except ImportError:  # the message says how to get it
        raise SystemExit('plots need matplotlib: pip install -e ".[workflow]" (or pip install matplotlib)') from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def softmax(values: Sequence[float]) -> List[float]:
    """Softmax of the scalar-mix logits (the layer weights the listener uses)."""
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def scalar_mix_params(model: Any) -> List[Dict[str, Any]]:
    """``[{"layers": n, "weights": softmax(weights), "logits": weights, "gamma": g}]`` for every
    ScalarMix node (Thinc name ``scalar_mix``) of a Thinc model, in walk order."""
    out = []
    for node in model.walk():
        if node.name != "scalar_mix" or not node.has_param("weights") or not node.has_param("gamma"):
            continue
        logits = [float(x) for x in node.ops.to_numpy(node.get_param("weights")).ravel()]
        gamma = float(node.ops.to_numpy(node.get_param("gamma")).ravel()[0])
        out.append({"layers": len(logits), "weights": softmax(logits), "logits": logits, "gamma": gamma})
    return out


def pipeline_scalar_mixes(nlp: Any) -> List[Dict[str, Any]]:
    """The scalar mixes of a loaded spaCy pipeline, with the component that owns each."""
    found = []
    for name, pipe in nlp.pipeline:
        model = getattr(pipe, "model", None)
        if model is None or not hasattr(model, "walk"):
            continue
        for mix in scalar_mix_params(model):
            found.append({"component": name, **mix})
    return found


def collect_scalar_mixes(names: Iterable[str], training_dir: Path) -> Dict[str, List[Dict[str, Any]]]:
    """Load ``training/NAME/model-best`` of each variant; keep those with a scalar mix."""
    import spacy

    out: Dict[str, List[Dict[str, Any]]] = {}
    for name in names:
        model_dir = training_dir / name / "model-best"
        if not (model_dir / "config.cfg").exists():
            continue
        config = (model_dir / "config.cfg").read_text(encoding="utf8")
        if "ScalarMixListener" not in config:  # no need to load the others
            continue
        mixes = pipeline_scalar_mixes(spacy.load(model_dir))
        if mixes:
            out[name] = mixes
    return out


def score_points(records: Dict[str, dict], pretrain: Dict[str, dict]) -> List[Dict[str, Any]]:
    """One point per evaluated variant: task, score, training time, time incl. pretraining."""
    pre_seconds = {suffix: (pretrain.get(kind) or {}).get("pretrain_seconds") for kind, suffix, _ in PRETRAINED}
    points = []
    for name, rec in records.items():
        task = rec["eval"]["task"]
        if task not in TASK_KEYS:
            continue
        score = rec["eval"]["scores"].get(TASK_KEYS[task][0])
        seconds = (rec.get("train") or {}).get("train_seconds")
        if score is None or seconds is None:
            continue
        extra = pre_seconds.get(name.split("_", 1)[1] if "_" in name else "")
        points.append({"name": name, "task": task, "score": 100 * score, "train_seconds": seconds,
                       "with_pretraining": seconds + extra if extra else None})
    return points


def plot_scores(points: List[Dict[str, Any]], path: Path, title: str = "") -> None:
    """Test score against training time, one panel per task."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (task, (_, label)) in zip(axes, TASK_KEYS.items()):
        mine = [p for p in points if p["task"] == task]
        for i, p in enumerate(mine):
            color = colors[i % len(colors)]
            ax.scatter([p["train_seconds"]], [p["score"]], color=color, s=45, zorder=3, label=p["name"])
            if p["with_pretraining"]:
                ax.plot([p["train_seconds"], p["with_pretraining"]], [p["score"]] * 2, color=color, lw=1, ls="--")
                ax.scatter([p["with_pretraining"]], [p["score"]], facecolors="none", edgecolors=color, s=45, zorder=3)
            ax.annotate(p["name"], (p["train_seconds"], p["score"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
        ax.set_xlabel("training time (s); hollow: + pretraining")
        ax.set_ylabel(label + " (%)")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        if not mine:
            ax.text(0.5, 0.5, "no evaluated variants", ha="center", va="center", transform=ax.transAxes)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_scalar_mixes(mixes: Dict[str, List[Dict[str, Any]]], path: Path, title: str = "") -> None:
    """Bar charts of the softmaxed layer weights, one panel per scalar mix."""
    plt = _pyplot()
    panels = [(name, mix) for name, found in mixes.items() for mix in found]
    n = max(len(panels), 1)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    if not panels:
        axes[0][0].text(0.5, 0.5, "no scalar-mix models", ha="center", va="center")
    for ax, (name, mix) in zip(axes.ravel(), panels):
        layers = list(range(mix["layers"]))
        ax.bar(layers, mix["weights"], color="tab:blue")
        ax.axhline(1 / mix["layers"], color="gray", ls=":", lw=1)  # the initial (uniform) weights
        ax.set_xticks(layers)
        ax.set_xlabel("layer (0 = embeddings / char CNN)")
        ax.set_ylabel("softmax weight")
        ax.set_ylim(0, max(max(mix["weights"]) * 1.15, 1.2 / mix["layers"]))
        ax.set_title(f"{name} ({mix['component']}), gamma {mix['gamma']:.2f}", fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def make_plots(metrics_dir: Path, settings_path: Optional[Path], training_dir: Path) -> Dict[str, Any]:
    """Both plots, ``scalar_mix.json`` and ``plots.json``; returns the plots.json contents."""
    settings = json.loads(settings_path.read_text(encoding="utf8")) if settings_path and settings_path.exists() else None
    records = load_records(metrics_dir, settings)
    pretrain = load_pretrain_records(metrics_dir, settings)
    title = f"setting {settings.get('setting')}" if settings else ""
    plot_scores(score_points(records, pretrain), metrics_dir / SCORES_PNG, title)
    mixes = collect_scalar_mixes(records, training_dir)
    (metrics_dir / "scalar_mix.json").write_text(json.dumps(mixes, indent=2) + "\n", encoding="utf8")
    plot_scalar_mixes(mixes, metrics_dir / SCALAR_MIX_PNG, title)
    index = {"settings": settings, "plots": [
        {"file": SCORES_PNG, "title": "Test score against training time"},
        {"file": SCALAR_MIX_PNG, "title": "Learned scalar-mix weights per layer"},
    ]}
    (metrics_dir / "plots.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf8")
    return index


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--metrics", type=Path, default=Path("metrics"))
    parser.add_argument("--settings", type=Path, default=Path("corpus/settings.json"))
    parser.add_argument("--training", type=Path, default=Path("training"))
    args = parser.parse_args(argv)
    index = make_plots(args.metrics, args.settings, args.training)
    for plot in index["plots"]:
        print(f"{args.metrics / plot['file']}: {plot['title']}")


if __name__ == "__main__":
    main()
