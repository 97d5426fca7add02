"""Merging experts (BTM): the weighted parameter average, and adding, removing and exporting the experts of a run's ensemble."""

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


# ------------------------------------------------------------------------------------------------
# operations on a run's ensemble: average into one model, add or remove an expert, export


def _entries(run) -> list[dict]:
    from .rundir import RunDir

    entries = [e for e in RunDir(run).manifest().get("experts") or [] if e.get("status") == "done"]
    if not entries:
        raise FileNotFoundError(f"{run} has no trained experts")
    return sorted(entries, key=lambda e: e["id"])


def average(run, out, weights: str | Sequence[float] = "uniform") -> Path:
    """The parameter average of a run's experts, saved as one Hugging Face model (with the run's
    tokenizer) in ``out``. weights: "uniform", "sizes" (training documents per cluster) or one
    number per expert."""
    from . import data
    from .models import save
    from .rundir import RunDir, atomic_write_json

    run = RunDir(run)
    entries = _entries(run.path)
    if isinstance(weights, str):
        if weights == "uniform":
            w = None
        elif weights == "sizes":
            sizes = run.manifest()["assignments"]["train_sizes"]
            w = [sizes[int(e.get("cluster", e["id"]))] for e in entries]
        else:
            raise ValueError(f"weights must be 'uniform', 'sizes' or a list of numbers, got {weights!r}")
    else:
        w = list(weights)
    model = average_experts([run.path / e["path"] for e in entries], w)
    out = Path(out)
    save(model, out)
    data.load_tokenizer(run.tokenizer).save_pretrained(out)
    atomic_write_json(out / "cbtm_merge.json", {"source": str(run.path), "experts": [e["id"] for e in entries],
                                                "weights": normalise_weights(w, len(entries))})
    return out


def add_expert(run, expert_dir, centre_texts: Sequence[str]) -> int:
    """Add a trained expert (a save_pretrained directory sharing the run's tokenizer) with a new
    router centre: the mean embedding of ``centre_texts`` (documents of its domain). Returns its id."""
    import shutil

    import numpy as np

    from .cluster import load_router
    from .rundir import RunDir

    run = RunDir(run)
    expert_dir = Path(expert_dir)
    if not (expert_dir / "config.json").is_file():
        raise FileNotFoundError(f"{expert_dir}: no config.json (expected a save_pretrained directory)")
    if not centre_texts:
        raise ValueError("the new expert's centre needs at least one document of its domain")
    embedder, km = load_router(run)
    centre = embedder.transform(list(centre_texts)).mean(0).astype(np.float32)  # (D,)
    km.cluster_centers_ = np.vstack([km.cluster_centers_, centre[None]])
    km.prices_ = np.append(km.prices_, np.float32(0))
    km.counts_ = np.append(km.counts_, np.int64(len(centre_texts)))
    km.n_clusters += 1
    km.save(run.router)
    experts = run.manifest().get("experts") or []
    new_id = max((e["id"] for e in experts), default=-1) + 1
    dst = run.experts / f"expert_{new_id:03d}"
    shutil.copytree(expert_dir, dst)
    experts.append({"id": new_id, "cluster": km.n_clusters - 1, "path": f"experts/expert_{new_id:03d}",
                    "status": "done", "added_from": str(expert_dir)})
    run.update(experts=experts)
    return new_id


def remove_expert(run, expert_id: int) -> None:
    """Drop an expert from the ensemble (its directory and router centre are kept, unused)."""
    from .rundir import RunDir

    run = RunDir(run)
    experts = run.manifest().get("experts") or []
    if not any(e["id"] == expert_id for e in experts):
        raise ValueError(f"{run.path} has no expert {expert_id} (ids: {[e['id'] for e in experts]})")
    left = [e for e in experts if e["id"] != expert_id]
    if not any(e.get("status") == "done" for e in left):
        raise ValueError("cannot remove the last expert of an ensemble")
    run.update(experts=left)


def export(run, path, top_k: int | None = 2, temperature: float = 0.1) -> Path:
    """A self-describing JSON manifest of the ensemble (experts, router files, routing settings)."""
    from . import __version__
    from .rundir import RunDir, atomic_write_json

    run = RunDir(run)
    entries = _entries(run.path)
    spec = {"format": "cbtm.ensemble/1", "cbtm": __version__, "run": str(run.path.resolve()),
            "tokenizer": str(run.tokenizer.resolve()), "router": str(run.router.resolve()),
            "routing": {"kind": "cluster", "top_k": top_k, "temperature": temperature,
                        "weights": "softmax(-||e - c_j||^2 / T), top-k renormalised"},
            "experts": [{"id": e["id"], "cluster": int(e.get("cluster", e["id"])),
                         "path": str((run.path / e["path"]).resolve())} for e in entries]}
    return atomic_write_json(path, spec)


def add_cli(sub) -> None:
    """Register ``cbtm merge average|add|remove|export``."""
    m = sub.add_parser("merge", help="BTM operations: average experts, add or remove one, export the ensemble")
    msub = m.add_subparsers(dest="action", required=True)
    a = msub.add_parser("average", help="parameter average of the experts as one model")
    a.add_argument("--out", required=True, help="run directory")
    a.add_argument("--to", required=True, help="directory of the averaged model")
    a.add_argument("--weights", default="uniform", help="uniform, sizes, or comma-separated numbers")
    a.set_defaults(fn=lambda x: print(average(x.out, x.to, x.weights if x.weights in ("uniform", "sizes")
                                                else [float(v) for v in x.weights.split(",")])))
    d = msub.add_parser("add", help="add a trained expert with a centre from documents of its domain")
    d.add_argument("--out", required=True, help="run directory")
    d.add_argument("--expert", required=True, help="the expert's save_pretrained directory")
    d.add_argument("--docs", nargs="+", required=True, help="JSONL / text files of the expert's domain (its centre)")
    d.set_defaults(fn=lambda x: print(f"added expert {add_expert(x.out, x.expert, _texts(x.docs))}"))
    r = msub.add_parser("remove", help="drop an expert from the ensemble")
    r.add_argument("--out", required=True, help="run directory")
    r.add_argument("--expert", type=int, required=True)
    r.set_defaults(fn=lambda x: remove_expert(x.out, x.expert))
    e = msub.add_parser("export", help="write the ensemble's manifest (JSON)")
    e.add_argument("--out", required=True, help="run directory")
    e.add_argument("--to", required=True, help="JSON file to write")
    e.add_argument("--top-k", type=int, default=2)
    e.add_argument("--temperature", type=float, default=0.1)
    e.set_defaults(fn=lambda x: print(export(x.out, x.to, x.top_k, x.temperature)))


def _texts(paths) -> list[str]:
    from .corpus import read_documents

    return [d.text for d in read_documents(paths)]
