"""`cbtm demo`: the whole pipeline on the embedded corpus (or any corpus), reproducing the C-BTM
papers' comparisons at laptop scale, and one table saying which claims this run reproduced.

Stages (each resumes when rerun): a shared BPE tokenizer and a dense seed model (the BTM seed
phase) -> balanced tf-idf clusterings for the budget's k (one shared embedder) -> the budget's
baselines: random equal split (k=4), unbalanced k-means (k=4), gold metadata split (one expert per
label) -> every expert branched from the seed and trained on its cluster with a compute-matched
budget (k experts of T/k tokens each) -> a dense model trained T tokens from the same seed ->
validation perplexity of every run at top-k in {1, 2, 4, all} -> reports/demo.{json,md},
reports/eval.png, reports/curves.png (and reports/scaling.png for several budgets)."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np

from . import cluster, defaults, evaluate, models, tokens
from .assignments import corpus_paths, read_assignments, write_assignments
from .corpus import read_documents
from .kmeans import BalancedKMeans
from .router import Router, fit_prefix_routers
from .rundir import RunDir, atomic_write_json, atomic_write_text
from .training import prepare_dense, train_dense, train_runs

# One recipe for every corpus (issue 9), the papers' regime in miniature: a long seed phase that is
# the "stable" part of a warmup-stable-decay schedule (peak LR after a short warmup, no decay), then
# every compared run -- the dense model for T tokens and each of k experts for T/k -- continues from
# the seed at the same peak LR (no re-warmup, which would undo part of the seed) and decays it with
# its own cosine to 0.1x. A 4096-token BPE keeps the output layer (most of a tiny model's work) small.
SEED_SCHEDULE = dict(warmup=0.05, min_lr_ratio=1.0)
BRANCH_SCHEDULE = dict(warmup=0.0, min_lr_ratio=0.1)
VOCAB_SIZE = 4096

# total_tokens: T, the budget of every compared run; seed_tokens: the shared seed phase;
# scales: multiples of T also run for the "best k grows with the budget" claim; baselines: which of
# the random / unbalanced / gold splits to train; ks: the numbers of clusters (the scaling study trains
# only those and dense, k=1). The small budget fits 15 minutes on 2 CPU cores: k=2, the unbalanced and
# gold splits are left to the scaling study, the medium budget and `--baselines`.
KS = (2, 4, 8)
BASELINES = defaults.BASELINES
BUDGETS = {
    "tiny": dict(total_tokens=24_000, seed_tokens=8_000, model_size="tiny", seq_len=64, batch_size=8,
                 eval_docs=12, scales=(1,), parallel=False, baselines=BASELINES, ks=KS),
    "small": dict(total_tokens=1_800_000, seed_tokens=2_400_000, model_size="tiny", seq_len=128, batch_size=16,
                  eval_docs=150, scales=(1,), parallel=True, baselines=("random",), ks=(4, 8)),
    "scaling": dict(total_tokens=600_000, seed_tokens=2_400_000, model_size="tiny", seq_len=128, batch_size=16,
                    eval_docs=150, scales=(1, 2, 4), parallel=True, baselines=(), ks=KS),
    "medium": dict(total_tokens=20_000_000, seed_tokens=20_000_000, model_size="small", seq_len=512, batch_size=32,
                   eval_docs=None, scales=(1, 4), parallel=False, baselines=BASELINES, ks=KS),
}
CURVE_POINTS = 4  # validation losses per training job (the learning curves) ...
CURVE_TOKENS = 8_192  # ... each on this many tokens of the job's validation documents


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[demo] {msg}", flush=True)


def _records(out: Path, assign) -> list[dict]:
    """(id, cluster, split) of every document of a clustered run, with assign(rec) -> new cluster."""
    return [{"id": r["id"], "cluster": assign(r), "split": r["split"]} for r in read_assignments(out)]


def _router_from_groups(run: Path, embedder, corpus, records: list[dict], k: int) -> None:
    """A router whose centres are the mean embeddings of each group's training documents, so the
    baselines route the way C-BTM does (by distance to their group centres)."""
    group = {r["id"]: r["cluster"] for r in records if r["split"] == "train"}
    texts, labels = [], []
    for doc in read_documents(corpus):
        if doc.id in group:
            texts.append(doc.text)
            labels.append(group[doc.id])
    x = embedder.transform(texts)  # (n, D)
    labels = np.asarray(labels)
    km = BalancedKMeans.from_centers(np.stack([x[labels == c].mean(0) for c in range(k)]).astype(np.float32),
                                     counts=np.bincount(labels, minlength=k), balanced=False)
    embedder.save(RunDir(run).router)
    km.save(RunDir(run).router)


def _prefix_routers(runs: dict[str, Path], progress: bool) -> None:
    """Fit the prefix router of every run that has none fitted on its current assignments."""
    def fitted(run):
        try:
            return Router.load(run, "prefix") is not None
        except (FileNotFoundError, ValueError):
            return False

    todo = [run for run in runs.values() if not fitted(run)]
    if todo:
        _log(progress, f"prefix routers of {', '.join(r.name for r in todo)}")
        fit_prefix_routers(todo, progress=progress)


def _random_equal(records: list[dict], k: int) -> list[dict]:
    """Documents in a seeded random order dealt round-robin into k groups: equal sizes (+-1)."""
    def key(r):
        return hashlib.blake2b(f"random:{r['id']}".encode(), digest_size=8).digest()

    out = []
    for split in ("train", "valid"):
        part = sorted((r for r in records if r["split"] == split), key=key)
        out += [{**r, "cluster": i % k} for i, r in enumerate(part)]
    return out


def prepare_runs(out: Path, corpus: list[str], progress: bool, baselines=BASELINES, ks=KS) -> dict[str, Path]:
    """Cluster the corpus into k in ``ks`` balanced clusters and the named ``baselines`` (resumable;
    the largest k fits the shared embedder); returns name -> run directory."""
    unknown = set(baselines) - set(BASELINES)
    if unknown:
        raise ValueError(f"unknown baselines {sorted(unknown)}: choose from {BASELINES}")
    ks = sorted(ks, reverse=True)
    runs = {f"cbtm-k{k}": out / f"cbtm-k{k}" for k in ks}
    base = runs[f"cbtm-k{ks[0]}"]
    if not RunDir(base).exists() or "cluster" not in RunDir(base).manifest():
        _log(progress, f"clustering k={ks[0]} (fits the shared tf-idf + SVD embedder)")
        cluster.fit(corpus, base, k=ks[0], progress=progress)
    embedder, _ = cluster.load_router(base)
    for k in ks:
        run = runs[f"cbtm-k{k}"]
        if not RunDir(run).exists() or "cluster" not in RunDir(run).manifest():
            _log(progress, f"clustering k={k} (balanced: at most {defaults.MAX_SIZE_RATIO}x the mean size)")
            cluster.fit(corpus, run, k=k, embedder=embedder, progress=progress)
        cluster.assign(corpus, run, label_field="domain", progress=progress)
    if "unbalanced" in baselines:
        unbalanced = out / "unbalanced-k4"
        if not RunDir(unbalanced).exists() or "cluster" not in RunDir(unbalanced).manifest():
            _log(progress, "clustering k=4 (unbalanced k-means)")
            cluster.fit(corpus, unbalanced, k=4, balanced=False, embedder=embedder, progress=progress)
        cluster.assign(corpus, unbalanced, balanced=False, progress=progress)
        runs["unbalanced-k4"] = unbalanced
    if "random" in baselines:  # random equal split: documents hashed into 4 groups (sizes equal up to noise)
        rand = out / "random-k4"
        if not (RunDir(rand).router / "kmeans.json").is_file():
            _log(progress, "random equal split, k=4")
            recs = _random_equal(_records(base, lambda r: 0), 4)
            write_assignments(rand, recs, corpus, k=4, name="random", source="random equal split")
            _router_from_groups(rand, embedder, corpus, recs, 4)
        runs["random-k4"] = rand
    if "gold" in baselines:  # gold metadata split: one expert per `domain` label, when the corpus has labels
        labels = {d.id: d.meta.get("domain") for d in read_documents(corpus)}
        names = sorted({v for v in labels.values() if v is not None})
        if len(names) >= 2 and None not in labels.values():
            gold = out / "gold"
            if not (RunDir(gold).router / "kmeans.json").is_file():
                _log(progress, f"gold metadata split: {len(names)} domains")
                recs = _records(base, lambda r: names.index(labels[r["id"]]))
                write_assignments(gold, recs, corpus, k=len(names), name="gold", source="gold domain labels")
                _router_from_groups(gold, embedder, corpus, recs, len(names))
            runs["gold"] = gold
    _prefix_routers(runs, progress)
    return runs


def _settings(cfg: dict, progress: bool) -> dict:
    return dict(seq_len=cfg["seq_len"], batch_size=cfg["batch_size"], lr=_lr(cfg), eval_tokens=CURVE_TOKENS,
                progress=progress)


def train_seed(out: Path, corpus: list[str], cfg: dict, progress: bool) -> Path:
    """The shared seed phase (resumes; a finished seed is reused); returns the seed model's directory."""
    seed_run = out / "seed"
    seed = seed_run / "experts" / "expert_000"
    _log(progress, f"seed phase: a dense {cfg['model_size']} model on {cfg['seed_tokens']:,} tokens")
    train_dense(seed_run, cfg["seed_tokens"], corpus=corpus, model_size=cfg["model_size"], vocab_size=VOCAB_SIZE,
                **_settings(cfg, progress), **SEED_SCHEDULE, eval_every=_eval_every(cfg, cfg["seed_tokens"], 3))
    if not (seed / "tokenizer_config.json").is_file():
        tokens.load_tokenizer(RunDir(seed_run).tokenizer).save_pretrained(seed)  # the seed carries its tokenizer
    return seed


