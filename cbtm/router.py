"""The C-BTM router: weights over the k experts from a context's tf-idf/SVD embedding, top-k
renormalised, per document or per token position (via the exact prefix embeddings).

Two ways to weight, over the same embedding:
- ``distance`` (the paper's): ``w = softmax(-d^2 / T)`` of the distances to the cluster centres.
  The centres are means of *whole* documents, so on a short context (a few words) the nearest centre
  is often not the document's cluster.
- ``prefix``: ``w = softmax(A e + b)``, a multinomial logistic regression fitted on prefixes of every
  length of the run's training documents, labelled with their document's cluster
  (:func:`fit_prefix_router`, run by ``cbtm cluster assign``): the probability of each cluster given
  the context so far, calibrated for short contexts too. Stored as ``router/prefix.{safetensors,json}``.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from . import defaults
from .assignments import iter_assigned, iter_documents, read_records
from .embed import TfidfEmbedder
from .kmeans import BalancedKMeans
from .rundir import RunDir, atomic_save_safetensors, atomic_write_json, holds_lock, read_json

ROUTINGS = defaults.ROUTINGS
_SPACE = re.compile(r"\s+")
LOGISTIC = dict(C=1.0, max_iter=1000, tol=1e-3)  # scikit-learn's LogisticRegression of the prefix router
_ABSENT = -1e4  # the log-odds of a cluster the prefix router saw no document of
_PREFIX_FORMAT = "cbtm.prefix-router/1"


def keep_top_k(w: np.ndarray, top_k: int | None) -> np.ndarray:
    """Keep the top_k weights of each row (first index on ties) and renormalise: (N, K) -> (N, K)."""
    w = np.asarray(w, np.float64)
    if top_k is not None and top_k < w.shape[1]:
        drop = np.argsort(-w, axis=1, kind="stable")[:, top_k:]
        w = w.copy()
        np.put_along_axis(w, drop, 0.0, axis=1)
    return w / w.sum(1, keepdims=True)


class Router:
    """Expert weights from cluster distances, or from a prefix classifier.

    temperature: T of ``softmax(-d^2 / T)`` (paper default 0.1; distance routing only).
    top_k: keep the k largest weights per context and renormalise (None or >= K: all experts).
    official_distance: use ``d^4 / T`` as the official C-BTM code does (it squares the squared
        distance); the default is the paper's formula.
    classifier: ``(coef (K, D), intercept (K,))`` of a prefix router; when given, the weights are
        ``softmax(emb @ coef.T + intercept)`` and the centres only name the clusters.
    """

    def __init__(self, embedder: TfidfEmbedder, centers: np.ndarray, temperature: float = defaults.TEMPERATURE,
                 top_k: int | None = None, official_distance: bool = False,
                 classifier: tuple[np.ndarray, np.ndarray] | None = None):
        centers = np.asarray(centers, np.float32)
        if centers.ndim != 2 or centers.shape[1] != embedder.n_components:
            raise ValueError(f"centers must be (K, {embedder.n_components}), got {centers.shape}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 (or None for all experts), got {top_k}")
        if classifier is not None:
            coef, bias = (np.asarray(a, np.float64) for a in classifier)
            if coef.shape != centers.shape or bias.shape != (centers.shape[0],):
                raise ValueError(f"the prefix classifier must be ({centers.shape}, ({centers.shape[0]},)), "
                                 f"got ({coef.shape}, {bias.shape})")
            classifier = (coef, bias)
        self.embedder, self.centers, self.classifier = embedder, centers, classifier
        self.temperature, self.top_k, self.official_distance = float(temperature), top_k, bool(official_distance)
        self._projection: np.ndarray | None = None  # the terms' products with _matrix(), made on first use

    @classmethod
    def load(cls, run: str | Path, routing: str = defaults.ROUTING, **kw) -> "Router":
        """The router of a run directory (``router/embedder.*``, ``router/kmeans.*`` and, for
        ``routing`` "prefix" -- or "auto" when the run has one fitted on its current clusters and
        assignments; otherwise the distance router -- ``router/prefix.*``)."""
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
        run = RunDir.of(run)
        if not (run.router / "kmeans.json").is_file():
            raise FileNotFoundError(f"{run.router} holds no fitted router: run `cbtm cluster fit` first")
        centers = BalancedKMeans.load(run.router).cluster_centers_
        classifier = None
        if routing == "prefix":
            classifier = _load_classifier(run, centers.shape)
        elif routing == "auto" and (run.router / "prefix.json").is_file():
            try:
                classifier = _load_classifier(run, centers.shape)
            except StalePrefixRouter:
                classifier = None  # e.g. `merge add` gave the run a centre the prefix router cannot route to
        return cls(TfidfEmbedder.load(run.router), centers, classifier=classifier, **kw)

    @property
    def n_experts(self) -> int:
        return self.centers.shape[0]

    @property
    def routing(self) -> str:
        """"prefix" or "distance": how this router weights."""
        return "distance" if self.classifier is None else "prefix"

    def by_distance(self) -> "Router":
        """The paper's distance router over the same embedder, centres and top_k."""
        return Router(self.embedder, self.centers, self.temperature, self.top_k, self.official_distance)

    def subset(self, clusters: Sequence[int], top_k: int | None = None) -> "Router":
        """A router over the given clusters only (in that order), keeping ``top_k`` of them."""
        clusters = list(clusters)
        classifier = None if self.classifier is None else tuple(a[clusters] for a in self.classifier)
        return Router(self.embedder, self.centers[clusters], self.temperature, top_k, self.official_distance,
                      classifier)

    def scores(self, emb: np.ndarray) -> np.ndarray:
        """Unnormalised log-weights of embeddings, before top-k: (N, D) -> float64 (N, K)."""
        emb = np.asarray(emb, np.float64)
        # einsum rather than BLAS: BLAS threads would spin against torch's on the same cores
        return self._scores(np.einsum("nd,kd->nk", emb, self._matrix()), (emb * emb).sum(1))

    def _matrix(self) -> np.ndarray:
        """What the scores are linear in: the classifier's coefficients or the centres, float64 (K, D)."""
        return self.classifier[0] if self.classifier is not None else self.centers.astype(np.float64)

    def _scores(self, cross: np.ndarray, sq: np.ndarray) -> np.ndarray:
        """``scores`` from the embeddings' products with ``_matrix()`` (N, K) and squared norms (N,)."""
        if self.classifier is not None:
            return cross + self.classifier[1]  # (N, K) log-odds of each cluster
        c = self.centers.astype(np.float64)
        # |e|^2 - 2 e.c + |c|^2 (float64: no (N, K, D) temporary, exact to ~1e-15)
        d2 = np.maximum(sq[:, None] - 2 * cross + (c * c).sum(1)[None], 0)  # (N, K)
        return -(d2 ** 2 if self.official_distance else d2) / self.temperature

    def weights(self, emb: np.ndarray, allowed: np.ndarray | None = None, top_k: int | None = None) -> np.ndarray:
        """Expert weights of embeddings: (N, D) -> float32 (N, K), rows sum to 1, at most top_k
        non-zero (this router's ``top_k`` unless given). ``allowed`` (N, K) bool: the experts each row
        may use (the others get weight 0)."""
        return self._weights(self.scores(emb), allowed, top_k)

    def _weights(self, score: np.ndarray, allowed: np.ndarray | None = None, top_k: int | None = None) -> np.ndarray:
        if allowed is not None:
            score = np.where(allowed, score, -np.inf)
        w = np.exp(score - score.max(1, keepdims=True))
        return keep_top_k(w, self.top_k if top_k is None else top_k).astype(np.float32)

    def document_weights(self, texts: Sequence[str]) -> np.ndarray:
        """One weight vector per document: (N, K)."""
        return self.weights(self.embedder.transform(texts))

    def token_weights(self, texts: Sequence[str], char_offsets: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Per text, the weights of the context ``text[:c]`` for each offset c: (len(offsets), K). The same
        as ``weights(embedder.prefix_embeddings(...))``, from each prefix's products with the centres (or
        the classifier), which are running sums of the terms' own (``embedder.term_projection``)."""
        if self._projection is None:
            self._projection = self.embedder.term_projection(self._matrix())  # (V, K)
        return [self._weights(self._scores(cross, sq))
                for cross, sq in self.embedder.prefix_products(texts, char_offsets, self._projection)]


