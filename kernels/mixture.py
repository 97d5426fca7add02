"""Mixture of k experts' next-token distributions with per-row weights (the C-BTM merge step).

For k expert logit matrices ``logits[j]`` of shape [B, V] and log weights ``log_weights`` [B, k]::

    out[b, v] = logsumexp_j( log_weights[b, j] + logits[j][b, v] - logsumexp_u logits[j][b, u] )

i.e. ``log sum_j w_bj softmax(logits[j][b])[v]``, computed without materialising any
log-softmax.  Conventions (the same on every backend):

* ``logits`` is a sequence (list/tuple) of k tensors [B, V] or one [k, B, V] tensor; all experts
  share one float dtype (float32, bfloat16 or float16 on the Triton path; the reference also takes
  float64) and one device.  1 <= k <= 16.  Rows may be strided views; a column stride other than 1
  makes the Triton path copy that expert (``.contiguous()``).
* ``log_weights`` is a float tensor [B, k] (converted to float32).  The weights need not be
  normalised.  A weight of ``-inf`` removes that expert from that row: the kernels branch on the
  weight before touching the expert's logits, so they are never read (they may hold NaN or garbage
  values).  A row whose log weights are all ``-inf`` gives ``-inf`` everywhere (the empty mixture,
  log 0).  NaN or ``+inf`` log weights are rejected.
* Results are float32.  ``weighted_logsumexp_target`` gives ``out[b, target[b]]`` without ever
  writing a B x V output (the perplexity path).

Backends: ``mixture_backend(tensor)`` picks ``"triton"`` for CUDA tensors (when triton is
installed) and for CPU tensors only under ``TRITON_INTERPRET=1`` (the Triton CPU interpreter: slow,
for tests); otherwise ``"torch"``, the plain-PyTorch reference computed in float32, which is the CPU
fallback.  ``weighted_logsumexp`` / ``weighted_logsumexp_target`` dispatch with it; the ``*_triton``
functions call the kernels directly; the ``*_ref`` functions are the references (float64 when
``upcast=True``).

Memory traffic of the Triton kernels (per active (row, expert) pair; inactive pairs cost nothing):

* ``weighted_logsumexp``, V <= ``FUSED_MAX_V`` (8192): one program per row keeps a whole logit row
  in registers: every active logit is **read once**, every output element **written once** (fp32).
* ``weighted_logsumexp``, larger V: kernel 1 (grid B x k) streams each active row once with an
  online (max, sum-exp) to get lse_j; kernel 2 (grid B x V-chunks) streams it again and writes the
  mixture: every active logit is **read twice**, every output written once, plus a B x k x 2
  float32 scratch (max, log-sum-exp) per pair.  A second read is unavoidable without a grid-wide barrier: out[b, v]
  depends on the normalisers of *all* experts, known only after the whole row is read.
* ``weighted_logsumexp_target``: one program per row streams each active expert row once with the
  online (max, sum-exp), loads its target logit (one extra scalar load, a cache hit), and folds
  the k terms in registers: every active logit is **read once**, only B floats are written.

The k expert pointers reach the kernels as a tuple argument (no stacking copy, no pointer table to
upload): each kernel is specialised on k and unrolled over the experts, so it compiles once per
(k, dtype, block size).  Input validation costs one host-device sync (NaN/+inf weights, target
range).  The Triton module is imported lazily: this module imports without triton (or a GPU), and the
kernels are built on first use, in the mode (compiled or interpreted) that ``TRITON_INTERPRET``
selects at that moment.
"""

import importlib.util
import os
from typing import Optional, Sequence, Union

import torch

__all__ = [
    "MAX_EXPERTS",
    "FUSED_MAX_V",
    "mixture_backend",
    "weighted_logsumexp",
    "weighted_logsumexp_target",
    "weighted_logsumexp_triton",
    "weighted_logsumexp_target_triton",
    "weighted_logsumexp_ref",
    "weighted_logsumexp_target_ref",
]

MAX_EXPERTS = 16
FUSED_MAX_V = 8192  # rows up to this length are held in registers: logits read once
_LSE_BLOCK_V = 4096  # chunk of the streaming (max, sum-exp) pass
_MIX_BLOCK_V = 2048  # columns per program of the mixing pass
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_REF_DTYPES = TRITON_DTYPES + (torch.float64,)

