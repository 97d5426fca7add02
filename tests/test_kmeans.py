"""cbtm.BalancedKMeans: objective, balance, agreement with scikit-learn, persistence, streaming."""
import json
import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from cbtm import BalancedKMeans, ops

EPS32 = 2.0 ** -23


def mixture(rng, n, d, m, weights=None, spread=3.0, centres=None):
    """n points from m unit Gaussians (optionally with given centres and unequal weights)."""
    cent = rng.standard_normal((m, d)) * spread if centres is None else centres
    w = np.full(m, 1.0 / m) if weights is None else np.asarray(weights, float) / np.sum(weights)
    z = rng.choice(m, n, p=w)
    return (cent[z] + rng.standard_normal((n, d))).astype(np.float32), cent


def d64(x, c):
    x, c = np.asarray(ops.to_numpy(x), np.float64), np.asarray(c, np.float64)
    return np.maximum((x * x).sum(1)[:, None] + (c * c).sum(1)[None, :] - 2.0 * x @ c.T, 0.0)


def assert_nearest_up_to_ties(labels, x, c, bias=None):
    lab = ops.to_numpy(labels)
    score = d64(x, c) + (0.0 if bias is None else np.asarray(bias, np.float64)[None, :])
    xn = (np.asarray(ops.to_numpy(x), np.float64) ** 2).sum(1)
    tol = 2 * (x.shape[1] + 4) * EPS32 * (xn + (np.asarray(c, np.float64) ** 2).sum(1).max()) + 1e-6 * np.abs(score).max(1)
    slack = score[np.arange(len(lab)), lab] - score.min(1)
    assert np.all(slack <= tol), slack.max()


def match_centres(a, b):
    """Largest distance between the centres of a and b after optimal (Hungarian) matching."""
    d = np.sqrt(d64(a, b))
    r, c = linear_sum_assignment(d)
    return float(d[r, c].max())


def balanced_cost(x, centres):
    return ops.total_cost(x, centres, ops.balanced_assign(x, centres)[0])


@pytest.fixture(scope="module")
def blobs():
    """8 equally likely, partly overlapping Gaussians in 6-D: 8000 points."""
    x, cent = mixture(np.random.default_rng(2024), 8000, 6, 8, spread=2.5)
    return x, cent


# --------------------------------------------------------------------------------------------
# objective


@pytest.mark.parametrize("balanced", [True, False])
@pytest.mark.parametrize("seed,n,d,k", [(0, 3000, 5, 10), (1, 1001, 3, 7), (2, 500, 16, 33), (3, 2000, 2, 4)])
def test_objective_never_increases(balanced, seed, n, d, k):
    rng = np.random.default_rng(seed)
    x, _ = mixture(rng, n, d, 6, weights=rng.dirichlet(np.ones(6)))
    m = BalancedKMeans(k, balanced=balanced, max_iter=25, tol=0, seed=seed).fit(x)
    h = np.asarray(m.inertia_history_)
    assert len(h) == m.n_iter_ >= 1
    assert np.all(np.diff(h) <= 1e-9 * h[:-1]), np.diff(h).max()
    assert m.inertia_ <= h[-1] * (1 + 1e-9)
    # inertia_ is the objective of labels_ under cluster_centers_
    assert m.inertia_ == pytest.approx(ops.total_cost(x, m.cluster_centers_, m.labels_), rel=1e-6)
    assert m.cluster_centers_.dtype == np.float32 and m.cluster_centers_.shape == (k, d)
    assert m.prices_.dtype == np.float32 and m.prices_.shape == (k,)


@pytest.mark.parametrize("balanced", [True, False])
def test_history_starts_at_optimal_assignment_of_init(rng, balanced):
    """inertia_history_[0] is the objective of the (exact) first assignment to the initial centres."""
    x, _ = mixture(rng, 400, 3, 5, weights=[0.5, 0.2, 0.1, 0.1, 0.1])
    init = x[rng.choice(400, 9, replace=False)] + 0.5
    m = BalancedKMeans(9, balanced=balanced, init=init, max_iter=3).fit(x)
    want = ops.balanced_assign_ref(x, init)[1] if balanced else float(d64(x, init).min(1).sum())
    assert m.inertia_history_[0] == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("balanced", [True, False])
def test_larger_k_lower_inertia(blobs, balanced):
    x, _ = blobs
    inertia = [BalancedKMeans(k, balanced=balanced, max_iter=30, seed=0).fit(x).inertia_ for k in (2, 4, 8, 16)]
    assert all(b < a for a, b in zip(inertia, inertia[1:])), inertia