def train_all(out: Path, runs: dict[str, Path], corpus: list[str], cfg: dict, scale: int, seed: Path,
              progress: bool) -> dict:
    """Every run's experts and the dense model at budget scale * T, branched from ``seed``: all their
    jobs in one pool of worker processes (one thread each: on tiny CPU models processes beat threads
    within one), the longest first, so no core idles between runs."""
    settings = {**_settings(cfg, progress), **BRANCH_SCHEDULE}
    settings.pop("progress")
    total = cfg["total_tokens"] * scale
    suffix = "" if scale == 1 else f"-x{scale}"
    targets = {name + suffix: run if scale == 1 else _scaled_copy(run, scale) for name, run in runs.items()}
    targets["dense" + suffix] = prepare_dense(out / f"dense{suffix}", corpus=corpus, progress=progress).path
    requests = []
    for name, target in targets.items():
        k = RunDir(target).section("assignments")["k"]
        _log(progress, f"{name}: {k} job{'s' * (k > 1)} of {total // k:,} tokens")
        requests.append(dict(run=target, total_tokens=total, seed_model=seed, **settings,
                             eval_every=_eval_every(cfg, total // k)))
    parallel = (os.cpu_count() or 1) if cfg.get("parallel") else 1
    train_runs(requests, parallel=parallel, progress=progress)
    return targets


def _eval_every(cfg: dict, tokens_per_job: int, per_point: int = 1) -> int:
    """Optimizer steps between validation losses: CURVE_POINTS * per_point points per job."""
    steps = -(-tokens_per_job // (cfg["batch_size"] * cfg["seq_len"]))
    return max(1, -(-steps // (CURVE_POINTS * per_point)))  # the last point is the job's final loss


def _lr(cfg: dict) -> float:
    return models.default_lr(cfg["model_size"])


def _scaled_copy(run: Path, scale: int) -> Path:
    """A sibling run directory sharing the router and assignments, for a larger budget."""
    import shutil

    dst = run.with_name(f"{run.name}-x{scale}")
    if not RunDir(dst).exists():
        for sub in ("router", "assignments"):
            if (run / sub).is_dir():
                shutil.copytree(run / sub, dst / sub)
        m = RunDir(run).manifest()
        RunDir(dst).update(**{key: m[key] for key in ("cluster", "corpus", "assignments") if key in m})
    for name in ("prefix.json", "prefix.safetensors"):  # a prefix router fitted after the copy was made
        if (run / "router" / name).is_file() and not (dst / "router" / name).is_file():
            shutil.copy2(run / "router" / name, dst / "router" / name)
    return dst


def _all(ppl: dict, name: str):
    return ppl.get(name, {}).get("all")


def best_k_per_budget(ppl: dict, scales) -> dict[int, int]:
    """The number of experts with the lowest perplexity (all experts) at each budget scale; k=1 is
    the dense model."""
    out = {}
    for scale in scales:
        suffix = "" if scale == 1 else f"-x{scale}"
        cands = {1: _all(ppl, "dense" + suffix), **{k: _all(ppl, f"cbtm-k{k}{suffix}") for k in KS}}
        cands = {k: v for k, v in cands.items() if v is not None}
        if cands:
            out[scale] = min(cands, key=cands.get)
    return out


def _change(v: float, ref: float) -> str:
    """Relative change of a perplexity against a reference, e.g. "-2.4%"."""
    return f"{(v / ref - 1) * 100:+.1f}%"


def claims(ppl: dict, scales, n_labels: int | None = None, own_cluster: dict | None = None) -> list[dict]:
    """The papers' claims this run can test, each with reproduced: true|false and its figures
    (``own_cluster``: run -> perplexity of each document scored by its own cluster's expert, the
    bound on what top-1 routing can reach, shown with the top-1 claims)."""
    dense = _all(ppl, "dense")
    out = []
    for k in (4, 8):
        v = _all(ppl, f"cbtm-k{k}")
        if v is not None:
            out.append({"claim": f"C-BTM k={k} has lower validation perplexity than the compute-matched dense model",
                        "reproduced": bool(v < dense), "cbtm": v, "dense": dense, "vs_dense": _change(v, dense)})
    k4 = _all(ppl, "cbtm-k4")
    for other in ("random-k4", "unbalanced-k4"):
        v = _all(ppl, other)
        if v is not None and k4 is not None:
            out.append({"claim": f"balanced tf-idf clusters (k=4) beat the {other.replace('-k4', '')} split",
                        "reproduced": bool(k4 < v), "cbtm-k4": k4, other: v})
    if "gold" in ppl:  # compared at the number of experts closest to the number of gold labels
        g, n_gold = ppl["gold"]["all"], n_labels or 8
        k = min((k for k in KS if f"cbtm-k{k}" in ppl), key=lambda k: abs(k - n_gold))
        out.append({"claim": f"balanced tf-idf clusters (k={k}) come close to the gold metadata split "
                             f"({n_gold} labels): within 5%", "reproduced": bool(ppl[f"cbtm-k{k}"]["all"] <= 1.05 * g),
                    f"cbtm-k{k}": ppl[f"cbtm-k{k}"]["all"], "gold": g})
    for k in (4, 8):
        p = ppl.get(f"cbtm-k{k}", {})
        if {"2", "all"} <= set(p):
            tops = {t: p[t] for t in ("2", "4") if t in p}
            out.append({"claim": f"k={k}: top-2 and top-4 are within 1% of using all experts",
                        "reproduced": all(v <= 1.01 * p["all"] for v in tops.values()), **{f"top-{t}": v for t, v in tops.items()},
                        "all": p["all"]})
            own = (own_cluster or {}).get(f"cbtm-k{k}")
            out.append({"claim": f"k={k}: top-1 still beats the dense model", "reproduced": bool(p["1"] < dense),
                        "top-1": p["1"], "dense": dense, "vs_dense": _change(p["1"], dense),
                        **({"own_cluster": own} if own is not None else {})})
    if len(scales) > 1:
        best = best_k_per_budget(ppl, scales)
        ks = [best[s] for s in sorted(best)]
        out.append({"claim": f"the best k grows with the budget ({', '.join(f'{s}T' for s in sorted(best))})",
                    "reproduced": bool(ks[-1] > ks[0] and all(a <= b for a, b in zip(ks, ks[1:]))),
                    **{f"best_k_at_{s}T": best[s] for s in sorted(best)}})
    else:
        out.append({"claim": "the best k grows with the budget", "reproduced": None,
                    "note": "not tested at this budget: run `cbtm demo --budget scaling`"})
    return out


def plot_scaling(ppl: dict, scales, total_tokens: int, path: Path) -> None:
    """Validation perplexity (all experts) vs training tokens, one line per k (k=1: dense)."""
    fig, ax = evaluate.new_figure()
    for k in (1, *KS):
        pts = [(s * total_tokens, _all(ppl, ("dense" if k == 1 else f"cbtm-k{k}") + ("" if s == 1 else f"-x{s}")))
               for s in scales]
        pts = [(t, v) for t, v in pts if v is not None]
        if pts:
            ax.plot([t for t, _ in pts], [v for _, v in pts], marker="o", label="dense (k=1)" if k == 1 else f"k={k}")
    ax.set_xscale("log")
    evaluate.save_figure(fig, ax, path, "training tokens per compared run (after the seed)", "validation perplexity")


def _n_experts(run) -> int | None:
    return None if run is None else len(RunDir(run).expert_entries())


def _perplexity_table(ppl: dict, cols) -> list[str]:
    """Markdown rows: a run per row, a top-k per column (``ppl``: run -> top-k -> perplexity)."""
    lines = ["| run | " + " | ".join(f"top-{c}" if c != "all" else "all experts" for c in cols) + " |",
             "| --- |" + " ---: |" * len(cols)]
    for name, p in ppl.items():
        lines.append(f"| {name} | " + " | ".join(f"{p[c]:.2f}" if c in p else "" for c in cols) + " |")
    return lines


def _markdown(report: dict) -> str:
    cols = ("1", "2", "4", "all")
    lines = [f"# cbtm demo ({report['budget']} budget: T = {report['config']['total_tokens']:,} tokens per run, "
             f"{report['config']['model_size']} models, {report['config']['vocab_size']}-token BPE, seed phase "
             f"{report['config']['seed_tokens']:,} tokens = {report['seed_share']:.0%} of the seed + T compute, "
             f"clusters of at most {report['config'].get('max_size_ratio', 1.0)}x the mean size)", "",
             f"Validation perplexity, {report['eval']['documents']} documents / {report['eval']['tokens']:,} tokens:", ""]
    lines += _perplexity_table(report["perplexity"], cols)
    if report.get("distance_router"):
        lines += ["", "Routed runs use their prefix router (a classifier of the cluster from the context so far, "
                  "fitted on training documents); the same experts with the paper's distance router "
                  "softmax(-d^2 / T):", ""]
        lines += _perplexity_table(report["distance_router"], cols)
    lines += evaluate.context_markdown(report.get("by_context", {}))
    lines += ["", "| claim | reproduced | figures |", "| --- | --- | --- |"]
    for c in report["claims"]:
        figs = ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in c.items()
                         if k not in ("claim", "reproduced"))
        mark = {True: "yes", False: "**no**", None: "not tested"}[c["reproduced"]]
        lines.append(f"| {c['claim']} | {mark} | {figs} |")
    return "\n".join(lines) + "\n"


def run_demo(out: str | Path = "runs/demo", budget: str = "small", corpus=None, progress: bool = True,
             baselines: tuple[str, ...] | None = None) -> dict:
    """Run (or resume) the whole demo; returns the report written to ``out/reports/demo.json``."""
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {', '.join(BUDGETS)}, got {budget!r}")
    cfg = BUDGETS[budget] if baselines is None else {**BUDGETS[budget], "baselines": tuple(baselines)}
    t0 = time.perf_counter()
    out = Path(out)
    corpus = corpus_paths(corpus)
    runs = prepare_runs(out, corpus, progress, cfg["baselines"], cfg["ks"])
    trained = {}
    seed = train_seed(out, corpus, cfg, progress)
    for scale in cfg["scales"]:
        trained.update(train_all(out, runs, corpus, cfg, scale, seed, progress))
    trained["seed"] = seed.parents[1]  # the seed's run alone: what every compared run gained over it
    order = ["dense", "seed"] + [n for n in trained if n not in ("dense", "seed")]
    _log(progress, "evaluating every run on the validation split")
    ev = evaluate.evaluate({n: trained[n] for n in order}, out, max_docs=cfg["eval_docs"], progress=False)
    by_context = {n: r["by_context"] for n, r in ev["runs"].items() if n == "dense" or n.startswith("cbtm-")}
    curves = evaluate.learning_curves({n: trained[n] for n in order})
    evaluate.plot_curves(curves, RunDir(out).reports / "curves.png")
    if len(cfg["scales"]) > 1:
        plot_scaling(ev["perplexity"], cfg["scales"], cfg["total_tokens"], RunDir(out).reports / "scaling.png")
    report = {"budget": budget, "config": {**{k: v for k, v in cfg.items() if k not in ("scales", "parallel")},
                                           "vocab_size": VOCAB_SIZE, "max_size_ratio": defaults.MAX_SIZE_RATIO,
                                           "seed_schedule": SEED_SCHEDULE,
                                           "branch_schedule": BRANCH_SCHEDULE, "lr": _lr(cfg)},
              "scales": list(cfg["scales"]),
              "seed_share": cfg["seed_tokens"] / (cfg["seed_tokens"] + cfg["total_tokens"]),
              "corpus": corpus, "perplexity": ev["perplexity"],
              "distance_router": {n: r["distance_router"] for n, r in ev["runs"].items() if "distance_router" in r},
              "eval": {k: ev[k] for k in ("documents", "tokens", "temperature")},
              "by_context": by_context,
              "claims": claims(ev["perplexity"], cfg["scales"], _n_experts(trained.get("gold")),
                               {n: b["own cluster"]["all tokens"] for n, b in by_context.items() if "own cluster" in b}),
              "runs": {n: str(p) for n, p in trained.items()}, "learning_curves": curves,
              "seconds": round(time.perf_counter() - t0, 1)}
    reports = RunDir(out).reports
    atomic_write_json(reports / "demo.json", report)
    md = _markdown(report)
    atomic_write_text(reports / "demo.md", md)
    if progress:
        print(md)
        print(f"[demo] done in {report['seconds']:.0f} s -> {reports / 'demo.json'}, {reports / 'eval.png'}, "
              f"{reports / 'curves.png'}")
    return report