Logits = Union[torch.Tensor, Sequence[torch.Tensor]]

# ------------------------------------------------------------------------------------------------
# Triton kernels.  Written as plain functions; ``_triton_kernels()`` imports triton and rebinds the
# names to ``triton.jit`` objects on first use.
# Every load is cast to float32 at once (bf16 arithmetic is wrong in the interpreter), all vector
# lengths are powers of two, every load past V is masked.
# The constexpr annotations must read ``tl.constexpr`` in the source: the interpreter re-compiles
# the source with postponed annotations and recognises that spelling.  Until triton is imported,
# ``tl`` is this stub, whose ``constexpr`` is the string the compiler recognises.


class _LanguageStub:
    constexpr = "constexpr"


tl = _LanguageStub()  # rebound to triton.language by _triton_kernels()
_KERNELS = None


# The online log-sum-exp used throughout keeps, per lane, a running max m and s = sum exp(v - m),
# and folds a value t in with ONE exp:
#     d = exp(-|m - t|)   (0 when t is -inf, which also covers m = t = -inf)
#     s = s * d + 1  if t > m  else  s + d;      m = max(m, t)
# -inf values leave the state unchanged, NaN poisons s; the result is m + log(s) (-inf when all
# values were -inf: s = 0).  The update is written out in each kernel rather than called: nested
# jit calls are free when compiled but cost milliseconds each in the interpreter.


def _fused_kernel(xs, row_strides, lw_ptr, out_ptr, V, K: tl.constexpr, BLOCK_V: tl.constexpr):
    """grid (B,), V <= BLOCK_V: each active expert row is loaded once, normalised in registers and
    folded into a per-column running log-sum-exp over experts; the output row is written once."""
    b = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_V)
    mask = cols < V
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_V], tl.float32)
    for j in tl.static_range(K):
        lw = tl.load(lw_ptr + b * K + j)
        if lw > float("-inf"):  # an expert with weight 0 is never read
            x = tl.load(xs[j] + b * row_strides[j] + cols, mask=mask, other=float("-inf")).to(tl.float32)
            mx = tl.max(x, 0)
            mx = tl.where(mx == float("-inf"), 0.0, mx)
            x = x - mx  # log_softmax = (x - max) - log(sum exp(x - max)): no cancellation at large |x|
            t = x + (lw - tl.log(tl.sum(tl.exp(x), 0)))
            d = tl.where(t == float("-inf"), 0.0, tl.exp(-tl.abs(m - t)))
            s = tl.where(t > m, s * d + 1.0, s + d)
            m = tl.maximum(m, t)
    tl.store(out_ptr + b * V + cols, m + tl.log(s), mask=mask)


