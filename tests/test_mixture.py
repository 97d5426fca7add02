"""The expert-mixture kernels (cbtm.kernels.mixture): Triton (interpreted on CPU) vs the references.

Without a CUDA GPU the Triton kernels run in the interpreter (TRITON_INTERPRET=1, set below before
triton can be imported), so the CPU cases are small.  ``gpu`` tests run the compiled kernels at a
real vocabulary size.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from cbtm.kernels import mixture as mx  # noqa: E402

NEG_INF = float("-inf")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LAYOUTS = ("list", "stacked", "strided")
HAS_CUDA = torch.cuda.is_available()
# the Triton path needs a GPU, or the interpreter on CPU tensors
DEV = "cuda" if HAS_CUDA else "cpu"
requires_triton_here = pytest.mark.skipif(
    not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1",
    reason="no CUDA device and TRITON_INTERPRET is not 1")
pytestmark = requires_triton_here


# ------------------------------------------------------------------------------------------ helpers
def make_logits(B, V, k, dtype, layout, gen, scale=3.0, device=DEV):
    """k expert logit matrices [B, V]: a list of tensors, one stacked [k, B, V] tensor, or a list of
    row-strided views (row stride > V, unit column stride) of wider buffers."""
    def randn(*shape):
        return (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(dtype).to(device)

    if layout == "list":
        return [randn(B, V) for _ in range(k)]
    if layout == "stacked":
        return randn(k, B, V)
    if layout == "strided":  # every other row of a buffer with 3 spare columns, offset by 1
        return [randn(2 * B, V + 3)[::2, 1:V + 1] for _ in range(k)]
    raise ValueError(layout)


def make_log_weights(B, k, gen, drop=0.3, device=DEV):
    """Normalised log weights [B, k] with about ``drop`` of them -inf (at least one kept per row)."""
    lw = torch.log_softmax(2 * torch.randn(B, k, generator=gen), dim=1)
    dropped = torch.rand(B, k, generator=gen) < drop
    dropped[torch.arange(B), torch.randint(k, (B,), generator=gen)] = False
    lw[dropped] = NEG_INF
    return lw.to(device)


def experts(logits):
    return list(logits.unbind(0)) if isinstance(logits, torch.Tensor) else list(logits)


def assert_close_to_ref(out, ref64, ref_low):
    """``out`` (float32) vs the float64 reference: same -inf pattern, no NaN, and a max error within
    2x the max error of the reference computed in the input dtype, plus a tiny floor."""
    out = out.detach().double().cpu()
    ref64 = ref64.cpu()
    ref_low = ref_low.detach().double().cpu()
    assert out.shape == ref64.shape
    assert not torch.isnan(out).any(), "NaN in the output"
    assert torch.equal(torch.isneginf(out), torch.isneginf(ref64)), "-inf pattern differs from the reference"
    assert not torch.isposinf(out).any()
    fin = torch.isfinite(ref64)
    if not fin.any():
        return
    err = (out[fin] - ref64[fin]).abs().max().item()
    both = fin & torch.isfinite(ref_low)
    err_low = (ref_low[both] - ref64[both]).abs().max().item() if both.any() else 0.0
    floor = 1e-5 + 1e-6 * ref64[fin].abs().max().item()
    assert err <= 2 * err_low + floor, f"max error {err:.3g} > 2 x {err_low:.3g} (input-dtype reference) + {floor:.2g}"


def check_full(logits, lw, **kw):
    out = mx.weighted_logsumexp_triton(logits, lw, **kw)
    assert out.dtype == torch.float32
    assert_close_to_ref(out, mx.weighted_logsumexp_ref(logits, lw), mx.weighted_logsumexp_ref(logits, lw, upcast=False))
    return out


def check_target(logits, lw, target, full=None, **kw):
    out = mx.weighted_logsumexp_target_triton(logits, lw, target, **kw)
    assert out.dtype == torch.float32 and out.shape == target.shape
    assert_close_to_ref(out, mx.weighted_logsumexp_target_ref(logits, lw, target),
                        mx.weighted_logsumexp_target_ref(logits, lw, target, upcast=False))
    if full is not None:  # equals the full output gathered at the target (up to fp32 rounding of x - lse)
        gathered = full.gather(1, target[:, None].to(full.device))[:, 0]
        scale = max(x[torch.isfinite(x)].abs().max().item() if torch.isfinite(x).any() else 0.0
                    for x in experts(logits))
        torch.testing.assert_close(out, gathered, rtol=1e-5, atol=1e-5 + 5e-7 * scale)
    return out


# --------------------------------------------------------------------------------------- the grid
VS = (1, 7, 100, 1000)
KS = (1, 2, 3, 5, 16)
BS = (1, 3, 8)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("V", VS)
def test_grid_fused(V, k, dtype):
    """Full and target mixtures over V x k x dtype; B and the layout rotate through the grid."""
    vi, ki, di = VS.index(V), KS.index(k), DTYPES.index(dtype)
    B = BS[(vi + 2 * ki + di) % 3]
    layout = LAYOUTS[(vi + ki + di) % 3]
    gen = torch.Generator().manual_seed(1000 * vi + 10 * ki + di)
    logits = make_logits(B, V, k, dtype, layout, gen)
    lw = make_log_weights(B, k, gen)
    full = check_full(logits, lw)
    target = torch.randint(V, (B,), generator=gen).to(DEV)
    check_target(logits, lw, target, full)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("V,k,block_v,layout", [
    (100, 1, 32, "list"), (100, 3, 16, "stacked"), (1000, 2, 256, "strided"), (1000, 5, 128, "list"),
    (7, 3, 4, "strided"), (129, 2, 64, "stacked"),
])
def test_grid_split(V, k, block_v, layout, dtype):
    """The two-kernel path (V > block_v: lse pass + mixing pass over V chunks) and chunked target."""
    gen = torch.Generator().manual_seed(V * 31 + k + DTYPES.index(dtype))
    B = 3
    logits = make_logits(B, V, k, dtype, layout, gen)
    lw = make_log_weights(B, k, gen)
    full = check_full(logits, lw, block_v=block_v)
    target = torch.randint(V, (B,), generator=gen).to(DEV)
    check_target(logits, lw, target, full, block_v=block_v)


@settings(max_examples=12, deadline=None)
@given(B=st.integers(1, 4), V=st.integers(1, 300), k=st.integers(1, 6), dtype=st.sampled_from(DTYPES),
       layout=st.sampled_from(LAYOUTS), split=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_random_shapes(B, V, k, dtype, layout, split, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = make_logits(B, V, k, dtype, layout, gen)
    lw = make_log_weights(B, k, gen)
    block_v = 32 if split else None
    full = check_full(logits, lw, block_v=block_v)
    check_target(logits, lw, torch.randint(V, (B,), generator=gen).to(DEV), full, block_v=block_v)


# -------------------------------------------------------------------------------- special cases
@pytest.mark.parametrize("block_v", [None, 16])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
def test_neg_inf_logits(dtype, block_v):
    """-inf logits (masked vocabulary): a column -inf in every expert stays -inf; an expert row with
    some -inf entries mixes normally."""
    gen = torch.Generator().manual_seed(3)
    B, V, k = 3, 50, 3
    xs = [x.clone() for x in make_logits(B, V, k, dtype, "list", gen)]
    for x in xs:
        x[:, 5] = NEG_INF
    xs[0][:, 10:20] = NEG_INF
    xs[1][1, ::2] = NEG_INF
    lw = make_log_weights(B, k, gen, drop=0.0)
    full = check_full(xs, lw, block_v=block_v)
    assert torch.isneginf(full[:, 5]).all() and torch.isfinite(full[:, 10:20]).all()
    target = torch.tensor([5, 12, 2], device=DEV)
    out = check_target(xs, lw, target, full, block_v=block_v)
    assert out[0] == NEG_INF and torch.isfinite(out[1:]).all()


@pytest.mark.parametrize("block_v", [None, 32])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
def test_huge_logits(dtype, block_v):
    gen = torch.Generator().manual_seed(4)
    B, V, k = 4, 70, 3
    xs = [(1e4 * torch.sign(torch.randn(B, V, generator=gen))).to(dtype).to(DEV) for _ in range(k)]
    xs[1] = xs[1] * 0.5 + (torch.randn(B, V, generator=gen) * 100).to(dtype).to(DEV)
    lw = make_log_weights(B, k, gen, drop=0.2)
    full = check_full(xs, lw, block_v=block_v)
    check_target(xs, lw, torch.randint(V, (B,), generator=gen).to(DEV), full, block_v=block_v)


@pytest.mark.parametrize("block_v", [None, 8])
def test_single_active_expert_is_its_log_softmax(block_v):
    """Rows with exactly one finite weight give that expert's log_softmax plus the weight; a weight
    of 1 (log 0) gives exactly its log_softmax."""
    gen = torch.Generator().manual_seed(5)
    B, V, k = 5, 33, 4
    logits = make_logits(B, V, k, torch.float32, "stacked", gen)
    chosen = torch.tensor([0, 3, 1, 1, 2])
    lw = torch.full((B, k), NEG_INF)
    lw[torch.arange(B), chosen] = torch.tensor([0.0, 0.0, -0.7, 0.0, -2.5])
    lw = lw.to(DEV)
    out = mx.weighted_logsumexp_triton(logits, lw, block_v=block_v)
    expect = torch.log_softmax(logits[chosen.to(DEV), torch.arange(B, device=DEV)].double(), -1) + lw.max(1).values[:, None]
    torch.testing.assert_close(out.double(), expect, rtol=1e-6, atol=1e-5)
    for b in (0, 1, 3):  # weight 1
        torch.testing.assert_close(out[b], torch.log_softmax(logits[chosen[b], b], -1), rtol=1e-6, atol=1e-5)
    target = torch.randint(V, (B,), generator=gen).to(DEV)
    tgt = mx.weighted_logsumexp_target_triton(logits, lw, target, block_v=block_v)
    torch.testing.assert_close(tgt.double(), expect.gather(1, target[:, None])[:, 0], rtol=1e-6, atol=1e-5)


def test_k1_and_v1():
    """k=1: out = log_softmax + lw; V=1: out = logsumexp of the weights of the active experts."""
    gen = torch.Generator().manual_seed(6)
    x = make_logits(3, 9, 1, torch.float32, "list", gen)
    lw = torch.tensor([[0.0], [-1.5], [NEG_INF]], device=DEV)
    out = mx.weighted_logsumexp_triton(x, lw)
    torch.testing.assert_close(out[:2], torch.log_softmax(x[0][:2], -1) + lw[:2], rtol=1e-6, atol=1e-6)
    assert torch.isneginf(out[2]).all()
    xs = make_logits(4, 1, 3, torch.float16, "list", gen)
    lw = make_log_weights(4, 3, gen, drop=0.4)
    out = mx.weighted_logsumexp_triton(xs, lw)
    torch.testing.assert_close(out[:, 0].double(), torch.logsumexp(lw.double(), 1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("block_v", [None, 16])
def test_all_weights_neg_inf_row_is_neg_inf(block_v):
    gen = torch.Generator().manual_seed(7)
    B, V, k = 3, 40, 3
    logits = make_logits(B, V, k, torch.bfloat16, "list", gen)
    lw = make_log_weights(B, k, gen)
    lw[1] = NEG_INF
    out = mx.weighted_logsumexp_triton(logits, lw, block_v=block_v)
    assert torch.isneginf(out[1]).all() and torch.isfinite(out[[0, 2]]).all()
    assert_close_to_ref(out, mx.weighted_logsumexp_ref(logits, lw), mx.weighted_logsumexp_ref(logits, lw, upcast=False))
    tgt = mx.weighted_logsumexp_target_triton(logits, lw, torch.tensor([0, 1, 2], device=DEV), block_v=block_v)
    assert tgt[1] == NEG_INF and torch.isfinite(tgt[[0, 2]]).all()
    for fn in (mx.weighted_logsumexp_ref, lambda *a: mx.weighted_logsumexp_target_ref(*a, torch.tensor([0, 1, 2], device=DEV))):
        assert torch.isneginf(fn(logits, lw)[1]).all()


@pytest.mark.parametrize("block_v", [None, 16])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
def test_dropped_expert_is_never_read(dtype, block_v):
    """An expert full of NaN with weight -inf in every row, and an expert whose NaN rows are exactly
    the rows where it is dropped: the output stays finite and equals the mixture of the others."""
    gen = torch.Generator().manual_seed(8)
    B, V, k = 4, 45, 4
    xs = make_logits(B, V, k, dtype, "list", gen)
    lw = make_log_weights(B, k, gen, drop=0.0)
    xs[2] = torch.full((B, V), float("nan"), dtype=dtype, device=DEV)
    lw[:, 2] = NEG_INF
    xs[0] = xs[0].clone()
    xs[0][[1, 3]] = float("nan")
    lw[[1, 3], 0] = NEG_INF
    out = mx.weighted_logsumexp_triton(xs, lw, block_v=block_v)
    assert torch.isfinite(out).all()
    keep = [0, 1, 3]
    others = mx.weighted_logsumexp_ref([xs[j] for j in keep], lw[:, keep])
    others_low = mx.weighted_logsumexp_ref([xs[j] for j in keep], lw[:, keep], upcast=False)
    assert_close_to_ref(out, others, others_low)
    target = torch.randint(V, (B,), generator=gen).to(DEV)
    tgt = mx.weighted_logsumexp_target_triton(xs, lw, target, block_v=block_v)
    assert torch.isfinite(tgt).all()
    torch.testing.assert_close(tgt.double(), others.gather(1, target[:, None])[:, 0].cpu(), rtol=1e-5, atol=1e-5)
    # the references skip dropped experts too
    assert torch.isfinite(mx.weighted_logsumexp_ref(xs, lw)).all()
    assert torch.isfinite(mx.weighted_logsumexp_target_ref(xs, lw, target)).all()


def test_column_strided_expert_is_copied():
    gen = torch.Generator().manual_seed(9)
    xs = [torch.randn(3, 40, generator=gen).to(DEV)[:, ::2], torch.randn(3, 20, generator=gen).to(DEV)]
    lw = make_log_weights(3, 2, gen, drop=0.0)
    check_full(xs, lw)
    check_target(xs, lw, torch.tensor([0, 19, 7], device=DEV))


def test_unnormalised_weights():
    """Weights need not sum to 1: the result shifts by their log-sum."""
    gen = torch.Generator().manual_seed(10)
    xs = make_logits(2, 30, 3, torch.float32, "list", gen)
    lw = make_log_weights(2, 3, gen, drop=0.0)
    out = mx.weighted_logsumexp_triton(xs, lw + 2.0)
    torch.testing.assert_close(out, mx.weighted_logsumexp_triton(xs, lw) + 2.0, rtol=1e-6, atol=1e-5)


# ----------------------------------------------------------------------------- dispatch & errors
def test_backend_and_dispatch(monkeypatch):
    x = torch.zeros(2, 3)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert mx.mixture_backend(x) == "triton"
    assert mx.mixture_backend([x, x]) == "triton"
    assert mx.mixture_backend(x.double()) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert mx.mixture_backend(x) == "torch"
    monkeypatch.delenv("TRITON_INTERPRET")
    assert mx.mixture_backend(x) == "torch"
    if HAS_CUDA:
        assert mx.mixture_backend(x.cuda()) == "triton"
    # the CPU fallback: float32 results from the reference
    gen = torch.Generator().manual_seed(11)
    xs = make_logits(3, 20, 2, torch.bfloat16, "list", gen, device="cpu")
    lw = make_log_weights(3, 2, gen, device="cpu")
    target = torch.tensor([1, 2, 3])
    out = mx.weighted_logsumexp(xs, lw)
    tgt = mx.weighted_logsumexp_target(xs, lw, target)
    assert out.dtype == tgt.dtype == torch.float32
    torch.testing.assert_close(out.double(), mx.weighted_logsumexp_ref(xs, lw), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tgt, out.gather(1, target[:, None])[:, 0])
    # float64 goes to the reference on any backend
    x64 = [x.double() for x in xs]
    assert mx.weighted_logsumexp(x64, lw).dtype == torch.float32


def test_public_functions_use_triton_under_the_interpreter(monkeypatch):
    if HAS_CUDA:
        pytest.skip("covered by the gpu tests")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    gen = torch.Generator().manual_seed(12)
    xs = make_logits(2, 10, 2, torch.float32, "list", gen)
    lw = make_log_weights(2, 2, gen)
    called = []
    real = mx.weighted_logsumexp_triton
    monkeypatch.setattr(mx, "weighted_logsumexp_triton", lambda *a, **k: called.append(1) or real(*a, **k))
    mx.weighted_logsumexp(xs, lw)
    assert called


def _err(exc, match, fn, *args, **kw):
    with pytest.raises(exc, match=match):
        fn(*args, **kw)


@pytest.mark.parametrize("fn", [mx.weighted_logsumexp_triton, mx.weighted_logsumexp_ref, mx.weighted_logsumexp])
def test_validation_full(fn):
    x = torch.randn(2, 5)
    lw = torch.zeros(2, 2)
    _err(ValueError, "1 to 16 experts", fn, [], torch.zeros(2, 0))
    _err(ValueError, "1 to 16 experts", fn, [x] * 17, torch.zeros(2, 17))
    _err(ValueError, "expert shapes differ", fn, [x, torch.randn(2, 6)], lw)
    _err(ValueError, "expert shapes differ", fn, [x, torch.randn(3, 5)], lw)
    _err(TypeError, "one dtype", fn, [x, x.half()], lw)
    _err(TypeError, "floating point", fn, [x.long(), x.long()], lw)
    _err(TypeError, "floating point", fn, [x, x], lw.long())
    _err(ValueError, r"shape \[B, k\]", fn, [x, x], torch.zeros(2, 3))
    _err(ValueError, r"shape \[B, k\]", fn, [x, x], torch.zeros(3, 2))
    _err(ValueError, "NaN or \\+inf", fn, [x, x], torch.tensor([[0.0, float("nan")], [0.0, 0.0]]))
    _err(ValueError, "NaN or \\+inf", fn, [x, x], torch.tensor([[0.0, 0.0], [float("inf"), 0.0]]))
    _err(ValueError, "one device", fn, [x, x.to("meta")], lw)
    _err(ValueError, "log_weights is on", fn, [x, x], lw.to("meta"))
    _err(ValueError, r"\[k, B, V\]", fn, x, lw)
    _err(ValueError, "2-D", fn, [x[0], x[0]], lw)
    _err(ValueError, "V=0", fn, [x[:, :0], x[:, :0]], lw)
    _err(TypeError, "list/tuple", fn, "logits", lw)


@pytest.mark.parametrize("fn", [mx.weighted_logsumexp_target_triton, mx.weighted_logsumexp_target_ref,
                                mx.weighted_logsumexp_target])
def test_validation_target(fn):
    x = torch.randn(2, 5)
    lw = torch.zeros(2, 2)
    _err(ValueError, r"\[0, 5\)", fn, [x, x], lw, torch.tensor([0, 5]))
    _err(ValueError, r"\[0, 5\)", fn, [x, x], lw, torch.tensor([-1, 0]))
    _err(ValueError, r"shape \[B\]", fn, [x, x], lw, torch.tensor([0, 1, 2]))
    _err(TypeError, "integer", fn, [x, x], lw, torch.tensor([0.0, 1.0]))
    _err(ValueError, "target is on", fn, [x, x], lw, torch.tensor([0, 1], device="meta"))
    _err(ValueError, "1 to 16 experts", fn, [], torch.zeros(2, 0), torch.tensor([0, 1]))


def test_triton_rejects_float64():
    x = torch.randn(2, 5, dtype=torch.float64)
    _err(TypeError, "not supported", mx.weighted_logsumexp_triton, [x], torch.zeros(2, 1))


def test_empty_batch():
    xs = [torch.randn(0, 5, device=DEV)] * 2
    lw = torch.zeros(0, 2, device=DEV)
    assert mx.weighted_logsumexp_triton(xs, lw).shape == (0, 5)
    assert mx.weighted_logsumexp_target_triton(xs, lw, torch.zeros(0, dtype=torch.long, device=DEV)).shape == (0,)


def test_imports_without_triton():
    """The module imports and its CPU fallback runs when triton is missing; asking for a Triton
    path then raises an actionable ImportError."""
    code = """
