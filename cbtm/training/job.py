"""One training job: train one model on the token streams of some clusters to a token budget.

A job is a pure function of its spec (name, clusters, token budget, init, config, data key): the
rows of every step come from a deterministic block stream, so a checkpoint holds one integer of
data position and a killed job resumes to the same weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .. import models, tokens
from ..rundir import RunDir, atomic_write_json, now
from .checkpoint import CheckpointError, digest, list_checkpoints, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .distributed import barrier, num_threads, resolve_device, process_world
from .mix import MixTrainer
from .trainer import NonFiniteLoss, Trainer


def _step_rows(step: int, budget: int, tokens_per_step: int, seq_len: int) -> list[tuple[int, int]]:
    """``(stream row, length)`` of the step's rows: full rows, and a shorter last row when the budget
    ends inside one."""
    pos, end = step * tokens_per_step, min((step + 1) * tokens_per_step, budget)
    rows = []
    while pos < end:
        n = min(seq_len, end - pos)
        rows.append((pos // seq_len, n))
        pos += n
    return rows


def _resolve(run: RunDir, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else run.inside(run.path / p, entries=True)


def _init_fingerprint(run: RunDir, init: dict) -> str:
    """What the job starts from: the named config and seed, or a hash of the weights files."""
    if "size" in init:
        return json.dumps(init, sort_keys=True)
    path = _resolve(run, init["path"])
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".json"))
    h = hashlib.blake2b(digest_size=12)
    for f in files:
        h.update(f.name.encode() + b"\0" + digest(f).encode())
    return h.hexdigest()


def _fingerprint(run: RunDir, spec: dict) -> str:
    """Everything that determines the job's weights: spec, init weights, tokenizer, token data."""
    from safetensors import safe_open

    h = hashlib.blake2b(digest_size=12)
    trained = TrainConfig(**spec["config"]).trained_fields()
    h.update(json.dumps({key: spec[key] for key in ("clusters", "tokens", "init", "key")}, sort_keys=True).encode())
    h.update(json.dumps(trained, sort_keys=True).encode())
    h.update(_init_fingerprint(run, spec["init"]).encode())
    if spec.get("moe"):  # a MoE's MiX job (expert jobs keep their fingerprints)
        h.update(json.dumps(spec["moe"], sort_keys=True).encode())
    h.update(tokens.tokenizer_fingerprint(run.tokenizer).encode())
    for c in spec["clusters"]:
        with safe_open(str(tokens.cache_path(run, c)), framework="np") as f:
            h.update(f.metadata()["data"].encode())
    return h.hexdigest()


def job_log(run: RunDir, name: str) -> dict | None:
    path = run.log_path(name)
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except ValueError:
        return None


def spec_json(spec: dict) -> dict:
    return json.loads(json.dumps(spec))


def same_training(a: dict | None, b: dict) -> bool:
    """Whether two job specs train the same weights (evaluation and checkpoint cadence aside)."""
    def key(s):
        return {**{k: s[k] for k in ("clusters", "tokens", "init", "key")},
                "config": TrainConfig(**s["config"]).trained_fields(), "moe": s.get("moe")}
    return a is not None and spec_json(key(a)) == spec_json(key(b))


def _stream(run: RunDir, clusters: Sequence[int], split: str) -> np.ndarray:
    parts = [tokens.load_tokens(run, c, split) for c in clusters]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _init_model(run: RunDir, init: dict):
    if "size" in init:
        return models.new_model(init["size"], tokens.load_tokenizer(run.tokenizer), init["seed"])
    return models.load_model(_resolve(run, init["path"]))


def run_job(run, spec: dict, *, device: str | None = None, threads: int | None = None, progress: bool = True,
            callback: Callable[[dict], None] | None = None, position: int = 0) -> dict:
    """Train one job to its token budget, resuming from its latest checkpoint; save the model to
    ``run/<spec.out>`` and the log to ``run/logs/<name>.json``; return the log. A job already done
    with the same fingerprint returns its log at once. ``callback(info)`` runs after every step
    (process 0 only); an exception it raises stops training (as a kill would)."""
    run = RunDir.of(run)
    with num_threads(threads):
        return _run_job(run, spec, device, progress, callback, position)


