"""Deprecated import path (until cbtm 0.3): training lives in :mod:`cbtm.training`, BTM branching in
:mod:`cbtm.branch`, router weights in :func:`cbtm.router.mixture_weights`."""

import warnings

from . import defaults
from .branch import branch_from_mixture as _branch_from_mixture
from .router import mixture_weights as router_weights
from .training import (BACKENDS, SEED_KEY, CheckpointError, TrainConfig, Trainer, TrainingFailed,  # noqa: F401
                       list_checkpoints, load_checkpoint, lr_factor, run_job, save_checkpoint, split_budget,
                       train_dense, train_experts)

warnings.warn("cbtm.train is deprecated: import from cbtm.training, cbtm.branch and cbtm.router",
              DeprecationWarning, stacklevel=2)


def branch_from_mixture(run, cluster: int, *, sources=None, weights=None, temperature: float = defaults.TEMPERATURE,
                        **kwargs) -> dict:
    """:func:`cbtm.branch.branch_from_mixture` with the old default: router weights when none are given."""
    from .branch import default_sources

    expert = kwargs.get("expert")
    sources = default_sources(run, cluster if expert is None else expert) if sources is None else list(sources)
    method = "given"
    if weights is None:
        weights, method = router_weights(run, cluster, sources, temperature), "router"
    return _branch_from_mixture(run, cluster, weights, sources=sources, method=method,
                                temperature=temperature if method == "router" else None, **kwargs)