import sys
sys.modules["triton"] = None
import torch
from cbtm.kernels import mixture as mx
xs = [torch.randn(2, 4), torch.randn(2, 4)]
lw = torch.zeros(2, 2)
assert mx.mixture_backend(xs) == "torch"
assert mx.weighted_logsumexp(xs, lw).shape == (2, 4)
try:
    mx.weighted_logsumexp_triton(xs, lw)
except ImportError as e:
    assert "pip install triton" in str(e), e
else:
    raise SystemExit("no ImportError")
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


_COMPILE_CODE = """
import os
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from cbtm.kernels import mixture as mx
kern = mx._triton_kernels()
K = 3
common = {"xs": ("*bf16",) * K, "row_strides": ("i64",) * K, "lw_ptr": "*fp32"}
tail = {"V": "i32", "K": "constexpr", "BLOCK_V": "constexpr"}
sigs = {"fused": {"out_ptr": "*fp32"}, "lse": {"stats_ptr": "*fp32"},
        "target": {"tgt_ptr": "*i64", "out_ptr": "*fp32"}, "mix": {"stats_ptr": "*fp32", "out_ptr": "*fp32"}}
for name, extra in sigs.items():
    src = ASTSource(kern[name], {**common, **extra, **tail}, {"K": K, "BLOCK_V": 4096})
    c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
    assert c.asm["cubin"], name
print("compiled")
"""