@pytest.mark.parametrize("n,k", [(1000, 10), (1001, 10), (999, 7), (64, 64), (65, 64), (300, 1), (5000, 33)])
def test_balanced_sizes_within_capacity(rng, n, k):
    x, _ = mixture(rng, n, 4, 5, weights=[0.5, 0.3, 0.1, 0.05, 0.05])  # very unequal natural clusters
    m = BalancedKMeans(k, max_iter=10, seed=1).fit(x)
    counts = np.bincount(m.labels_, minlength=k)
    assert counts.sum() == n
    assert counts.max() <= math.ceil(n / k)
    np.testing.assert_array_equal(m.counts_, counts)
    if n <= 1100:  # labels_ is the exact balanced assignment of the final centres
        _, ref_cost = ops.balanced_assign_ref(x, m.cluster_centers_)
        assert m.inertia_ == pytest.approx(ref_cost, rel=1e-5)


@pytest.mark.parametrize("ratio", [1.0, 1.25, 1.5, 2.0])
@pytest.mark.parametrize("n,k", [(1000, 10), (999, 7), (65, 64), (301, 4)])
def test_size_ratio_bounds_sizes_and_is_exact(rng, ratio, n, k):
    x, _ = mixture(rng, n, 4, 5, weights=[0.5, 0.3, 0.1, 0.05, 0.05])
    m = BalancedKMeans(k, max_iter=10, seed=1, max_size_ratio=ratio).fit(x)
    cap = max(math.ceil(n / k), math.floor(ratio * n / k))
    assert m.capacity(n) == cap
    counts = np.bincount(m.labels_, minlength=k)
    assert counts.sum() == n and counts.max() <= cap
    # labels_ is the exact capacity-constrained assignment of the final centres
    _, ref_cost = ops.balanced_assign_ref(x, m.cluster_centers_, capacity=cap)
    assert m.inertia_ == pytest.approx(ref_cost, rel=1e-5)


def test_size_ratio_follows_unequal_groups(rng):
    """Three well separated groups of 50%, 30%, 20%: exact balance (k=3) must cut the largest
    group; a ratio of 1.5 (capacity 50%) lets every cluster be one group."""
    x, cent = mixture(rng, 3000, 5, 3, weights=[0.5, 0.3, 0.2], spread=12.0)
    truth = d64(x, cent).argmin(1)
    purity = {}
    for ratio in (1.0, 1.5):
        lab = BalancedKMeans(3, seed=0, max_size_ratio=ratio).fit(x).labels_
        purity[ratio] = sum(np.bincount(truth[lab == c]).max() for c in range(3)) / len(x)
    assert purity[1.5] > 0.999
    assert purity[1.0] < 0.9


def test_size_ratio_at_least_k_is_plain_lloyd(rng):
    """Capacity N: the constraint never binds, so the fit is plain k-means from the same start."""
    x, _ = mixture(rng, 1200, 6, 4, weights=[0.55, 0.25, 0.15, 0.05])
    init = x[:5].copy()
    free = BalancedKMeans(5, init=init, max_iter=30, tol=0, max_size_ratio=5.0).fit(x)
    plain = BalancedKMeans(5, balanced=False, init=init, max_iter=30, tol=0).fit(x)
    np.testing.assert_allclose(free.cluster_centers_, plain.cluster_centers_, atol=1e-5)
    assert free.inertia_ == pytest.approx(plain.inertia_, rel=1e-6)
    np.testing.assert_allclose(free.prices_, 0.0)


def test_unbalanced_matches_sklearn(rng):
    from sklearn.cluster import KMeans

    x, _ = mixture(rng, 4000, 8, 6, weights=[0.4, 0.2, 0.15, 0.1, 0.1, 0.05])
    init = x[rng.choice(len(x), 10, replace=False)].copy()
    m = BalancedKMeans(10, balanced=False, max_iter=300, tol=0, init=init).fit(x)
    sk = KMeans(10, init=init, n_init=1, max_iter=300, tol=0, algorithm="lloyd").fit(x)
    assert m.inertia_ == pytest.approx(sk.inertia_, rel=1e-4)
    # same initial centres in the same order: the same local optimum, centre by centre
    np.testing.assert_allclose(m.cluster_centers_, sk.cluster_centers_, atol=1e-3)
    assert np.mean(ops.to_numpy(m.labels_) == sk.labels_) > 0.999
    # and balanced mode from the same init is constrained: sizes capped, objective not lower
    b = BalancedKMeans(10, balanced=True, max_iter=50, init=init).fit(x)
    assert np.bincount(b.labels_, minlength=10).max() <= 400
    assert b.inertia_ >= sk.inertia_ * (1 - 1e-6)


