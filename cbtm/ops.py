"""The one dispatch layer between Python and the compiled kernels.

Every op accepts numpy arrays or torch tensors (CPU or CUDA) of float32, float16 or bfloat16,
validates them, allocates the outputs in the same framework and on the same device, and calls
``cbtm._C`` (CPU, OpenMP) or ``cbtm._cuda`` (CUDA tensors). Arrays cross into C++ through DLPack.
Each op has a plain reference implementation ``<op>_ref`` beside it (float64 NumPy / PyTorch).
The expert-mixture ops are Triton kernels (``cbtm.kernels.mixture``): Triton for CUDA tensors (and
for CPU tensors under ``TRITON_INTERPRET=1``), their PyTorch reference otherwise.
"""

from __future__ import annotations

import math
import sys
import threading
import warnings
from typing import Any

import numpy as np


class _Torch:
    """torch, imported on first attribute access: the CPU ops on numpy arrays never import it (and
    every use below follows a check that a tensor was given, so torch is already loaded)."""

    def __getattr__(self, name: str):
        import torch as module

        return getattr(module, name)


torch = _Torch()

__all__ = [
    "assign",
    "assign_ref",
    "balanced_assign",
    "balanced_assign_ref",
    "centroid_update",
    "centroid_update_ref",
    "pairwise_sqdist",
    "pairwise_sqdist_ref",
    "cuda_available",
    "decode_attention",
    "decode_attention_ref",
    "grouped_rms_norm",
    "grouped_rms_norm_ref",
    "rotary_",
    "rotary_ref",
    "varlen_attention",
    "varlen_attention_ref",
    "weighted_logsumexp_rows",
    "last_solve_stats",
    "total_cost",
    "weighted_logsumexp",
    "weighted_logsumexp_ref",
    "weighted_logsumexp_target",
    "weighted_logsumexp_target_ref",
]

_NUMPY_FLOATS = (np.float32, np.float16)
# Largest squared norm of a point or centre (the kernels' kNormLimit): below it no float32 squared
# distance can overflow.
NORM_LIMIT = float(np.finfo(np.float32).max) / 8
_deprecated = threading.local()  # .stats: the calling thread's last solve, for last_solve_stats() only


def _cpu_module():
    try:
        from . import _C
    except ImportError as e:
        raise ImportError(
            "cbtm._C (the compiled CPU kernels) is missing: install the package with "
            "`pip install .` (or `pip install -e .`) from the repository root so CMake builds it"
        ) from e
    return _C


def _cuda_module():
    try:
        from . import _cuda
    except ImportError as e:
        raise RuntimeError(
            "cbtm was built without CUDA kernels (cbtm._cuda is missing): reinstall on a machine "
            "with nvcc, e.g. `CBTM_CUDA=1 pip install --no-build-isolation .`, or move the "
            "tensors to the CPU"
        ) from e
    return _cuda


def cuda_available() -> bool:
    """True when cbtm._cuda is built and sees a usable CUDA device."""
    try:
        return bool(_cuda_module().device_count() > 0)
    except RuntimeError:
        return False


def last_solve_stats() -> dict:
    """Deprecated: use ``balanced_assign(..., return_stats=True)`` (or ``BalancedKMeans.solve_stats_``).

    Statistics of the calling thread's last balanced_assign call (empty before one); kept for one
    release. Each thread sees only its own solves, so concurrent callers never read each other's."""
    warnings.warn("cbtm.ops.last_solve_stats() is deprecated: pass return_stats=True to balanced_assign "
                  "(or read BalancedKMeans.solve_stats_)", DeprecationWarning, stacklevel=2)
    return dict(getattr(_deprecated, "stats", {}))


# --------------------------------------------------------------------------------------------
# validation


def _is_torch(a) -> bool:
    module = sys.modules.get("torch")  # a tensor exists only once torch is imported
    return module is not None and isinstance(a, module.Tensor)


