"""BalancedKMeans built from given centres (from_centers, with_center) and its solve statistics."""
import numpy as np
import pytest

from cbtm import BalancedKMeans, ops


@pytest.fixture
def rng():
    return np.random.default_rng(3)


def test_from_centers_predicts_and_round_trips(tmp_path, rng):
    c = rng.standard_normal((4, 6)).astype(np.float32)
    x = rng.standard_normal((300, 6)).astype(np.float32)
    km = BalancedKMeans.from_centers(c, counts=np.array([3, 0, 5, 1]), balanced=False, seed=7)
    assert (km.n_clusters, km.n_features_in_, km.balanced, km.seed) == (4, 6, False, 7)
    np.testing.assert_array_equal(km.cluster_centers_, c)
    assert km.cluster_centers_ is not c  # a copy: the caller's array is not aliased
    np.testing.assert_array_equal(km.prices_, np.zeros(4, np.float32))
    np.testing.assert_array_equal(km.counts_, [3, 0, 5, 1])
    assert km.counts_.dtype == np.int64 and km.prices_.dtype == np.float32
    np.testing.assert_array_equal(km.predict(x), ops.assign(x, c)[0])
    p = np.array([0, 1, 0, 2], np.float32)
    priced = BalancedKMeans.from_centers(c, prices=p)
    np.testing.assert_array_equal(priced.predict(x, balanced=True), ops.assign(x, c, bias=p)[0])
    back = BalancedKMeans.load(km.save(tmp_path / "r"))
    np.testing.assert_array_equal(back.cluster_centers_, c)
    np.testing.assert_array_equal(back.counts_, km.counts_)
    assert back.balanced is False


def test_from_centers_then_partial_fit_continues_from_counts(rng):
    c = np.array([[0.0, 0.0], [10.0, 10.0]], np.float32)
    km = BalancedKMeans.from_centers(c, counts=[1, 1], balanced=False)
    km.partial_fit(np.array([[2.0, 0.0]], np.float32))
    np.testing.assert_allclose(km.cluster_centers_[0], [1.0, 0.0])
    np.testing.assert_array_equal(km.counts_, [2, 1])


def test_with_center_returns_a_new_estimator(rng):
    c = rng.standard_normal((3, 5)).astype(np.float32)
    km = BalancedKMeans.from_centers(c, prices=[0, 0.5, 0], counts=[4, 5, 6], balanced=False, max_iter=7)
    new = km.with_center(np.ones(5, np.float32), count=9)
    assert new is not km and km.n_clusters == 3 and km.cluster_centers_.shape == (3, 5)
    assert new.n_clusters == 4 and (new.balanced, new.max_iter) == (False, 7)
    np.testing.assert_array_equal(new.cluster_centers_[:3], c)
    np.testing.assert_array_equal(new.cluster_centers_[3], np.ones(5))
    np.testing.assert_array_equal(new.prices_, np.array([0, 0.5, 0, 0], np.float32))
    np.testing.assert_array_equal(new.counts_, [4, 5, 6, 9])
    x = np.ones((2, 5), np.float32)
    np.testing.assert_array_equal(new.predict(x), [3, 3])


@pytest.mark.parametrize("bad,match", [
    (dict(centers=np.zeros((0, 3))), "centers"),
    (dict(centers=np.zeros(3)), "centers"),
    (dict(centers=np.array([[0.0, np.nan]])), "NaN"),
    (dict(prices=np.zeros(3)), "prices"),
    (dict(prices=[0.0, np.inf]), "prices"),
    (dict(counts=[1, 2, 3]), "counts"),
    (dict(counts=[1, -1]), "counts"),
    (dict(counts=[1.5, 2]), "counts"),
])
def test_from_centers_bad_input(bad, match):
    args = {"centers": np.zeros((2, 3), np.float32), **bad}
    with pytest.raises(ValueError, match=match):
        BalancedKMeans.from_centers(args.pop("centers"), **args)


def test_with_center_bad_shape(rng):
    km = BalancedKMeans.from_centers(rng.standard_normal((2, 3)))
    with pytest.raises(ValueError, match=r"center: expected shape \(3,\)"):
        km.with_center(np.zeros(4))
    with pytest.raises(RuntimeError, match="not fitted"):
        BalancedKMeans(2).with_center(np.zeros(3))


def test_solve_stats_on_the_estimator(rng):
    x = rng.standard_normal((2000, 4)).astype(np.float32)
    km = BalancedKMeans(5, max_iter=3).fit(x)
    assert km.solve_stats_["effective_passes"] >= 1 and set(km.solve_stats_) == {
        "effective_passes", "rounds", "augments", "cached"}
    assert BalancedKMeans(5, balanced=False, max_iter=3).fit(x).solve_stats_ is None
    chunked = BalancedKMeans(5, max_iter=2).fit([x[:1000], x[1000:]])
    assert chunked.solve_stats_["effective_passes"] >= 1