# --------------------------------------------------------------------------------------------
# predict / transform / score


def test_predict_balanced_on_fresh_data(rng):
    w = [0.4, 0.2, 0.15, 0.1, 0.1, 0.05]
    x, cent = mixture(rng, 5000, 8, 6, weights=w)
    m = BalancedKMeans(10, max_iter=30, seed=1).fit(x)
    fresh, _ = mixture(rng, 20_000, 8, 6, weights=w, centres=cent)
    sizes = np.bincount(m.predict(fresh, balanced=True), minlength=10)
    assert sizes.max() <= 1.2 * 2000 and sizes.min() >= 0.8 * 2000, sizes
    plain = m.predict(fresh)
    assert plain.dtype == np.int64 and plain.shape == (20_000,)
    assert_nearest_up_to_ties(plain, fresh, m.cluster_centers_)
    assert_nearest_up_to_ties(m.predict(fresh, balanced=True), fresh, m.cluster_centers_, bias=m.prices_)
    # the prices matter on this data: without them the sizes drift
    assert np.bincount(plain, minlength=10).max() > 1.2 * 2000


def test_transform_and_score(rng):
    x, _ = mixture(rng, 700, 5, 4)
    m = BalancedKMeans(9, max_iter=10).fit(x)
    t = m.transform(x[:123])
    assert t.dtype == np.float32 and t.shape == (123, 9)
    ref = ops.pairwise_sqdist_ref(x[:123], m.cluster_centers_)
    np.testing.assert_allclose(t, ref, rtol=1e-5, atol=1e-4 * float(np.abs(ref).max()))
    assert m.score(x) == pytest.approx(-d64(x, m.cluster_centers_).min(1).sum(), rel=1e-5)
    with pytest.raises(ValueError, match="features"):
        m.predict(x[:, :4])
    with pytest.raises(RuntimeError, match="not fitted"):
        BalancedKMeans(3).predict(x)


# --------------------------------------------------------------------------------------------
# persistence


def test_save_load_round_trip(tmp_path, rng):
    x, _ = mixture(rng, 1500, 7, 5)
    m = BalancedKMeans(12, max_iter=8, seed=4).fit(x)
    out = m.save(tmp_path / "model")
    files = sorted(p.name for p in (tmp_path / "model").iterdir())
    assert files and all(f.endswith((".json", ".safetensors")) for f in files), files
    m2 = BalancedKMeans.load(out)
    np.testing.assert_array_equal(m2.cluster_centers_, m.cluster_centers_)
    np.testing.assert_array_equal(m2.prices_, m.prices_)
    np.testing.assert_array_equal(m2.counts_, m.counts_)
    assert m2.n_clusters == 12 and m2.balanced and m2.n_features_in_ == 7 and m2.max_size_ratio == 1.0
    assert m2.inertia_ == m.inertia_ and m2.inertia_history_ == m.inertia_history_
    fresh, _ = mixture(rng, 900, 7, 5)
    np.testing.assert_array_equal(m2.predict(fresh), m.predict(fresh))
    np.testing.assert_array_equal(m2.predict(fresh, balanced=True), m.predict(fresh, balanced=True))
    np.testing.assert_array_equal(m2.transform(fresh), m.transform(fresh))
    # init given as an array also saves (no pickle of the array)
    m3 = BalancedKMeans(3, init=x[:3], max_iter=2).fit(x)
    m3.save(tmp_path / "m3")
    np.testing.assert_array_equal(BalancedKMeans.load(tmp_path / "m3").cluster_centers_, m3.cluster_centers_)
    # the size ratio travels with the model (and its capacity with it); older files mean 1.0
    m4 = BalancedKMeans(4, max_iter=3, max_size_ratio=1.5).fit(x)
    m4.save(tmp_path / "m4")
    assert BalancedKMeans.load(tmp_path / "m4").capacity(1000) == 375
    meta = json.loads((tmp_path / "m4" / "kmeans.json").read_text())
    del meta["params"]["max_size_ratio"]
    (tmp_path / "m4" / "kmeans.json").write_text(json.dumps(meta))
    assert BalancedKMeans.load(tmp_path / "m4").capacity(1000) == 250
    with pytest.raises(FileNotFoundError):
        BalancedKMeans.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError):
        BalancedKMeans.load(tmp_path / "empty")


# --------------------------------------------------------------------------------------------
# chunks and streaming