def _check_float_matrix(a, name: str):
    """Returns the array (torch tensors detached); raises a clear error on anything unusable."""
    if _is_torch(a):
        if a.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"{name}: dtype must be float32, float16 or bfloat16, got {a.dtype}")
        a = a.detach()
        if a.is_cuda and a.ndim == 2 and a.shape[1] > 1 and a.stride(1) != 1:
            a = a.contiguous()  # the CUDA kernels take any row stride but unit column stride
    elif isinstance(a, np.ndarray):
        if a.dtype not in _NUMPY_FLOATS:
            raise TypeError(
                f"{name}: dtype must be float32 or float16 (numpy; bfloat16 via torch), got {a.dtype}"
                + (" (convert with .astype(np.float32))" if a.dtype == np.float64 else "")
            )
    else:
        raise TypeError(f"{name}: expected a numpy array or a torch tensor, got {type(a).__name__}")
    if a.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array, got shape {tuple(a.shape)}")
    if a.shape[0] == 0:
        raise ValueError(f"{name}: is empty (shape {tuple(a.shape)})")
    if a.shape[1] == 0:
        raise ValueError(f"{name}: has zero columns")
    return a


def _all_finite(a) -> bool:
    if _is_torch(a):
        return bool(torch.isfinite(a).all())
    return bool(np.isfinite(a).all())


def _check_pair(x, centers):
    x = _check_float_matrix(x, "x")
    centers = _check_float_matrix(centers, "centers")
    if _is_torch(x) != _is_torch(centers):
        raise TypeError("x and centers must both be numpy arrays or both be torch tensors")
    if _is_torch(x) and x.device != centers.device:
        raise ValueError(f"x is on {x.device} but centers is on {centers.device}")
    if x.shape[1] != centers.shape[1]:
        raise ValueError(f"x has {x.shape[1]} columns but centers has {centers.shape[1]}")
    if not _all_finite(centers):
        raise ValueError("centers contains NaN or Inf")
    sq = _max_sq_norm(centers)
    if sq > NORM_LIMIT:
        raise ValueError(f"centers: a centre's squared norm is {sq:.3g}, above {NORM_LIMIT:.3g} (squared distances "
                         "would overflow float32: scale the data down)")
    return x, centers


def _max_sq_norm(a) -> float:
    """Largest squared row norm, in float64."""
    if _is_torch(a):
        return float((a.double() ** 2).sum(1).max())
    a64 = np.asarray(a, np.float64)
    return float(np.einsum("kd,kd->k", a64, a64).max())


def _on_cuda(a) -> bool:
    return _is_torch(a) and a.is_cuda


def _empty(like, shape, kind: str):
    """Output array in like's framework and device; kind in {'f32', 'f64', 'i64'}."""
    if _is_torch(like):
        dt = {"f32": torch.float32, "f64": torch.float64, "i64": torch.int64}[kind]
        return torch.empty(shape, dtype=dt, device=like.device)
    return np.empty(shape, dtype={"f32": np.float32, "f64": np.float64, "i64": np.int64}[kind])


def _zeros(like, shape, kind: str):
    out = _empty(like, shape, kind)
    out[...] = 0
    return out


def _vector(v, like, k: int, name: str):
    """A length-k float32 vector in like's framework/device (a fresh copy)."""
    if _is_torch(v):
        v = v.detach().to(dtype=torch.float32).cpu().numpy()
    v = np.array(v, dtype=np.float32).reshape(-1)
    if v.shape != (k,):
        raise ValueError(f"{name}: expected shape ({k},), got {v.shape}")
    if not np.isfinite(v).all():
        raise ValueError(f"{name}: contains NaN or Inf")
    if _is_torch(like):
        return torch.from_numpy(v).to(like.device)
    return v


def _call(x, fn_name: str, *args):
    if _on_cuda(x):
        mod = _cuda_module()
        with torch.cuda.device(x.device):
            stream = torch.cuda.current_stream(x.device).cuda_stream
            return getattr(mod, fn_name)(*args, stream)
    return getattr(_cpu_module(), fn_name)(*args)