def mixture_weights(run, cluster: int, sources: Sequence[int], temperature: float = defaults.TEMPERATURE,
                    max_documents: int = 1000) -> list[float]:
    """BTM mixture weights of source experts for a new expert of ``cluster``: the mean over the
    cluster's training documents of ``softmax_j(-||x - c_j||^2 / T)`` over the sources' centres."""
    run = RunDir.of(run)
    entries = {e["id"]: e for e in run.expert_entries()}
    missing = [s for s in sources if s not in entries]
    if missing:
        raise ValueError(f"experts {missing} are not in {run.manifest_path}")
    router = Router.load(run, temperature=temperature)
    centres = [int(entries[s].get("cluster", s)) for s in sources]
    if any(not 0 <= c < router.n_experts for c in centres):
        raise ValueError(f"source clusters {centres} are not all router clusters 0..{router.n_experts - 1}")
    texts = []
    for _, _, text in iter_documents(run, {(int(cluster), "train")}):
        texts.append(text)
        if len(texts) >= max_documents:
            break
    if not texts:
        raise ValueError(f"cluster {cluster} has no training documents to weight the mixture with")
    return router.subset(centres).document_weights(texts).astype(np.float64).mean(0).tolist()


# ------------------------------------------------------------------------------------------------
# the prefix router