def test_chunked_fit_unbalanced_equals_full_fit(blobs):
    """Unbalanced Lloyd over chunks accumulates exact sums: identical to a fit on the whole array."""
    x, _ = blobs
    init = x[:8].copy()
    full = BalancedKMeans(8, balanced=False, max_iter=40, tol=0, init=init).fit(x)
    chunks = [x[i:i + 1000] for i in range(0, len(x), 1000)]
    ch = BalancedKMeans(8, balanced=False, max_iter=40, tol=0, init=init).fit(chunks)
    np.testing.assert_allclose(ch.cluster_centers_, full.cluster_centers_, atol=1e-4)
    assert ch.n_iter_ == full.n_iter_
    np.testing.assert_allclose(ch.inertia_history_, full.inertia_history_, rtol=1e-6)
    assert int(np.sum(ch.counts_)) == len(x)


def test_chunked_fit_balanced_close_to_full_fit(blobs):
    x, cent = blobs
    full = BalancedKMeans(8, max_iter=40, seed=3).fit(x)
    chunks = [x[i:i + 2000] for i in range(0, len(x), 2000)]
    ch = BalancedKMeans(8, max_iter=40, seed=3).fit(chunks)
    assert int(np.sum(ch.counts_)) == len(x)
    # same objective (exact balanced assignment of all points) for both sets of centres
    assert balanced_cost(x, ch.cluster_centers_) == pytest.approx(balanced_cost(x, full.cluster_centers_), rel=0.02)
    assert match_centres(ch.cluster_centers_, full.cluster_centers_) < 0.3
    # within each chunk the balance holds
    for c in chunks:
        lab, _ = ops.balanced_assign(c, ch.cluster_centers_)
        assert np.bincount(lab, minlength=8).max() <= 250


def test_partial_fit_one_shot_generator(blobs):
    x, cent = blobs
    sizes = [1000, 1500, 700, 2300, 2495, 5]  # the last chunk is smaller than K: plain assignment
    bounds = np.cumsum([0] + sizes)
    gen = (x[a:b] for a, b in zip(bounds[:-1], bounds[1:]))
    m = BalancedKMeans(8, seed=0).fit(gen)
    assert int(np.sum(m.counts_)) == bounds[-1]
    assert len(m.inertia_history_) == len(sizes)
    assert m.inertia_ == pytest.approx(sum(m.inertia_history_))
    # every centre is the mean of the points assigned to it over the stream: near the true blobs
    assert match_centres(m.cluster_centers_, cent) < 0.5
    # continuing with partial_fit accumulates
    m.partial_fit(x[:100])
    assert int(np.sum(m.counts_)) == bounds[-1] + 100
    # partial_fit after fit() continues from fit's counts
    f = BalancedKMeans(8, max_iter=5).fit(x[:4000])
    c0 = f.cluster_centers_.copy()
    f.partial_fit(x[4000:4800])
    assert int(np.sum(f.counts_)) == 4800
    assert np.abs(f.cluster_centers_ - c0).max() < 0.5


def test_partial_fit_first_chunk_too_small():
    x = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    with pytest.raises(ValueError, match="n_clusters"):
        BalancedKMeans(6).partial_fit(x)


# --------------------------------------------------------------------------------------------
# sizes, inputs, errors


@pytest.mark.parametrize("balanced", [True, False])
@pytest.mark.parametrize("k,n", [(1, 1), (1, 5), (5, 5), (12, 12), (12, 13), (12, 24), (12, 37), (40, 41)])
def test_small_n(rng, balanced, k, n):
    x = rng.standard_normal((n, 3)).astype(np.float32)
    m = BalancedKMeans(k, balanced=balanced, seed=2).fit(x)
    counts = np.bincount(m.labels_, minlength=k)
    assert counts.sum() == n
    if balanced:
        assert counts.max() <= math.ceil(n / k)
    if n == k:  # one point per cluster: zero inertia
        assert sorted(m.labels_.tolist()) == list(range(k))
        assert m.inertia_ == pytest.approx(0.0, abs=1e-6)
    assert np.all(np.isfinite(m.cluster_centers_))
    assert m.inertia_ == pytest.approx(ops.total_cost(x, m.cluster_centers_, m.labels_), rel=1e-6, abs=1e-6)


def test_duplicate_points():
    x = np.repeat(np.random.default_rng(0).standard_normal((3, 4)), 20, 0).astype(np.float32)
    for balanced in (True, False):
        m = BalancedKMeans(6, balanced=balanced).fit(x)
        assert np.all(np.isfinite(m.cluster_centers_))
        if balanced:
            assert np.bincount(m.labels_, minlength=6).max() <= 10


