"""Peak memory of one long Doc through ctx_bert (issue 7, defect 2.4).

    python benchmarks/long_doc_memory.py --words 200000 [--model DIR] [--store last|all]

Builds ``ctx_bert`` (default model: the embedded all-MiniLM-L6-v2), loads it with a
short text, makes one Doc of ``--words`` random words, then runs the pipe on it and
prints: the Doc's pieces and windows (``TransformerBackend.window_stats``), the size of
``doc._.ctx.layers``, RSS before the call and the process's peak RSS. Peak RSS is
``VmHWM`` from /proc (Linux), which, unlike ``getrusage().ru_maxrss``, does not
inherit the RSS of the process that started this one.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

WORDS = ("the bank raised interest rates while we sat on the river bank watching "
         "unbelievable reorganisation of international companies in london").split()


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--words", type=int, default=200_000, help="words in the Doc")
    parser.add_argument("--model", default=None, help="checkpoint dir (default: the embedded MiniLM)")
    parser.add_argument("--max-batch-tokens", type=int, default=4096)
    parser.add_argument("--store", default="last", choices=["last", "all"])
    args = parser.parse_args()

    import spacy
    from spacy_ctx.assets import find_embedded_model_dir

    model = args.model or str(find_embedded_model_dir())
    nlp = spacy.blank("en")
    nlp.max_length = 10 ** 9
    nlp.add_pipe("ctx_bert", config={"model": {"name": model}, "store": args.store,
                                     "max_batch_tokens": args.max_batch_tokens})
    nlp("Load the model first.")
    doc = nlp.make_doc(" ".join(np.random.default_rng(0).choice(WORDS, args.words)))
    stats = nlp.get_pipe("ctx_bert").backend.window_stats([doc])
    before = _status_mb("VmRSS")
    start = time.perf_counter()
    doc = nlp(doc)
    seconds = time.perf_counter() - start
    peak = _status_mb("VmHWM")
    output = doc._.ctx.layers.nbytes / 2 ** 20
    print(f"words={len(doc)} pieces={stats['n_pieces']} windows={stats['n_windows']} "
          f"store={args.store} seconds={seconds:.1f}")
    print(f"output_mb={output:.0f} rss_before_mb={before:.0f} peak_rss_mb={peak:.0f} "
          f"growth_mb={peak - before:.0f} growth/output={(peak - before) / output:.2f}")


if __name__ == "__main__":
    main()
