"""``router`` suite: the embedding of every prefix a per-token router needs.

Documents of the embedded corpus are tokenized by a byte-level BPE; the context before token t is
``text[:start_t]``. Ours: ``TfidfEmbedder.prefix_embeddings`` (running sums of per-word vectors,
O(words x D)). Anchor: the official C-BTM approach, which re-runs the scikit-learn pipeline
(tf-idf -> SVD -> Normalizer) on every prefix, one call per prefix; also shown, the same pipeline
called once per document on all its prefixes (a stronger variant). The anchors are timed on a
subset of the documents spread over the sample and compared per prefix; results must agree to 1e-5.

Second table: documents of a few KB held out of the fit, a prefix every ``STRIDE`` characters (most
offsets fall inside a word), ours one ``prefix_embeddings`` call per document (a fresh embedder per
repeat, so nothing is remembered from the previous one) against one batched pipeline ``transform``
of all the document's prefixes, alternating in one process; wall and process CPU time, best of the
repeats. Goal: >= 50x with max |diff| <= 1e-5.
"""
import tempfile
import time
from itertools import islice

import numpy as np

from benchmarks.common import best_of, markdown_table

N_DOCS = {False: 1000, True: 50}
N_ANCHOR_DOCS = {False: 25, True: 5}
FIT_DOCS = 4000
STRIDE = 8  # characters between the prefixes of the second table
FEW_KB = (2000, 8000)  # document lengths of the second table, in characters
N_FEW_KB_DOCS = {False: 40, True: 4}
TOL = 1e-5


def _sklearn_pipeline(texts, n_components, seed):
    """The official pipeline, fitted exactly as TfidfEmbedder fits it."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import Normalizer

    from cbtm.embed import _number_vectorizer

    pipe = make_pipeline(_number_vectorizer(), TruncatedSVD(n_components, random_state=seed), Normalizer(copy=False))
    return pipe.fit(texts)


def _token_starts(texts, vocab_size=8000):
    """Start character offset of every BPE token of every text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return [[s for s, _ in enc.offsets] for enc in tok.encode_batch(texts)]


