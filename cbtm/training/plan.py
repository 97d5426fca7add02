"""Planning a run's training: validate the request, create the tokenizer, token caches and seed,
one job spec per expert (plus the seed phase), and keep the manifest's statuses up to date."""

from __future__ import annotations

import shutil
from dataclasses import asdict, replace
from pathlib import Path
from typing import Sequence

from .. import assignments, models, tokens
from ..rundir import RunDir, expert_name
from .checkpoint import list_checkpoints
from .config import SEED_KEY, TrainConfig, split_budget
from .job import job_log, make_spec, same_training


def has_progress(run: RunDir, name: str) -> bool:
    log = job_log(run, name)
    return bool(list_checkpoints(run.checkpoints / name)) or bool(log and log.get("status") == "done")


def clear_job(run: RunDir, spec: dict) -> None:
    shutil.rmtree(run.checkpoints / spec["name"], ignore_errors=True)
    shutil.rmtree(run.path / spec["out"], ignore_errors=True)
    run.log_path(spec["name"]).unlink(missing_ok=True)


def record(run: RunDir, spec: dict, status: str, result: dict | None = None, error: str | None = None) -> None:
    """Write a job's status (and metrics) to the manifest: ``experts`` entries, or ``seed``."""
    fields_ = {"status": status}
    if result:
        fields_.update({key: result.get(key) for key in ("tokens_trained", "final_valid_loss", "params",
                                                          "seconds", "tokens_per_s")})
        fields_["log"] = f"logs/{spec['name']}.json"
        fields_["sha256"] = models.model_digest(run.path / spec["out"])  # verified whenever it is loaded
    if error:
        fields_["error"] = error
    if spec["expert"] is None:
        old = {k: v for k, v in run.manifest().get("seed", {}).items() if k != "error"}
        run.update(seed={**old, **fields_})
    else:
        run.update_experts({spec["expert"]: fields_}, drop=() if error else ("error",))