def _expert_lse_kernel(xs, row_strides, lw_ptr, stats_ptr, V, K: tl.constexpr, BLOCK_V: tl.constexpr):
    """grid (B, K): stats[b, j] = (max, log sum exp(x - max)) of row b of expert j (logsumexp = their
    sum, kept apart so that x - lse loses no precision at large |x|), streamed once in BLOCK_V
    chunks with a per-lane online (max, sum-exp); an inactive pair reads nothing and stores its
    weight (-inf)."""
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    lw = tl.load(lw_ptr + b * K + j)
    if lw > float("-inf"):
        for jj in tl.static_range(K):  # pick the pointer of expert j (tuple indices are static)
            if jj == j:
                row = xs[jj] + b * row_strides[jj]
                cols = tl.arange(0, BLOCK_V)
                m = tl.full([BLOCK_V], float("-inf"), tl.float32)
                s = tl.zeros([BLOCK_V], tl.float32)
                for start in range(0, V, BLOCK_V):
                    t = tl.load(row + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
                    d = tl.where(t == float("-inf"), 0.0, tl.exp(-tl.abs(m - t)))
                    s = tl.where(t > m, s * d + 1.0, s + d)
                    m = tl.maximum(m, t)
                big = tl.max(m, 0)
                big = tl.where(big == float("-inf"), 0.0, big)
                tl.store(stats_ptr + (b * K + j) * 2, big)
                tl.store(stats_ptr + (b * K + j) * 2 + 1, tl.log(tl.sum(s * tl.exp(m - big), 0)))
    else:
        tl.store(stats_ptr + (b * K + j) * 2, lw)
        tl.store(stats_ptr + (b * K + j) * 2 + 1, lw)


def _target_kernel(xs, row_strides, lw_ptr, tgt_ptr, out_ptr, V, K: tl.constexpr, BLOCK_V: tl.constexpr):
    """grid (B,): out[b] = logsumexp_j(lw_j + x_j[target] - lse_j) over the active experts; each
    active row is streamed once (plus one scalar load of its target logit)."""
    b = tl.program_id(0).to(tl.int64)
    tgt = tl.load(tgt_ptr + b)
    one = tl.arange(0, 1)
    cols = tl.arange(0, BLOCK_V)
    acc_m = tl.full([1], float("-inf"), tl.float32)  # online log-sum-exp over the experts
    acc_s = tl.zeros([1], tl.float32)
    for j in tl.static_range(K):
        lw = tl.load(lw_ptr + b * K + j)
        if lw > float("-inf"):
            row = xs[j] + b * row_strides[j]
            m = tl.full([BLOCK_V], float("-inf"), tl.float32)
            s = tl.zeros([BLOCK_V], tl.float32)
            for start in range(0, V, BLOCK_V):
                t = tl.load(row + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
                d = tl.where(t == float("-inf"), 0.0, tl.exp(-tl.abs(m - t)))
                s = tl.where(t > m, s * d + 1.0, s + d)
                m = tl.maximum(m, t)
            big = tl.max(m, 0)
            big = tl.where(big == float("-inf"), 0.0, big)
            term = (tl.load(row + tgt + one).to(tl.float32) - big) + (lw - tl.log(tl.sum(s * tl.exp(m - big), 0)))
            e = tl.where(term == float("-inf"), 0.0, tl.exp(-tl.abs(acc_m - term)))
            acc_s = tl.where(term > acc_m, acc_s * e + 1.0, acc_s + e)
            acc_m = tl.maximum(acc_m, term)
    tl.store(out_ptr + b + one, acc_m + tl.log(acc_s))


def _mix_kernel(xs, row_strides, lw_ptr, stats_ptr, out_ptr, V, K: tl.constexpr, BLOCK_V: tl.constexpr):
    """grid (B, cdiv(V, BLOCK_V)): out[b, chunk] from the stats of ``_expert_lse_kernel``."""
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = cols < V
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_V], tl.float32)
    for j in tl.static_range(K):
        lw = tl.load(lw_ptr + b * K + j)
        if lw > float("-inf"):
            big = tl.load(stats_ptr + (b * K + j) * 2)
            shift = lw - tl.load(stats_ptr + (b * K + j) * 2 + 1)
            x = tl.load(xs[j] + b * row_strides[j] + cols, mask=mask, other=float("-inf")).to(tl.float32)
            t = (x - big) + shift
            d = tl.where(t == float("-inf"), 0.0, tl.exp(-tl.abs(m - t)))
            s = tl.where(t > m, s * d + 1.0, s + d)
            m = tl.maximum(m, t)
    tl.store(out_ptr + b * V + cols, m + tl.log(s), mask=mask)


def _triton_kernels():
    """Import triton and jit the kernels (once).  Raises an actionable ImportError without triton."""
    global _KERNELS, tl
    global _fused_kernel, _expert_lse_kernel, _target_kernel, _mix_kernel
    if _KERNELS is None:
        try:
            import triton
            import triton.language as _tl
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                "the Triton mixture kernels need the `triton` package (pip install triton); "
                "on CPU use weighted_logsumexp / the *_ref functions (plain PyTorch) instead, or set "
                "TRITON_INTERPRET=1 before importing triton to run the kernels in the interpreter"
            ) from exc
        tl = _tl
        _fused_kernel = triton.jit(_fused_kernel)
        _expert_lse_kernel = triton.jit(_expert_lse_kernel)
        _target_kernel = triton.jit(_target_kernel)
        _mix_kernel = triton.jit(_mix_kernel)
        _KERNELS = {"fused": _fused_kernel, "lse": _expert_lse_kernel, "target": _target_kernel, "mix": _mix_kernel,
                    "interpret": _interpret()}
    return _KERNELS


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _triton_installed() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # e.g. sys.modules["triton"] = None
        return False


