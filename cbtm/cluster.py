"""Cluster a corpus: fit the router (tf-idf -> SVD -> balanced k-means) on a sample of the training
split, then assign every document of every shard, in parallel (processes or Ray), resumably.

Outputs in the run directory:
  router/embedder.{safetensors,json}, router/kmeans.{safetensors,json}
  assignments/<shard>.jsonl           one line per document: id, cluster, split (and label)
  assignments/<shard>.json            done-marker of the shard (written last, atomically)
  assignments/clusters/cluster_XXX/<shard>.jsonl   the documents themselves (--write-docs)
  reports/cluster_report.{md,json}
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from . import ops
from . import defaults
from .assignments import corpus_paths, read_assignments, read_options
from .corpus import CorpusReport, check_unique_ids, corpus_root, fingerprint, list_shards, read_documents, split_of
from .embed import TfidfEmbedder
from .kmeans import BalancedKMeans, capacity
from .rundir import RunDir, atomic_write_json, atomic_write_text, holds_lock, read_json

_BATCH = 4096  # documents embedded and assigned at once
_CLUSTERS_DEPEND_ON = ("shard", "size", "mtime_ns", "router", "balanced", "root")  # of a shard's state


def load_router(run: str | Path | RunDir) -> tuple[TfidfEmbedder, BalancedKMeans]:
    """The embedder and the balanced k-means model of a run directory."""
    router = RunDir.of(run).router
    if not (router / "kmeans.json").is_file():
        raise FileNotFoundError(f"{router} holds no fitted router: run `cbtm cluster fit` first")
    return TfidfEmbedder.load(router), BalancedKMeans.load(router)


def _router_fingerprint(run: RunDir) -> str:
    h = hashlib.blake2b(digest_size=8)
    for name in ("embedder.safetensors", "kmeans.safetensors"):
        h.update((run.router / name).read_bytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# fit


@holds_lock("cluster fit", "out")
def fit(corpus=None, out: str | Path = "run", k: int = 8, *, sample: int = defaults.SAMPLE,
        n_components: int = defaults.N_COMPONENTS, seed: int = defaults.SPLIT_SEED, balanced: bool = True,
        max_size_ratio: float = defaults.MAX_SIZE_RATIO, max_iter: int = defaults.MAX_ITER, text_field: str = "text",
        id_field: str = "id", text_mode: str = "file",
        valid_fraction: float = defaults.VALID_FRACTION, embedder: TfidfEmbedder | None = None,
        force: bool = False, progress: bool = True) -> dict:
    """Fit the embedder and BalancedKMeans on up to ``sample`` training documents (reservoir
    sample, seeded) and write them to ``out/router`` with the manifest. Returns a summary dict.
    ``max_size_ratio``: a cluster holds at most this multiple of N / K documents (1 = exactly
    balanced, as in C-BTM; see ``defaults.MAX_SIZE_RATIO``). ``text_field``, ``id_field``,
    ``text_mode``: how to read the corpus (``read_documents``), kept in the manifest for every
    later stage.
    ``embedder``: reuse a fitted embedder (e.g. another run's, to compare several k) instead of
    fitting one. A run that already has assignments or experts is refitted only with ``force``,
    which drops them from the manifest (their files stay): they belong to the old router and split."""
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if sample < k:
        raise ValueError(f"sample ({sample}) must be at least k ({k})")
    if not 0 < valid_fraction < 1:
        raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    existing = RunDir(out)
    dependent = [s for s in ("assignments", "tokenizer", "train", "seed", "experts")
                 if existing.exists() and existing.manifest().get(s)]
    if dependent and not force:
        raise ValueError(f"{existing.path} already has {', '.join(dependent)} made with its current router: "
                         "refitting would route them with other centres and change the validation split. "
                         "Cluster into a new run directory, or pass --force to refit and drop them from the manifest")
    t0 = time.perf_counter()
    paths = corpus_paths(corpus)
    report = CorpusReport()
    rng = random.Random(seed)
    texts: list[str] = []
    n_train = 0
    docs = read_documents(paths, text_field=text_field, id_field=id_field, text_mode=text_mode, report=report)
    for doc in tqdm(docs, desc="reading corpus", unit="doc", disable=not progress):
        if split_of(doc.id, valid_fraction, seed) != "train":
            continue
        n_train += 1
        if len(texts) < sample:
            texts.append(doc.text)
        else:
            j = rng.randrange(n_train)
            if j < sample:
                texts[j] = doc.text
    if len(texts) < k:
        why = ""
        if report.n_skipped:  # e.g. a --text-field no record has: say what was skipped and where
            first = report.bad_shards[0] if report.bad_shards else report.examples[0]
            why = f" ({report.summary().splitlines()[0]}; first: {first})"
        raise ValueError(f"only {len(texts)} training documents in {paths}, fewer than k={k}{why}")
    if embedder is None:
        if progress:
            print(f"fitting tf-idf + SVD({n_components}) on {len(texts)} documents ...", flush=True)
        embedder = TfidfEmbedder(n_components=n_components, seed=seed).fit(texts)
    n_components = embedder.n_components
    x = embedder.transform(texts)  # (n, n_components)
    if progress:
        print(f"fitting {'balanced ' if balanced else ''}k-means, k={k} ...", flush=True)
    km = BalancedKMeans(k, balanced=balanced, max_size_ratio=max_size_ratio, max_iter=max_iter, seed=seed).fit(x)
    run = RunDir(out)
    if dependent:
        run.drop(*dependent)
    run.router.mkdir(parents=True, exist_ok=True)
    embedder.save(run.router)
    km.save(run.router)
    sizes = np.bincount(np.asarray(km.labels_), minlength=k).tolist()
    summary = {
        "k": int(k), "balanced": bool(balanced), "max_size_ratio": km.max_size_ratio, "seed": int(seed),
        "n_components": int(n_components),
        "sample": len(texts), "train_documents": n_train, "valid_fraction": valid_fraction,
        "text_field": text_field, "id_field": id_field, "text_mode": text_mode, "inertia": float(km.inertia_),
        "n_iter": int(km.n_iter_),
        "sample_cluster_sizes": sizes, "skipped_lines": report.n_skipped, "seconds": round(time.perf_counter() - t0, 2),
    }
    run.update(cluster=summary, corpus={"paths": paths, "fingerprint": fingerprint(paths)},
               router={"embedder": "router/embedder.json", "kmeans": "router/kmeans.json"})
    if progress:
        if report.n_skipped:
            print(report.summary())
        print(f"router fitted: k={k}, {len(texts)} sampled documents, sample sizes {min(sizes)}..{max(sizes)}, "
              f"{summary['seconds']} s -> {run.router}")
    return summary


# ------------------------------------------------------------------------------------------------
# assign


def shard_key(path: str | Path) -> str:
    """A file-system-safe name for a shard, unique per absolute path."""
    path = Path(path).resolve()
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", path.name)
    return f"{stem}-{hashlib.blake2b(str(path).encode(), digest_size=4).hexdigest()}"


def _shard_state(path: Path, router_fp: str, balanced: bool, write_docs: bool, label_field: str | None,
                 root: str) -> dict:
    st = path.stat()
    from . import __version__

    return {"cbtm": __version__, "shard": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "router": router_fp, "balanced": balanced, "write_docs": write_docs, "label_field": label_field,
            "root": root}


def _assign_shard(run_path: str, shard: str, opts: dict) -> dict:
    """Embed and assign every document of one shard; write its outputs atomically. Runs in a
    worker process or a Ray task; identical output whatever runs it."""
    run = RunDir(run_path)
    embedder, km = load_router(run)
    key = shard_key(shard)
    out_dir = run.assignments
    lines: list[str] = []
    docs_out: dict[int, list[str]] = {}
    counts = Counter()
    report = CorpusReport()
    docs, parts = [], []
    batch: list = []
    for doc in read_documents(shard, **read_options(opts), report=report, root=opts["root"]):
        batch.append(doc)
        if len(batch) >= _BATCH:
            parts.append(embedder.transform([d.text for d in batch]))  # (b, n_components)
            docs += batch
            batch = []
    if batch:
        parts.append(embedder.transform([d.text for d in batch]))
        docs += batch
    if not docs:
        labels = []
    elif opts["balanced"] and len(docs) >= km.n_clusters:
        # exact balanced assignment of the shard (the router's capacity for n points), warm-started
        # from its prices: close to a one-pass argmin(d + prices), and never over capacity
        labels, _ = ops.balanced_assign(np.concatenate(parts), km.cluster_centers_, km.capacity(len(docs)),
                                        prices=km.prices_)
    else:
        labels = km.predict(np.concatenate(parts), balanced=opts["balanced"])
    for d, c in zip(docs, np.asarray(labels).tolist()):
        split = split_of(d.id, opts["valid_fraction"], opts["seed"])
        rec = {"id": d.id, "cluster": c, "split": split}
        if opts["label_field"]:
            rec["label"] = d.meta.get(opts["label_field"])
        lines.append(json.dumps(rec, ensure_ascii=False))
        counts[(c, split)] += 1
        if opts["write_docs"]:
            doc = {"id": d.id, "text": d.text, "split": split, **d.meta}
            docs_out.setdefault(c, []).append(json.dumps(doc, ensure_ascii=False))
    for c, rows in docs_out.items():
        atomic_write_text(out_dir / "clusters" / f"cluster_{c:03d}" / f"{key}.jsonl", "\n".join(rows) + "\n")
    atomic_write_text(out_dir / f"{key}.jsonl", "\n".join(lines) + ("\n" if lines else ""))
    marker = {**opts["state"], "key": key, "documents": len(lines), "skipped_lines": report.n_skipped,
              "skip_examples": report.examples[:20], "bad_shards": report.bad_shards,
              "sizes": {f"{c}:{s}": n for (c, s), n in sorted(counts.items())}}
    atomic_write_json(out_dir / f"{key}.json", marker)
    return marker


@holds_lock("cluster assign", "out")
def assign(corpus=None, out: str | Path = "run", *, balanced: bool = True, backend: str = "local",
           workers: int | None = None, ray_address: str | None = None, write_docs: bool = False,
           label_field: str | None = None, force: bool = False, progress: bool = True) -> dict:
    """Assign every document of every shard to a cluster: balanced (each shard's exact balanced
    assignment under the router's capacity, warm-started from the router's prices) or nearest
    centre. Finished shards (done-marker matching the shard and router) are skipped, so a
    killed run restarted with the same command resumes and ends with identical output. Changing
    the assignments of a run with experts (or a seed) trained on them is refused unless ``force``,
    which drops those from the manifest (their files stay), as ``fit`` does."""
    if backend not in ("local", "ray"):
        raise ValueError(f"backend must be 'local' or 'ray', got {backend!r}")
    if workers is not None and (isinstance(workers, bool) or int(workers) != workers or workers < 1):
        raise ValueError(f"--workers must be a positive integer, got {workers!r}")
    t0 = time.perf_counter()
    run = RunDir(out)
    manifest = run.manifest()
    cfg = manifest.get("cluster")
    if cfg is None:
        raise FileNotFoundError(f"{run.manifest_path} has no fitted router: run `cbtm cluster fit` first")
    reading = read_options(cfg)
    paths = corpus_paths(corpus if corpus is not None else manifest.get("corpus", {}).get("paths"))
    shards = list_shards(paths)
    root = str(corpus_root(paths))
    if fingerprint(paths) != (manifest.get("corpus") or {}).get("fingerprint"):
        check_unique_ids(paths, **reading)  # fit checked its corpus
    router_fp = _router_fingerprint(run)
    run.assignments.mkdir(parents=True, exist_ok=True)
    todo, done, moved = [], [], 0  # moved: shards whose clusters may change
    for shard in shards:
        state = _shard_state(shard, router_fp, balanced, write_docs, label_field, root)
        marker = run.assignments / f"{shard_key(shard)}.json"
        old = read_json(marker) if marker.is_file() else {}
        if all(old.get(key) == v for key, v in state.items()):
            done.append(old)
        else:
            todo.append((str(shard), state))
            moved += any(old.get(key) != state[key] for key in _CLUSTERS_DEPEND_ON)
    trained = [s for s in ("train", "seed", "experts") if manifest.get(s)]
    if moved and trained:
        if not force:
            raise ValueError(f"{run.path} already has {', '.join(trained)} trained on its current assignments: "
                             "assigning again (e.g. --nearest) would change the clusters they were trained on. "
                             "Cluster into a new run directory, or pass --force to reassign and drop them from "
                             "the manifest")
        run.drop(*trained)
    base = {"balanced": balanced, "write_docs": write_docs, "label_field": label_field, "root": root,
            **reading, "valid_fraction": cfg["valid_fraction"], "seed": cfg["seed"]}
    bar = tqdm(total=len(shards), initial=len(done), desc="assigning shards", unit="shard", disable=not progress)
    results = list(done)
    if todo:
        n_workers = max(1, min(workers or os.cpu_count() or 1, len(todo)))
        if backend == "ray":
            results += _run_ray(str(run.path), todo, base, n_workers, ray_address, bar)
        elif n_workers == 1:
            for shard, state in todo:
                results.append(_assign_shard(str(run.path), shard, {**base, "state": state}))
                bar.update()
        else:
            with ProcessPoolExecutor(n_workers) as pool:
                futs = [pool.submit(_assign_shard, str(run.path), shard, {**base, "state": state})
                        for shard, state in todo]
                for f in futs:
                    results.append(f.result())
                    bar.update()
    bar.close()
    k = cfg["k"]
    sizes = np.zeros((k, 2), np.int64)  # (cluster, train/valid)
    for r in results:
        for key, n in r["sizes"].items():
            c, split = key.split(":")
            sizes[int(c), 0 if split == "train" else 1] += n
    summary = {"shards": len(shards), "resumed": len(done), "documents": int(sizes.sum()),
               "capacity": int(sum(capacity(r["documents"], k, cfg.get("max_size_ratio", 1.0)) for r in results)),
               "skipped_lines": int(sum(r["skipped_lines"] for r in results)), "balanced": balanced,
               "backend": backend, "train_sizes": sizes[:, 0].tolist(), "valid_sizes": sizes[:, 1].tolist(),
               "label_field": label_field, "write_docs": write_docs, "k": int(k),
               **reading, "valid_fraction": cfg["valid_fraction"], "seed": cfg["seed"],
               "shard_keys": [shard_key(s) for s in shards], "seconds": round(time.perf_counter() - t0, 2)}
    run.update(assignments=summary)
    if progress:
        print(f"assigned {summary['documents']} documents from {len(shards)} shard(s) "
              f"({len(done)} resumed, {summary['skipped_lines']} bad lines skipped) in {summary['seconds']} s")
    return summary


def _run_ray(run_path: str, todo: list, base: dict, n_workers: int, address: str | None, bar) -> list:
    from .ray_backend import ray_session

    with ray_session(address, n_workers) as ray:
        task = ray.remote(max_retries=2)(_assign_shard)
        refs = [task.remote(run_path, shard, {**base, "state": state}) for shard, state in todo]
        out = []
        for ref in refs:
            out.append(ray.get(ref))
            bar.update()
        return out


# ------------------------------------------------------------------------------------------------
# report


def top_terms(embedder: TfidfEmbedder, centers: np.ndarray, n: int = 10) -> list[list[str]]:
    """Terms with the largest weight in each centre, mapped back through the SVD components."""
    weights = centers.astype(np.float64) @ np.asarray(embedder.components, np.float64)  # (K, V)
    vocab = embedder.vocabulary
    return [[vocab[i] for i in np.argsort(-w)[:n]] for w in weights]


@holds_lock("cluster report", "out")
def report(out: str | Path, label_field: str | None = None, n_terms: int = 10, progress: bool = True) -> dict:
    """Cluster sizes, top terms, and (when assignments carry labels) purity, NMI and the
    cluster x label table; written to reports/cluster_report.{md,json} and returned."""
    from sklearn.metrics import normalized_mutual_info_score

    run = RunDir(out)
    manifest = run.manifest()
    embedder, km = load_router(run)
    k = km.n_clusters
    recs = read_assignments(out)
    clusters = np.array([r["cluster"] for r in recs], np.int64)
    sizes = np.bincount(clusters, minlength=k)
    cap = int(manifest["assignments"]["capacity"])  # sum over shards of each one's capacity
    rep: dict[str, Any] = {
        "k": k, "documents": len(recs), "sizes": sizes.tolist(), "capacity": cap,
        "within_capacity": bool(sizes.max() <= cap), "max_over_mean": float(sizes.max() / sizes.mean()),
        "balanced": manifest.get("assignments", {}).get("balanced"),
        "top_terms": top_terms(embedder, km.cluster_centers_, n_terms),
    }
    labels = [r.get("label") for r in recs]
    if any(l is not None for l in labels):
        labels = ["<none>" if l is None else str(l) for l in labels]
        names = sorted(set(labels))
        lab_idx = np.array([names.index(l) for l in labels])
        table = np.zeros((k, len(names)), np.int64)
        np.add.at(table, (clusters, lab_idx), 1)
        rep.update(label_field=label_field or manifest.get("assignments", {}).get("label_field"), labels=names,
                   table=table.tolist(), purity=float(table.max(1).sum() / len(recs)),
                   nmi=float(normalized_mutual_info_score(lab_idx, clusters)))
    md = _report_markdown(rep)
    run.reports.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run.reports / "cluster_report.json", rep)
    atomic_write_text(run.reports / "cluster_report.md", md)
    run.update(cluster_report={"path": "reports/cluster_report.json", "nmi": rep.get("nmi"),
                               "purity": rep.get("purity"), "within_capacity": rep["within_capacity"]})
    if progress:
        print(md)
    return rep


def _report_markdown(rep: dict) -> str:
    lines = [f"# Cluster report: k={rep['k']}, {rep['documents']} documents", ""]
    summary = f"Sizes {min(rep['sizes'])}..{max(rep['sizes'])} (capacity {rep['capacity']}, " \
              f"{'all within' if rep['within_capacity'] else 'NOT all within'} capacity)"
    if "nmi" in rep:
        summary += f"; against `{rep['label_field']}`: NMI {rep['nmi']:.3f}, purity {rep['purity']:.3f}"
    lines += [summary + ".", "", "| cluster | size | top terms |", "| ---: | ---: | --- |"]
    for c, (n, terms) in enumerate(zip(rep["sizes"], rep["top_terms"])):
        lines.append(f"| {c} | {n} | {', '.join(terms)} |")
    if "table" in rep:
        lines += ["", "| cluster | " + " | ".join(rep["labels"]) + " |",
                  "| ---: |" + " ---: |" * len(rep["labels"])]
        for c, row in enumerate(rep["table"]):
            lines.append(f"| {c} | " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"
