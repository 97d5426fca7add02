"""Administering a run's experts (BTM): average them into one model, add or remove an expert,
export the ensemble's description."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from . import defaults, models
from .branch import average_experts, normalise_weights
from .cluster import load_router
from .rundir import RunDir, atomic_write_json, check_replaceable, holds_lock, replace_dir
from .tokens import load_tokenizer


def trained_entries(run) -> list[dict]:
    """The manifest entries of the run's trained experts, by id; FileNotFoundError when none."""
    entries = RunDir.of(run).expert_entries(done_only=True)
    if not entries:
        raise FileNotFoundError(f"{RunDir.of(run).path} has no trained experts: run `cbtm train` first")
    return entries


@holds_lock("merge average", "out", output=True)
def average(run, out, weights: str | Sequence[float] = "uniform", save_dtype: str = defaults.SAVE_DTYPE) -> Path:
    """The parameter average of a run's experts, saved as one Hugging Face model (with the run's
    tokenizer) in the new or empty directory ``out`` (or a previous average). weights: "uniform",
    "sizes" (training documents per cluster) or one number per expert; ``save_dtype``: see
    :func:`cbtm.models.save_dtype` ("auto": the experts' dtype)."""
    run = RunDir.of(run)
    out = Path(out)
    if run.contains(out) or out.resolve() in run.path.resolve().parents:
        raise ValueError(f"--to {out} is inside (or contains) the run directory {run.path} that is read: "
                         "write the averaged model somewhere else")
    check_replaceable(out, "model")
    entries = trained_entries(run)
    if isinstance(weights, str):
        if weights == "uniform":
            w = None
        elif weights == "sizes":
            w = cluster_sizes(run, [e.get("cluster", e["id"]) for e in entries])
        else:
            raise ValueError(f"weights must be 'uniform', 'sizes' or a list of numbers, got {weights!r}")
    else:
        w = list(weights)
    w = normalise_weights(w, len(entries))
    paths = [run.resolve(e["path"]) for e in entries]
    model = average_experts(paths, w, [e.get("sha256") for e in entries], models.save_dtype(save_dtype, paths[0]))
    tokenizer = load_tokenizer(run.tokenizer)

    def save(tmp: str) -> None:
        with models.quiet():
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(Path(tmp) / "cbtm_merge.json", {"source": str(run.path), "weights": w,
                                                           "experts": [e["id"] for e in entries]})

    return replace_dir(out, save, "model")


def cluster_sizes(run: RunDir, clusters: Sequence[int]) -> list[int]:
    """The training documents of each of ``clusters`` (``assignments.train_sizes``); a cluster it
    does not list (an expert added by `merge add`) is a ValueError, not a weight of 0."""
    sizes = run.section("assignments").get("train_sizes") or []
    missing = [c for c in clusters if not 0 <= c < len(sizes)]
    if missing:
        raise ValueError(f"{run.manifest_path}: assignments.train_sizes lists {len(sizes)} clusters, not the clusters "
                         f"{missing} of the experts (added by `merge add`?): weight them uniformly or give the weights")
    return [sizes[c] for c in clusters]


@holds_lock("merge add")
def add_expert(run, expert_dir, centre_texts: Sequence[str]) -> int:
    """Add a trained expert (a save_pretrained directory sharing the run's tokenizer), copied into the
    run, with a new router centre: the mean embedding of ``centre_texts`` (documents of its
    domain). Returns its id."""
    run = RunDir.of(run)
    expert_dir = Path(expert_dir)
    if not (expert_dir / "config.json").is_file():
        raise FileNotFoundError(f"{expert_dir}: no config.json (expected a save_pretrained directory)")
    if not centre_texts:
        raise ValueError("the new expert's centre needs at least one document of its domain")
    models.load_config(expert_dir)  # refuses custom code and unreadable configs before anything is copied
    models.require_safetensors(expert_dir)
    embedder, km = load_router(run)
    centre = embedder.transform(list(centre_texts)).mean(0).astype(np.float32)  # (D,)
    experts = run.expert_entries()
    new_id = max((e["id"] for e in experts), default=-1) + 1
    dst = run.expert_dir(new_id)
    replace_dir(dst, lambda tmp: shutil.copytree(expert_dir, tmp, symlinks=False), "model")
    km = km.with_center(centre, count=len(centre_texts))
    km.save(run.router)
    run.update_experts({new_id: {"cluster": km.n_clusters - 1, "path": f"experts/{dst.name}", "status": "done",
                                 "added_from": str(expert_dir), "sha256": models.model_digest(dst)}})
    return new_id


@holds_lock("merge remove")
def remove_expert(run, expert_id: int) -> None:
    """Drop an expert from the ensemble (its directory and router centre are kept, unused)."""
    run = RunDir.of(run)
    experts = run.expert_entries()
    if not any(e["id"] == expert_id for e in experts):
        raise ValueError(f"{run.path} has no expert {expert_id} (ids: {[e['id'] for e in experts]})")
    left = [e for e in experts if e["id"] != expert_id]
    if not any(e["status"] == "done" for e in left):
        raise ValueError("cannot remove the last expert of an ensemble")
    run.set_experts(left)


def export(run, path, top_k: int | None = defaults.TOP_K, temperature: float = defaults.TEMPERATURE,
           router: str | None = None) -> Path:
    """A self-describing JSON manifest of the ensemble (experts, router files, routing settings).
    ``router``: how it routes, "prefix" or "distance" (``Router.load(run).routing``; default:
    "prefix" when the run has a prefix router file, current or not)."""
    from . import __version__

    if router not in (None, "prefix", "distance"):
        raise ValueError(f"router must be 'prefix' or 'distance', got {router!r}")
    run = RunDir.of(run)
    entries = trained_entries(run)
    prefix = (run.router / "prefix.json").is_file() if router is None else router == "prefix"
    weights = ("softmax(coef @ e + intercept) of router/prefix.safetensors while it matches the run's centres "
               "and assignments, else softmax(-||e - c_j||^2 / T); top-k renormalised" if prefix
               else "softmax(-||e - c_j||^2 / T), top-k renormalised")
    spec = {"format": "cbtm.ensemble/1", "cbtm": __version__, "run": str(run.path.resolve()),
            "tokenizer": str(run.tokenizer.resolve()), "router": str(run.router.resolve()),
            "routing": {"kind": "cluster", "router": "prefix" if prefix else "distance", "top_k": top_k,
                        "temperature": temperature, "weights": weights},
            "experts": [{"id": e["id"], "cluster": int(e.get("cluster", e["id"])),
                         "path": str(run.resolve(e["path"]))} for e in entries]}
    return atomic_write_json(path, spec)