# ------------------------------------------------------------------------------------------------
# Dispatch and validation
def mixture_backend(tensor: Logits) -> str:
    """``"triton"`` or ``"torch"`` for these logits (a tensor, or the first of a sequence).

    Triton for CUDA tensors (if triton is installed) and for CPU tensors only when
    ``TRITON_INTERPRET=1``; float64 logits, other devices and a missing triton give the torch
    reference."""
    if not isinstance(tensor, torch.Tensor):
        tensor = next(iter(tensor), None)
        if not isinstance(tensor, torch.Tensor):
            return "torch"
    if tensor.dtype not in TRITON_DTYPES or not _triton_installed():
        return "torch"
    if tensor.device.type == "cuda":
        return "triton"
    if tensor.device.type == "cpu" and _interpret():
        return "triton"
    return "torch"


def validate_inputs(logits: Logits, log_weights: torch.Tensor, target: Optional[torch.Tensor], dtypes):
    """Check the inputs; return (list of k [B, V] tensors, float32 log weights [B, k], target, B, V)."""
    if isinstance(logits, torch.Tensor):
        if logits.dim() != 3:
            raise ValueError(f"logits: a [k, B, V] tensor or a sequence of k [B, V] tensors; "
                             f"got a tensor of shape {tuple(logits.shape)}")
        xs = list(logits.unbind(0))
    elif isinstance(logits, (list, tuple)):
        xs = list(logits)
        for j, x in enumerate(xs):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"logits[{j}] is a {type(x).__name__}, not a torch.Tensor")
            if x.dim() != 2:
                raise ValueError(f"logits[{j}] must be 2-D [B, V]; got shape {tuple(x.shape)}")
    else:
        raise TypeError(f"logits: a [k, B, V] tensor or a list/tuple of [B, V] tensors, not {type(logits).__name__}")
    k = len(xs)
    if not 1 <= k <= MAX_EXPERTS:
        raise ValueError(f"the mixture needs 1 to {MAX_EXPERTS} experts; got k={k}")
    x0 = xs[0]
    B, V = x0.shape
    for j, x in enumerate(xs):
        if x.shape != x0.shape:
            raise ValueError(f"expert shapes differ: logits[0] is {tuple(x0.shape)}, logits[{j}] is {tuple(x.shape)}")
        if x.dtype != x0.dtype:
            raise TypeError(f"experts must share one dtype: logits[0] is {x0.dtype}, logits[{j}] is {x.dtype}")
        if x.device != x0.device:
            raise ValueError(f"experts must be on one device: logits[0] on {x0.device}, logits[{j}] on {x.device}")
    if not x0.dtype.is_floating_point:
        raise TypeError(f"logits must be floating point; got {x0.dtype}")
    if x0.dtype not in dtypes:
        raise TypeError(f"logits dtype {x0.dtype} is not supported here (supported: "
                        f"{', '.join(str(d) for d in dtypes)}); use the *_ref function for others")
    if V == 0:
        raise ValueError("logits have V=0 columns: the softmax is undefined")
    if not isinstance(log_weights, torch.Tensor):
        raise TypeError(f"log_weights must be a torch.Tensor [B, k], not {type(log_weights).__name__}")
    if not log_weights.dtype.is_floating_point:
        raise TypeError(f"log_weights must be floating point (float32); got {log_weights.dtype}")
    if tuple(log_weights.shape) != (B, k):
        raise ValueError(f"log_weights must have shape [B, k] = [{B}, {k}]; got {tuple(log_weights.shape)}")
    if log_weights.device != x0.device:
        raise ValueError(f"log_weights is on {log_weights.device}, the logits on {x0.device}")
    lw = log_weights.to(torch.float32).contiguous()
    checks = [(torch.isnan(lw) | torch.isposinf(lw)).any()]
    if target is not None:
        if not isinstance(target, torch.Tensor):
            raise TypeError(f"target must be an integer torch.Tensor [B], not {type(target).__name__}")
        if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
            raise TypeError(f"target must be an integer tensor (int64); got {target.dtype}")
        if tuple(target.shape) != (B,):
            raise ValueError(f"target must have shape [B] = [{B}]; got {tuple(target.shape)}")
        if target.device != x0.device:
            raise ValueError(f"target is on {target.device}, the logits on {x0.device}")
        target = target.to(torch.int64).contiguous()
        checks.append(((target < 0) | (target >= V)).any())
    bad = torch.stack(checks).tolist()  # one device sync for all value checks
    if bad[0]:
        raise ValueError("log_weights contain NaN or +inf (use -inf to drop an expert from a row)")
    if target is not None and bad[1]:
        lo, hi = int(target.min()), int(target.max())
        raise ValueError(f"target values must lie in [0, V) = [0, {V}); got min {lo}, max {hi}")
    return xs, lw, target, B, V