# --------------------------------------------------------------------------------------------
# ops


def assign(x, centers, bias=None):
    """Nearest centre of every point, fused (no N x K matrix).

    x: (N, D), centers: (K, D), bias: optional (K,) added to the squared distances before the
    argmin (balanced prediction passes the cluster prices here).
    Returns labels: int64 (N,), sqdist: float32 (N,) squared distance to the chosen centre.
    """
    x, centers = _check_pair(x, centers)
    n, k = x.shape[0], centers.shape[0]
    b = None if bias is None else _vector(bias, x, k, "bias")
    labels, sqdist = _empty(x, (n,), "i64"), _empty(x, (n,), "f32")
    _call(x, "assign", x, centers, b, labels, sqdist)
    return labels, sqdist


def _sqdist_f64(x, centers):
    """Exact pairwise squared distances in float64: (N, K)."""
    if _is_torch(x):
        xd, cd = x.detach().double(), centers.detach().double()
        return ((xd[:, None, :] - cd[None, :, :]) ** 2).sum(-1)
    xd, cd = np.asarray(x, np.float64), np.asarray(centers, np.float64)
    return ((xd[:, None, :] - cd[None, :, :]) ** 2).sum(-1)


def assign_ref(x, centers, bias=None):
    """Reference for assign: float64 distances, argmin (first index on ties)."""
    d = _sqdist_f64(x, centers)
    if _is_torch(d):
        score = d + (0 if bias is None else torch.as_tensor(bias, dtype=torch.float64, device=d.device))
        labels = torch.argmin(score, dim=1)
        return labels, d.gather(1, labels[:, None])[:, 0].float()
    score = d + (0 if bias is None else np.asarray(bias, np.float64))
    labels = np.argmin(score, axis=1)
    return labels.astype(np.int64), d[np.arange(len(d)), labels].astype(np.float32)


def pairwise_sqdist(x, centers):
    """Squared Euclidean distances of every point to every centre: float32 (N, K)."""
    x, centers = _check_pair(x, centers)
    out = _empty(x, (x.shape[0], centers.shape[0]), "f32")
    _call(x, "pairwise_sqdist", x, centers, out)
    return out


def pairwise_sqdist_ref(x, centers):
    """Reference for pairwise_sqdist (float64, returned as float32)."""
    d = _sqdist_f64(x, centers)
    return d.float() if _is_torch(d) else d.astype(np.float32)


def _check_labels(labels, x, k: int):
    if _is_torch(x):
        if not _is_torch(labels) or labels.device != x.device:
            raise TypeError(f"labels must be a torch tensor on {x.device}")
        labels = labels.detach().to(torch.int64).contiguous()
    else:
        labels = np.ascontiguousarray(labels, dtype=np.int64)
    if tuple(labels.shape) != (x.shape[0],):
        raise ValueError(f"labels: expected shape ({x.shape[0]},), got {tuple(labels.shape)}")
    if labels.shape[0] and (int(labels.min()) < 0 or int(labels.max()) >= k):
        raise ValueError(f"labels must lie in [0, {k})")
    return labels


def centroid_update(x, labels, n_clusters: int):
    """Per-cluster sums and counts, the k-means M-step.

    Returns sums: float64 (K, D) and counts: int64 (K,); centres are sums / counts. Sums are
    float64 so chunks of a streamed corpus can be accumulated without loss.
    """
    x = _check_float_matrix(x, "x")
    if int(n_clusters) < 1:
        raise ValueError("n_clusters must be at least 1")
    k = int(n_clusters)
    labels = _check_labels(labels, x, k)
    sums, counts = _zeros(x, (k, x.shape[1]), "f64"), _zeros(x, (k,), "i64")
    _call(x, "centroid_update", x, labels, sums, counts)
    return sums, counts