class StalePrefixRouter(ValueError):
    """The run's prefix router was fitted on another embedder, clustering or assignment, or cannot
    route to every cluster."""


def _prefix_fingerprint(run: RunDir) -> str:
    """What a prefix router was fitted on: the embedder, the centres and the run's assignments."""
    h = hashlib.blake2b(digest_size=8)
    for name in ("embedder.safetensors", "kmeans.safetensors"):
        h.update((run.router / name).read_bytes())
    a = run.section("assignments")
    h.update(json.dumps([a.get("k"), a.get("documents"), a.get("train_sizes"), a.get("shard_keys")]).encode())
    return h.hexdigest()


def _load_classifier(run: RunDir, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    from safetensors.numpy import load_file

    meta_path, weights = run.router / "prefix.json", run.router / "prefix.safetensors"
    for p in (meta_path, weights):
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found: fit the prefix router with `cbtm cluster fit-prefix --run {run.path}`")
    meta = read_json(meta_path)
    if not isinstance(meta, dict) or meta.get("format") != _PREFIX_FORMAT:
        raise ValueError(f"{meta_path}: not a {_PREFIX_FORMAT} file")
    if meta.get("fingerprint") != _prefix_fingerprint(run):
        raise StalePrefixRouter(f"{meta_path} was fitted on another embedder, clustering or assignment of "
                                f"{run.path} (an expert added since?): refit it with `cbtm cluster fit-prefix "
                                f"--run {run.path}`")
    absent = meta.get("absent_clusters") or []
    if absent:
        raise StalePrefixRouter(f"{meta_path}: the run's assignments have no training documents of clusters "
                                f"{absent} (experts added by `merge add`?), so the prefix router cannot route "
                                "to them: route by distance (routing='distance')")
    t = load_file(str(weights))
    coef, bias = t.get("coef"), t.get("intercept")
    if coef is None or bias is None or coef.shape != tuple(shape) or bias.shape != (shape[0],):
        raise ValueError(f"{weights}: expected coef {tuple(shape)} and intercept ({shape[0]},)")
    if not (np.isfinite(coef).all() and np.isfinite(bias).all()):
        raise ValueError(f"{weights}: non-finite weights")
    return coef, bias


def _cuts(text: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``n`` distinct contexts of ``text`` as character offsets: word starts (where an LM token
    usually starts too), the word index log-uniform so that short contexts are as common as long ones."""
    starts = np.array([0] + [m.end() for m in _SPACE.finditer(text)], np.int64)
    starts = np.unique(np.minimum(starts, len(text)))
    pick = np.expm1(rng.uniform(0, np.log1p(len(starts)), n)).astype(np.int64)
    return starts[np.unique(np.minimum(pick, len(starts) - 1))]


def fit_prefix_router(run: str | Path, max_documents: int = defaults.PREFIX_DOCUMENTS,
                      cuts: int = defaults.PREFIX_CUTS, seed: int = defaults.SPLIT_SEED,
                      progress: bool = False) -> dict:
    """Fit the prefix router of a run with assignments: a multinomial logistic regression (scikit-learn,
    ``LOGISTIC``) from the embedding of a context to its document's cluster, on ``cuts`` log-uniform
    prefixes of each of up to ``max_documents`` seeded-sampled training documents. Writes
    ``router/prefix.{safetensors,json}``; returns a summary."""
    return fit_prefix_routers([run], max_documents, cuts, seed, progress)[0]


def fit_prefix_routers(runs: Sequence[str | Path], max_documents: int = defaults.PREFIX_DOCUMENTS,
                       cuts: int = defaults.PREFIX_CUTS, seed: int = defaults.SPLIT_SEED,
                       progress: bool = False) -> list[dict]:
    """:func:`fit_prefix_router` for several runs; runs that share an embedder and a training split
    (several clusterings of one corpus) embed the same prefixes once."""
    shared: dict = {}
    return [_fit_prefix(RunDir.of(run), max_documents, cuts, seed, progress, shared) for run in runs]


def _prefix_examples(run: RunDir, records: dict, max_documents: int, cuts: int, seed: int,
                     shared: dict) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Training documents' ids, the embeddings of their sampled prefixes (N, D), prefixes per document."""
    train = sorted(i for i, (_, split) in records.items() if split == "train")
    key = (hashlib.blake2b((run.router / "embedder.safetensors").read_bytes(), digest_size=16).digest(),
           run.section("corpus").get("fingerprint"), tuple(train), max_documents, cuts, seed)
    if key not in shared:
        rng = np.random.default_rng(seed)
        if len(train) > max_documents:
            train = sorted(rng.choice(train, max_documents, replace=False).tolist())
        ids, texts = [], []
        for _, _, doc_id, text in iter_assigned(run, records={i: records[i] for i in train}):
            ids.append(doc_id)
            texts.append(text)
        offsets = [_cuts(t, cuts, rng) for t in texts]
        x = np.concatenate(TfidfEmbedder.load(run.router).prefix_embeddings_batch(texts, offsets))
        shared[key] = (ids, x, np.array([len(o) for o in offsets]))
    return shared[key]


@holds_lock("cluster fit-prefix")
def _fit_prefix(run: RunDir, max_documents: int, cuts: int, seed: int, progress: bool, shared: dict) -> dict:
    import time

    from sklearn.linear_model import LogisticRegression

    t0 = time.perf_counter()
    k = BalancedKMeans.load(run.router).n_clusters
    records = read_records(run)
    ids, x, per_doc = _prefix_examples(run, records, max_documents, cuts, seed, shared)
    y = np.repeat([records[i][0] for i in ids], per_doc)  # (N,) each prefix's document's cluster
    present = np.unique(y)
    if present[0] < 0 or present[-1] >= k:
        raise ValueError(f"{run.manifest_path}: assignments name clusters {present.tolist()} but the router has "
                         f"{k} centres")
    if len(present) < 2:
        raise ValueError(f"{run.path}: the prefix router needs training documents in at least 2 clusters, "
                         f"found {len(present)}")
    clf = LogisticRegression(**LOGISTIC).fit(x, y)
    coef = np.zeros((k, x.shape[1]), np.float32)
    bias = np.full(k, _ABSENT, np.float32)  # a cluster without training documents gets no weight
    if len(present) == 2:  # scikit-learn keeps one row, the log-odds of the second class: split it
        coef[clf.classes_] = np.stack([-clf.coef_[0], clf.coef_[0]]) / 2
        bias[clf.classes_] = np.array([-clf.intercept_[0], clf.intercept_[0]]) / 2
    else:
        coef[clf.classes_], bias[clf.classes_] = clf.coef_, clf.intercept_
    atomic_save_safetensors(run.router / "prefix.safetensors", {"coef": coef, "intercept": bias})
    absent = sorted(set(range(k)) - set(present.tolist()))
    summary = {"format": _PREFIX_FORMAT, "fingerprint": _prefix_fingerprint(run), "k": k, "documents": len(ids),
               "prefixes": int(len(y)), "cuts_per_document": cuts, "seed": seed, "absent_clusters": absent,
               "train_accuracy": round(float(clf.score(x, y)), 4),
               "seconds": round(time.perf_counter() - t0, 1)}
    atomic_write_json(run.router / "prefix.json", summary)
    if progress:
        print(f"prefix router fitted: {summary['prefixes']} prefixes of {summary['documents']} documents, "
              f"accuracy {summary['train_accuracy']} on them, {summary['seconds']} s -> {run.router / 'prefix.json'}")
        if absent:
            print(f"clusters {absent} have no training documents in the assignments (experts added by `merge add`?): "
                  "the prefix router cannot route to them, so the run routes by distance")
    return summary
