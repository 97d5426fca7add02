"""Memory safety at the kernels' boundary: any finite input either works or raises a ValueError
naming the argument; the process never aborts (the balanced solver once corrupted the heap on
centres whose squares overflow float32)."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from cbtm import _C, ops

CASES = [(1e19, 200, 5, 4, 0), (1e19, 5000, 8, 16, 1), (3e19, 5000, 8, 16, 2), (1e25, 1000, 4, 4, 5),
         (1e19, 20000, 32, 100, 4)]


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("scale,n,k,d,seed", CASES)
def test_balanced_assign_huge_centres_raise_cleanly(scale, n, k, d, seed):
    """Centres >= 1e19 used to abort the process (free(): invalid size); now a ValueError naming them."""
    out = _run(f"""
        import numpy as np
        from cbtm import ops
        rng = np.random.default_rng({seed})
        x = rng.standard_normal(({n}, {d})).astype(np.float32)
        c = (rng.standard_normal(({k}, {d})) * {scale}).astype(np.float32)
        for op in (ops.balanced_assign, ops.assign, ops.pairwise_sqdist):
            try:
                op(x, c)
                print("no error")
            except ValueError as e:
                print("ValueError:", e)
    """)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert len(lines) == 3 and all(line.startswith("ValueError: centers") and "overflow" in line for line in lines), lines


@pytest.mark.parametrize("op", [ops.assign, ops.pairwise_sqdist, ops.balanced_assign], ids=lambda f: f.__name__)
@pytest.mark.parametrize("kind", ["np32", "np16", "t32"])
def test_overflowing_centres_name_the_argument(op, kind):
    """assign and pairwise_sqdist used to return inf distances and label 0 without an error."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 3)).astype(np.float32)
    c = rng.standard_normal((4, 3)).astype(np.float32)
    c[2] = [1e19, 0, 0] if kind != "np16" else [6e4, 6e4, 6e4]
    if kind == "np16":  # float16 cannot hold a value that large: its largest finite squares are fine
        op(x.astype(np.float16), c.astype(np.float16))
        return
    cc = torch.from_numpy(c) if kind == "t32" else c
    xx = torch.from_numpy(x) if kind == "t32" else x
    with pytest.raises(ValueError, match=r"centers: .*squared norm.*overflow"):
        op(xx, cc)


def test_kernel_boundary_checks_centres_itself():
    """The C++ boundary refuses overflowing centres even when called without cbtm.ops' checks."""
    x = np.ones((10, 2), np.float32)
    c = np.array([[0, 0], [3e19, 0]], np.float32)
    with pytest.raises(ValueError, match=r"centers: row 1 .*overflow"):
        _C.assign(x, c, None, np.empty(10, np.int64), np.empty(10, np.float32))
    with pytest.raises(ValueError, match=r"centers: row 1"):
        _C.balanced_assign(x, c, 5, np.zeros(2, np.float32), False, np.empty(10, np.int64))


@pytest.mark.parametrize("where", ["x", "centers"])
def test_points_near_the_norm_limit_give_finite_results(where):
    """Just under the limit every op works and every distance is finite; just over it, a clear error."""
    rng = np.random.default_rng(1)
    n, k, d = 3000, 6, 5
    x = rng.standard_normal((n, d)).astype(np.float32)
    c = rng.standard_normal((k, d)).astype(np.float32)
    for a in (x, c):  # every squared norm at 0.98 of the limit
        a /= np.linalg.norm(a, axis=1, keepdims=True)
        a *= np.float32(np.sqrt(ops.NORM_LIMIT) * 0.99)
    big = x if where == "x" else c
    dist = ops.pairwise_sqdist(x, c)
    assert np.isfinite(dist).all() and (dist >= 0).all()
    labels, sq = ops.assign(x, c)
    assert np.isfinite(sq).all() and labels.min() >= 0 and labels.max() < k
    labels, prices = ops.balanced_assign(x, c)
    assert np.bincount(labels, minlength=k).max() <= -(-n // k) and np.isfinite(prices).all()
    big *= np.float32(1.1)
    with pytest.raises(ValueError, match=f"{where}.*overflow"):
        ops.pairwise_sqdist(x, c)


def test_balanced_assign_finite_inputs_of_any_scale_never_crash():
    """Mixed scales (1e-30 .. 6e18) in one instance, in a subprocess: valid labels or a clean error."""
    out = _run("""
        import numpy as np
        from cbtm import ops
        for seed in range(12):
            rng = np.random.default_rng(seed)
            n, k, d = int(rng.integers(50, 4000)), int(rng.integers(2, 40)), int(rng.integers(1, 20))
            scales = 10.0 ** rng.uniform(-30, 18, size=(n, 1))
            x = (rng.standard_normal((n, d)) * scales).astype(np.float32)
            c = x[rng.choice(n, k, replace=False)] * np.float32(1.01)
            try:
                labels, prices = ops.balanced_assign(x, c)
            except ValueError as e:
                print("error", e)
                continue
            assert labels.min() >= 0 and labels.max() < k and np.isfinite(prices).all()
            assert np.bincount(labels, minlength=k).max() <= -(-n // k)
            print("ok")
    """)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("ok") + out.stdout.count("error") == 12, out.stdout
    assert "ok" in out.stdout