def centroid_update_ref(x, labels, n_clusters: int):
    """Reference for centroid_update."""
    if _is_torch(x):
        xd = x.detach().double()
        sums = torch.zeros(n_clusters, x.shape[1], dtype=torch.float64, device=x.device)
        sums.index_add_(0, labels.long(), xd)
        return sums, torch.bincount(labels.long(), minlength=n_clusters)
    xd = np.asarray(x, np.float64)
    sums = np.zeros((n_clusters, x.shape[1]))
    np.add.at(sums, np.asarray(labels), xd)
    return sums, np.bincount(np.asarray(labels), minlength=n_clusters).astype(np.int64)


def _capacity(n: int, k: int, capacity) -> int:
    if k > n:
        raise ValueError(f"more clusters than points: K={k} > N={n}")
    if capacity is None:
        return -(-n // k)
    cap = int(capacity)
    if cap != capacity or cap < 1:
        raise ValueError(f"capacity must be a positive integer, got {capacity!r}")
    if cap * k < n:
        raise ValueError(f"capacity {cap} x K={k} clusters cannot hold N={n} points (need >= {math.ceil(n / k)})")
    return cap


def balanced_assign(x, centers, capacity=None, prices=None, *, return_stats: bool = False):
    """Exact capacity-constrained assignment of minimum total squared distance.

    No cluster receives more than ``capacity`` points (default ceil(N / K)). The result is an
    optimum of the transportation problem (up to float ties), found by a dual price method.
    Returns labels: int64 (N,) and prices: float32 (K,), the dual variables: every point sits at
    argmin_k (d_ik + prices_k), so ``assign(x, centers, bias=prices)`` reproduces the labels (up
    to ties) and keeps new data balanced. Passing ``prices`` from an earlier solve warm-starts.
    ``return_stats=True`` adds a third value, the solve's statistics: ``effective_passes``
    (distance rows computed / N), ``rounds`` (price rounds), ``augments`` (shortest-path
    augmentations), ``cached`` (largest candidate set held).
    """
    x, centers = _check_pair(x, centers)
    n, k = x.shape[0], centers.shape[0]
    cap = _capacity(n, k, capacity)
    p = _vector(np.zeros(k, np.float32) if prices is None else prices, x, k, "prices")
    labels = _empty(x, (n,), "i64")
    stats = dict(_call(x, "balanced_assign", x, centers, cap, p, prices is not None, labels))
    _deprecated.stats = stats
    return (labels, p, dict(stats)) if return_stats else (labels, p)


def balanced_assign_ref(x, centers, capacity=None):
    """Reference for balanced_assign: scipy's linear_sum_assignment on the cost matrix expanded
    to ``capacity`` slots per cluster (exact; O(N * K * capacity) memory, small inputs only).
    Returns labels int64 (N,) and the optimal total cost (float64)."""
    from scipy.optimize import linear_sum_assignment

    d = _sqdist_f64(x, centers)
    d = d.cpu().numpy() if _is_torch(d) else d
    n, k = d.shape
    cap = _capacity(n, k, capacity)
    rows, cols = linear_sum_assignment(np.repeat(d, cap, axis=1))
    labels = np.empty(n, np.int64)
    labels[rows] = cols // cap
    return labels, float(d[rows, labels[rows]].sum())


def total_cost(x, centers, labels) -> float:
    """Sum of squared distances of the points to their assigned centres (float64)."""
    if _is_torch(x):
        diff = x.detach().double() - centers.detach().double()[labels.long()]
        return float((diff * diff).sum())
    diff = np.asarray(x, np.float64) - np.asarray(centers, np.float64)[np.asarray(labels)]
    return float(np.einsum("nd,nd->", diff, diff))


def to_numpy(a: Any) -> np.ndarray:
    """numpy view/copy of a numpy array or torch tensor (any device; bfloat16 becomes float32)."""
    if _is_torch(a):
        a = a.detach().cpu()
        return (a.float() if a.dtype == torch.bfloat16 else a).numpy()
    return np.asarray(a)


# --------------------------------------------------------------------------------------------
# expert mixture (Triton)


def decode_attention(q, k, v, slots, lengths, scale: float):
    """One decode step of attention over a pool of KV-cache slots: row p's query attends to the first
    ``lengths[p]`` positions of slot ``slots[p]``, read in place.

    q: (P, Hq, D); k, v: (S, Hk, L, D) of q's dtype (Hq a multiple of Hk: grouped-query attention);
    slots, lengths: (P,) integers. Returns (P, Hq, D) in q's dtype, computed in float32. CPU tensors
    run the OpenMP kernel (no gather of the slots); CUDA tensors gather and call PyTorch's SDPA."""
    if not all(_is_torch(a) for a in (q, k, v, slots, lengths)):
        raise TypeError("decode_attention takes torch tensors")
    if q.ndim != 3 or k.ndim != 4 or v.shape != k.shape or q.shape[2] != k.shape[3]:
        raise ValueError(f"decode_attention: q (P, Hq, D) and k, v (S, Hk, L, D) expected, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.dtype != k.dtype or v.dtype != k.dtype or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"decode_attention: q, k, v must share a float dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    P, hq, D = q.shape
    S, hk, L, _ = k.shape
    slots, lengths = slots.to(device=q.device, dtype=torch.int64), lengths.to(device=q.device, dtype=torch.int64)
    if tuple(slots.shape) != (P,) or tuple(lengths.shape) != (P,):
        raise ValueError(f"decode_attention: slots and lengths must have shape ({P},)")
    if q.is_cuda:
        return _decode_attention_torch(q, k, v, slots, lengths, scale)
    out = torch.empty(P, hq * D, dtype=torch.float32)
    _cpu_module().decode_attention(q.detach().reshape(P, hq * D).contiguous(), k.detach().view(S * hk * L, D),
                                   v.detach().view(S * hk * L, D), slots.contiguous(), lengths.contiguous(), hk, L,
                                   float(scale), out)
    return out.view(P, hq, D).to(q.dtype)


def _decode_attention_torch(q, k, v, slots, lengths, scale: float):
    """decode_attention with PyTorch ops: the slots gathered, then one masked SDPA call."""
    end = int(lengths.max())
    keys, values = k[:, :, :end].index_select(0, slots), v[:, :, :end].index_select(0, slots)
    mask = torch.arange(end, device=q.device)[None, None, None, :] < lengths[:, None, None, None]
    out = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=mask, scale=scale,
                                                           enable_gqa=k.shape[1] != q.shape[1])
    return out[:, :, 0]


def decode_attention_ref(q, k, v, slots, lengths, scale: float):
    """Reference for decode_attention: each row on its own, float64, returned in q's dtype."""
    group = q.shape[1] // k.shape[1]
    out = []
    for p in range(q.shape[0]):
        n, s = int(lengths[p]), int(slots[p])
        keys = k[s, :, :n].double().repeat_interleave(group, 0)  # (Hq, n, D)
        values = v[s, :, :n].double().repeat_interleave(group, 0)
        w = torch.softmax(scale * (keys @ q[p].double()[:, :, None])[..., 0], -1)  # (Hq, n)
        out.append((w[:, None, :] @ values)[:, 0])
    return torch.stack(out).to(q.dtype)


def varlen_attention(qkv, lengths, heads: int, kv_heads: int, scale: float):
    """Causal self-attention of segments packed without padding (flash-attn's varlen "qkvpacked" layout):
    segment p is the next ``lengths[p]`` rows of ``qkv`` and attends only to itself.

    qkv: (N, (heads + 2 kv_heads) D), each row's query heads, then key heads, then value heads (one fused
    projection's output; query head h reads key/value head h // (heads / kv_heads)); lengths: (P,)
    integers >= 0 summing to N. Returns (N, heads D) in qkv's dtype. CPU tensors run the OpenMP kernel
    in float32 (no padding: each segment costs its own length squared); CUDA tensors and tensors needing
    grad pad the segments and call PyTorch's SDPA."""
    if not _is_torch(qkv) or not _is_torch(lengths):
        raise TypeError("varlen_attention takes torch tensors")
    if qkv.ndim != 2 or not qkv.is_floating_point():
        raise ValueError(f"varlen_attention: qkv must be a 2-D float tensor, got {qkv.dtype} {tuple(qkv.shape)}")
    if heads < 1 or kv_heads < 1 or heads % kv_heads or qkv.shape[1] % (heads + 2 * kv_heads) or qkv.shape[1] == 0:
        raise ValueError(f"varlen_attention: {qkv.shape[1]} columns are not (heads + 2 kv_heads) * D for heads={heads}, "
                         f"kv_heads={kv_heads} (heads a multiple of kv_heads)")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"varlen_attention: scale must be positive and finite, got {scale}")
    lengths = lengths.to(device="cpu", dtype=torch.int64)
    if lengths.ndim != 1 or (lengths < 0).any() or int(lengths.sum()) != qkv.shape[0]:
        raise ValueError(f"varlen_attention: lengths must be (P,) integers >= 0 summing to qkv's {qkv.shape[0]} rows")
    if qkv.is_cuda or qkv.requires_grad:
        return _varlen_attention_torch(qkv, lengths, heads, kv_heads, scale)
    D = qkv.shape[1] // (heads + 2 * kv_heads)
    x = qkv.detach().float()
    if x.stride(1) != 1:
        x = x.contiguous()
    out = torch.empty(qkv.shape[0], heads * D, dtype=torch.float32)
    _cpu_module().varlen_attention(x, lengths.contiguous(), heads, kv_heads, float(scale), out)
    return out.to(qkv.dtype)


