"""cbtm.ops against the references beside them (assign_ref, pairwise_sqdist_ref, centroid_update_ref,
balanced_assign_ref) and against the LP dual of the balanced assignment problem."""
import math

import numpy as np
import pytest
import torch

from cbtm import ops

EPS32 = 2.0 ** -23

# --------------------------------------------------------------------------------------------
# helpers

KINDS = ["np32", "np16", "t32", "t16", "tbf16"]


def make(a32: np.ndarray, kind: str):
    """a32 (float32 numpy) in the requested framework and dtype."""
    a32 = np.ascontiguousarray(a32, np.float32)
    if kind == "np32":
        return a32
    if kind == "np16":
        return a32.astype(np.float16)
    t = torch.from_numpy(a32.copy())
    return {"t32": t, "t16": t.half(), "tbf16": t.bfloat16()}[kind]


def f64(a) -> np.ndarray:
    """The exact values of an input array as float64 numpy."""
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().double().numpy()
    return np.asarray(a, np.float64)


def np_(a) -> np.ndarray:
    return ops.to_numpy(a)


def d64(x, c) -> np.ndarray:
    """Exact (float64) squared distances of the input values, (N, K)."""
    x, c = f64(x), f64(c)
    return ((x[:, None, :] - c[None, :, :]) ** 2).sum(-1)


def d64_big(x, c) -> np.ndarray:
    """float64 squared distances by the norm expansion (accurate enough in float64; for large N)."""
    x, c = f64(x), f64(c)
    return np.maximum((x * x).sum(1)[:, None] + (c * c).sum(1)[None, :] - 2.0 * x @ c.T, 0.0)


def dist_tol(x, c) -> np.ndarray:
    """Error bound of float32 distances computed as |x|^2 + |c|^2 - 2 x.c: (N, K)."""
    x, c = f64(x), f64(c)
    d = x.shape[1]
    scale = (x * x).sum(1)[:, None] + (c * c).sum(1)[None, :]
    return (d + 4) * EPS32 * scale + 1e-30


def check_labels_up_to_ties(got, x, c, bias=None):
    """got[i] is the reference label, or one whose (biased) distance is within tolerance of the best."""
    got = np_(got)
    ref = np_(ops.assign_ref(x, c, bias)[0])
    d = d64(x, c)
    tol = dist_tol(x, c)
    score = d + (0.0 if bias is None else f64(bias).reshape(1, -1))
    n = len(got)
    assert got.min() >= 0 and got.max() < c.shape[0]
    best = score[np.arange(n), ref]
    bad = got != ref
    # a label differing from the reference must be (near) tied with the reference's best
    slack = score[np.arange(n), got] - best
    allowed = tol[np.arange(n), got] + tol[np.arange(n), ref]
    if bias is not None:
        allowed = allowed + 4 * EPS32 * np.abs(score).max(1)
    assert np.all(slack[bad] <= allowed[bad]), (
        f"{bad.sum()} labels differ from the reference beyond ties: max slack {np.max(slack[bad] - allowed[bad])}")
    return ref


def grid_data(rng, n, d, k, scale=1.0, offset=0.0):
    x = (rng.standard_normal((n, d)) * scale + offset).astype(np.float32)
    c = (rng.standard_normal((k, d)) * scale + offset).astype(np.float32)
    return x, c


# (N, D, K): non-powers of two, D=1, K=1, K=N, N=1, K>16 not a multiple of 16, N % 8 != 0, larger N
SHAPES = [
    (1, 1, 1), (1, 5, 3), (7, 1, 1), (8, 3, 16), (9, 3, 17), (15, 2, 15), (17, 4, 17), (33, 1, 33),
    (64, 8, 16), (100, 7, 33), (257, 31, 48), (513, 64, 100), (3001, 37, 67), (2049, 130, 5),
    (50, 3, 1000), (23, 1000, 20),
]


# --------------------------------------------------------------------------------------------
# assign / pairwise_sqdist


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,d,k", SHAPES)
def test_pairwise_sqdist_matches_ref(rng, n, d, k, kind):
    x32, c32 = grid_data(rng, n, d, k)
    x, c = make(x32, kind), make(c32, kind)
    out = ops.pairwise_sqdist(x, c)
    ref = ops.pairwise_sqdist_ref(x, c)
    if kind.startswith("t"):
        assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.device.type == "cpu"
    else:
        assert isinstance(out, np.ndarray) and out.dtype == np.float32
    assert tuple(out.shape) == (n, k)
    got, want = np_(out).astype(np.float64), np_(ref).astype(np.float64)
    assert np.all(got >= 0)
    # reference is float64 rounded to float32: add its own rounding to the kernel's error bound
    np.testing.assert_array_less(np.abs(got - want), dist_tol(x, c) + 2 * EPS32 * want)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,d,k", SHAPES)
def test_assign_matches_ref(rng, n, d, k, kind):
    x32, c32 = grid_data(rng, n, d, k)
    x, c = make(x32, kind), make(c32, kind)
    labels, sq = ops.assign(x, c)
    if kind.startswith("t"):
        assert isinstance(labels, torch.Tensor) and labels.dtype == torch.int64
        assert isinstance(sq, torch.Tensor) and sq.dtype == torch.float32
    else:
        assert isinstance(labels, np.ndarray) and labels.dtype == np.int64
        assert isinstance(sq, np.ndarray) and sq.dtype == np.float32
    assert tuple(labels.shape) == (n,) and tuple(sq.shape) == (n,)
    check_labels_up_to_ties(labels, x, c)
    lab = np_(labels)
    dd = d64(x, c)[np.arange(n), lab]
    tol = dist_tol(x, c)[np.arange(n), lab]
    np.testing.assert_array_less(np.abs(np_(sq).astype(np.float64) - dd), tol + 2 * EPS32 * dd)