def _run_job(run: RunDir, spec: dict, device, progress: bool, callback, position: int) -> dict:
    from tqdm.auto import tqdm

    spec = spec_json(spec)
    cfg = TrainConfig(**spec["config"])
    world, rank = process_world()
    name, budget = spec["name"], int(spec["tokens"])
    fp = _fingerprint(run, spec)
    log_path = run.log_path(name)
    prev = job_log(run, name)
    out_dir = run.path / spec["out"]
    if prev and prev.get("status") == "done" and prev.get("fingerprint") == fp and (out_dir / "config.json").is_file():
        return prev
    dev = resolve_device(device, int(os.environ.get("LOCAL_RANK", 0)))
    train_ids = _stream(run, spec["clusters"], "train")
    stream = tokens.BlockStream(train_ids, cfg.seq_len, cfg.seed, spec["key"])
    blocks = tokens.pack(_stream(run, spec["clusters"], "valid"), cfg.seq_len, cfg.eval_tokens)
    model = _init_model(run, spec["init"])
    models.check_compatible(model.config, cfg.seq_len, run.manifest()["tokenizer"]["size"])
    tokens_per_step = cfg.batch_size * cfg.grad_accum * world * cfg.seq_len
    n_steps = -(-budget // tokens_per_step)
    trainer = (MixTrainer(model, cfg, n_steps, dev, **spec["moe"]) if spec.get("moe")
               else Trainer(model, cfg, n_steps, dev))
    ckpt_root = run.checkpoints / name
    state = {"step": 0, "tokens": 0, "history": [], "valid": [], "seconds": 0.0, "train_seconds": 0.0,
             "fingerprint": fp, "started": now()}
    ckpts = list_checkpoints(ckpt_root)
    if ckpts:
        state = load_checkpoint(run.inside(ckpts[-1], entries=True), trainer, fp)
        _check_counters(state, ckpts[-1], n_steps, budget)
    resumed_from = state["step"]
    log = {"name": name, "expert": spec["expert"], "clusters": spec["clusters"], "status": "running",
           "fingerprint": fp, "spec": spec, "tokens_budget": budget, "n_steps": n_steps,
           "tokens_per_step": tokens_per_step, "world_size": world, "device": str(dev),
           "threads": torch.get_num_threads(), "params": models.num_params(model),
           "train_tokens_available": len(train_ids), "epochs": round(budget / max(1, stream.n_blocks * cfg.seq_len), 3),
           "resumed_from_step": resumed_from}

    def write_log(**extra):
        if rank == 0:
            atomic_write_json(log_path, {**log, **{k: v for k, v in state.items() if k != "fingerprint"}, **extra})

    write_log()
    log_every = max(1, n_steps // 100)
    bar = tqdm(total=budget, initial=state["tokens"], unit="tok", unit_scale=True, desc=name, position=position,
               disable=not progress or rank != 0, dynamic_ncols=True, leave=True)
    session_tokens, session_train_s, session_start = 0, 0.0, time.time()
    mark = time.perf_counter()
    while state["step"] < n_steps:
        t0 = time.perf_counter()
        rows = [stream.row(r, n) for r, n in _step_rows(state["step"], budget, tokens_per_step, cfg.seq_len)]
        try:
            out = trainer.step(rows)
        except NonFiniteLoss as e:
            write_log(status="failed", error=f"{e} at step {state['step'] + 1}")
            raise NonFiniteLoss(f"{name} stopped at step {state['step'] + 1} of {n_steps}: {e} (a learning rate "
                                "too high, or non-finite weights in its init or checkpoint: lower --lr, or "
                                "--restart)") from None
        dt = time.perf_counter() - t0
        state["step"] += 1
        state["tokens"] += out["tokens"]
        state["train_seconds"] += dt
        session_tokens, session_train_s = session_tokens + out["tokens"], session_train_s + dt
        info = {"step": state["step"], "tokens": state["tokens"], "loss": out["loss"], "lr": out["lr"],
                "grad_norm": out["grad_norm"], "tokens_per_s": round(out["tokens"] / max(dt, 1e-9), 1)}
        if state["step"] % log_every == 0 or state["step"] == n_steps:
            state["history"].append(info)
        bar.update(out["tokens"])
        bar.set_postfix(loss=f"{out['loss']:.3f}", refresh=False)
        if cfg.eval_every and state["step"] % cfg.eval_every == 0 and state["step"] < n_steps:
            valid = _finite_valid(trainer.evaluate(blocks), name, state["step"])
            state["valid"].append({"step": state["step"], "tokens": state["tokens"], "valid_loss": valid})
            if valid is not None:
                bar.set_postfix(loss=f"{out['loss']:.3f}", valid=f"{valid:.3f}", refresh=False)
        state["seconds"] += time.perf_counter() - mark  # wall time: steps, evaluations, checkpoints
        mark = time.perf_counter()
        if cfg.ckpt_every and state["step"] % cfg.ckpt_every == 0 and state["step"] < n_steps:
            with _disk_errors(f"{name}: cannot write a checkpoint in {ckpt_root}"):
                save_checkpoint(ckpt_root, trainer, state)
            write_log()
        if callback is not None and rank == 0:
            callback({"name": name, "n_steps": n_steps, **info})
    bar.close()
    final = _finite_valid(trainer.evaluate(blocks), name, state["step"])
    state["seconds"] += time.perf_counter() - mark
    state["valid"].append({"step": state["step"], "tokens": state["tokens"], "valid_loss": final})
    if rank == 0:  # trained in float32, saved in the init's dtype unless save_dtype names another
        source = None if "size" in spec["init"] else _resolve(run, spec["init"]["path"])
        with _disk_errors(f"{name}: cannot write the trained model to {out_dir}"):
            models.save(trainer.model.to(models.save_dtype(cfg.save_dtype, source)), out_dir)
    speed = session_tokens / session_train_s if session_train_s else None
    result = {"final_valid_loss": final, "valid_tokens": sum(len(b) for b in blocks),
              "tokens_trained": state["tokens"], "tokens_per_s": speed, "finished": now(),
              "last_session": {"start": session_start, "end": time.time(), "tokens": session_tokens,
                               "pid": os.getpid()}}
    write_log(**result, status="done")
    barrier()
    return {**log, **state, **result, "status": "done"}


def _check_counters(state: dict, path: Path, n_steps: int, budget: int) -> None:
    """A checkpoint's step and token counters must lie inside the job (they decide where it resumes)."""
    step, toks = state.get("step"), state.get("tokens")
    ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (step, toks))
    if not (ints and 0 <= step < n_steps and 0 <= toks <= budget and isinstance(state.get("history"), list)
            and isinstance(state.get("valid"), list)):
        raise CheckpointError(f"checkpoint {path}: step {step!r} and tokens {toks!r} are out of range for a job of "
                              f"{n_steps} steps and {budget} tokens: delete it to resume from the one before, or "
                              "pass --restart")


def _finite_valid(loss: float | None, name: str, step: int) -> float | None:
    if loss is not None and not np.isfinite(loss):
        raise NonFiniteLoss(f"{name}: non-finite validation loss {loss} after step {step}: lower --lr, or --restart")
    return loss


@contextlib.contextmanager
def _disk_errors(what: str):
    """An OSError (a full disk, a read-only directory) as one clear CheckpointError; resuming is safe."""
    try:
        yield
    except OSError as e:
        raise CheckpointError(f"{what}: {e.strerror or e}. Make room and run the same command again: it resumes "
                              "from the last checkpoint to the same weights") from None


def make_spec(name, expert, clusters, tokens, init, out, key, cfg: TrainConfig) -> dict:
    return spec_json({"name": name, "expert": expert, "clusters": list(clusters), "tokens": int(tokens),
                       "init": init, "out": out, "key": key, "config": asdict(cfg)})