def _varlen_attention_torch(qkv, lengths, heads: int, kv_heads: int, scale: float):
    """varlen_attention with PyTorch ops: the segments padded to the longest, one causal SDPA call."""
    N, C = qkv.shape
    D = C // (heads + 2 * kv_heads)
    P, T = len(lengths), int(lengths.max()) if len(lengths) else 0
    if N == 0:
        return qkv.new_zeros(0, heads * D)
    lengths = lengths.to(qkv.device)
    valid = torch.arange(T, device=qkv.device)[None, :] < lengths[:, None]  # (P, T)
    rows, cols = valid.nonzero(as_tuple=True)
    padded = qkv.new_zeros(P, T, C)  # zeros at the padding: never attended to by a real row, but not NaN
    padded[rows, cols] = qkv
    h = padded.view(P, T, heads + 2 * kv_heads, D).transpose(1, 2)  # (P, H, T, D)
    out = torch.nn.functional.scaled_dot_product_attention(
        h[:, :heads], h[:, heads:heads + kv_heads], h[:, heads + kv_heads:], is_causal=True, scale=scale,
        enable_gqa=kv_heads != heads)  # (P, heads, T, D)
    return out.transpose(1, 2)[rows, cols].reshape(N, heads * D)


def varlen_attention_ref(qkv, lengths, heads: int, kv_heads: int, scale: float):
    """Reference for varlen_attention: each segment on its own, float64, returned in qkv's dtype."""
    D = qkv.shape[1] // (heads + 2 * kv_heads)
    out, a = [], 0
    for n in [int(n) for n in lengths]:
        x = qkv[a:a + n].double().view(n, heads + 2 * kv_heads, D).transpose(0, 1)  # (H, n, D)
        a += n
        q = x[:heads]
        k = x[heads:heads + kv_heads].repeat_interleave(heads // kv_heads, 0)
        v = x[heads + kv_heads:].repeat_interleave(heads // kv_heads, 0)
        s = (scale * q @ k.transpose(1, 2)).masked_fill(torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1), -math.inf)
        out.append((s.softmax(-1) @ v).transpose(0, 1).reshape(n, heads * D))
    return (torch.cat(out) if out else qkv.new_zeros(0, heads * D, dtype=torch.float64)).to(qkv.dtype)


def grouped_rms_norm(x, weight, expert, eps: float):
    """RMSNorm of every row with its own expert's weight: ``weight[expert[n]] * x[n] / rms(x[n])``.
    x: (N, D); weight: (K, D) of x's dtype; expert: (N,) integers. Float32 CPU tensors (without grad)
    run one OpenMP kernel (PyTorch runs RMSNorm as several ops); anything else :func:`grouped_rms_norm_ref`."""
    if not all(_is_torch(a) for a in (x, weight, expert)):
        raise TypeError("grouped_rms_norm takes torch tensors")
    if x.ndim != 2 or weight.ndim != 2 or weight.shape[1] != x.shape[1] or tuple(expert.shape) != (x.shape[0],):
        raise ValueError(f"grouped_rms_norm: x (N, D), weight (K, D), expert (N,) expected, got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(expert.shape)}")
    if x.is_cuda or x.dtype != torch.float32 or weight.dtype != torch.float32 or x.requires_grad or weight.requires_grad:
        return grouped_rms_norm_ref(x, weight, expert, eps)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    _cpu_module().grouped_rms_norm(x.detach().contiguous(), weight.detach().contiguous(),
                                   expert.to(torch.int64).contiguous(), float(eps), out)
    return out


def grouped_rms_norm_ref(x, weight, expert, eps: float):
    """grouped_rms_norm as transformers' Llama RMSNorm computes it (in float32, then x's dtype; one fused
    op where torch has ``rms_norm``)."""
    xf = x.float()
    if hasattr(torch.nn.functional, "rms_norm"):
        normed = torch.nn.functional.rms_norm(xf, xf.shape[-1:], eps=eps)
    else:
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight[expert] * normed.to(x.dtype)


def rotary_(x, cos, sin):
    """Rotary positions in place: every head of row n becomes ``x * cos[n] + rotate_half(x) * sin[n]``.
    x: (N, H, D) with unit stride over D and H; cos, sin: (N, D). Float32 CPU tensors run one OpenMP
    kernel; anything else :func:`rotary_ref`, written back. Returns x."""
    if not all(_is_torch(a) for a in (x, cos, sin)):
        raise TypeError("rotary_ takes torch tensors")
    if x.ndim != 3 or cos.shape != (x.shape[0], x.shape[2]) or sin.shape != cos.shape:
        raise ValueError(f"rotary_: x (N, H, D), cos and sin (N, D) expected, got {tuple(x.shape)}, "
                         f"{tuple(cos.shape)}, {tuple(sin.shape)}")
    fast = (not x.is_cuda and x.dtype == cos.dtype == sin.dtype == torch.float32 and x.stride(2) == 1
            and x.stride(1) == x.shape[2] and not x.requires_grad)
    if not fast:
        x.copy_(rotary_ref(x, cos, sin))
        return x
    _cpu_module().rotary(x.detach().view(x.shape[0], -1) if x.is_contiguous() else
                         x.detach().as_strided((x.shape[0], x.shape[1] * x.shape[2]), (x.stride(0), 1)),
                         cos.contiguous(), sin.contiguous(), x.shape[1])
    return x


def rotary_ref(x, cos, sin):
    """rotary_ as transformers computes it (``apply_rotary_pos_emb``), out of place."""
    h = x.shape[-1] // 2
    rotated = torch.cat((-x[..., h:], x[..., :h]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def weighted_logsumexp(logits, log_weights):
    """Mixed next-token log-probs: float32 (B, V) with
    ``out[b, v] = logsumexp_j(log_weights[b, j] + log_softmax(logits[j][b])[v])``.
    logits: k tensors (B, V) or one (k, B, V); log_weights: (B, k), -inf skips an expert (its logits are
    never read). CPU float32 / bfloat16 logits run the C++ kernel (one pass per expert row for its
    normaliser, one for the mixture) unless TRITON_INTERPRET=1 asks for the Triton kernels, which CUDA
    runs; anything else runs the PyTorch reference."""
    from .kernels import mixture

    if not _mixture_in_cpp(logits):
        return mixture.weighted_logsumexp(logits, log_weights)
    xs, lw, _, B, _ = mixture.validate_inputs(logits, log_weights, None, (torch.float32, torch.bfloat16))
    return _mixture_rows_cpp(xs, torch.arange(B).expand(len(xs), B), lw)


def weighted_logsumexp_rows(table, idx, log_weights):
    """:func:`weighted_logsumexp` of rows gathered from one table of logits, without the gather:
    ``out[b] = logsumexp_j(log_weights[b, j] + log_softmax(table[idx[j, b]]))``. table: (M, V);
    idx: (k, B) integers (read only where the weight is > -inf); log_weights: (B, k). Float32 (B, V)."""
    if not _is_torch(table) or not _is_torch(idx) or not _is_torch(log_weights):
        raise TypeError("weighted_logsumexp_rows takes torch tensors")
    if table.ndim != 2 or idx.ndim != 2 or tuple(log_weights.shape) != (idx.shape[1], idx.shape[0]):
        raise ValueError(f"weighted_logsumexp_rows: table (M, V), idx (k, B) and log_weights (B, k) expected, got "
                         f"{tuple(table.shape)}, {tuple(idx.shape)}, {tuple(log_weights.shape)}")
    if idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise TypeError(f"weighted_logsumexp_rows: idx must be integers, got {idx.dtype}")
    if not _mixture_in_cpp(table):
        from .kernels import mixture

        idx = idx.to(table.device)
        lw = log_weights.to(table.device)
        used = (lw > float("-inf")).T  # (k, B): the rows each expert rank must provide
        rows = [table.index_select(0, torch.where(u, i, 0)) for i, u in zip(idx, used)]
        return mixture.weighted_logsumexp(rows, lw)
    return _mixture_rows_cpp([table] * idx.shape[0], idx, log_weights.to(torch.float32))


def _mixture_in_cpp(logits) -> bool:
    """Whether these logits (a tensor or the first of a sequence) take the C++ mixture kernel."""
    from .kernels import mixture

    first = logits if _is_torch(logits) else next(iter(logits), None)
    return (_is_torch(first) and first.device.type == "cpu" and first.dtype in (torch.float32, torch.bfloat16)
            and not first.requires_grad and mixture.mixture_backend(first) == "torch")


def _mixture_rows_cpp(tables, idx, lw):
    """The C++ mixture of rows ``idx[j, b]`` of ``tables[j]`` (B, V each): float32 (B, V). The kernel
    checks the weights (no NaN or +inf) and the rows it reads."""
    out = torch.empty(lw.shape[0], tables[0].shape[1], dtype=torch.float32)
    tables = [t.detach() if t.stride(-1) == 1 else t.detach().contiguous() for t in tables]
    _cpu_module().weighted_logsumexp_rows(tables, idx.to(torch.int64).contiguous(), lw.contiguous(), out)
    return out


def weighted_logsumexp_target(logits, log_weights, target):
    """The mixture at one target token per row: float32 (B,), no B x V output."""
    from .kernels import mixture

    return mixture.weighted_logsumexp_target(logits, log_weights, target)


def weighted_logsumexp_ref(logits, log_weights, upcast=True):
    from .kernels import mixture

    return mixture.weighted_logsumexp_ref(logits, log_weights, upcast=upcast)


def weighted_logsumexp_target_ref(logits, log_weights, target, upcast=True):
    from .kernels import mixture

    return mixture.weighted_logsumexp_target_ref(logits, log_weights, target, upcast=upcast)