def plan_jobs(run: RunDir, *, total_tokens: int, model_size: str, seed_model, seed_tokens: int, experts, cfg: TrainConfig,
          vocab_size: int | None, restart: bool, progress: bool, write: bool) -> tuple[list[dict], dict]:
    """Validate the request and return (jobs, manifest train section). With ``write`` (one process
    only) it also creates the tokenizer, token caches and fresh seed, and records the plan."""
    if int(total_tokens) != total_tokens or total_tokens < 1:
        raise ValueError(f"total_tokens must be a positive integer, got {total_tokens!r}")
    if int(seed_tokens) != seed_tokens or seed_tokens < 0:
        raise ValueError(f"seed_tokens must be a non-negative integer, got {seed_tokens!r}")
    if seed_model is None:
        context = models.context_of_size(model_size)  # validates the name
    else:
        seed_model = Path(seed_model).resolve()
        if not seed_model.exists():
            raise FileNotFoundError(f"seed model not found: {seed_model}")
        models.require_safetensors(seed_model)
        context = models.context_length(models.load_config(seed_model))
    if context is not None and cfg.seq_len > context:
        raise ValueError(f"seq_len {cfg.seq_len} is larger than the model's context of {context} tokens: "
                         f"use --seq-len {context} or less")
    records = assignments.read_records(run)
    k = assignments.num_clusters(run, records)
    ids = list(range(k)) if experts is None else sorted({int(e) for e in experts})
    bad = [e for e in ids if not 0 <= e < k]
    if bad or not ids:
        raise ValueError(f"experts {bad or ids} do not exist: the run's clusters are 0..{k - 1}")
    if total_tokens < 2 * k:
        raise ValueError(f"total_tokens={total_tokens} is too small for {k} experts (at least 2 tokens each)")
    cfg = replace(cfg, lr=cfg.lr or models.default_lr(None if seed_model else model_size))
    budgets = split_budget(int(total_tokens), k)
    seed_init = {"path": str(seed_model)} if seed_model else {"size": model_size, "seed": cfg.seed}
    seed_info = {"source": "seed_phase" if seed_tokens else "seed_model" if seed_model else "config",
                 "model_size": None if seed_model else model_size, "seed_model": str(seed_model) if seed_model else None,
                 "seed": cfg.seed, "tokens": int(seed_tokens),
                 "path": "seed" if seed_tokens or not seed_model else str(seed_model)}
    jobs = []
    if seed_tokens:
        jobs.append(make_spec("seed", None, range(k), seed_tokens, seed_init, "seed", SEED_KEY, cfg))
    expert_init = seed_init if seed_model and not seed_tokens else {"path": "seed"}
    jobs += [make_spec(expert_name(e), e, [e], budgets[e], expert_init, f"experts/{expert_name(e)}", e, cfg) for e in ids]
    train = {"total_tokens": int(total_tokens), "k": k, "per_expert_tokens": budgets, "model_size": seed_info["model_size"],
             "seed_model": seed_info["seed_model"], "seed_tokens": int(seed_tokens), "config": asdict(cfg)}
    if not write:
        return jobs, train

    have_seed = run.manifest().get("seed")
    if have_seed and any(have_seed.get(key) != seed_info[key] for key in ("source", "model_size", "seed_model", "seed", "tokens")):
        raise ValueError(f"{run.path} branches from a seed made by {have_seed}, not {seed_info}: "
                         "train in a new run directory")
    for spec in jobs:
        log = job_log(run, spec["name"])
        if restart:
            clear_job(run, spec)
        elif log and not same_training(log.get("spec"), spec) and has_progress(run, spec["name"]):
            raise ValueError(f"{spec['name']} in {run.path} was trained with other settings; pass --restart "
                             "(restart=True) to train it from scratch, or use a new run directory")
    tok = tokens.ensure_tokenizer(run, seed_model, vocab_size, progress)
    need = range(k) if seed_tokens else ids
    info = tokens.ensure_token_cache(run, need, tok, progress)
    for c in need:
        if info[c]["train"] < cfg.seq_len:
            what = "no training documents" if not info[c]["train_documents"] else \
                f"{info[c]['train_documents']} training documents, {info[c]['train']} tokens"
            raise ValueError(f"cluster {c} has {what}: fewer tokens than one block of seq_len={cfg.seq_len}; "
                             "re-cluster with fewer clusters, or train the other experts with --experts")
    config = models.config_for(model_size, tok) if not seed_model else models.load_config(seed_model)
    models.check_compatible(config, cfg.seq_len, len(tok))
    if not seed_tokens and not seed_model and not (run.path / "seed" / "config.json").is_file():
        models.save(models.new_model(model_size, tok, cfg.seed), run.path / "seed")
    run.update(train=train, seed={**seed_info, "status": "done" if not seed_tokens else
                                  (have_seed or {}).get("status", "pending")})
    listed = {e["id"] for e in run.manifest().get("experts", [])}
    entries = {e: {"cluster": e, "path": f"experts/{expert_name(e)}", "tokens": budgets[e], "status": "pending"}
               for e in range(k) if e not in listed and e not in ids}  # every cluster has an entry
    for spec in jobs:
        if spec["expert"] is not None:
            log = job_log(run, spec["name"])
            done = bool(log and log.get("status") == "done" and same_training(log.get("spec"), spec))
            entries[spec["expert"]] = {"cluster": spec["clusters"][0], "path": spec["out"], "init": spec["init"],
                                       "tokens": spec["tokens"], "status": "done" if done else "pending"}
    run.update_experts(entries)
    return jobs, train


def run_summary(run: RunDir, names: Sequence[str]) -> dict:
    m = run.manifest()
    experts = [e for e in m.get("experts", []) if expert_name(e["id"]) in names]
    return {"run": str(run.path), "train": m.get("train"), "seed": m.get("seed"), "experts": experts,
            "tokens_trained": sum(e.get("tokens_trained") or 0 for e in experts)}


def print_summary(summary: dict) -> None:
    for e in summary["experts"]:
        loss, speed = e.get("final_valid_loss"), e.get("tokens_per_s")
        print(f"{expert_name(e['id'])}: {e['status']}, {e.get('tokens_trained') or 0:,} tokens, valid loss "
              f"{'-' if loss is None else f'{loss:.4f}'}{f', {speed:,.0f} tok/s' if speed else ''}", flush=True)