def test_kernels_compile_for_sm90():
    """The kernels go through Triton's real compiler (to an sm_90 cubin, no GPU needed): catches
    what the interpreter lets pass (types of values carried through loops and branches)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, "-c", _COMPILE_CODE], capture_output=True, text=True, env=env, timeout=300)
    if res.returncode != 0 and "ptxas" in res.stderr and "CompilationError" not in res.stderr:
        pytest.skip(f"no usable ptxas here: {res.stderr.strip().splitlines()[-1]}")
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-3000:]


# -------------------------------------------------------------------------------------------- GPU
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@gpu
@needs_cuda
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("V,k", [(50272, 8), (50272, 1), (8192, 5), (32000, 16)])
def test_gpu_large_vocab(V, k, dtype, layout):
    gen = torch.Generator().manual_seed(V + k)
    B = 24
    logits = make_logits(B, V, k, dtype, layout, gen, device="cuda")
    lw = make_log_weights(B, k, gen, device="cuda")
    lw[3] = NEG_INF
    full = check_full(logits, lw)
    assert torch.isneginf(full[3]).all()
    target = torch.randint(V, (B,), generator=gen).cuda()
    check_target(logits, lw, target, full)
    # the public functions take the Triton path on CUDA
    torch.testing.assert_close(mx.weighted_logsumexp(logits, lw), full)


@gpu
@needs_cuda
def test_gpu_dropped_expert_is_never_read():
    gen = torch.Generator().manual_seed(13)
    B, V, k = 16, 50272, 4
    xs = make_logits(B, V, k, torch.bfloat16, "list", gen, device="cuda")
    xs[1] = torch.full_like(xs[1], float("nan"))
    lw = make_log_weights(B, k, gen, drop=0.0, device="cuda")
    lw[:, 1] = NEG_INF
    out = mx.weighted_logsumexp_triton(xs, lw)
    assert torch.isfinite(out).all()
    keep = [0, 2, 3]
    assert_close_to_ref(out, mx.weighted_logsumexp_ref([xs[j] for j in keep], lw[:, keep]),
                        mx.weighted_logsumexp_ref([xs[j] for j in keep], lw[:, keep], upcast=False))
    assert torch.isfinite(mx.weighted_logsumexp_target_triton(xs, lw, torch.zeros(B, dtype=torch.long, device="cuda"))).all()
