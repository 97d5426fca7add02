"""The C-BTM router: weights over the k experts from the distance between a context's embedding
and each cluster centre, ``w = softmax(-d^2 / T)``, top-k renormalised, per document or per token
position (via the exact prefix embeddings)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from . import defaults
from .assignments import iter_documents
from .embed import TfidfEmbedder
from .kmeans import BalancedKMeans
from .rundir import RunDir


def keep_top_k(w: np.ndarray, top_k: int | None) -> np.ndarray:
    """Keep the top_k weights of each row (first index on ties) and renormalise: (N, K) -> (N, K)."""
    w = np.asarray(w, np.float64)
    if top_k is not None and top_k < w.shape[1]:
        drop = np.argsort(-w, axis=1, kind="stable")[:, top_k:]
        w = w.copy()
        np.put_along_axis(w, drop, 0.0, axis=1)
    return w / w.sum(1, keepdims=True)


class Router:
    """Expert weights from cluster distances.

    temperature: T of ``softmax(-d^2 / T)`` (paper default 0.1).
    top_k: keep the k largest weights per context and renormalise (None or >= K: all experts).
    official_distance: use ``d^4 / T`` as the official C-BTM code does (it squares the squared
        distance); the default is the paper's formula.
    """

    def __init__(self, embedder: TfidfEmbedder, centers: np.ndarray, temperature: float = defaults.TEMPERATURE,
                 top_k: int | None = None, official_distance: bool = False):
        centers = np.asarray(centers, np.float32)
        if centers.ndim != 2 or centers.shape[1] != embedder.n_components:
            raise ValueError(f"centers must be (K, {embedder.n_components}), got {centers.shape}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 (or None for all experts), got {top_k}")
        self.embedder, self.centers = embedder, centers
        self.temperature, self.top_k, self.official_distance = float(temperature), top_k, bool(official_distance)

    @classmethod
    def load(cls, run: str | Path, **kw) -> "Router":
        """The router of a run directory (``router/embedder.*`` and ``router/kmeans.*``)."""
        router = RunDir.of(run).router
        if not (router / "kmeans.json").is_file():
            raise FileNotFoundError(f"{router} holds no fitted router: run `cbtm cluster fit` first")
        return cls(TfidfEmbedder.load(router), BalancedKMeans.load(router).cluster_centers_, **kw)

    @property
    def n_experts(self) -> int:
        return self.centers.shape[0]

    def weights(self, emb: np.ndarray) -> np.ndarray:
        """Expert weights of embeddings: (N, D) -> float32 (N, K), rows sum to 1, at most top_k
        non-zero."""
        emb = np.asarray(emb, np.float64)
        d2 = ((emb[:, None, :] - self.centers[None].astype(np.float64)) ** 2).sum(-1)  # (N, K)
        score = -(d2 ** 2 if self.official_distance else d2) / self.temperature
        w = np.exp(score - score.max(1, keepdims=True))
        return keep_top_k(w, self.top_k).astype(np.float32)

    def document_weights(self, texts: Sequence[str]) -> np.ndarray:
        """One weight vector per document: (N, K)."""
        return self.weights(self.embedder.transform(texts))

    def token_weights(self, texts: Sequence[str], char_offsets: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Per text, the weights of the context ``text[:c]`` for each offset c: (len(offsets), K)."""
        embs = self.embedder.prefix_embeddings_batch(texts, char_offsets)
        return [self.weights(e) for e in embs]


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
    sub = Router(router.embedder, router.centers[centres], temperature)
    return sub.document_weights(texts).astype(np.float64).mean(0).tolist()