def test_k_larger_than_n():
    x = np.zeros((4, 2), np.float32) + np.arange(4, dtype=np.float32)[:, None]
    for balanced in (True, False):
        with pytest.raises(ValueError, match=r"n_clusters=5.*larger.*4"):
            BalancedKMeans(5, balanced=balanced).fit(x)


def test_bad_params():
    for kw in ({"n_clusters": 0}, {"n_clusters": 2.5}, {"n_clusters": 2, "max_iter": 0},
               {"n_clusters": 2, "tol": -1.0}, {"n_clusters": 2, "init": "kmeans"},
               {"n_clusters": 2, "max_size_ratio": 0.9}, {"n_clusters": 2, "max_size_ratio": float("nan")},
               {"n_clusters": 2, "max_size_ratio": float("inf")}, {"n_clusters": 2, "max_size_ratio": True}):
        with pytest.raises(ValueError):
            BalancedKMeans(**kw)
    x = np.random.default_rng(0).standard_normal((20, 3)).astype(np.float32)
    with pytest.raises(ValueError, match="shape"):
        BalancedKMeans(4, init=x[:3]).fit(x)
    with pytest.raises(ValueError, match="2-D"):
        BalancedKMeans(2).fit(x[:, 0])


def test_float64_input_is_converted(rng):
    x, _ = mixture(rng, 1200, 5, 4)
    a = BalancedKMeans(6, max_iter=10, seed=5).fit(x.astype(np.float64))
    b = BalancedKMeans(6, max_iter=10, seed=5).fit(x)
    np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)
    np.testing.assert_array_equal(a.labels_, b.labels_)
    assert a.cluster_centers_.dtype == np.float32
    np.testing.assert_array_equal(a.predict(x.astype(np.float64)), b.predict(x))
    # and from a list of lists
    c = BalancedKMeans(6, max_iter=10, seed=5).fit(x.astype(np.float64).tolist())
    np.testing.assert_array_equal(c.cluster_centers_, b.cluster_centers_)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_torch_cpu_input(rng, dtype):
    x, _ = mixture(rng, 1500, 6, 5)
    xt = torch.from_numpy(x).to(dtype)
    xs = xt.float().numpy()  # the values the model sees (float16/bfloat16 rounding)
    mt = BalancedKMeans(7, max_iter=12, tol=0, seed=6).fit(xt)
    mn = BalancedKMeans(7, max_iter=12, tol=0, seed=6).fit(xs)
    assert isinstance(mt.labels_, torch.Tensor) and mt.labels_.dtype == torch.int64
    np.testing.assert_allclose(mt.cluster_centers_, mn.cluster_centers_, rtol=1e-5, atol=1e-5)
    assert mt.inertia_ == pytest.approx(mn.inertia_, rel=1e-6)
    p = mt.predict(xt)
    assert isinstance(p, torch.Tensor) and p.dtype == torch.int64
    np.testing.assert_array_equal(p.numpy(), mn.predict(xs))
    t = mt.transform(xt)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
    assert np.bincount(mt.labels_.numpy(), minlength=7).max() <= math.ceil(1500 / 7)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("init", ["k-means++", "random", "array"])
def test_non_finite_input_raises(bad, init):
    x = np.random.default_rng(0).standard_normal((50, 3)).astype(np.float32)
    init_ = x[:4].copy() if init == "array" else init
    x[17, 1] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        BalancedKMeans(4, init=init_).fit(x)
    with pytest.raises(ValueError, match="NaN or Inf"):
        BalancedKMeans(4, init=init_).fit(torch.from_numpy(x))
    good = BalancedKMeans(4).fit(np.nan_to_num(x, posinf=0.0))
    with pytest.raises(ValueError, match="NaN or Inf"):
        good.predict(x)


@pytest.mark.gpu
def test_cuda_device_matches_cpu(rng):
    x, _ = mixture(rng, 5000, 8, 6, weights=[0.4, 0.2, 0.15, 0.1, 0.1, 0.05])
    g = BalancedKMeans(10, max_iter=15, tol=0, seed=1, device="cuda").fit(x)
    c = BalancedKMeans(10, max_iter=15, tol=0, seed=1).fit(x)
    assert g.labels_.is_cuda
    assert np.bincount(g.labels_.cpu().numpy(), minlength=10).max() <= 500
    assert g.inertia_ == pytest.approx(c.inertia_, rel=1e-3)
    assert match_centres(g.cluster_centers_, c.cluster_centers_) < 0.1
