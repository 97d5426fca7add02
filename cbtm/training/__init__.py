"""Branch and train: one expert LM per cluster, compute-matched, resumable, on one machine or many.

Modules, each depending only on those above it:

- ``config``: :class:`TrainConfig`, compute matching (:func:`split_budget`), the LR schedule
- ``distributed``: the torch.distributed world, devices, CPU threads
- ``trainer``: :class:`Trainer`, the optimisation of one model
- ``checkpoint``: atomic safetensors + JSON checkpoints, verified on load
- ``job``: one job (a model trained on some clusters to a token budget), resumable
- ``plan``: a run's jobs, tokenizer, token caches, seed, and the manifest's statuses
- ``launch``: :func:`train_experts` (local, worker processes, torchrun, Ray), :func:`train_runs`
  (several runs in one pool of worker processes) and :func:`train_dense`

Compute matching: with ``total_tokens=T`` and k clusters, expert i trains on exactly
``T // k (+1 for the first T % k)`` tokens, so the experts' token counts sum to T; the dense
baseline is the same run with k=1 (:func:`train_dense`).
"""

import importlib

_EXPORTS = {"CheckpointError": "checkpoint", "list_checkpoints": "checkpoint", "load_checkpoint": "checkpoint",
            "save_checkpoint": "checkpoint", "SEED_KEY": "config", "TrainConfig": "config", "lr_factor": "config",
            "make_config": "config", "split_budget": "config", "run_job": "job", "BACKENDS": "launch",
            "TrainingFailed": "launch", "prepare_dense": "launch", "train_dense": "launch", "train_experts": "launch",
            "train_runs": "launch", "Trainer": "trainer", "NonFiniteLoss": "trainer"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):  # lazy (PEP 562): `training.config` alone does not import torch
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