def _compute_dtype(dtype: torch.dtype, upcast) -> torch.dtype:
    if upcast is True:
        return torch.float64
    if upcast is False or upcast is None:
        return dtype
    if isinstance(upcast, torch.dtype) and upcast.is_floating_point:
        return upcast
    raise TypeError(f"upcast: True (float64), False (input dtype) or a float dtype; got {upcast!r}")


# ------------------------------------------------------------------------------------------------
# References (plain PyTorch)
def weighted_logsumexp_ref(logits: Logits, log_weights: torch.Tensor, upcast=True) -> torch.Tensor:
    """Plain-PyTorch ``weighted_logsumexp``: float64 when ``upcast`` (default), the input dtype when
    ``upcast=False``, or any float dtype given as ``upcast``; the result has that dtype."""
    xs, lw, _, B, V = validate_inputs(logits, log_weights, None, _REF_DTYPES)
    dt = _compute_dtype(xs[0].dtype, upcast)
    neg_inf = torch.tensor(float("-inf"), dtype=dt, device=xs[0].device)
    active = lw > float("-inf")  # [B, k]
    used = torch.nonzero(active.any(0)).flatten().tolist()
    if len(used) == 1 and bool(active[:, used[0]].all()):  # one expert for every row: its log-softmax
        j = used[0]
        out = torch.log_softmax(xs[j].to(dt), dim=-1)
        return out if bool((lw[:, j] == 0).all()) else out.add_(lw[:, j:j + 1].to(dt))
    if not used:
        return neg_inf.expand(B, V).clone()
    out = None
    for j in used:  # a running log-add-exp over the used experts, in place
        term = torch.log_softmax(xs[j].to(dt), dim=-1).add_(lw[:, j:j + 1].to(dt))
        if not bool(active[:, j].all()):
            term = torch.where(active[:, j:j + 1], term, neg_inf)
        out = term if out is None else torch.logaddexp(out, term, out=out)
    return out


def weighted_logsumexp_target_ref(logits: Logits, log_weights: torch.Tensor, target: torch.Tensor,
                                  upcast=True) -> torch.Tensor:
    """Plain-PyTorch ``weighted_logsumexp_target`` (same ``upcast`` convention)."""
    xs, lw, target, B, V = validate_inputs(logits, log_weights, target, _REF_DTYPES)
    dt = _compute_dtype(xs[0].dtype, upcast)
    neg_inf = torch.tensor(float("-inf"), dtype=dt, device=xs[0].device)
    terms = neg_inf.expand(B, len(xs)).clone()
    active = lw > float("-inf")
    for j in torch.nonzero(active.any(0)).flatten().tolist():
        # log_softmax + gather: much faster on CPU than torch.logsumexp, and the same value
        term = lw[:, j].to(dt) + torch.log_softmax(xs[j].to(dt), dim=-1).gather(1, target[:, None])[:, 0]
        terms[:, j] = torch.where(active[:, j], term, neg_inf)
    return torch.logsumexp(terms, dim=1)


# ------------------------------------------------------------------------------------------------
# Triton entry points
def _prepare(xs):
    """Unit column stride for every expert (copies only an expert that lacks it)."""
    xs = [x if x.shape[1] <= 1 or x.stride(1) == 1 else x.contiguous() for x in xs]
    return tuple(xs), tuple(int(x.stride(0)) for x in xs)


def _num_warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


