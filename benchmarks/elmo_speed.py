"""Words/s of the ELMo backend (what ``ctx_elmo`` runs) on BBC sentences.

Random weights of the published "small" ELMo shape (``benchmarks/elmo_weights.py``
preset ``small``: 2 layers, LSTM dim 1024, projection 128, 2048 char filters, 1
highway), or ``--preset tiny``. The corpus is the first sentences of the BBC
articles of ``benchmarks/make_corpus.py`` (synthetic text when the corpus
package is absent), split by spaCy's ``sentencizer``; each sentence is a Doc.

Every repeat encodes the same sentences with :meth:`ElmoBackend.encode_docs`
(``max_batch_tokens`` as in ``ctx_elmo``'s default), no gradients. By default the
word-embedding cache is cleared before each repeat, so the char CNN runs on every
distinct word of the corpus once per repeat (``--warm-cache`` keeps it: then the
time is the LSTM's). The time excludes tokenization (the Docs are built once).

To compare two source trees in one job (for example the code before a change, from
``git worktree add /tmp/elmo_before HEAD``), give ``--src`` once per tree: the
repeats alternate between the trees, each in its own subprocess, and the table
shows the median of each, with the ratio to the first.

Usage::

    python benchmarks/elmo_speed.py --n-sents 400 --threads 1 --repeats 5
    python benchmarks/elmo_speed.py --src /tmp/elmo_before --src . --threads 1 --repeats 5

Other processes share the CPU on a busy machine: numbers are indicative, and
alternating repeats with medians is what makes two trees comparable.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
DEFAULT_CACHE = HERE / "results"  # git-ignored; the random model goes to <cache>/elmo_<preset>/
DEFAULT_MAX_BATCH_TOKENS = 4096  # ctx_elmo's default


def _sentences(n_sents: int) -> List[str]:
    """The first ``n_sents`` sentences (sentencizer) of the benchmark corpus, in order."""
    sys.path.insert(0, str(HERE))
    import make_corpus  # benchmarks/make_corpus.py
    import spacy

    nlp = spacy.blank("en")
    nlp.add_pipe("sentencizer")
    out: List[str] = []
    n_docs = 16
    while True:
        records, _ = make_corpus.build_corpus(n_docs)
        out = []
        for doc in nlp.pipe(r["text"] for r in records):
            out.extend(s.text for s in doc.sents if s.text.strip())
            if len(out) >= n_sents:
                return out[:n_sents]
        if len(records) < n_docs:  # the corpus has no more
            return out
        n_docs *= 2


def measure(args: argparse.Namespace) -> Dict[str, Any]:
    """One process, one source tree: time ``args.repeats`` encodes; returns the record."""
    import torch

    torch.set_num_threads(args.threads)
    import spacy
    import spacy_ctx
    from spacy_ctx.backends.elmo import ElmoBackend

    sys.path.insert(0, str(HERE))
    import elmo_weights  # benchmarks/elmo_weights.py

    options_path, weights_path, _ = elmo_weights.ensure_random_elmo(
        Path(args.cache) / f"elmo_{args.preset}", elmo_weights.PRESETS[args.preset], seed=args.seed
    )
    backend = ElmoBackend.from_pretrained(options_path, weights_path, name="elmo")
    backend.bilm.eval()
    nlp = spacy.blank("en")
    nlp.add_pipe("sentencizer")
    docs = list(nlp.pipe(_sentences(args.n_sents)))
    n_words = sum(1 for doc in docs for t in doc if not t.is_space)
    times: List[float] = []
    cpu_times: List[float] = []
    with torch.no_grad():
        # Warm-up: a few Docs, or all of them when the word cache is to be warm.
        warm_docs = docs if args.warm_cache else docs[: min(len(docs), 8)]
        backend.encode_docs(warm_docs, max_batch_tokens=args.max_batch_tokens)
        for _ in range(args.repeats):
            if not args.warm_cache:
                backend.word_cache.clear()
            start, cpu_start = time.perf_counter(), time.process_time()
            backend.encode_docs(docs, max_batch_tokens=args.max_batch_tokens)
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    return {
        "source": str(Path(spacy_ctx.__file__).resolve().parents[1]),
        "n_sents": len(docs),
        "n_words": n_words,
        "threads": args.threads,
        "torch_threads_after": torch.get_num_threads(),
        "times_s": times,
        "words_per_s": [n_words / t for t in times],
        # CPU seconds of the process (all threads): with 1 thread, words per CPU second
        # hardly depends on other processes, unlike words per wall second.
        "cpu_s": cpu_times,
        "words_per_cpu_s": [n_words / t for t in cpu_times],
    }


def _child_command(args: argparse.Namespace, src: str) -> List[str]:
    return [
        sys.executable, str(Path(__file__).resolve()), "--child", "--src", src,
        "--preset", args.preset, "--n-sents", str(args.n_sents), "--threads", str(args.threads),
        "--repeats", "1", "--max-batch-tokens", str(args.max_batch_tokens), "--cache", str(args.cache),
        "--seed", str(args.seed),
    ] + (["--warm-cache"] if args.warm_cache else [])


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=["small", "tiny"], default="small")
    parser.add_argument("--n-sents", type=int, default=400, help="BBC sentences encoded per repeat")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads before encoding")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-batch-tokens", type=int, default=DEFAULT_MAX_BATCH_TOKENS)
    parser.add_argument("--warm-cache", action="store_true",
                        help="keep the word-embedding cache between repeats (times the LSTM only)")
    parser.add_argument("--src", action="append", default=None,
                        help="source tree(s) holding spacy_ctx; repeats alternate between them")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="folder for the random model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default: none)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        sys.path.insert(0, str(Path(args.src[0]).resolve()))
        print(json.dumps(measure(args)))
        return 0

    sources = [str(Path(s).resolve()) for s in (args.src or [str(REPO_ROOT)])]
    runs: Dict[str, List[Dict[str, Any]]] = {s: [] for s in sources}
    for repeat in range(args.repeats):
        for src in sources:  # alternate, so load changes hit every tree alike
            result = subprocess.run(_child_command(args, src), capture_output=True, text=True,
                                    env={**os.environ, "PYTHONPATH": src})
            if result.returncode != 0:
                sys.stderr.write(result.stderr)
                raise SystemExit(f"run for {src} failed")
            record = json.loads(result.stdout.strip().splitlines()[-1])
            runs[src].append(record)
            print(f"  repeat {repeat + 1}/{args.repeats} {src}: {record['words_per_s'][0]:,.0f} words/s, "
                  f"{record['words_per_cpu_s'][0]:,.0f} words/cpu-s", flush=True)

    rows = []
    first = first_cpu = None
    for src in sources:
        speeds = [r["words_per_s"][0] for r in runs[src]]
        cpu_speeds = [r["words_per_cpu_s"][0] for r in runs[src]]
        median = statistics.median(speeds)
        cpu_median = statistics.median(cpu_speeds)
        first = first or median
        first_cpu = first_cpu or cpu_median
        rows.append({"source": src, "median_words_per_s": median, "words_per_s": speeds,
                     "ratio_to_first": median / first,
                     "median_words_per_cpu_s": cpu_median, "words_per_cpu_s": cpu_speeds,
                     "cpu_ratio_to_first": cpu_median / first_cpu,
                     "n_words": runs[src][0]["n_words"], "n_sents": runs[src][0]["n_sents"]})
    print(f"\nELMo '{args.preset}', {rows[0]['n_sents']} sentences, {rows[0]['n_words']} words, "
          f"{args.threads} thread(s), {'warm' if args.warm_cache else 'cold'} word cache, "
          f"{args.repeats} alternating repeats")
    print(f"{'source':<40} {'median words/s':>15} {'ratio':>7} {'words/cpu-s':>12} {'ratio':>7}   all words/s")
    for row in rows:
        print(f"{row['source']:<40} {row['median_words_per_s']:>15,.0f} {row['ratio_to_first']:>6.2f}x "
              f"{row['median_words_per_cpu_s']:>12,.0f} {row['cpu_ratio_to_first']:>6.2f}x   "
              + " ".join(f"{s:,.0f}" for s in row["words_per_s"]))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "command": " ".join([Path(sys.executable).name] + sys.argv),
            "preset": args.preset, "threads": args.threads, "warm_cache": args.warm_cache,
            "max_batch_tokens": args.max_batch_tokens, "rows": rows,
            "load_average": os.getloadavg(),
        }, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