def run(args):
    from cbtm.corpus import default_corpus_path, read_documents
    from cbtm.embed import TfidfEmbedder

    docs = [d.text for d in islice(read_documents(default_corpus_path()), 0, None, 2)]
    fit_texts, held_out = docs[:FIT_DOCS], docs[FIT_DOCS:]
    bench = docs[:: max(1, len(docs) // N_DOCS[args.quick])][: N_DOCS[args.quick]]
    emb = TfidfEmbedder(n_components=100, seed=0).fit(fit_texts)
    pipe = _sklearn_pipeline(fit_texts, 100, 0)
    starts = _token_starts(bench)
    n_prefix = sum(len(s) for s in starts)

    t_ours, ours = best_of(lambda: emb.prefix_embeddings_batch(bench, starts), args.repeats)
    pick = list(range(0, len(bench), len(bench) // N_ANCHOR_DOCS[args.quick]))  # spread over the sample
    sub = len(pick)
    n_sub = sum(len(starts[i]) for i in pick)
    t_batched, anchor = best_of(lambda: [pipe.transform([bench[i][:c] for c in starts[i]]) for i in pick], args.repeats)
    few = pick[::5]  # one call per prefix costs milliseconds: time it on fewer documents
    n_few = sum(len(starts[i]) for i in few)
    t_single, single = best_of(lambda: [np.concatenate([pipe.transform([bench[i][:c]]) for c in starts[i]])
                                        for i in few], 1)
    diff = max([float(np.abs(a - ours[i]).max()) for a, i in zip(anchor, pick) if len(a)]
               + [float(np.abs(b - ours[i]).max()) for b, i in zip(single, few) if len(b)])
    us_ours = 1e6 * t_ours / n_prefix
    rows = [{"method": "cbtm prefix_embeddings_batch", "documents": len(bench), "prefixes": n_prefix,
             "seconds": t_ours, "us_per_prefix": us_ours, "max_abs_diff": diff}]
    for name, t, docs, n in (("official: sklearn pipeline, one call per prefix", t_single, len(few), n_few),
                             ("sklearn pipeline, one call per document's prefixes", t_batched, sub, n_sub)):
        rows.append({"method": name, "documents": docs, "prefixes": n, "seconds": t,
                     "us_per_prefix": 1e6 * t / n, "max_abs_diff": 0.0})
    for r in rows:
        r["speedup_vs_ours"] = r["us_per_prefix"] / us_ours
    speedup = rows[1]["speedup_vs_ours"]
    stride_rows, stride_md = _every_stride(args, emb, pipe, held_out)
    md = (f"## router suite: prefix embeddings for every BPE token offset ({len(bench)} documents, "
          f"{n_prefix:,} prefixes)\n\n"
          + markdown_table(["method", "docs", "prefixes", "s", "µs / prefix", "µs / prefix ÷ ours", "max |diff|"],
                           [[r["method"], r["documents"], r["prefixes"], r["seconds"], r["us_per_prefix"],
                             r["speedup_vs_ours"], r["max_abs_diff"]] for r in rows])
          + f"\n\nGoal: >= 100x the official approach (one pipeline call per prefix) with max |diff| <= 1e-5: "
          + f"{speedup:.0f}x, max |diff| {diff:.1e}: " + ("met" if speedup >= 100 and diff <= TOL else "NOT met")
          + "\n\n" + stride_md)
    return {"rows": rows + stride_rows, "markdown": md, "speedup_vs_official": speedup,
            "speedup_every_stride": stride_rows[1]["speedup_vs_ours"]}


def _timed(fn):
    """(wall seconds, process CPU seconds, result) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def _every_stride(args, emb, pipe, held_out):
    """Prefixes every STRIDE characters of documents of a few KB: ours vs one batched transform per document."""
    from cbtm.embed import TfidfEmbedder

    sized = [t for t in held_out if FEW_KB[0] <= len(t) < FEW_KB[1]]
    n = N_FEW_KB_DOCS[args.quick]
    texts = sized[:: max(1, len(sized) // n)][:n]
    offsets = [list(range(0, len(t) + 1, STRIDE)) for t in texts]
    n_prefix = sum(map(len, offsets))
    best = {"ours": (float("inf"),) * 2, "anchor": (float("inf"),) * 2}
    with tempfile.TemporaryDirectory() as tmp:
        emb.save(tmp)
        for _ in range(args.repeats):  # alternate, so that both see the same load
            fresh = TfidfEmbedder.load(tmp)
            *t_ours, ours = _timed(lambda: [fresh.prefix_embeddings(t, o) for t, o in zip(texts, offsets)])
            *t_anchor, anchor = _timed(lambda: [pipe.transform([t[:c] for c in o]) for t, o in zip(texts, offsets)])
            best["ours"] = tuple(map(min, best["ours"], t_ours))
            best["anchor"] = tuple(map(min, best["anchor"], t_anchor))
    diff = max(float(np.abs(a - b).max()) for a, b in zip(anchor, ours))
    rows = []
    for key, name in (("ours", "cbtm prefix_embeddings, one call per document"),
                      ("anchor", "sklearn pipeline, one transform of all the document's prefixes")):
        wall, cpu = best[key]
        rows.append({"method": name, "stride": STRIDE, "documents": len(texts), "prefixes": n_prefix,
                     "seconds": wall, "cpu_seconds": cpu, "us_per_prefix": 1e6 * wall / n_prefix,
                     "max_abs_diff": diff if key == "ours" else 0.0,
                     "speedup_vs_ours": wall / best["ours"][0], "cpu_speedup_vs_ours": cpu / best["ours"][1]})
    ratio, cpu_ratio = rows[1]["speedup_vs_ours"], rows[1]["cpu_speedup_vs_ours"]
    mean_len = sum(map(len, texts)) / len(texts)
    md = (f"## router suite: a prefix every {STRIDE} characters of {len(texts)} held-out documents of "
          f"{FEW_KB[0]:,}-{FEW_KB[1]:,} characters (mean {mean_len:,.0f}; {n_prefix:,} prefixes)\n\n"
          + markdown_table(["method", "s", "CPU s", "µs / prefix", "× ours (wall)", "× ours (CPU)", "max |diff|"],
                           [[r["method"], r["seconds"], r["cpu_seconds"], r["us_per_prefix"], r["speedup_vs_ours"],
                             r["cpu_speedup_vs_ours"], r["max_abs_diff"]] for r in rows])
          + f"\n\nGoal: >= 50x one batched transform per document with max |diff| <= {TOL:g}: {ratio:.0f}x wall, "
          + f"{cpu_ratio:.0f}x CPU, max |diff| {diff:.1e}: "
          + ("met" if min(ratio, cpu_ratio) >= 50 and diff <= TOL else "NOT met"))
    return rows, md
