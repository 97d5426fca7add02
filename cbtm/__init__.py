"""cbtm: Cluster-Branch-Train-Merge.

Cluster a corpus without metadata (tf-idf -> SVD -> balanced k-means), train one expert language
model per cluster, and merge the experts at inference as a sparse ensemble.

The package, one concept per module, each depending only on those listed before it:
corpus, embed, kmeans (with ops, the compiled kernels), assignments, cluster, tokens, models,
training/, branch, experts, moe, router, pool, stacked, engine, ensemble, hf_model, harness, fewshot,
evaluate, demo, server; cli on top. Names are imported on first use, so ``import cbtm`` stays cheap (no torch).
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {"BalancedKMeans": "kmeans", "Ensemble": "ensemble", "Router": "router", "TfidfEmbedder": "embed",
            "RunDir": "rundir", "EnsembleForCausalLM": "hf_model"}
_MODULES = ("ops", "corpus", "embed", "kmeans", "assignments", "cluster", "tokens", "models", "training", "branch",
            "experts", "moe", "router", "pool", "stacked", "engine", "ensemble", "hf_model", "harness", "fewshot",
            "evaluate", "demo", "cli", "defaults", "rundir")

__all__ = sorted(_EXPORTS) + ["ops", "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif name in _MODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'cbtm' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS) | set(_MODULES))
