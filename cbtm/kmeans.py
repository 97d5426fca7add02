"""Balanced k-means: Lloyd iterations whose assignment step is an exact capacity-constrained
assignment (``cbtm.ops.balanced_assign``), as a scikit-learn style estimator."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from . import ops
from .defaults import MAX_ITER
from .rundir import atomic_save_safetensors, atomic_write_json


_FORMAT = "cbtm.BalancedKMeans/1"
TOL = 1e-4  # stop when the squared centre shift is at most TOL x the mean feature variance
INIT = "k-means++"
KMEANSPP_TRIALS = 2  # k-means++ tries KMEANSPP_TRIALS + log(K) candidates per centre


def _torch():
    """The torch module, imported on first use (``import cbtm`` and numpy inputs never import it)."""
    try:
        import torch
    except ImportError:
        raise RuntimeError("a device other than 'cpu' needs torch") from None
    return torch


def _is_torch(a) -> bool:
    torch = sys.modules.get("torch")  # a tensor exists only once torch is imported
    return torch is not None and isinstance(a, torch.Tensor)


def _is_chunk_source(X) -> bool:
    """True for an iterable of arrays (chunks), False for one array."""
    if isinstance(X, np.ndarray) or _is_torch(X):
        return False
    if isinstance(X, (list, tuple)):
        return len(X) > 0 and (isinstance(X[0], np.ndarray) or _is_torch(X[0]))
    return isinstance(X, Iterable)


class BalancedKMeans:
    """K-means with clusters of (at most) equal size, the clustering step of C-BTM.

    Parameters
    ----------
    n_clusters: number of clusters K.
    balanced: exact capacity-constrained assignment in each iteration (every cluster at most
        ``capacity(N)`` points); False gives plain Lloyd k-means.
    max_size_ratio: the capacity as a multiple of the mean size: at most
        max(ceil(N / K), floor(max_size_ratio * N / K)) points per cluster. 1.0 (the default) is
        exactly balanced, C-BTM's setting; a larger ratio lets clusters follow domains of unequal
        size while still bounding each expert's share of the data.
    max_iter: Lloyd iterations (epochs over the chunks for a re-iterable chunk source).
    tol: stop when the squared centre shift is at most ``tol`` times the mean feature variance.
    init: "k-means++" or "random" (or an array (K, D) of initial centres).
    seed: random seed of the initialisation.
    device: "cpu" or a CUDA device ("cuda", "cuda:1"); data is moved there for the kernels.

    Attributes (after fit): ``cluster_centers_`` float32 (K, D), ``prices_`` float32 (K,) the dual
    prices of the last balanced assignment (``predict(X, balanced=True)`` uses them),
    ``labels_`` (N,), ``inertia_`` (sum of squared distances), ``n_iter_``,
    ``inertia_history_`` (objective of each iteration's assignment; it never increases),
    ``counts_`` (points per cluster accumulated by partial_fit), ``n_features_in_``,
    ``solve_stats_`` (statistics of the last balanced assignment, see ``ops.balanced_assign``;
    None when no balanced assignment ran).

    ``from_centers`` builds a fitted estimator from given centres; ``with_center`` adds one.
    """

    def __init__(self, n_clusters: int, balanced: bool = True, max_iter: int = MAX_ITER, tol: float = TOL,
                 init=INIT, seed: int = 0, device: str = "cpu", max_size_ratio: float = 1.0):
        if int(n_clusters) != n_clusters or n_clusters < 1:
            raise ValueError(f"n_clusters must be a positive integer, got {n_clusters!r}")
        if int(max_iter) != max_iter or max_iter < 1:
            raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
        if tol < 0:
            raise ValueError(f"tol must be >= 0, got {tol}")
        if isinstance(max_size_ratio, bool) or not math.isfinite(max_size_ratio) or max_size_ratio < 1:
            raise ValueError(f"max_size_ratio must be a finite number >= 1 (1 = exactly balanced), "
                             f"got {max_size_ratio!r}")
        if isinstance(init, str) and init not in ("k-means++", "random"):
            raise ValueError(f"init must be 'k-means++', 'random' or an array, got {init!r}")
        self.n_clusters = int(n_clusters)
        self.balanced = bool(balanced)
        self.max_iter = int(max_iter)
        self.tol = float(tol)
        self.init = init
        self.seed = int(seed)
        self.device = str(device)
        self.max_size_ratio = float(max_size_ratio)

    # ---------------------------------------------------------------------------------------
    # data handling

    def _prepare(self, X):
        """X on the estimator's device, in a dtype the kernels take; (N, D) checked."""
        if _is_torch(X):
            X = X.detach()
            torch = _torch()
            if X.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                X = X.float()
            if str(X.device) != self.device and not (self.device == "cuda" and X.is_cuda):
                X = X.to(self.device)
        else:
            X = np.asarray(X)
            if X.dtype not in (np.float32, np.float16):
                X = X.astype(np.float32)
            if self.device != "cpu":
                X = _torch().from_numpy(np.ascontiguousarray(X)).to(self.device)
        if X.ndim != 2:
            raise ValueError(f"X must be 2-D (n_samples, n_features), got shape {tuple(X.shape)}")
        if X.shape[0] == 0:
            raise ValueError("X is empty")
        if hasattr(self, "n_features_in_") and X.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {X.shape[1]} features, the model was fitted with {self.n_features_in_}")
        return X

    def _centers_like(self, X):
        c = self.cluster_centers_
        return _torch().from_numpy(c).to(X.device) if _is_torch(X) else c

    def _check_fitted(self):
        if not hasattr(self, "cluster_centers_"):
            raise RuntimeError("this BalancedKMeans is not fitted yet: call fit() or partial_fit() first")

    # ---------------------------------------------------------------------------------------
    # initialisation

    def _init_centers(self, X, rng: np.random.Generator) -> np.ndarray:
        """(K, D) float32 initial centres: k-means++ (greedy, 2 + log K trials per centre)."""
        k = self.n_clusters
        n = X.shape[0]
        if k > n:
            raise ValueError(f"n_clusters={k} is larger than the number of points ({n})")
        if not isinstance(self.init, str):
            c = np.asarray(self.init, dtype=np.float32)
            if c.shape != (k, X.shape[1]):
                raise ValueError(f"init array must have shape ({k}, {X.shape[1]}), got {c.shape}")
            return c.copy()
        Xn = ops.to_numpy(X).astype(np.float32, copy=False)
        if not np.isfinite(Xn).all():
            raise ValueError("X contains NaN or Inf")
        if self.init == "random":
            return Xn[rng.choice(n, k, replace=False)].copy()
        trials = KMEANSPP_TRIALS + int(math.log(k))
        centers = np.empty((k, Xn.shape[1]), np.float32)
        centers[0] = Xn[rng.integers(n)]
        closest = ops.pairwise_sqdist(Xn, centers[:1])[:, 0].astype(np.float64)  # (N,)
        for c in range(1, k):
            total = closest.sum()
            if total <= 0:  # every point coincides with a centre: any distinct pick will do
                cand = rng.choice(n, trials)
            else:
                cand = np.searchsorted(np.cumsum(closest), rng.random(trials) * total)
                cand = np.minimum(cand, n - 1)
            d = ops.pairwise_sqdist(Xn, Xn[cand]).astype(np.float64)  # (N, trials)
            pot = np.minimum(closest[:, None], d).sum(0)
            best = int(np.argmin(pot))
            centers[c] = Xn[cand[best]]
            closest = np.minimum(closest, d[:, best])
        return centers

    # ---------------------------------------------------------------------------------------
    # assignment and update

    def capacity(self, n: int) -> int:
        """Most points one cluster may hold in a balanced assignment of n points."""
        return capacity(n, self.n_clusters, self.max_size_ratio)

    def _assign(self, X, centers, prices):
        """labels of X under centers: exact capacity-constrained or nearest centre."""
        if self.balanced:
            return self._balanced_assign(X, centers, prices)
        labels, _ = ops.assign(X, centers)
        return labels, prices

    def _balanced_assign(self, X, centers, prices):
        """ops.balanced_assign, keeping its statistics in ``solve_stats_``."""
        labels, prices, self.solve_stats_ = ops.balanced_assign(X, centers, self.capacity(X.shape[0]), prices=prices,
                                                                return_stats=True)
        return labels, prices

    @staticmethod
    def _sq_norm_sum(X) -> float:
        if _is_torch(X):
            return float((X.double() ** 2).sum())
        x64 = X.astype(np.float64)
        return float(np.einsum("nd,nd->", x64, x64))

    def _update(self, X, labels, centers: np.ndarray):
        """(sums (K, D), counts (K,), cost of labels under centers) as float64 numpy."""
        sums, counts = ops.centroid_update(X, labels, self.n_clusters)
        sums, counts = ops.to_numpy(sums), ops.to_numpy(counts)
        c64 = centers.astype(np.float64)
        cost = -2.0 * float((c64 * sums).sum()) + float((counts * (c64 ** 2).sum(1)).sum())
        return sums, counts, cost

    def _relocate_empty(self, X, labels, centers, new, counts):
        """Empty clusters move to the points farthest from their centres (the objective of the
        current assignment is unchanged, so it still never increases)."""
        empty = np.flatnonzero(counts == 0)
        if len(empty) == 0:
            return new
        Xn = ops.to_numpy(X).astype(np.float32)
        far = ((Xn - centers[ops.to_numpy(labels)]) ** 2).sum(1)
        new[empty] = Xn[np.argsort(-far, kind="stable")[: len(empty)]]
        return new

    def _prices(self, prices) -> np.ndarray:
        """float32 (K,) prices of the last balanced assignment (zeros without one)."""
        return np.zeros(self.n_clusters, np.float32) if prices is None else ops.to_numpy(prices).astype(np.float32)

    # ---------------------------------------------------------------------------------------
    # public API

    def fit(self, X, y=None):
        """Fit on one array (N, D), or on an iterable of chunks streamed from disk.

        Chunks: a re-iterable source (a list, or an object whose __iter__ starts over) runs
        ``max_iter`` exact Lloyd epochs whose centre sums accumulate over all chunks, with the
        balance enforced per chunk; a one-shot iterator is consumed once through partial_fit.
        """
        if _is_chunk_source(X):
            return self._fit_chunks(X)
        X = self._prepare(X)
        n = X.shape[0]
        if self.n_clusters > n:
            raise ValueError(f"n_clusters={self.n_clusters} is larger than the number of points ({n})")
        rng = np.random.default_rng(self.seed)
        centers = self._init_centers(X, rng)
        self.n_features_in_ = X.shape[1]
        self.solve_stats_ = None
        sq = self._sq_norm_sum(X)
        Xn_var = ops.to_numpy(X.float().var(0) if _is_torch(X) else X.astype(np.float64).var(0))
        tol = self.tol * float(np.mean(Xn_var))
        prices, history = None, []
        for it in range(self.max_iter):
            c_dev = _torch().from_numpy(centers).to(X.device) if _is_torch(X) else centers
            labels, prices = self._assign(X, c_dev, prices)
            sums, counts, cost = self._update(X, labels, centers)
            history.append(sq + cost)
            new = _means(sums, counts, centers)
            new = self._relocate_empty(X, labels, centers, new, counts)
            shift = float(((new.astype(np.float64) - centers) ** 2).sum())
            centers = new
            if shift <= tol:
                break
        self.cluster_centers_ = centers
        c_dev = self._centers_like(X)
        labels, prices = self._assign(X, c_dev, prices)
        _, counts, cost = self._update(X, labels, centers)
        self.labels_ = labels
        self.prices_ = self._prices(prices)
        self.inertia_ = max(sq + cost, 0.0)
        self.inertia_history_ = history
        self.n_iter_ = it + 1
        self.counts_ = counts.astype(np.int64)
        return self

    def _fit_chunks(self, source):
        one_shot = iter(source) is source
        if one_shot:
            for chunk in source:
                self.partial_fit(chunk)
            self._check_fitted()
            self.n_iter_ = 1
            return self
        first = self._prepare(next(iter(source)))
        self.n_features_in_ = first.shape[1]
        self.solve_stats_ = None
        centers = self._init_centers(first, np.random.default_rng(self.seed))
        prices, history, tol = None, [], None
        for it in range(self.max_iter):
            sums = np.zeros((self.n_clusters, self.n_features_in_))
            counts = np.zeros(self.n_clusters, np.int64)
            total, sq_cols = 0.0, np.zeros(self.n_features_in_)
            for chunk in source:
                X = self._prepare(chunk)
                c_dev = _torch().from_numpy(centers).to(X.device) if _is_torch(X) else centers
                labels, prices = self._assign_chunk(X, c_dev, prices)
                s, c, cost = self._update(X, labels, centers)
                sums += s
                counts += c
                total += self._sq_norm_sum(X) + cost
                if tol is None:
                    sq_cols += (ops.to_numpy(X).astype(np.float64) ** 2).sum(0)
            if tol is None:  # tol relative to the mean feature variance, measured in the first epoch
                n = counts.sum()
                mean = sums.sum(0) / n
                tol = self.tol * float(np.mean(sq_cols / n - mean ** 2))
            history.append(total)
            new = _means(sums, counts, centers)
            shift = float(((new.astype(np.float64) - centers) ** 2).sum())
            centers = new
            if shift <= tol:
                break
        self.cluster_centers_ = centers
        self.prices_ = self._prices(prices)
        self.inertia_ = history[-1]
        self.inertia_history_ = history
        self.n_iter_ = it + 1
        self.counts_ = counts
        return self

    def _assign_chunk(self, X, centers, prices):
        """Assignment of one chunk: balanced within the chunk when it has at least K points."""
        if self.balanced and X.shape[0] >= self.n_clusters:
            return self._balanced_assign(X, centers, prices)
        labels, _ = ops.assign(X, centers)
        return labels, prices

    def partial_fit(self, X, y=None):
        """Update the centres with one chunk: its points are assigned (balanced within the chunk),
        and every centre becomes the mean of all points ever assigned to it (sums accumulate)."""
        X = self._prepare(X)
        if not hasattr(self, "cluster_centers_"):
            if self.n_clusters > X.shape[0]:
                raise ValueError(f"the first chunk needs at least n_clusters={self.n_clusters} points, got {X.shape[0]}")
            self.n_features_in_ = X.shape[1]
            self.cluster_centers_ = self._init_centers(X, np.random.default_rng(self.seed))
            self._sums = np.zeros((self.n_clusters, X.shape[1]))
            self.counts_ = np.zeros(self.n_clusters, np.int64)
            self.prices_ = np.zeros(self.n_clusters, np.float32)
            self.inertia_ = 0.0
            self.inertia_history_ = []
            self.solve_stats_ = None
        elif not hasattr(self, "_sums"):  # fitted by fit() or loaded: continue from its counts
            self._sums = self.cluster_centers_.astype(np.float64) * self.counts_[:, None]
        labels, prices = self._assign_chunk(X, self._centers_like(X), self.prices_)
        s, c, cost = self._update(X, labels, self.cluster_centers_)
        self.inertia_history_.append(self._sq_norm_sum(X) + cost)
        self.inertia_ = float(sum(self.inertia_history_))
        self._sums += s
        self.counts_ = self.counts_ + c
        seen = self.counts_ > 0
        self.cluster_centers_ = self.cluster_centers_.copy()
        self.cluster_centers_[seen] = (self._sums[seen] / self.counts_[seen, None]).astype(np.float32)
        self.prices_ = ops.to_numpy(prices).astype(np.float32)
        self.n_iter_ = len(self.inertia_history_)
        return self

    def predict(self, X, balanced: bool = False):
        """Cluster of every point: nearest centre, or with ``balanced=True`` the nearest centre
        after adding the stored prices (one pass; keeps sizes near N/K on similar data)."""
        self._check_fitted()
        X = self._prepare(X)
        labels, _ = ops.assign(X, self._centers_like(X), bias=self.prices_ if balanced else None)
        return labels

    def fit_predict(self, X, y=None):
        return self.fit(X).labels_

    def transform(self, X):
        """Squared distances to every centre: float32 (N, K)."""
        self._check_fitted()
        X = self._prepare(X)
        return ops.pairwise_sqdist(X, self._centers_like(X))

    def score(self, X) -> float:
        """Opposite of the nearest-centre objective on X (scikit-learn convention)."""
        self._check_fitted()
        X = self._prepare(X)
        _, d = ops.assign(X, self._centers_like(X))
        return -float(ops.to_numpy(d).astype(np.float64).sum())

    # ---------------------------------------------------------------------------------------
    # construction from given centres

    @classmethod
    def from_centers(cls, centers, *, prices=None, counts=None, balanced: bool = True, **params) -> "BalancedKMeans":
        """A fitted estimator whose centres are ``centers`` (K, D), e.g. the mean embeddings of given
        groups. prices: (K,) for ``predict(balanced=True)`` (default zeros); counts: (K,) points
        behind each centre (default zeros; ``partial_fit`` continues from them); ``params`` are
        the other constructor arguments. No fit has run: ``inertia_`` 0, ``n_iter_`` 0."""
        c = np.array(ops.to_numpy(centers), dtype=np.float32)  # (K, D), a copy
        if c.ndim != 2 or c.shape[0] < 1 or c.shape[1] < 1:
            raise ValueError(f"centers: expected a non-empty 2-D array (K, D), got shape {c.shape}")
        if not np.isfinite(c).all():
            raise ValueError("centers contains NaN or Inf")
        k = c.shape[0]
        model = cls(k, balanced=balanced, **params)
        model.cluster_centers_ = c
        model.prices_ = _per_cluster(prices, k, "prices", np.float32, 0.0)
        model.counts_ = _per_cluster(counts, k, "counts", np.int64, 0)
        if (model.counts_ < 0).any():
            raise ValueError("counts must be >= 0")
        model.n_features_in_ = c.shape[1]
        model.inertia_, model.n_iter_, model.inertia_history_, model.solve_stats_ = 0.0, 0, [], None
        return model

    def with_center(self, center, *, count: int = 0, price: float = 0.0) -> "BalancedKMeans":
        """A new estimator with one more centre (index K): ``center`` (D,), the ``count`` points behind
        it and its ``price``. The other centres, prices, counts and parameters are kept; this one
        is unchanged."""
        self._check_fitted()
        c = np.asarray(ops.to_numpy(center), dtype=np.float32).reshape(-1)
        if c.shape != (self.n_features_in_,):
            raise ValueError(f"center: expected shape ({self.n_features_in_},), got {np.shape(center)}")
        params = {"max_iter": self.max_iter, "tol": self.tol, "seed": self.seed, "device": self.device,
                  "max_size_ratio": self.max_size_ratio}
        if isinstance(self.init, str):
            params["init"] = self.init
        return type(self).from_centers(
            np.vstack([self.cluster_centers_, c[None]]), balanced=self.balanced,
            prices=np.append(self.prices_, np.float32(price)), counts=np.append(self.counts_, np.int64(count)),
            **params)

    # ---------------------------------------------------------------------------------------
    # persistence: safetensors + JSON, never pickle

    def save(self, path) -> Path:
        """Write ``path/kmeans.safetensors`` (centres, prices, counts) and ``path/kmeans.json``."""
        self._check_fitted()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {
            "cluster_centers": np.ascontiguousarray(self.cluster_centers_, np.float32),
            "prices": np.ascontiguousarray(self.prices_, np.float32),
            "counts": np.ascontiguousarray(self.counts_, np.int64),
        }
        meta = {
            "format": _FORMAT,
            "params": {"n_clusters": self.n_clusters, "balanced": self.balanced, "max_iter": self.max_iter,
                       "tol": self.tol, "init": self.init if isinstance(self.init, str) else "array",
                       "seed": self.seed, "max_size_ratio": self.max_size_ratio},
            "n_features_in": int(self.n_features_in_),
            "inertia": float(self.inertia_),
            "n_iter": int(self.n_iter_),
            "inertia_history": [float(v) for v in self.inertia_history_],
        }
        atomic_save_safetensors(path / "kmeans.safetensors", tensors)
        atomic_write_json(path / "kmeans.json", meta)
        return path

    @classmethod
    def load(cls, path, device: str = "cpu") -> "BalancedKMeans":
        """Read a model written by save()."""
        from safetensors.numpy import load_file

        path = Path(path)
        for name in ("kmeans.json", "kmeans.safetensors"):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path / name} not found (expected a directory written by BalancedKMeans.save)")
        meta = json.loads((path / "kmeans.json").read_text())
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{path / 'kmeans.json'}: not a {_FORMAT} file (format={meta.get('format')!r})")
        params = dict(meta["params"])
        if params.get("init") == "array":
            params["init"] = "k-means++"
        model = cls(device=device, **params)
        t = load_file(str(path / "kmeans.safetensors"))
        model.cluster_centers_ = t["cluster_centers"]
        model.prices_ = t["prices"]
        model.counts_ = t["counts"]
        model.n_features_in_ = int(meta["n_features_in"])
        model.inertia_ = float(meta["inertia"])
        model.n_iter_ = int(meta["n_iter"])
        model.inertia_history_ = list(meta["inertia_history"])
        model.solve_stats_ = None
        if model.cluster_centers_.shape != (model.n_clusters, model.n_features_in_):
            raise ValueError(f"{path}: cluster_centers has shape {model.cluster_centers_.shape}, "
                             f"expected ({model.n_clusters}, {model.n_features_in_})")
        for name in ("cluster_centers", "prices"):
            if not np.isfinite(t[name]).all():
                raise ValueError(f"{path / 'kmeans.safetensors'}: {name} holds NaN or Inf (a damaged router): "
                                 "fit it again with `cbtm cluster fit`")
        return model

    def __repr__(self) -> str:
        return (f"BalancedKMeans(n_clusters={self.n_clusters}, balanced={self.balanced}, "
                f"max_size_ratio={self.max_size_ratio}, max_iter={self.max_iter}, tol={self.tol}, seed={self.seed}, "
                f"device={self.device!r})")


def capacity(n: int, k: int, max_size_ratio: float = 1.0) -> int:
    """Most of n points one of k clusters may hold: max(ceil(n / k), floor(max_size_ratio * n / k))."""
    return max(-(-n // k), math.floor(max_size_ratio * n / k))


def _per_cluster(v, k: int, name: str, dtype, default) -> np.ndarray:
    """A (k,) array of dtype from v (default when None), finite, shape checked."""
    a = np.full(k, default, dtype) if v is None else np.array(ops.to_numpy(v)).reshape(-1)
    if a.shape != (k,):
        raise ValueError(f"{name}: expected shape ({k},), got {a.shape}")
    if not np.isfinite(a.astype(np.float64)).all():
        raise ValueError(f"{name} contains NaN or Inf")
    if dtype is np.int64 and not np.array_equal(a, np.round(a)):
        raise ValueError(f"{name} must be integers")
    return a.astype(dtype)


def _means(sums: np.ndarray, counts: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """New centres sums / counts: float32 (K, D); a cluster without points keeps its centre."""
    return np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], centers).astype(np.float32)
