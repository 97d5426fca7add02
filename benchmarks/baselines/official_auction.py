"""Re-implementation of the official C-BTM balanced k-means (the baseline to beat).

C-BTM (kernelmachine/cbtm, ``metaseq/scripts/train_clusterer.py``) clusters with
``kmeans_pytorch.KMeans(balanced=True)`` from kernelmachine/balanced-kmeans. Each k-means
iteration there builds the full N x K squared-distance matrix (broadcast, subtract, square,
sum; done here in blocks of 2,000 rows as later versions of that file do, to bound memory),
runs ``auction_lap(-distances)`` to get a balanced assignment, then moves every centre to the
mean of its points. This module re-implements those three pieces with the same algorithm and
constants; the code is written anew.

The auction (the balanced-assignment routine of BASE layers): clusters are the bidders and
points the goods; each point carries a price. Every round, each cluster bids on its
``N // K`` best-valued points (value = score - price) with increment
``value - value_of_its_(N//K + 1)th_best + eps``; each point goes to its highest bidder and
its price rises by that bid. A cluster that won a point sees it at its un-priced score next
round (so it stays in its top set) and, for the first 100 rounds, re-bids ``eps`` on it.
The auction stops once every point received a bid. ``eps = (max - min score) / 50``
(clamped to >= 1e-4): a coarse bid step, so the result is only eps-optimal. When
``K * (N // K) < N`` some points can never be bid for; after round 1000 those get an
``eps`` bid in row 0 (cluster 0 takes them), so such inputs cost more than 1000 rounds and
overfill cluster 0. Benchmarks therefore use N divisible by K.
"""
import time

import numpy as np
import torch

CHUNK = 2000  # rows per block of the distance matrix
RETAIN_ROUNDS = 100  # rounds during which last round's winners re-bid eps
FALLBACK_ROUNDS = 1000  # after this many rounds, un-bid points are given to cluster 0


@torch.no_grad()
def pairwise_sqdist(x, centers):
    """N x K squared Euclidean distances, computed like the official code (broadcast, chunked)."""
    out = [((x[i:i + CHUNK, None, :] - centers[None]) ** 2).sum(-1) for i in range(0, len(x), CHUNK)]
    return torch.cat(out)


@torch.no_grad()
def auction_lap(scores):
    """Balanced assignment maximising ``scores`` (N x K); returns (labels int64[N], rounds)."""
    eps = ((scores.max() - scores.min()) / 50).clamp_min(1e-4)
    score = scores.t().contiguous()  # K x N: clusters bid for points
    n_clusters, n = score.shape
    per = n // n_clusters
    value = score.clone()
    bids = torch.zeros_like(score)
    price = torch.zeros(1, n, dtype=score.dtype, device=score.device)
    won = unbid = None
    rounds = 0
    while True:
        top_val, top_idx = value.topk(per + 1, dim=1)
        bids.zero_()
        bids.scatter_(1, top_idx[:, :-1], top_val[:, :-1] - top_val[:, -1:] + eps)
        if rounds < RETAIN_ROUNDS and won is not None:
            bids.view(-1)[won] = eps
        if rounds > FALLBACK_ROUNDS:
            bids.view(-1)[unbid] = eps  # flat index < n: row 0, i.e. cluster 0
        has_bid = (bids > 0).any(0)
        points = has_bid.nonzero().squeeze(1)
        unbid = (~has_bid).nonzero().squeeze(1)
        high, winner = bids[:, points].max(0)
        if len(points) == n:
            return winner, rounds
        price[:, points] += high
        value = score - price
        won = winner * n + points
        value.view(-1)[won] = score.view(-1)[won]
        rounds += 1


@torch.no_grad()
def balanced_assign(x, centers):
    """Official balanced assignment of points to fixed centres: (labels, auction rounds)."""
    return auction_lap(-pairwise_sqdist(x, centers))


@torch.no_grad()
def fit(x, n_clusters, iters=20, tol=1e-3, seed=0, max_seconds=None):
    """Official balanced k-means loop; returns (centers, labels, iterations run).

    Initial centres are ``n_clusters`` distinct random points (as in the official
    ``initialize``). Each iteration: auction assignment, then centre = mean of its points (an
    empty cluster takes a random point). Stops when (sum of centre shifts)^2 < tol, or after
    ``iters`` iterations. The returned labels are those of the last assignment step.
    ``max_seconds`` (not in the official code) is a benchmark budget: stop after the iteration
    that exceeds it.
    """
    start = time.perf_counter()
    gen = np.random.default_rng(seed)
    x = x.float()
    centers = x[torch.from_numpy(gen.choice(len(x), n_clusters, replace=False))].clone()
    for it in range(1, iters + 1):
        labels, _ = balanced_assign(x, centers)
        prev = centers.clone()
        for j in range(n_clusters):
            members = x.index_select(0, (labels == j).nonzero().view(-1))
            if len(members) == 0:
                members = x[gen.integers(len(x))][None]
            centers[j] = members.mean(0)
        if (centers - prev).norm(dim=1).sum() ** 2 < tol:
            break
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            break
    return centers, labels, it