def _launch_guard(device):
    """The kernels' device as the current CUDA device; in the CPU interpreter, silence numpy's
    warnings about -inf arithmetic (the kernels handle those values on purpose)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    if _interpret():
        import numpy as np

        return np.errstate(all="ignore")
    return _Null()


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


def weighted_logsumexp_triton(logits: Logits, log_weights: torch.Tensor, *,
                              block_v: Optional[int] = None) -> torch.Tensor:
    """Triton ``weighted_logsumexp`` -> float32 [B, V].

    ``block_v`` (a power of two; tests and tuning): rows with V <= block_v use the fused one-read
    kernel with that block, longer rows the two-kernel path with chunks of block_v.  Default:
    fused up to ``FUSED_MAX_V``, else chunks of 4096 (lse pass) and 2048 (mix pass)."""
    xs, lw, _, B, V = validate_inputs(logits, log_weights, None, TRITON_DTYPES)
    kern = _triton_kernels()
    k = len(xs)
    dev = xs[0].device
    out = torch.empty((B, V), dtype=torch.float32, device=dev)
    if B == 0:
        return out
    ptrs, strides = _prepare(xs)
    if block_v is not None and (block_v < 1 or block_v & (block_v - 1)):
        raise ValueError(f"block_v must be a power of two; got {block_v}")
    fused_block = _next_pow2(V)
    with _launch_guard(dev):
        if V <= (block_v if block_v is not None else FUSED_MAX_V):
            kern["fused"][(B,)](ptrs, strides, lw, out, V, K=k, BLOCK_V=fused_block,
                                num_warps=_num_warps(fused_block))
        else:
            lse_block, mix_block = (block_v, block_v) if block_v else (_LSE_BLOCK_V, _MIX_BLOCK_V)
            stats = torch.empty((B, k, 2), dtype=torch.float32, device=dev)
            kern["lse"][(B, k)](ptrs, strides, lw, stats, V, K=k, BLOCK_V=lse_block, num_warps=_num_warps(lse_block))
            kern["mix"][(B, _cdiv(V, mix_block))](ptrs, strides, lw, stats, out, V, K=k, BLOCK_V=mix_block,
                                                        num_warps=_num_warps(mix_block))
    return out


def weighted_logsumexp_target_triton(logits: Logits, log_weights: torch.Tensor, target: torch.Tensor, *,
                                     block_v: Optional[int] = None) -> torch.Tensor:
    """Triton ``weighted_logsumexp_target`` -> float32 [B]; reads each active logit once and
    writes no B x V output.  ``block_v``: chunk length of the streaming pass (power of two)."""
    xs, lw, target, B, V = validate_inputs(logits, log_weights, target, TRITON_DTYPES)
    kern = _triton_kernels()
    k = len(xs)
    dev = xs[0].device
    if B == 0:
        return torch.empty((0,), dtype=torch.float32, device=dev)
    if block_v is not None and (block_v < 1 or block_v & (block_v - 1)):
        raise ValueError(f"block_v must be a power of two; got {block_v}")
    block = block_v or min(_next_pow2(V), _LSE_BLOCK_V)
    ptrs, strides = _prepare(xs)
    out = torch.empty((B,), dtype=torch.float32, device=dev)
    with _launch_guard(dev):
        kern["target"][(B,)](ptrs, strides, lw, target, out, V, K=k, BLOCK_V=block, num_warps=_num_warps(block))
    return out


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ------------------------------------------------------------------------------------------------
# Public, dispatching entry points
def weighted_logsumexp(logits: Logits, log_weights: torch.Tensor) -> torch.Tensor:
    """Mixed log-probabilities float32 [B, V] (see the module docstring); backend by
    ``mixture_backend``: Triton kernels, or the reference computed in float32."""
    if mixture_backend(logits) == "triton":
        return weighted_logsumexp_triton(logits, log_weights)
    return weighted_logsumexp_ref(logits, log_weights, upcast=torch.float32)


def weighted_logsumexp_target(logits: Logits, log_weights: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mixed log-probability of ``target[b]`` for every row, float32 [B]; no B x V output."""
    if mixture_backend(logits) == "triton":
        return weighted_logsumexp_target_triton(logits, log_weights, target)
    return weighted_logsumexp_target_ref(logits, log_weights, target, upcast=torch.float32)