@pytest.mark.parametrize("scale,offset", [(1e-3, 0.0), (1e3, 0.0), (1.0, 30.0), (0.05, -4.0)])
def test_assign_data_scale(rng, scale, offset):
    """Tolerances scale with |x|^2 + |c|^2: large offsets (cancellation) and tiny/huge scales."""
    x, c = grid_data(rng, 777, 19, 41, scale, offset)
    labels, sq = ops.assign(x, c)
    check_labels_up_to_ties(labels, x, c)
    out = ops.pairwise_sqdist(x, c)
    want = d64(x, c)
    np.testing.assert_array_less(np.abs(out - want), dist_tol(x, c) + 2 * EPS32 * want)


def test_half_precision_conversion_exact():
    """Every finite float16 value (normals, subnormals, +-0, +-65504) and a wide range of bfloat16 values:
    the squared distance to the origin is exact in float32 (x^2 of an 11- / 8-bit mantissa)."""
    bits = np.arange(1 << 16, dtype=np.uint16)
    h = bits.view(np.float16)
    h = h[np.isfinite(h)][:, None]
    out = ops.pairwise_sqdist(h, np.zeros((1, 1), np.float16))
    np.testing.assert_array_equal(out[:, 0], (h[:, 0].astype(np.float64) ** 2).astype(np.float32))
    b = torch.from_numpy(bits.view(np.int16).copy()).view(torch.bfloat16)
    b = b[torch.isfinite(b) & ((b.float().abs() < 1e18) & (b.float().abs() > 1e-18) | (b.float() == 0))][:, None]
    out = ops.pairwise_sqdist(b, torch.zeros((1, 1), dtype=torch.bfloat16))
    want = (b.double() ** 2).float()
    assert torch.equal(out, want)
    # and as centres: distance of the origin to every value
    out = ops.pairwise_sqdist(np.zeros((1, 1), np.float16), h[::7])
    np.testing.assert_array_equal(out[0], (h[::7, 0].astype(np.float64) ** 2).astype(np.float32))


def test_assign_well_separated_exact(rng):
    """Points near distinct centres (no near ties): labels must equal the reference exactly."""
    c = rng.standard_normal((45, 12)).astype(np.float32) * 10
    truth = rng.integers(0, 45, 1003)
    x = (c[truth] + 0.01 * rng.standard_normal((1003, 12))).astype(np.float32)
    labels, _ = ops.assign(x, c)
    np.testing.assert_array_equal(labels, truth)
    np.testing.assert_array_equal(labels, ops.assign_ref(x, c)[0])


