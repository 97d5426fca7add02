"""BTM branching: a new expert initialised as the weighted parameter average of trained experts,
then trained on its cluster; and the parameter averaging itself."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from . import models
from .rundir import RunDir, expert_name, holds_lock
from .tokens import ensure_token_cache
from .training import TrainConfig, make_config
from .training.job import job_log, make_spec, same_training
from .training.launch import run_recorded
from .training.plan import clear_job, has_progress


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


def average_experts(paths: Sequence[str | Path], weights: Sequence[float] | None = None,
                    digests: Sequence[str | None] | None = None, dtype: torch.dtype | None = None):
    """The weighted parameter average of expert directories (``save_pretrained`` outputs of one
    architecture) as a model with the first expert's config, accumulated in float32 and returned
    in ``dtype`` (default: the dtype the first expert's weights are stored in); ``digests``: their
    expected weight checksums. Holds two models in memory at a time."""
    paths = [Path(p) for p in paths]
    w = normalise_weights(weights, len(paths))
    digests = list(digests) if digests is not None else [None] * len(paths)
    model = models.load_model(paths[0], sha256=digests[0])
    first = model.state_dict()
    acc = {name: t.detach().to(torch.float32) * w[0] if t.is_floating_point() else t for name, t in first.items()}
    for path, wi, sha in zip(paths[1:], w[1:], digests[1:]):
        other = models.load_model(path, sha256=sha)
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
    return model.to(models.save_dtype("auto", paths[0]) if dtype is None else dtype)


def default_sources(run, expert: int) -> list[int]:
    """Every trained expert of the run but ``expert``: the default sources of a mixture."""
    return [e["id"] for e in RunDir.of(run).expert_entries(done_only=True) if e["id"] != int(expert)]


@holds_lock("branch")
def branch_from_mixture(run, cluster: int, weights: Sequence[float] | None = None, *,
                        sources: Sequence[int] | None = None, method: str = "given",
                        temperature: float | None = None, expert: int | None = None,
                        tokens: int | None = None, train: bool = True,
                        device: str | None = None, threads: int | None = None, restart: bool = False,
                        progress: bool = True, callback: Callable[[dict], None] | None = None,
                        **settings) -> dict:
    """BTM branching: initialise expert ``expert`` (default: id ``cluster``) as the weighted parameter
    average of trained ``sources`` (default: every finished expert), then train it on ``cluster``'s
    documents for ``tokens`` (default: the run's per-expert budget). ``weights``: one per source
    (default uniform); :func:`cbtm.router.mixture_weights` gives BTM's router weights, recorded with
    ``method="router"`` and their ``temperature``. Training settings default to the run's;
    ``settings`` override them. Returns the expert's manifest entry."""
    run = RunDir.of(run)
    m = run.manifest()
    entries = {e["id"]: e for e in m.get("experts", [])}
    expert = int(cluster if expert is None else expert)
    sources = [int(s) for s in (default_sources(run, expert) if sources is None else sources)]
    if not sources:
        raise ValueError("no trained experts to branch from: train some first (cbtm train)")
    for s in sources:
        if entries.get(s, {}).get("status") != "done" or not (run.resolve(entries[s]["path"]) / "config.json").is_file():
            raise ValueError(f"source expert {s} is not trained in {run.path}")
    if expert in sources:
        raise ValueError(f"expert {expert} cannot be initialised from a mixture that contains itself")
    if entries.get(expert, {}).get("status") == "done" and not restart and entries[expert].get("mixture") is None:
        raise ValueError(f"expert {expert} already exists; choose another --expert id or pass --restart")
    weights = normalise_weights(weights, len(sources))
    base = m.get("train")
    if base is None:
        raise FileNotFoundError(f"{run.path} has no training settings: run `cbtm train` first")
    tokens = int(tokens if tokens is not None else base["total_tokens"] // base["k"])
    if tokens < 2:
        raise ValueError(f"tokens must be at least 2, got {tokens}")
    cfg = make_config(TrainConfig(**base["config"]), settings)
    name = expert_name(expert)
    init_dir = run.init_dir(expert)
    mixture = {"sources": sources, "weights": weights, "method": method,
               "temperature": temperature}
    spec = make_spec(name, expert, [int(cluster)], tokens, {"path": f"init/{name}"}, f"experts/{name}", expert, cfg)
    if restart:
        clear_job(run, spec)
    elif has_progress(run, name) and not same_training((job_log(run, name) or {}).get("spec"), spec):
        raise ValueError(f"{name} was trained with other settings; pass --restart to train it from scratch")
    model = average_experts([run.resolve(entries[s]["path"]) for s in sources], weights,
                            [entries[s].get("sha256") for s in sources])
    models.save(model, init_dir)
    info = ensure_token_cache(run, [int(cluster)], progress=progress)
    if info[int(cluster)]["train"] < cfg.seq_len:
        raise ValueError(f"cluster {cluster} has too few training tokens ({info[int(cluster)]['train']}) "
                         f"for one block of seq_len={cfg.seq_len}")
    run.update_experts({expert: {"cluster": int(cluster), "path": spec["out"], "init": spec["init"],
                                   "tokens": tokens, "mixture": mixture, "status": "pending"}})
    if train:
        run_recorded(run, spec, device=device, threads=threads, progress=progress, callback=callback)
    return {e["id"]: e for e in run.manifest()["experts"]}[expert]
