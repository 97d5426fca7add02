"""Helpers shared by the benchmark suites: timing, synthetic data, tables, environment."""
import datetime
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def best_of(fn, repeats, sync=None):
    """Run ``fn()`` ``repeats`` times; return (best wall time in seconds, last result).

    ``sync`` (e.g. ``torch.cuda.synchronize``) is called before starting and stopping the clock.
    """
    best, out = float("inf"), None
    for _ in range(max(1, repeats)):
        if sync:
            sync()
        t0 = time.perf_counter()
        out = fn()
        if sync:
            sync()
        best = min(best, time.perf_counter() - t0)
    return best, out


def make_data(n, d=100, seed=0, modes=64, spread=1.0):
    """``n`` unit-norm float32 points: a seeded mixture of ``modes`` Gaussians, L2-normalised."""
    gen = np.random.default_rng(seed)
    means = gen.standard_normal((modes, d), dtype=np.float32)
    x = gen.standard_normal((n, d), dtype=np.float32)
    x *= spread
    x += means[gen.integers(modes, size=n)]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def kmeanspp_centers(x, k, seed=0, sample=10_000):
    """``k`` points of ``x`` picked by k-means++ (D^2 sampling) on a random subsample."""
    gen = np.random.default_rng(seed)
    pool = x[gen.choice(len(x), min(sample, len(x)), replace=False)].astype(np.float64)
    picks = [gen.integers(len(pool))]
    d2 = ((pool - pool[picks[0]]) ** 2).sum(1)
    for _ in range(k - 1):
        picks.append(gen.choice(len(pool), p=d2 / d2.sum()))
        d2 = np.minimum(d2, ((pool - pool[picks[-1]]) ** 2).sum(1))
    return pool[picks].astype(np.float32)


def assignment_cost(x, centers, labels):
    """Sum of squared distances from each point to its assigned centre, in float64."""
    x, centers, labels = (np.asarray(a) for a in (x, centers, labels))
    total = 0.0
    for i in range(0, len(x), 65_536):
        diff = x[i:i + 65_536].astype(np.float64) - centers[labels[i:i + 65_536]]
        total += float(np.einsum("ij,ij->", diff, diff))
    return total


def markdown_table(headers, rows):
    """A GitHub markdown table; floats are shown with 4 significant digits."""
    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def cpu_name():
    """CPU model from /proc/cpuinfo (falls back to platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def vector_isa():
    """The CPU's widest vector instruction set ("AVX-512", "AVX2", "NEON", "SSE" or "unknown") and the
    one cbtm's CPU micro-kernels (distance, attention, mixture) use (``cbtm._C.cpu_isa()``;
    ``CBTM_CPU_ISA`` can lower it)."""
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    cpu = ("AVX-512" if "avx512f" in flags else "AVX2" if {"avx2", "fma"} <= flags
           else "NEON" if flags & {"asimd", "neon"} else "SSE" if "sse2" in flags else "unknown")
    try:
        from cbtm import _C
        kernels = _C.cpu_isa()
    except ImportError:
        kernels = None
    return {"cpu_vector_isa": cpu, "kernel_isa": kernels}


def git_commit():
    """``git rev-parse HEAD`` of the repository, or "unknown"."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _version(module):
    try:
        return __import__(module).__version__
    except Exception:  # missing or broken package: record it, do not fail the benchmark
        return None


def environment(device):
    """Provenance recorded in every result file."""
    import torch

    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = cpu_name()
    try:
        import faiss
        faiss_threads = faiss.omp_get_max_threads()
    except ImportError:
        faiss_threads = None
    return {
        "device": device,
        "device_name": name,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        **vector_isa(),
        "torch_threads": torch.get_num_threads(),
        "faiss_threads": faiss_threads,
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "versions": {m: _version(m) for m in ("numpy", "torch", "sklearn", "faiss", "cbtm")},
    }