@pytest.mark.parametrize("kind", ["np32", "np16", "t32", "tbf16"])
@pytest.mark.parametrize("n,d,k", [(1, 3, 1), (50, 4, 7), (301, 9, 35), (1000, 16, 16)])
def test_assign_bias(rng, n, d, k, kind):
    """assign(..., bias) = argmin_k (d_ik + bias_k)."""
    x32, c32 = grid_data(rng, n, d, k)
    x, c = make(x32, kind), make(c32, kind)
    bias = (rng.random(k) * 3.0).astype(np.float32)
    for b in (bias, bias.astype(np.float64), list(map(float, bias)), torch.from_numpy(bias)):
        labels, sq = ops.assign(x, c, bias=b)
        check_labels_up_to_ties(labels, x, c, bias=bias)
        lab = np_(labels)
        dd = d64(x, c)[np.arange(n), lab]
        np.testing.assert_allclose(np_(sq), dd, rtol=1e-5, atol=float(dist_tol(x, c).max()))
    # a huge bias on every cluster but one forces that cluster
    forced = np.full(k, 1e6, np.float32)
    forced[k // 2] = 0
    assert np.all(np_(ops.assign(x, c, bias=forced)[0]) == k // 2)


# --------------------------------------------------------------------------------------------
# strided / special inputs


VIEWS = {
    "cols_step2": lambda b, t: b[:61, ::2],
    "rows_step3": lambda b, t: b[::3, :13],
    "both": lambda b, t: b[::3, ::2],
    "transposed": lambda b, t: t.T,
    "offset": lambda b, t: b[5:66, 3:16],
    "fortran": lambda b, t: np.asfortranarray(b[:61, :13]),
    "reversed_rows": lambda b, t: b[:61, :13][::-1],
    "reversed_cols": lambda b, t: b[:61, :13][:, ::-1],
}
TORCH_VIEWS = ["cols_step2", "rows_step3", "both", "transposed", "offset"]


@pytest.mark.parametrize("name", list(VIEWS))
@pytest.mark.parametrize("kind", KINDS)
def test_strided_inputs(rng, name, kind):
    """Non-contiguous views give the same result as their contiguous copies (and the reference)."""
    if kind.startswith("t") and name not in TORCH_VIEWS:
        pytest.skip("torch has no negative strides / fortran arrays")
    base32 = rng.standard_normal((3 * 61, 2 * 13)).astype(np.float32)
    xt32 = rng.standard_normal((13, 61)).astype(np.float32)
    cbase32 = rng.standard_normal((2 * 19, 3 * 13)).astype(np.float32)
    base, xt, cbase = make(base32, kind), make(xt32, kind), make(cbase32, kind)
    x = VIEWS[name](base, xt)
    c = cbase[::2, ::3]  # strided centres too (K = 19 > 16, not a multiple of 16)
    if isinstance(x, torch.Tensor):
        assert not x.is_contiguous() or name == "offset"
        xc, cc = x.contiguous(), c.contiguous()
    else:
        xc, cc = np.ascontiguousarray(x), np.ascontiguousarray(c)
    assert tuple(x.shape) == (61, 13)
    lab, sq = ops.assign(x, c)
    lab_c, sq_c = ops.assign(xc, cc)
    np.testing.assert_array_equal(np_(lab), np_(lab_c))
    np.testing.assert_array_equal(np_(sq), np_(sq_c))
    np.testing.assert_array_equal(np_(ops.pairwise_sqdist(x, c)), np_(ops.pairwise_sqdist(xc, cc)))
    check_labels_up_to_ties(lab, xc, cc)
    s, n = ops.centroid_update(x, lab, 19)
    s_c, n_c = ops.centroid_update(xc, lab_c, 19)
    np.testing.assert_array_equal(np_(n), np_(n_c))
    np.testing.assert_allclose(np_(s), np_(s_c), rtol=1e-12, atol=1e-12)
    bl, bp = ops.balanced_assign(x, c)
    bl_c, bp_c = ops.balanced_assign(xc, cc)
    assert ops.total_cost(x, c, bl) == pytest.approx(ops.total_cost(xc, cc, bl_c), rel=1e-9)


def test_torch_strided_slices(rng):
    base = torch.from_numpy(rng.standard_normal((90, 40)).astype(np.float32))
    c = torch.from_numpy(rng.standard_normal((21, 20)).astype(np.float32))
    for x in (base[:, ::2], base[::3, 5:25], base[1:, :20][::2], base.t()[:20].t()[:, :20]):
        assert not x.is_contiguous()
        lab, sq = ops.assign(x, c)
        lab_c, sq_c = ops.assign(x.contiguous(), c)
        assert torch.equal(lab, lab_c) and torch.equal(sq, sq_c)
        check_labels_up_to_ties(lab, x.contiguous(), c)


def test_single_column_view_and_broadcast_rows(rng):
    base = rng.standard_normal((40, 6)).astype(np.float32)
    c = rng.standard_normal((5, 1)).astype(np.float32)
    x = base[:, 2:3]  # (N, 1) with row stride 6
    lab, _ = ops.assign(x, c)
    np.testing.assert_array_equal(lab, ops.assign(np.ascontiguousarray(x), c)[0])
    check_labels_up_to_ties(lab, np.ascontiguousarray(x), c)
    xb = np.broadcast_to(base[:1], (9, 6))  # zero row stride, read-only
    cb = rng.standard_normal((4, 6)).astype(np.float32)
    lab, sq = ops.assign(xb, cb)
    assert np.all(lab == lab[0]) and np.all(sq == sq[0])
    check_labels_up_to_ties(lab, np.ascontiguousarray(xb), cb)


def test_readonly_numpy_inputs(rng):
    x, c = grid_data(rng, 203, 11, 18)
    xr, cr = x.copy(), c.copy()
    xr.flags.writeable = False
    cr.flags.writeable = False
    np.testing.assert_array_equal(ops.assign(xr, cr)[0], ops.assign(x, c)[0])
    np.testing.assert_array_equal(ops.pairwise_sqdist(xr, cr), ops.pairwise_sqdist(x, c))
    lab = ops.assign(x, c)[0]
    labr = lab.copy()
    labr.flags.writeable = False
    s1, n1 = ops.centroid_update(xr, labr, 18)
    s2, n2 = ops.centroid_update(x, lab, 18)
    np.testing.assert_array_equal(s1, s2)
    np.testing.assert_array_equal(n1, n2)
    b1, p1 = ops.balanced_assign(xr, cr)
    b2, p2 = ops.balanced_assign(x, c)
    assert ops.total_cost(x, c, b1) == pytest.approx(ops.total_cost(x, c, b2), rel=1e-9)
    pr = p2.copy()
    pr.flags.writeable = False
    np.testing.assert_array_equal(ops.assign(xr, cr, bias=pr)[0], ops.assign(x, c, bias=p2)[0])
    p3 = ops.balanced_assign(xr, cr, prices=pr)[1]
    assert np.all(np.isfinite(p3))


def test_torch_requires_grad_and_inputs_untouched(rng):
    x32, c32 = grid_data(rng, 129, 7, 20)
    x = torch.from_numpy(x32.copy()).requires_grad_(True)
    c = torch.from_numpy(c32.copy()).requires_grad_(True)
    lab, sq = ops.assign(x, c)
    assert not lab.requires_grad and not sq.requires_grad
    out = ops.pairwise_sqdist(x, c)
    assert out.dtype == torch.float32 and not out.requires_grad
    s, n = ops.centroid_update(x, lab, 20)
    assert s.dtype == torch.float64 and n.dtype == torch.int64
    bl, bp = ops.balanced_assign(x, c)
    assert bl.dtype == torch.int64 and bp.dtype == torch.float32 and tuple(bp.shape) == (20,)
    np.testing.assert_array_equal(np_(lab), ops.assign(x32, c32)[0])
    # inputs are not modified
    np.testing.assert_array_equal(x.detach().numpy(), x32)
    np.testing.assert_array_equal(c.detach().numpy(), c32)


def test_numpy_inputs_untouched(rng):
    x, c = grid_data(rng, 500, 6, 23)
    x0, c0 = x.copy(), c.copy()
    ops.assign(x, c)
    ops.pairwise_sqdist(x, c)
    lab, p = ops.balanced_assign(x, c, capacity=25)
    ops.centroid_update(x, lab, 23)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(c, c0)


# --------------------------------------------------------------------------------------------
# centroid_update


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,d,k", [(1, 1, 1), (1, 4, 5), (9, 3, 17), (100, 7, 3), (1001, 33, 40), (5000, 64, 7)])
def test_centroid_update_matches_ref(rng, n, d, k, kind):
    x32 = (rng.standard_normal((n, d)) * 3 + 1).astype(np.float32)
    x = make(x32, kind)
    labels = rng.integers(0, max(1, k - 1), n)  # the last cluster stays empty when k > 1
    lab = torch.from_numpy(labels) if kind.startswith("t") else labels
    sums, counts = ops.centroid_update(x, lab, k)
    ref_s, ref_c = ops.centroid_update_ref(x, lab, k)
    if kind.startswith("t"):
        assert isinstance(sums, torch.Tensor) and sums.dtype == torch.float64
        assert isinstance(counts, torch.Tensor) and counts.dtype == torch.int64
    else:
        assert sums.dtype == np.float64 and counts.dtype == np.int64
    assert tuple(sums.shape) == (k, d) and tuple(counts.shape) == (k,)
    np.testing.assert_array_equal(np_(counts), np_(ref_c))
    assert int(np_(counts).sum()) == n
    # float64 sums of float32 values: exact to 1e-9 of the sum of magnitudes
    mag = np.zeros((k, d))
    np.add.at(mag, labels, np.abs(f64(x)))
    assert np.all(np.abs(np_(sums) - np_(ref_s)) <= 1e-9 * mag + 1e-300)
    if k > 1:
        assert np.all(np_(sums)[k - 1] == 0) and np_(counts)[k - 1] == 0


def test_centroid_update_label_dtypes(rng):
    x = rng.standard_normal((64, 5)).astype(np.float32)
    lab = rng.integers(0, 6, 64)
    ref = ops.centroid_update(x, lab, 6)
    for other in (lab.astype(np.int32), lab.astype(np.uint8), list(lab), lab[::-1].copy()[::-1]):
        s, n = ops.centroid_update(x, other, 6)
        np.testing.assert_array_equal(n, ref[1])
        np.testing.assert_allclose(s, ref[0], rtol=1e-12)
    strided = np.repeat(lab, 2)[::2]
    s, n = ops.centroid_update(x, strided, 6)
    np.testing.assert_array_equal(n, ref[1])


# --------------------------------------------------------------------------------------------
# balanced_assign: exactness against scipy and the LP dual


def _check_balanced(x, c, cap, labels, prices, ref_cost=None):
    """Capacity, optimal cost (against scipy), dual feasibility of the returned prices, duality gap."""
    n, k = x.shape[0], c.shape[0]
    lab, p = np_(labels).astype(np.int64), np_(prices).astype(np.float64)
    assert lab.shape == (n,) and p.shape == (k,)
    assert lab.min() >= 0 and lab.max() < k
    counts = np.bincount(lab, minlength=k)
    assert counts.max() <= cap, f"capacity {cap} exceeded: {counts.max()}"
    assert np.all(np.isfinite(p)) and p.min() >= 0 and p.min() == 0, p
    d = d64(x, c) if n * k * x.shape[1] < 3e6 else d64_big(x, c)
    tol = dist_tol(x, c).max(1) * 2 + 8 * EPS32 * (p.max() + 1e-30)
    score = d + p[None, :]
    # dual feasibility: every point at argmin_k (d_ik + p_k)
    slack = score[np.arange(n), lab] - score.min(1)
    assert np.all(slack <= tol), f"point not at its argmin: slack {slack.max()} > tol {tol[np.argmax(slack)]}"
    # complementary slackness: clusters that are not full hold dummies, so their price is the minimum
    under = counts < cap
    assert np.all(p[under] <= 8 * EPS32 * (p.max() + d.max()) + 1e-30), (p[under], counts[under])
    cost = ops.total_cost(x, c, labels)
    if ref_cost is not None:
        assert cost >= ref_cost - 1e-9 * max(ref_cost, 1.0) - 1e-12
        assert cost <= ref_cost * (1 + 1e-5) + 1e-6 * float(tol.mean()), (cost, ref_cost)
    # weak duality: for any prices, this is a lower bound on the optimum
    dual = score.min(1).sum() - cap * p.sum() + (k * cap - n) * p.min()
    assert dual <= cost * (1 + 1e-9) + 1e-9
    # duality gap: zero up to the float32 distance errors that the dual feasibility check allows
    assert cost - dual <= 1e-6 * cost + float(np.minimum(slack.clip(0), tol).sum()) + 1e-12, (cost, dual)
    return cost


def _instance(rng, n, k, d, mode):
    if mode == "uniform":
        x = rng.random((n, d))
        c = rng.random((k, d))
    elif mode == "clustered":  # few tight blobs of unequal weights: the capacity binds hard
        m = int(rng.integers(1, 5))
        blobs = rng.standard_normal((m, d)) * 5
        w = rng.dirichlet(np.ones(m) * 0.5)
        x = blobs[rng.choice(m, n, p=w)] + 0.3 * rng.standard_normal((n, d))
        c = x[rng.choice(n, k, replace=False)] + 0.1 * rng.standard_normal((k, d))
    elif mode == "dup_points":  # many identical points
        rows = rng.standard_normal((max(1, n // 7), d))
        x = rows[rng.integers(0, len(rows), n)]
        c = rng.standard_normal((k, d))
    elif mode == "dup_centers":  # identical centres: exact ties between clusters
        x = rng.standard_normal((n, d))
        u = rng.standard_normal((max(1, k // 3), d))
        c = u[np.arange(k) % len(u)]
    elif mode == "grid":  # small integers: many exactly equal distances
        x = rng.integers(0, 3, (n, d)).astype(float)
        c = rng.integers(0, 3, (k, d)).astype(float)
    elif mode == "same":  # all points identical: every assignment is optimal
        x = np.repeat(rng.standard_normal((1, d)), n, 0)
        c = rng.standard_normal((k, d))
    else:
        raise ValueError(mode)
    return x.astype(np.float32), c.astype(np.float32)


MODES = ["uniform", "clustered", "dup_points", "dup_centers", "grid", "same"]


def _random_cases(count):
    r = np.random.default_rng(12345)
    cases = []
    for s in range(count):
        n = int(r.integers(1, 301))
        k = int(r.integers(1, min(n, 40) + 1))
        cap_mode = ["default", "default", "plus1", "plus", "n"][s % 5]
        mode = MODES[s % len(MODES)]
        d = int(r.choice([1, 2, 3, 5, 8, 17]))
        cases.append((s, n, k, d, cap_mode, mode))
    return cases


def _cap(n, k, cap_mode, rng):
    base = -(-n // k)
    return {"default": None, "plus1": base + 1, "plus": base + int(rng.integers(2, 20)), "n": n,
            "exact": base}[cap_mode]


FIXED = [  # (n, k, d, cap_mode, mode): divisible and not, K = 1, K = N, tiny
    (1, 1, 1, "default", "uniform"), (2, 2, 1, "default", "uniform"), (2, 1, 3, "default", "uniform"),
    (5, 2, 2, "default", "same"), (16, 16, 4, "default", "uniform"), (16, 16, 4, "default", "dup_points"),
    (17, 4, 3, "default", "clustered"), (60, 6, 2, "default", "clustered"), (61, 6, 2, "default", "clustered"),
    (60, 6, 2, "exact", "grid"), (100, 7, 5, "plus1", "dup_centers"), (128, 16, 8, "default", "uniform"),
    (200, 40, 3, "default", "clustered"), (300, 40, 8, "default", "uniform"), (300, 17, 2, "n", "clustered"),
    (257, 33, 5, "default", "dup_centers"), (300, 30, 4, "default", "same"), (299, 37, 6, "plus", "grid"),
    (300, 2, 2, "default", "clustered"), (300, 3, 1, "default", "dup_points"),
]


@pytest.mark.parametrize("s,n,k,d,cap_mode,mode", _random_cases(36))
def test_balanced_assign_exact_random(s, n, k, d, cap_mode, mode):
    rng = np.random.default_rng(s)
    x, c = _instance(rng, n, k, d, mode)
    capacity = _cap(n, k, cap_mode, rng)
    labels, prices = ops.balanced_assign(x, c, capacity=capacity)
    assert labels.dtype == np.int64 and prices.dtype == np.float32
    ref_labels, ref_cost = ops.balanced_assign_ref(x, c, capacity=capacity)
    cap = -(-n // k) if capacity is None else capacity
    _check_balanced(x, c, cap, labels, prices, ref_cost)


@pytest.mark.parametrize("n,k,d,cap_mode,mode", FIXED)
def test_balanced_assign_exact_fixed(rng, n, k, d, cap_mode, mode):
    x, c = _instance(rng, n, k, d, mode)
    capacity = _cap(n, k, cap_mode, rng)
    labels, prices = ops.balanced_assign(x, c, capacity=capacity)
    _, ref_cost = ops.balanced_assign_ref(x, c, capacity=capacity)
    cap = -(-n // k) if capacity is None else capacity
    cost = _check_balanced(x, c, cap, labels, prices, ref_cost)
    if cap >= n:  # no constraint: nearest centre
        assert cost == pytest.approx(float(d64(x, c).min(1).sum()), rel=1e-6, abs=1e-9)
    if n % k == 0 and cap == n // k:
        np.testing.assert_array_equal(np.bincount(labels, minlength=k), np.full(k, n // k))
    # the prices reproduce the labels (up to ties) through the fused assign
    check_labels_up_to_ties(ops.assign(x, c, bias=prices)[0], x, c, bias=prices)


@pytest.mark.parametrize("kind", ["np16", "t32", "t16", "tbf16"])
def test_balanced_assign_dtypes(rng, kind):
    x32, c32 = _instance(rng, 211, 13, 6, "clustered")
    x, c = make(x32, kind), make(c32, kind)
    labels, prices = ops.balanced_assign(x, c)
    if kind.startswith("t"):
        assert isinstance(labels, torch.Tensor) and labels.dtype == torch.int64
        assert isinstance(prices, torch.Tensor) and prices.dtype == torch.float32
    else:
        assert labels.dtype == np.int64 and prices.dtype == np.float32
    _, ref_cost = ops.balanced_assign_ref(x, c)  # on the same (reduced precision) values
    _check_balanced(x, c, -(-211 // 13), labels, prices, ref_cost)


@pytest.mark.parametrize("seed", range(6))
def test_balanced_assign_warm_start(seed):
    rng = np.random.default_rng(100 + seed)
    n, k = int(rng.integers(50, 300)), int(rng.integers(2, 30))
    x, c = _instance(rng, n, k, 4, ["uniform", "clustered"][seed % 2])
    capacity = None if seed < 4 else -(-n // k) + 3
    cap = -(-n // k) if capacity is None else capacity
    _, p0 = ops.balanced_assign(x, c, capacity=capacity)
    c2 = (c + 1e-2 * rng.standard_normal(c.shape)).astype(np.float32)
    _, ref_cost = ops.balanced_assign_ref(x, c2, capacity=capacity)
    p_in = p0.copy()
    labels, p1 = ops.balanced_assign(x, c2, capacity=capacity, prices=p0)
    np.testing.assert_array_equal(p0, p_in)  # the caller's prices are not modified
    _check_balanced(x, c2, cap, labels, p1, ref_cost)
    cold = ops.total_cost(x, c2, ops.balanced_assign(x, c2, capacity=capacity)[0])
    assert ops.total_cost(x, c2, labels) == pytest.approx(cold, rel=1e-6)
    # any finite starting prices, even far from optimal or negative, still give the optimum
    for bad in (rng.random(k).astype(np.float32) * 50, -rng.random(k).astype(np.float32) * 5):
        labels, p2 = ops.balanced_assign(x, c2, capacity=capacity, prices=bad)
        _check_balanced(x, c2, cap, labels, p2, ref_cost)


@pytest.mark.parametrize("case", ["capacity_n", "capacity_x3", "identical_points", "duplicated_centers"])
def test_balanced_assign_degenerate_instances_stay_cheap(rng, case):
    """Spare capacity (K * cap - N empty slots) and exact ties (identical points, identical centres,
    common with duplicated documents) must not cost one shortest-path augmentation per point or slot
    (each augmentation is O(K^2) plus member-list rebuilds: the solve becomes quadratic in N).
    With capacity = N there is no constraint at all: nearest-centre labels are optimal at price 0."""
    n, k = 2000, 20
    x = rng.standard_normal((n, 4)).astype(np.float32)
    c = rng.standard_normal((k, 4)).astype(np.float32)
    cap = -(-n // k)
    if case == "capacity_n":
        cap = n
    elif case == "capacity_x3":
        cap = 3 * cap
    elif case == "identical_points":
        x[:] = x[0]
    else:
        c = np.repeat(c[: k // 4], 4, axis=0)
    labels, prices, stats = ops.balanced_assign(x, c, capacity=cap, return_stats=True)
    _check_balanced(x, c, cap, labels, prices)
    if case == "capacity_n":
        assert np.all(prices == 0)
        check_labels_up_to_ties(labels, x, c)
    assert stats["augments"] <= n // 4, stats


@pytest.mark.parametrize("mode,extra", [("uniform", 0), ("clustered", 0), ("clustered", 57), ("dup_points", 0)])
def test_balanced_assign_large_dual_certificate(mode, extra):
    """N = 20,000, D = 16, K = 32: too large for scipy; the returned prices certify optimality."""
    rng = np.random.default_rng(7 + extra)
    n, k, d = 20_000, 32, 16
    x, c = _instance(rng, n, k, d, mode)
    cap = -(-n // k) + extra
    labels, prices, stats = ops.balanced_assign(x, c, capacity=None if extra == 0 else cap, return_stats=True)
    lab, p = labels.astype(np.int64), prices.astype(np.float64)
    counts = np.bincount(lab, minlength=k)
    assert counts.max() <= cap
    assert p.min() == 0
    dd = d64_big(x, c)
    primal = ops.total_cost(x, c, labels)
    score = dd + p[None, :]
    dual = score.min(1).sum() - cap * p.sum() + (k * cap - n) * p.min()
    assert dual <= primal * (1 + 1e-9)  # weak duality (sanity of the identity)
    assert primal - dual <= 1e-6 * primal, (primal, dual, (primal - dual) / primal)
    # and the constraint matters here: plain nearest-centre assignment is cheaper but over capacity
    plain = dd.min(1).sum()
    assert plain <= primal * (1 + 1e-9)
    assert stats["effective_passes"] > 0


def test_balanced_assign_stats_returned_and_last_solve_stats_deprecated(rng):
    """Statistics come back with the solve; the deprecated last_solve_stats() warns and reports the
    calling thread's last solve only (another thread's solve does not leak in)."""
    import threading

    x, c = grid_data(rng, 500, 4, 5)
    out = ops.balanced_assign(x, c)
    assert len(out) == 2
    labels, prices, stats = ops.balanced_assign(x, c, return_stats=True)
    assert set(stats) == {"effective_passes", "rounds", "augments", "cached"}
    assert stats["effective_passes"] >= 1
    np.testing.assert_array_equal(labels, out[0])
    seen = {}
    thread = threading.Thread(target=lambda: seen.update(
        before=_last_stats_quietly(), after=(ops.balanced_assign(x[:50], c), _last_stats_quietly())[1]))
    thread.start()
    thread.join()
    assert seen["before"] == {} and seen["after"]["effective_passes"] >= 1
    with pytest.warns(DeprecationWarning, match="return_stats"):
        assert ops.last_solve_stats() == stats


def _last_stats_quietly():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return ops.last_solve_stats()


def test_balanced_assign_prices_keep_new_data_balanced(rng):
    """The prices from a large sample keep nearest-centre-plus-price sizes near N/K on new data."""
    k = 10
    c = rng.standard_normal((k, 5)).astype(np.float32)
    c[0] *= 0.1  # one centre in the dense middle attracts most points without prices
    x = rng.standard_normal((20_000, 5)).astype(np.float32)
    _, p = ops.balanced_assign(x, c)
    fresh = rng.standard_normal((20_000, 5)).astype(np.float32)
    plain = np.bincount(ops.assign(fresh, c)[0], minlength=k)
    priced = np.bincount(ops.assign(fresh, c, bias=p)[0], minlength=k)
    assert plain.max() > 1.3 * 2000  # the test data really is unbalanced without prices
    assert priced.max() <= 1.1 * 2000 and priced.min() >= 0.9 * 2000, priced


# --------------------------------------------------------------------------------------------
# bad input


def _raises(exc, match, fn, *a, **kw):
    with pytest.raises(exc, match=match):
        fn(*a, **kw)


X = np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32)
C = X[:5].copy()
PAIR_OPS = [ops.assign, ops.pairwise_sqdist, ops.balanced_assign]


@pytest.mark.parametrize("op", PAIR_OPS, ids=lambda f: f.__name__)
def test_bad_dtypes(op):
    _raises(TypeError, r"float64.*astype", op, X.astype(np.float64), C)
    _raises(TypeError, r"float64", op, X, C.astype(np.float64))
    _raises(TypeError, r"dtype", op, X.astype(np.int32), C)
    _raises(TypeError, r"dtype", op, X, C.astype(np.int64))
    _raises(TypeError, r"dtype", op, torch.from_numpy(X).double(), torch.from_numpy(C))
    _raises(TypeError, r"dtype", op, torch.from_numpy(X), torch.from_numpy(C).to(torch.int32))
    _raises(TypeError, r"numpy array or a torch tensor", op, X.tolist(), C)
    _raises(TypeError, r"both", op, X, torch.from_numpy(C))
    _raises(TypeError, r"both", op, torch.from_numpy(X), C)


@pytest.mark.parametrize("op", PAIR_OPS, ids=lambda f: f.__name__)
def test_bad_shapes(op):
    _raises(ValueError, r"2-D", op, X[:, 0], C)
    _raises(ValueError, r"2-D", op, X, C[0])
    _raises(ValueError, r"2-D", op, X[None], C)
    _raises(ValueError, r"empty", op, X[:0], C)
    _raises(ValueError, r"empty", op, X, C[:0])
    _raises(ValueError, r"zero columns", op, X[:, :0], C[:, :0])
    _raises(ValueError, r"columns", op, X, C[:, :3])
    _raises(ValueError, r"columns", op, torch.from_numpy(X), torch.from_numpy(C[:, :3]))


@pytest.mark.parametrize("op", PAIR_OPS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["x", "centers"])
@pytest.mark.parametrize("kind", ["np32", "np16", "t32", "tbf16"])
def test_non_finite(op, bad, where, kind):
    x, c = X.copy(), C.copy()
    (x if where == "x" else c)[3 % (len(x) if where == "x" else len(c)), 2] = bad
    _raises(ValueError, r"NaN or Inf", op, make(x, kind), make(c, kind))


def test_overflowing_points():
    """Finite values whose square overflows float32 cannot give meaningful distances."""
    x = X.copy()
    x[7, 1] = 1e30
    for op in PAIR_OPS:
        _raises(ValueError, r"NaN or Inf|overflow", op, x, C)


def test_balanced_bad_capacity():
    _raises(ValueError, r"more clusters than points", ops.balanced_assign, X[:4], C)
    _raises(ValueError, r"cannot hold", ops.balanced_assign, X, C, capacity=3)
    _raises(ValueError, r"positive integer", ops.balanced_assign, X, C, capacity=0)
    _raises(ValueError, r"positive integer", ops.balanced_assign, X, C, capacity=-4)
    _raises(ValueError, r"positive integer", ops.balanced_assign, X, C, capacity=4.5)
    _raises(ValueError, r"more clusters than points", ops.balanced_assign_ref, X[:4], C)
    _raises(ValueError, r"prices", ops.balanced_assign, X, C, prices=np.zeros(4, np.float32))
    _raises(ValueError, r"prices", ops.balanced_assign, X, C, prices=np.array([0, 1, np.nan, 0, 0], np.float32))
    # integral floats are accepted
    labels, _ = ops.balanced_assign(X, C, capacity=4.0)
    assert np.bincount(labels, minlength=5).max() <= 4


def test_bias_bad():
    _raises(ValueError, r"bias", ops.assign, X, C, bias=np.zeros(4, np.float32))
    _raises(ValueError, r"bias", ops.assign, X, C, bias=np.zeros((5, 2), np.float32))
    _raises(ValueError, r"bias", ops.assign, X, C, bias=np.array([0, np.nan, 0, 0, 0], np.float32))
    _raises(ValueError, r"bias", ops.assign, X, C, bias=np.array([0, np.inf, 0, 0, 0], np.float32))


def test_centroid_update_bad():
    lab = np.zeros(20, np.int64)
    _raises(ValueError, r"\[0, 5\)", ops.centroid_update, X, np.full(20, 5), 5)
    _raises(ValueError, r"\[0, 5\)", ops.centroid_update, X, np.full(20, -1), 5)
    _raises(ValueError, r"shape", ops.centroid_update, X, lab[:19], 5)
    _raises(ValueError, r"shape", ops.centroid_update, X, lab[:, None], 5)
    _raises(ValueError, r"n_clusters", ops.centroid_update, X, lab, 0)
    _raises(TypeError, r"float64", ops.centroid_update, X.astype(np.float64), lab, 5)
    _raises(ValueError, r"2-D", ops.centroid_update, X[0], lab[:1], 5)
    _raises(ValueError, r"empty", ops.centroid_update, X[:0], lab[:0], 5)
    _raises(TypeError, r"torch tensor", ops.centroid_update, torch.from_numpy(X), lab, 5)
    _raises(ValueError, r"\[0, 5\)", ops.centroid_update, torch.from_numpy(X), torch.full((20,), 7), 5)


# --------------------------------------------------------------------------------------------
# CUDA: the same comparisons, CUDA tensors against the CPU kernels


@pytest.mark.gpu
class TestCuda:
    dev = "cuda"

    def _pair(self, rng, n, d, k, dt=torch.float32):
        x32, c32 = grid_data(rng, n, d, k)
        xc = torch.from_numpy(x32).to(dt)
        cc = torch.from_numpy(c32).to(dt)
        return xc, cc, xc.to(self.dev), cc.to(self.dev)

    @pytest.mark.parametrize("dt", [torch.float32, torch.float16, torch.bfloat16])
    @pytest.mark.parametrize("n,d,k", SHAPES)
    def test_assign_and_pairwise(self, rng, n, d, k, dt):
        xc, cc, xg, cg = self._pair(rng, n, d, k, dt)
        lab, sq = ops.assign(xg, cg)
        assert lab.is_cuda and sq.is_cuda and lab.dtype == torch.int64 and sq.dtype == torch.float32
        check_labels_up_to_ties(lab.cpu(), xc, cc)
        lab_cpu = ops.assign(xc, cc)[0]
        # identical to the CPU kernel except at ties
        diff = (lab.cpu() != lab_cpu).numpy()
        dd = d64(xc, cc)
        tol = dist_tol(xc, cc)
        i = np.flatnonzero(diff)
        assert np.all(np.abs(dd[i, lab.cpu().numpy()[i]] - dd[i, lab_cpu.numpy()[i]])
                      <= tol[i, lab.cpu().numpy()[i]] + tol[i, lab_cpu.numpy()[i]])
        out = ops.pairwise_sqdist(xg, cg)
        assert out.is_cuda and out.dtype == torch.float32 and tuple(out.shape) == (n, k)
        np.testing.assert_array_less(np.abs(out.cpu().double().numpy() - dd), tol + 2 * EPS32 * dd)

    def test_assign_bias(self, rng):
        xc, cc, xg, cg = self._pair(rng, 1001, 9, 37)
        bias = torch.rand(37) * 2
        lab, _ = ops.assign(xg, cg, bias=bias.to(self.dev))
        check_labels_up_to_ties(lab.cpu(), xc, cc, bias=bias.numpy())

    def test_strided(self, rng):
        base = torch.from_numpy(rng.standard_normal((300, 40)).astype(np.float32)).to(self.dev)
        c = torch.from_numpy(rng.standard_normal((19, 20)).astype(np.float32)).to(self.dev)
        for x in (base[:, ::2], base[::3, :20], base.t()[:20].t()[:, :20]):
            lab, sq = ops.assign(x, c)
            lab2, sq2 = ops.assign(x.contiguous(), c)
            assert torch.equal(lab, lab2)
            torch.testing.assert_close(sq, sq2)

    @pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16])
    def test_centroid_update(self, rng, dt):
        xc = torch.from_numpy(rng.standard_normal((5000, 33)).astype(np.float32)).to(dt)
        lab = torch.from_numpy(rng.integers(0, 40, 5000))
        s, n = ops.centroid_update(xc.to(self.dev), lab.to(self.dev), 41)
        assert s.is_cuda and s.dtype == torch.float64 and n.dtype == torch.int64
        rs, rn = ops.centroid_update_ref(xc, lab, 41)
        assert torch.equal(n.cpu(), rn)
        mag = torch.zeros(41, 33, dtype=torch.float64).index_add_(0, lab, xc.double().abs())
        assert bool(((s.cpu() - rs).abs() <= 1e-9 * mag + 1e-300).all())

    @pytest.mark.parametrize("seed", range(8))
    def test_balanced_small(self, seed):
        rng = np.random.default_rng(seed)
        n, k = int(rng.integers(10, 300)), int(rng.integers(1, 40))
        k = min(k, n)
        x, c = _instance(rng, n, k, 5, MODES[seed % len(MODES)])
        xg, cg = torch.from_numpy(x).to(self.dev), torch.from_numpy(c).to(self.dev)
        labels, prices = ops.balanced_assign(xg, cg)
        assert labels.is_cuda and prices.is_cuda
        _, ref_cost = ops.balanced_assign_ref(x, c)
        _check_balanced(x, c, -(-n // k), labels.cpu(), prices.cpu(), ref_cost)
        cpu_cost = ops.total_cost(x, c, ops.balanced_assign(x, c)[0])
        assert ops.total_cost(xg, cg, labels) == pytest.approx(cpu_cost, rel=1e-6)

    def test_balanced_large(self, rng):
        x, c = _instance(rng, 20_000, 32, 16, "clustered")
        xg, cg = torch.from_numpy(x).to(self.dev), torch.from_numpy(c).to(self.dev)
        labels, prices = ops.balanced_assign(xg, cg)
        p0 = prices.clone()
        _check_balanced(x, c, 625, labels.cpu(), prices.cpu())
        cpu_cost = ops.total_cost(x, c, ops.balanced_assign(x, c)[0])
        assert ops.total_cost(xg, cg, labels) == pytest.approx(cpu_cost, rel=1e-6)
        c2 = cg + 1e-3 * torch.randn_like(cg)
        lab2, _ = ops.balanced_assign(xg, c2, prices=p0)
        cold = ops.balanced_assign(xg, c2)[0]
        assert ops.total_cost(xg, c2, lab2) == pytest.approx(ops.total_cost(xg, c2, cold), rel=1e-6)

    def test_errors(self):
        xg = torch.from_numpy(X).to(self.dev)
        cg = torch.from_numpy(C).to(self.dev)
        _raises(ValueError, r"cpu|cuda", ops.assign, xg, torch.from_numpy(C))
        bad = xg.clone()
        bad[2, 1] = float("nan")
        _raises(ValueError, r"NaN or Inf", ops.assign, bad, cg)
        _raises(ValueError, r"NaN or Inf", ops.balanced_assign, bad, cg)
