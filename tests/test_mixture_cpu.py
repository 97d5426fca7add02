"""The C++ mixture kernel that CPU float32 / bfloat16 logits run (``cbtm.ops.weighted_logsumexp`` and
``weighted_logsumexp_rows``) against the float64 reference of ``cbtm.kernels.mixture``: shapes, layouts,
dropped experts, special values, every instruction set, bad input."""
import math

import pytest
import torch

from cbtm import ops
from cbtm.kernels import mixture as mx

NEG_INF = float("-inf")


@pytest.fixture(autouse=True)
def cpp_mixture(monkeypatch):
    """CPU tensors take the C++ kernel only outside the Triton interpreter (which the test suite
    switches on for the Triton kernels' tests)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _logits(B, V, k, dtype, layout, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    if layout == "stacked":
        return (scale * torch.randn(k, B, V, generator=g)).to(dtype)
    if layout == "strided":  # every other row of a wider buffer, offset by one column
        return [(scale * torch.randn(2 * B, V + 3, generator=g)).to(dtype)[::2, 1:V + 1] for _ in range(k)]
    return [(scale * torch.randn(B, V, generator=g)).to(dtype) for _ in range(k)]


def _log_weights(B, k, seed, drop=0.3):
    g = torch.Generator().manual_seed(seed + 1)
    lw = torch.log_softmax(2 * torch.randn(B, k, generator=g), dim=1)
    dropped = torch.rand(B, k, generator=g) < drop
    dropped[torch.arange(B), torch.randint(k, (B,), generator=g)] = False
    lw[dropped] = NEG_INF
    return lw


def _check(got, want, tol=2e-5):
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got == NEG_INF, want == NEG_INF)
    finite = want.isfinite()
    assert (got.double() - want)[finite].abs().max() <= tol if finite.any() else True


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("layout", ["list", "stacked", "strided"])
@pytest.mark.parametrize("B,V,k", [(1, 1, 1), (3, 7, 2), (5, 16, 3), (4, 33, 2), (64, 8192, 2), (2, 50272, 4),
                                   (6, 100, 8), (3, 40, 16)])
def test_matches_float64_reference(B, V, k, layout, dtype):
    """Awkward widths (not a multiple of a vector: the scalar tail), k = 1 (a shifted log-softmax), 2 (its
    own path) and more, 16 experts (the most the mixture takes), about 30% of the weights dropped."""
    logits = _logits(B, V, k, dtype, layout, seed=B * V + k)
    lw = _log_weights(B, k, seed=k)
    _check(ops.weighted_logsumexp(logits, lw), mx.weighted_logsumexp_ref(logits, lw))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_special_values(k):
    """-inf logits (a masked vocabulary) stay -inf where every expert has -inf; a row whose weights are all
    -inf is -inf; a dropped expert's row is never read (NaN there changes nothing); NaN in a used row
    makes that row NaN, as the reference does; logits of 1e4 do not overflow."""
    B, V = 5, 37
    logits = _logits(B, V, k, torch.float32, "list", seed=k)
    for x in logits:
        x[:, 30:] = NEG_INF
    logits[0][1, 3] = NEG_INF
    logits[-1][4] += 1e4
    lw = torch.log_softmax(torch.randn(B, k, generator=torch.Generator().manual_seed(k)), 1)
    lw[2] = NEG_INF
    if k > 1:
        lw[3, 1] = NEG_INF
        logits[1][3] = float("nan")  # dropped in row 3: never read
    logits[0][0, 5] = float("nan")  # used in row 0: NaN row
    got = ops.weighted_logsumexp(logits, lw)
    _check(got, mx.weighted_logsumexp_ref(logits, lw), tol=2e-3)  # float32 logits of 1e4 are 1e-3 apart
    assert (got[2] == NEG_INF).all() and got[0].isnan().all() and not got[3].isnan().any()


def test_rows_of_one_table_equal_the_gathered_mixture():
    """``weighted_logsumexp_rows`` reads rows of one table in place; a row index is checked only where it
    is used (a dropped expert's index may be anything)."""
    g = torch.Generator().manual_seed(0)
    table = 3 * torch.randn(10, 300, generator=g)
    idx = torch.randint(0, 10, (3, 6), generator=g)
    lw = _log_weights(6, 3, seed=4)
    lw[1, 2] = NEG_INF
    idx[2, 1] = 99  # dropped: never read
    want = mx.weighted_logsumexp_ref([table[i.clamp(max=9)] for i in idx], lw)
    _check(ops.weighted_logsumexp_rows(table, idx, lw), want)
    idx[0, 0] = 10  # used: out of the table
    with pytest.raises(ValueError, match="outside table 0"):
        ops.weighted_logsumexp_rows(table, idx, lw)


def test_cpu_float_logits_take_the_cpp_kernel(monkeypatch):
    def unused(*a, **k):
        raise AssertionError("the PyTorch path ran")

    monkeypatch.setattr(mx, "weighted_logsumexp", unused)
    logits, lw = _logits(2, 9, 2, torch.float32, "list", seed=1), _log_weights(2, 2, seed=1)
    _check(ops.weighted_logsumexp(logits, lw), mx.weighted_logsumexp_ref(logits, lw))
    with pytest.raises(AssertionError, match="PyTorch path"):  # float64 logits keep the reference
        ops.weighted_logsumexp([x.double() for x in logits], lw)


def test_every_instruction_set(worst_on_every_isa):
    """Each micro-kernel this CPU can run against the float64 reference."""
    code = ("import torch; from cbtm import ops; from cbtm.kernels import mixture as mx\n"
            "g = torch.Generator().manual_seed(0); worst = 0.0\n"
            "for B, V, k in [(7, 8195, 2), (3, 77, 5), (2, 5, 1)]:\n"
            "    xs = [3 * torch.randn(B, V, generator=g) for _ in range(k)]\n"
            "    lw = torch.log_softmax(torch.randn(B, k, generator=g), 1)\n"
            "    worst = max(worst, float((ops.weighted_logsumexp(xs, lw).double() - "
            "mx.weighted_logsumexp_ref(xs, lw)).abs().max()))\n")
    for isa, worst in worst_on_every_isa(code, TRITON_INTERPRET="0").items():
        assert worst <= 2e-5, (isa, worst)


@pytest.mark.parametrize("case,match", [
    ("nan_weight", "NaN or \\+inf"), ("inf_weight", "NaN or \\+inf"), ("shapes", "must have shape"),
    ("dtypes", "share one dtype"), ("rows_shape", "table \\(M, V\\), idx \\(k, B\\)"), ("rows_idx", "integers")])
def test_bad_input(case, match):
    logits, lw = _logits(3, 8, 2, torch.float32, "list", seed=2), _log_weights(3, 2, seed=2, drop=0)
    table, idx = torch.randn(4, 8), torch.zeros(2, 3, dtype=torch.long)
    call = lambda: ops.weighted_logsumexp(logits, lw)  # noqa: E731
    if case == "nan_weight":
        lw[1, 0] = math.nan
    elif case == "inf_weight":
        call = lambda: ops.weighted_logsumexp_rows(table, idx, lw.index_fill(1, torch.tensor([1]), math.inf))  # noqa: E731
    elif case == "shapes":
        lw = lw[:, :1]
    elif case == "dtypes":
        logits[1] = logits[1].bfloat16()
    elif case == "rows_shape":
        call = lambda: ops.weighted_logsumexp_rows(table, idx[:1], lw)  # noqa: E731
    elif case == "rows_idx":
        call = lambda: ops.weighted_logsumexp_rows(table, idx.float(), lw)  # noqa: E731
    with pytest.raises((ValueError, TypeError), match=match):
        call()
