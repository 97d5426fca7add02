"""Merging experts into one model: the weighted parameter average (BTM)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import torch


def normalise_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """Weights validated (finite, >= 0, positive sum, one per expert) and scaled to sum to 1."""
    if n < 1:
        raise ValueError("no experts to average")
    if weights is None:
        return [1.0 / n] * n
    w = [float(x) for x in weights]
    if len(w) != n:
        raise ValueError(f"{len(w)} weights for {n} experts")
    if any(not math.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero, got {w}")
    total = sum(w)
    return [x / total for x in w]


def average_state_dicts(state_dicts: Sequence[Mapping[str, torch.Tensor]],
                        weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """``sum_i w_i * sd_i[name]`` for every floating tensor (accumulated in float32, returned in the
    first state dict's dtypes); other tensors (integer buffers) are copied from the first, and must
    agree. Weights default to uniform and are normalised to sum to 1."""
    w = normalise_weights(weights, len(state_dicts))
    first = state_dicts[0]
    for i, sd in enumerate(state_dicts[1:], 1):
        if sd.keys() != first.keys():
            diff = sorted(set(sd.keys()) ^ set(first.keys()))
            raise ValueError(f"expert {i} has different parameters than expert 0 (e.g. {diff[:3]})")
    out = {}
    for name, t0 in first.items():
        tensors = [sd[name] for sd in state_dicts]
        if any(t.shape != t0.shape for t in tensors):
            raise ValueError(f"parameter {name!r} has different shapes: {[tuple(t.shape) for t in tensors]}")
        if not t0.is_floating_point():
            if any(not torch.equal(t, t0) for t in tensors):
                raise ValueError(f"non-floating tensor {name!r} differs between experts")
            out[name] = t0.clone()
            continue
        acc = torch.zeros(t0.shape, dtype=torch.float32, device=t0.device)
        for wi, t in zip(w, tensors):
            acc.add_(t.to(acc.device, torch.float32), alpha=wi)
        out[name] = acc.to(t0.dtype)
    return out


def average_experts(paths: Sequence[str | Path], weights: Sequence[float] | None = None):
    """The weighted parameter average of expert directories (``save_pretrained`` outputs of one
    architecture) as a model with the first expert's config. Holds two models in memory at a time."""
    from .models import load_model

    paths = [Path(p) for p in paths]
    w = normalise_weights(weights, len(paths))
    model = load_model(paths[0])
    first = model.state_dict()
    acc = {name: t.detach().to(torch.float32) * w[0] if t.is_floating_point() else t for name, t in first.items()}
    for i, (path, wi) in enumerate(zip(paths[1:], w[1:]), 1):
        other = load_model(path)
        if type(other) is not type(model):
            raise ValueError(f"{path} is a {type(other).__name__}, {paths[0]} a {type(model).__name__}")
        sd = other.state_dict()
        if sd.keys() != first.keys():
            raise ValueError(f"{path} has different parameters than {paths[0]}")
        for name, t in sd.items():
            if t.shape != first[name].shape:
                raise ValueError(f"parameter {name!r} of {path} has shape {tuple(t.shape)}, "
                                 f"expected {tuple(first[name].shape)}")
            if t.is_floating_point():
                acc[name].add_(t.detach().to(torch.float32), alpha=wi)
            elif not torch.equal(t, first[name]):
                raise ValueError(f"non-floating tensor {name!r} of {path} differs from expert 0")
        del other, sd
    model.load_state_dict({name: t.to(first[name].dtype) for name, t in acc.items()})
    return model
