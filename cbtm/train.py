"""Branch and train: one expert LM per cluster, compute-matched, resumable, on one machine or many.

Run directory outputs:

```
run/ tokenizer/, tokens/             shared tokenizer and per-cluster token caches (cbtm.data)
     seed/                           the model every expert branches from (fresh init or seed phase)
     init/expert_XXX/                an expert initialised as a mixture of experts (branch_from_mixture)
     experts/expert_XXX/             trained experts (save_pretrained: config.json + model.safetensors)
     checkpoints/<job>/step_XXXXXXXX/  model, optimizer, scheduler, RNG states, data position
     logs/<job>.json                 one JSON log per job (expert_XXX, seed): settings, losses, speed
```

Compute matching: with ``total_tokens=T`` and k clusters, expert i trains on exactly
``T // k (+1 for the first T % k)`` tokens, so the experts' token counts sum to T; a dense
baseline is the same run with k=1 (:func:`train_dense`). Every job is a pure function of its
spec: rows of its cluster's token stream are a function of the step (``data.BlockStream``), so a
checkpoint holds one integer of data position and a killed run resumes to the same weights.
Backends: ``local`` (in process, or ``parallel`` processes pinned to GPUs), ``torchrun`` (DDP inside
each job; gloo on CPU), ``ray`` (one task per expert, retried from its checkpoint).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import data, models
from .rundir import RunDir, atomic_write_json, now

BACKENDS = ("local", "torchrun", "ray")
SEED_KEY = 1_000_003  # data-order key of the seed phase (experts use their id)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: corrupt, incomplete, or written with other settings."""


class TrainingFailed(RuntimeError):
    """One or more jobs failed; the manifest records which and why."""


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of a training job (model and token budget are given separately)."""

    seq_len: int = 128           # CPU-friendly defaults; raise seq_len and batch_size on GPU
    batch_size: int = 4          # sequences per forward pass and process
    grad_accum: int = 1          # forward passes per optimizer step
    lr: float | None = None      # peak learning rate; None: the model size's default
    warmup: float = 0.05         # fraction of the steps with linear warmup; cosine decay after
    min_lr_ratio: float = 0.1    # final / peak learning rate
    weight_decay: float = 0.1    # on matrices only
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    clip: float = 1.0            # gradient-norm clipping; 0 disables
    eval_every: int = 100        # steps between validation losses; 0: only at the end
    eval_tokens: int = 65536     # validation tokens per evaluation (the first ones of the split)
    ckpt_every: int = 100        # steps between checkpoints; 0: none
    keep_checkpoints: int = 2
    seed: int = 0
    bf16: bool = True            # bf16 autocast on GPU; CPU trains in fp32

    def __post_init__(self):
        for name in ("seq_len", "batch_size", "grad_accum", "eval_tokens", "keep_checkpoints",
                     "eval_every", "ckpt_every", "seed"):
            value, low = getattr(self, name), 0 if name in ("eval_every", "ckpt_every", "seed") else 1
            if isinstance(value, bool) or int(value) != value or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
            object.__setattr__(self, name, int(value))
        if self.seq_len < 2:
            raise ValueError("seq_len must be at least 2")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.warmup < 1 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("warmup must be in [0, 1) and min_lr_ratio in [0, 1]")
        if self.weight_decay < 0 or self.clip < 0 or self.eps <= 0:
            raise ValueError("weight_decay and clip must be >= 0, eps > 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))

    def trained_fields(self) -> dict:
        """The settings that change the trained weights (evaluation and checkpoint cadence do not)."""
        skip = {"eval_every", "eval_tokens", "ckpt_every", "keep_checkpoints"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}


def split_budget(total_tokens: int, k: int) -> list[int]:
    """Compute matching: per-expert token budgets of k experts, summing to ``total_tokens``."""
    return [total_tokens // k + (i < total_tokens % k) for i in range(k)]


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warmup over ``warmup`` steps, then cosine to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------------------------
# distributed helpers


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _barrier() -> None:
    if _world()[0] > 1:
        torch.distributed.barrier()


def _launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" in os.environ


def _device(device: str | None, local_rank: int = 0) -> torch.device:
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device cuda requested but torch.cuda.is_available() is False")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
    return dev


@contextlib.contextmanager
def _num_threads(n: int | None):
    """Set torch's intra-op threads for the block (restored after)."""
    prev = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(prev)


# ------------------------------------------------------------------------------------------------
# the optimisation of one model


def _micro_batches(rows: Sequence[np.ndarray], size: int) -> list[list[np.ndarray]]:
    """Consecutive groups of at most ``size`` rows of equal length."""
    out: list[list[np.ndarray]] = []
    for r in rows:
        if out and len(out[-1]) < size and len(out[-1][0]) == len(r):
            out[-1].append(r)
        else:
            out.append([r])
    return out


class Trainer:
    """AdamW with warmup + cosine decay, gradient clipping and accumulation, bf16 autocast on GPU,
    and DDP when a process group is initialised. :meth:`step` takes the *global* batch of the step
    and trains on this process's share; the loss is the mean over all of the step's tokens, so
    any world size and accumulation split of the same batch gives the same update."""

    def __init__(self, model, cfg: TrainConfig, total_steps: int, device: str | torch.device = "cpu"):
        if cfg.lr is None:
            raise ValueError("TrainConfig.lr must be resolved before training")
        self.cfg, self.total_steps = cfg, int(total_steps)
        self.device = torch.device(device)
        self.world, self.rank = _world()
        self.model = model.to(self.device).train()
        self.net = self.model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids)
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        self.opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
        warmup = round(cfg.warmup * self.total_steps)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, partial(lr_factor, total=self.total_steps, warmup=warmup, min_ratio=cfg.min_lr_ratio))
        self.autocast = self.device.type == "cuda" and cfg.bf16

    def _loss_sum(self, net, rows: list[np.ndarray]) -> torch.Tensor:
        """Summed next-token cross-entropy of equal-length rows."""
        x = torch.from_numpy(np.stack(rows).astype(np.int64)).to(self.device)  # (b, L)
        labels = torch.roll(x, -1, dims=1)
        labels[:, -1] = -100  # (b, L): next token, none after the last (no slicing of the logits)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            logits = net(input_ids=x, use_cache=False).logits  # (b, L, V)
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")

    def step(self, rows: Sequence[np.ndarray]) -> dict:
        """One optimizer step on the global batch ``rows``; this process trains on rows[rank::world]."""
        n_tokens = sum(len(r) for r in rows)
        denom = sum(len(r) - 1 for r in rows)  # predicted tokens of the whole step
        lr = self.sched.get_last_lr()[0]
        if denom == 0:  # a final step of one token: nothing to predict
            return {"loss": float("nan"), "tokens": n_tokens, "grad_norm": 0.0, "lr": lr}
        batches = _micro_batches(rows[self.rank::self.world], self.cfg.batch_size)
        scale = self.world / denom  # DDP averages gradients over processes
        if not batches:  # fewer rows than processes: take part in the gradient sync with nothing
            batches, scale = [[rows[0]]], 0.0
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, mb in enumerate(batches):
            last = i == len(batches) - 1
            with self.net.no_sync() if self.world > 1 and not last else contextlib.nullcontext():
                loss = self._loss_sum(self.net, mb)
                (loss * scale).backward()
            if scale:
                total += loss.detach().double()
        if self.world > 1:
            torch.distributed.all_reduce(total)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip or float("inf"))
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return {"loss": float(total) / denom, "tokens": n_tokens, "grad_norm": float(norm), "lr": lr}

    @torch.no_grad()
    def evaluate(self, blocks: Sequence[np.ndarray]) -> float | None:
        """Mean next-token loss over ``blocks`` (split across processes); None without blocks."""
        if not blocks:
            return None
        self.model.eval()
        acc = torch.zeros(2, dtype=torch.float64, device=self.device)  # (loss sum, tokens)
        for mb in _micro_batches(blocks[self.rank::self.world], self.cfg.batch_size):
            acc[0] += self._loss_sum(self.model, mb).double()
            acc[1] += sum(len(r) - 1 for r in mb)
        if self.world > 1:
            torch.distributed.all_reduce(acc)
        self.model.train()
        return float(acc[0] / acc[1])


# ------------------------------------------------------------------------------------------------
# checkpoints: safetensors + JSON, committed by renaming a complete directory


def _digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def list_checkpoints(root: str | Path) -> list[Path]:
    """Committed checkpoints of a job, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))


def _flatten_optimizer(sd: dict) -> tuple[dict, dict]:
    """optimizer.state_dict() -> (tensors ``"<param>.<key>"``, JSON-able rest)."""
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, v in state.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{key}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, v in [*tensors.items(), *meta["scalars"].items()]:
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_state() -> tuple[dict, dict]:
    """(tensors, JSON) of this process's torch, CUDA, Python and numpy RNG states."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return tensors, {"python": [version, list(state), gauss],
                     "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def _set_rng_state(tensors: dict, meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors) - 1) if f"cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_checkpoint(root: str | Path, trainer: Trainer, state: dict) -> Path:
    """Write ``root/step_XXXXXXXX`` (every process its RNG state, process 0 the rest), atomically:
    files go to a hidden directory renamed into place once complete, with a size + hash list."""
    from safetensors.torch import save_file, save_model

    root = Path(root)
    world, rank = _world()
    final = root / f"step_{state['step']:08d}"
    tmp = root / f".{final.name}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    rng_tensors, rng_meta = _rng_state()
    save_file(rng_tensors, str(tmp / f"rng_rank{rank}.safetensors"))
    (tmp / f"rng_rank{rank}.json").write_text(json.dumps(rng_meta))
    _barrier()
    if rank == 0:
        save_model(trainer.model, str(tmp / "model.safetensors"))
        opt_tensors, opt_meta = _flatten_optimizer(trainer.opt.state_dict())
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        body = {**state, "optimizer": opt_meta, "scheduler": trainer.sched.state_dict(), "world_size": world}
        (tmp / "state.json").write_text(json.dumps(body))
        files = {f.name: {"bytes": f.stat().st_size, "blake2b": _digest(f)} for f in sorted(tmp.iterdir())}
        (tmp / "checkpoint.json").write_text(json.dumps({"format": "cbtm.checkpoint/1", "step": state["step"],
                                                         "files": files}, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in list_checkpoints(root)[:-trainer.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path: str | Path, trainer: Trainer, fingerprint: str) -> dict:
    """Verify a checkpoint (sizes, hashes, settings) and load it into ``trainer``; returns the
    job state (step, tokens, history). Raises CheckpointError with what to do about it."""
    from safetensors.torch import load_file, load_model

    path = Path(path)
    hint = (f"delete {path} to resume from the checkpoint before it, or pass --restart "
            f"(restart=True) to train this job from scratch")
    try:
        meta = json.loads((path / "checkpoint.json").read_text())
        for name, info in meta["files"].items():
            f = path / name
            if not f.is_file():
                raise CheckpointError(f"{name} is missing")
            if f.stat().st_size != info["bytes"] or _digest(f) != info["blake2b"]:
                raise CheckpointError(f"{name} does not match its recorded size and hash")
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt or incomplete ({e}): {hint}") from e
    if state.get("fingerprint") != fingerprint:
        raise CheckpointError(f"checkpoint {path} was written by a job with other settings (data, tokenizer, "
                              f"init or optimisation): {hint}")
    try:
        load_model(trainer.model, str(path / "model.safetensors"), device=str(trainer.device))
        trainer.opt.load_state_dict(_unflatten_optimizer(load_file(str(path / "optimizer.safetensors")),
                                                         state.pop("optimizer")))
        trainer.sched.load_state_dict(state.pop("scheduler"))
        rank_file = path / f"rng_rank{trainer.rank}.safetensors"
        stem = rank_file.stem if rank_file.is_file() else "rng_rank0"
        _set_rng_state(load_file(str(path / f"{stem}.safetensors")), json.loads((path / f"{stem}.json").read_text()))
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path} cannot be loaded ({e}): {hint}") from e
    state.pop("world_size", None)
    return state


# ------------------------------------------------------------------------------------------------
# one job: train one model on the token streams of some clusters


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
    return p if p.is_absolute() else run.path / p


def _init_fingerprint(run: RunDir, init: dict) -> str:
    """What the job starts from: the named config and seed, or a hash of the weights files."""
    if "size" in init:
        return json.dumps(init, sort_keys=True)
    path = _resolve(run, init["path"])
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".json"))
    h = hashlib.blake2b(digest_size=12)
    for f in files:
        h.update(f.name.encode() + b"\0" + _digest(f).encode())
    return h.hexdigest()


def _fingerprint(run: RunDir, spec: dict) -> str:
    """Everything that determines the job's weights: spec, init weights, tokenizer, token data."""
    from safetensors import safe_open

    h = hashlib.blake2b(digest_size=12)
    trained = TrainConfig(**spec["config"]).trained_fields()
    h.update(json.dumps({key: spec[key] for key in ("clusters", "tokens", "init", "key")}, sort_keys=True).encode())
    h.update(json.dumps(trained, sort_keys=True).encode())
    h.update(_init_fingerprint(run, spec["init"]).encode())
    h.update(data.tokenizer_fingerprint(run.tokenizer).encode())
    for c in spec["clusters"]:
        with safe_open(str(data.cache_path(run, c)), framework="np") as f:
            h.update(f.metadata()["data"].encode())
    return h.hexdigest()


def _job_log(run: RunDir, name: str) -> dict | None:
    path = run.path / "logs" / f"{name}.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except ValueError:
        return None


def _spec_json(spec: dict) -> dict:
    return json.loads(json.dumps(spec))


def _same_training(a: dict | None, b: dict) -> bool:
    """Whether two job specs train the same weights (evaluation and checkpoint cadence aside)."""
    def key(s):
        return {**{k: s[k] for k in ("clusters", "tokens", "init", "key")},
                "config": TrainConfig(**s["config"]).trained_fields()}
    return a is not None and _spec_json(key(a)) == _spec_json(key(b))


def _stream(run: RunDir, clusters: Sequence[int], split: str) -> np.ndarray:
    parts = [data.load_tokens(run, c, split) for c in clusters]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _init_model(run: RunDir, init: dict):
    if "size" in init:
        return models.new_model(init["size"], data.load_tokenizer(run.tokenizer), init["seed"])
    return models.load_model(_resolve(run, init["path"]))


def run_job(run, spec: dict, *, device: str | None = None, threads: int | None = None, progress: bool = True,
            callback: Callable[[dict], None] | None = None, position: int = 0) -> dict:
    """Train one job to its token budget, resuming from its latest checkpoint; save the model to
    ``run/<spec.out>`` and the log to ``run/logs/<name>.json``; return the log. A job already done
    with the same fingerprint returns its log at once. ``callback(info)`` runs after every step
    (process 0 only); an exception it raises stops training (as a kill would)."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    with _num_threads(threads):
        return _run_job(run, spec, device, progress, callback, position)


def _run_job(run: RunDir, spec: dict, device, progress: bool, callback, position: int) -> dict:
    from tqdm.auto import tqdm

    spec = _spec_json(spec)
    cfg = TrainConfig(**spec["config"])
    world, rank = _world()
    name, budget = spec["name"], int(spec["tokens"])
    fp = _fingerprint(run, spec)
    log_path = run.path / "logs" / f"{name}.json"
    prev = _job_log(run, name)
    out_dir = run.path / spec["out"]
    if prev and prev.get("status") == "done" and prev.get("fingerprint") == fp and (out_dir / "config.json").is_file():
        return prev
    dev = _device(device, int(os.environ.get("LOCAL_RANK", 0)))
    tokens = _stream(run, spec["clusters"], "train")
    stream = data.BlockStream(tokens, cfg.seq_len, cfg.seed, spec["key"])
    blocks = data.pack(_stream(run, spec["clusters"], "valid"), cfg.seq_len, cfg.eval_tokens)
    model = _init_model(run, spec["init"])
    models.check_compatible(model.config, cfg.seq_len, run.manifest()["tokenizer"]["size"])
    tokens_per_step = cfg.batch_size * cfg.grad_accum * world * cfg.seq_len
    n_steps = -(-budget // tokens_per_step)
    trainer = Trainer(model, cfg, n_steps, dev)
    ckpt_root = run.path / "checkpoints" / name
    state = {"step": 0, "tokens": 0, "history": [], "valid": [], "seconds": 0.0, "train_seconds": 0.0,
             "fingerprint": fp, "started": now()}
    ckpts = list_checkpoints(ckpt_root)
    if ckpts:
        state = load_checkpoint(ckpts[-1], trainer, fp)
    resumed_from = state["step"]
    log = {"name": name, "expert": spec["expert"], "clusters": spec["clusters"], "status": "running",
           "fingerprint": fp, "spec": spec, "tokens_budget": budget, "n_steps": n_steps,
           "tokens_per_step": tokens_per_step, "world_size": world, "device": str(dev),
           "threads": torch.get_num_threads(), "params": models.num_params(model),
           "train_tokens_available": len(tokens), "epochs": round(budget / max(1, stream.n_blocks * cfg.seq_len), 3),
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
        out = trainer.step(rows)
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
            valid = trainer.evaluate(blocks)
            state["valid"].append({"step": state["step"], "tokens": state["tokens"], "valid_loss": valid})
            if valid is not None:
                bar.set_postfix(loss=f"{out['loss']:.3f}", valid=f"{valid:.3f}", refresh=False)
        state["seconds"] += time.perf_counter() - mark  # wall time: steps, evaluations, checkpoints
        mark = time.perf_counter()
        if cfg.ckpt_every and state["step"] % cfg.ckpt_every == 0 and state["step"] < n_steps:
            save_checkpoint(ckpt_root, trainer, state)
            write_log()
        if callback is not None and rank == 0:
            callback({"name": name, "n_steps": n_steps, **info})
    bar.close()
    final = trainer.evaluate(blocks)
    state["seconds"] += time.perf_counter() - mark
    state["valid"].append({"step": state["step"], "tokens": state["tokens"], "valid_loss": final})
    if rank == 0:
        models.save(trainer.model, out_dir)
    speed = session_tokens / session_train_s if session_train_s else None
    result = {"final_valid_loss": final, "valid_tokens": sum(len(b) for b in blocks),
              "tokens_trained": state["tokens"], "tokens_per_s": speed, "finished": now(),
              "last_session": {"start": session_start, "end": time.time(), "tokens": session_tokens,
                               "pid": os.getpid()}}
    write_log(**result, status="done")
    _barrier()
    return {**log, **state, **result, "status": "done"}


# ------------------------------------------------------------------------------------------------
# the run: tokenizer, caches, seed, one job per expert, backends


def _expert_name(i: int) -> str:
    return f"expert_{i:03d}"


def _make_config(config: TrainConfig | None, overrides: dict) -> TrainConfig:
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown training settings {unknown}; known: {sorted(known)}")
    return replace(config or TrainConfig(), **overrides)


def _has_progress(run: RunDir, name: str) -> bool:
    log = _job_log(run, name)
    return bool(list_checkpoints(run.path / "checkpoints" / name)) or bool(log and log.get("status") == "done")


def _clear_job(run: RunDir, spec: dict) -> None:
    shutil.rmtree(run.path / "checkpoints" / spec["name"], ignore_errors=True)
    shutil.rmtree(run.path / spec["out"], ignore_errors=True)
    (run.path / "logs" / f"{spec['name']}.json").unlink(missing_ok=True)


def _update_entries(run: RunDir, updates: dict[int, dict], drop: Sequence[str] = ()) -> None:
    """Merge fields into the manifest's ``experts`` entries (by id; new ids are added), removing
    the keys ``drop`` of the updated entries."""
    entries = {e["id"]: e for e in run.manifest().get("experts", [])}
    for i, fields_ in updates.items():
        old = {k: v for k, v in entries.get(i, {"id": i}).items() if k not in drop}
        entries[i] = {**old, **fields_}
    run.update(experts=[entries[i] for i in sorted(entries)])


def _record(run: RunDir, spec: dict, status: str, result: dict | None = None, error: str | None = None) -> None:
    """Write a job's status (and metrics) to the manifest: ``experts`` entries, or ``seed``."""
    fields_ = {"status": status}
    if result:
        fields_.update({key: result.get(key) for key in ("tokens_trained", "final_valid_loss", "params",
                                                          "seconds", "tokens_per_s")})
        fields_["log"] = f"logs/{spec['name']}.json"
    if error:
        fields_["error"] = error
    if spec["expert"] is None:
        old = {k: v for k, v in run.manifest().get("seed", {}).items() if k != "error"}
        run.update(seed={**old, **fields_})
    else:
        _update_entries(run, {spec["expert"]: fields_}, drop=() if error else ("error",))


def _job(name, expert, clusters, tokens, init, out, key, cfg: TrainConfig) -> dict:
    return _spec_json({"name": name, "expert": expert, "clusters": list(clusters), "tokens": int(tokens),
                       "init": init, "out": out, "key": key, "config": asdict(cfg)})


def _plan(run: RunDir, *, total_tokens: int, model_size: str, seed_model, seed_tokens: int, experts, cfg: TrainConfig,
          vocab_size: int | None, restart: bool, progress: bool, write: bool) -> tuple[list[dict], dict]:
    """Validate the request and return (jobs, manifest train section). With ``write`` (one process
    only) it also creates the tokenizer, token caches and fresh seed, and records the plan."""
    if int(total_tokens) != total_tokens or total_tokens < 1:
        raise ValueError(f"total_tokens must be a positive integer, got {total_tokens!r}")
    if int(seed_tokens) != seed_tokens or seed_tokens < 0:
        raise ValueError(f"seed_tokens must be a non-negative integer, got {seed_tokens!r}")
    if seed_model is None:
        models.default_lr(model_size)  # validates the name
    else:
        seed_model = Path(seed_model).resolve()
        if not seed_model.exists():
            raise FileNotFoundError(f"seed model not found: {seed_model}")
        if not (seed_model / "config.json").is_file():
            raise FileNotFoundError(f"{seed_model} has no config.json: not a Hugging Face model directory")
    records = data.read_records(run)
    k = data.num_clusters(run, records)
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
        jobs.append(_job("seed", None, range(k), seed_tokens, seed_init, "seed", SEED_KEY, cfg))
    expert_init = seed_init if seed_model and not seed_tokens else {"path": "seed"}
    jobs += [_job(_expert_name(e), e, [e], budgets[e], expert_init, f"experts/{_expert_name(e)}", e, cfg) for e in ids]
    train = {"total_tokens": int(total_tokens), "k": k, "per_expert_tokens": budgets, "model_size": seed_info["model_size"],
             "seed_model": seed_info["seed_model"], "seed_tokens": int(seed_tokens), "config": asdict(cfg)}
    if not write:
        return jobs, train

    have_seed = run.manifest().get("seed")
    if have_seed and any(have_seed.get(key) != seed_info[key] for key in ("source", "model_size", "seed_model", "seed", "tokens")):
        raise ValueError(f"{run.path} branches from a seed made by {have_seed}, not {seed_info}: "
                         "train in a new run directory")
    for spec in jobs:
        log = _job_log(run, spec["name"])
        if restart:
            _clear_job(run, spec)
        elif log and not _same_training(log.get("spec"), spec) and _has_progress(run, spec["name"]):
            raise ValueError(f"{spec['name']} in {run.path} was trained with other settings; pass --restart "
                             "(restart=True) to train it from scratch, or use a new run directory")
    tok = data.ensure_tokenizer(run, seed_model, vocab_size, progress)
    need = range(k) if seed_tokens else ids
    info = data.ensure_token_cache(run, need, tok, progress)
    for c in need:
        if info[c]["train"] < cfg.seq_len:
            what = "no training documents" if not info[c]["train_documents"] else \
                f"{info[c]['train_documents']} training documents, {info[c]['train']} tokens"
            raise ValueError(f"cluster {c} has {what}: fewer tokens than one block of seq_len={cfg.seq_len}; "
                             "re-cluster with fewer clusters, or train the other experts with --experts")
    config = models.config_for(model_size, tok) if not seed_model else _seed_config(seed_model)
    models.check_compatible(config, cfg.seq_len, len(tok))
    if not seed_tokens and not seed_model and not (run.path / "seed" / "config.json").is_file():
        models.save(models.new_model(model_size, tok, cfg.seed), run.path / "seed")
    run.update(train=train, seed={**seed_info, "status": "done" if not seed_tokens else
                                  (have_seed or {}).get("status", "pending")})
    listed = {e["id"] for e in run.manifest().get("experts", [])}
    entries = {e: {"cluster": e, "path": f"experts/{_expert_name(e)}", "tokens": budgets[e], "status": "pending"}
               for e in range(k) if e not in listed and e not in ids}  # every cluster has an entry
    for spec in jobs:
        if spec["expert"] is not None:
            log = _job_log(run, spec["name"])
            done = bool(log and log.get("status") == "done" and _same_training(log.get("spec"), spec))
            entries[spec["expert"]] = {"cluster": spec["clusters"][0], "path": spec["out"], "init": spec["init"],
                                       "tokens": spec["tokens"], "status": "done" if done else "pending"}
    _update_entries(run, entries)
    return jobs, train


def _seed_config(path: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the model config of {path}: {e}") from e


def _summary(run: RunDir, names: Sequence[str]) -> dict:
    m = run.manifest()
    experts = [e for e in m.get("experts", []) if _expert_name(e["id"]) in names]
    return {"run": str(run.path), "train": m.get("train"), "seed": m.get("seed"), "experts": experts,
            "tokens_trained": sum(e.get("tokens_trained") or 0 for e in experts)}


def _print_summary(summary: dict) -> None:
    for e in summary["experts"]:
        loss, speed = e.get("final_valid_loss"), e.get("tokens_per_s")
        print(f"{_expert_name(e['id'])}: {e['status']}, {e.get('tokens_trained') or 0:,} tokens, valid loss "
              f"{'-' if loss is None else f'{loss:.4f}'}{f', {speed:,.0f} tok/s' if speed else ''}", flush=True)


def train_experts(run, total_tokens: int, *, model_size: str = "tiny", seed_model: str | Path | None = None,
                  seed_tokens: int = 0, experts: Sequence[int] | None = None, backend: str = "local",
                  parallel: int = 1, nproc_per_node: int = 2, ray_address: str | None = None,
                  num_cpus: float = 1, num_gpus: float = 0, retries: int = 2, vocab_size: int | None = None,
                  device: str | None = None, threads: int | None = None, restart: bool = False,
                  progress: bool = True, callback: Callable[[dict], None] | None = None,
                  config: TrainConfig | None = None, **settings) -> dict:
    """Branch k experts from one seed and train expert i on cluster i for ``total_tokens / k``
    tokens (compute-matched with a dense model of ``total_tokens``).

    The seed is a fresh ``model_size`` model or the local HF model ``seed_model``, optionally
    trained first on all clusters for ``seed_tokens`` (the BTM seed phase). ``experts`` selects ids;
    ``settings`` are :class:`TrainConfig` fields (seq_len=..., batch_size=...). Backends:
    ``local`` (in process, or ``parallel`` worker processes, one per GPU when on GPU), ``torchrun``
    (DDP over ``nproc_per_node`` processes per job; also used when launched by torchrun), ``ray``
    (one task per expert with ``num_cpus``/``num_gpus``, retried ``retries`` times, resuming from
    its checkpoint). Rerunning the same call resumes; finished experts are skipped. Returns the
    manifest's view of the trained experts; raises TrainingFailed when any failed."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if int(parallel) != parallel or parallel < 1 or int(nproc_per_node) != nproc_per_node or nproc_per_node < 1:
        raise ValueError("parallel and nproc_per_node must be positive integers")
    if callback is not None and (backend != "local" or parallel > 1):
        raise ValueError("callback needs backend='local' with parallel=1")
    cfg = _make_config(config, settings)
    plan = dict(total_tokens=total_tokens, model_size=model_size, seed_model=seed_model, seed_tokens=seed_tokens,
                experts=experts, cfg=cfg, vocab_size=vocab_size, restart=restart, progress=progress)
    if _launched_by_torchrun():
        if backend == "ray":
            raise ValueError("backend 'ray' cannot run inside torchrun")
        return _train_distributed(run, plan, device, threads, progress, callback)
    jobs, _ = _plan(run, **plan, write=True)
    names = [j["name"] for j in jobs]
    if backend == "torchrun":
        kwargs = {"run": str(run.path), "total_tokens": total_tokens, "model_size": model_size,
                  "seed_model": None if seed_model is None else str(Path(seed_model).resolve()),
                  "seed_tokens": seed_tokens, "experts": None if experts is None else [int(e) for e in experts],
                  "vocab_size": vocab_size, "device": device,
                  "threads": threads, "progress": progress, "backend": "torchrun", **asdict(cfg)}
        _launch_torchrun(run, kwargs, nproc_per_node, progress)
    elif backend == "ray":
        _dispatch_ray(run, jobs, ray_address, num_cpus, num_gpus, retries, threads, progress)
    elif parallel > 1:
        _dispatch_pool(run, jobs, parallel, device, threads, progress)
    else:
        for spec in jobs:
            _run_recorded(run, spec, device=device, threads=threads, progress=progress, callback=callback)
    summary = _summary(run, names)
    failed = [e for e in summary["experts"] if e["status"] != "done"]
    if (summary["seed"] or {}).get("status") == "failed":
        raise TrainingFailed(f"the seed phase failed: {summary['seed'].get('error')}")
    if failed:
        raise TrainingFailed("experts failed: " + "; ".join(f"{_expert_name(e['id'])}: {e.get('error', e['status'])}"
                                                            for e in failed))
    if progress:
        _print_summary(summary)
    return summary


def _run_recorded(run: RunDir, spec: dict, **kwargs) -> dict:
    """run_job with the manifest kept up to date (running / done / failed)."""
    _record(run, spec, "running")
    try:
        result = run_job(run, spec, **kwargs)
    except Exception as e:
        _record(run, spec, "failed", error=f"{type(e).__name__}: {e}")
        raise
    _record(run, spec, "done", result)
    return result


# -- torchrun: DDP inside each job ----------------------------------------------------------------


def _launch_torchrun(run: RunDir, kwargs: dict, nproc: int, progress: bool) -> None:
    """Run :func:`train_experts` under ``torchrun --standalone --nproc-per-node nproc``."""
    job_file = run.path / "logs" / "torchrun.json"
    atomic_write_json(job_file, kwargs)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "cbtm.train", str(job_file)]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
    proc = subprocess.run(cmd, env=env, text=True, stdout=None if progress else subprocess.PIPE,
                          stderr=None if progress else subprocess.STDOUT)
    if proc.returncode != 0:
        tail = "" if progress else "\n" + (proc.stdout or "")[-4000:]
        raise TrainingFailed(f"torchrun exited with status {proc.returncode}{tail}")


def _train_distributed(run: RunDir, plan: dict, device, threads, progress, callback) -> dict:
    """Inside torchrun: process 0 prepares the run, then every job trains with DDP."""
    import torch.distributed as dist

    local_rank = int(os.environ["LOCAL_RANK"])
    dev = _device(device, local_rank)
    created = not dist.is_initialized()
    if created:
        from datetime import timedelta

        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(minutes=60))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    rank = dist.get_rank()
    threads = threads or max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    try:
        ok = torch.ones(1)
        if rank == 0:
            try:
                _plan(run, **plan, write=True)
            except Exception:
                ok.zero_()
                dist.broadcast(ok, 0)
                raise
        dist.broadcast(ok, 0)
        if not ok.item():
            raise TrainingFailed("process 0 failed to prepare the run")
        jobs, _ = _plan(run, **plan, write=False)
        for spec in jobs:
            if rank == 0:
                _run_recorded(run, spec, device=str(dev), threads=threads, progress=progress, callback=callback)
            else:
                run_job(run, spec, device=str(dev), threads=threads, progress=False)
        return _summary(run, [j["name"] for j in jobs])
    finally:
        if created:
            dist.destroy_process_group()


# -- local worker processes, one per GPU ------------------------------------------------------------

_SLOT = 0


def _pool_init(slots) -> None:
    global _SLOT
    _SLOT = slots.get()


def _pool_job(run_path: str, spec: dict, device: str | None, threads: int | None, progress: bool) -> dict:
    dev = _device(device)
    dev = f"cuda:{_SLOT}" if dev.type == "cuda" else "cpu"
    return run_job(run_path, spec, device=dev, threads=threads, progress=progress, position=_SLOT)


def _dispatch_pool(run: RunDir, jobs: list[dict], parallel: int, device, threads, progress) -> None:
    """``parallel`` worker processes, each pinned to one GPU (or to cores/parallel CPU threads)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    if _device(device).type == "cuda" and parallel > torch.cuda.device_count():
        raise ValueError(f"parallel={parallel} but only {torch.cuda.device_count()} GPUs are visible")
    threads = threads or max(1, (os.cpu_count() or 1) // parallel)
    ctx = mp.get_context("spawn")
    slots = ctx.Queue()
    for i in range(parallel):
        slots.put(i)
    seed = [j for j in jobs if j["expert"] is None]
    for spec in seed:
        _run_recorded(run, spec, device=device, threads=None, progress=progress)
    with ProcessPoolExecutor(parallel, mp_context=ctx, initializer=_pool_init, initargs=(slots,)) as pool:
        futures = {}
        for spec in jobs:
            if spec["expert"] is not None:
                _record(run, spec, "running")
                futures[pool.submit(_pool_job, str(run.path), spec, device, threads, progress)] = spec
        for fut in as_completed(futures):
            spec = futures[fut]
            try:
                _record(run, spec, "done", fut.result())
            except Exception as e:
                _record(run, spec, "failed", error=f"{type(e).__name__}: {e}")


# -- Ray: one task per expert -------------------------------------------------------------------------


def _ray_job(run_path: str, spec: dict, threads: int, use_gpu: bool) -> dict:
    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    return run_job(run_path, spec, device=device, threads=threads, progress=False)


def _dispatch_ray(run: RunDir, jobs: list[dict], address, num_cpus, num_gpus, retries, threads, progress) -> None:
    """Submit the seed job, then every expert as one Ray task; record results as they finish."""
    from tqdm.auto import tqdm

    from .backends import ray_session

    if num_cpus <= 0 or num_gpus < 0 or int(retries) != retries or retries < 0:
        raise ValueError("num_cpus must be > 0, num_gpus >= 0 and retries a non-negative integer")
    threads = threads or max(1, int(num_cpus))
    with ray_session(address, os.cpu_count()) as ray:
        task = ray.remote(_ray_job).options(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=int(retries),
                                            retry_exceptions=True)
        for stage in ([j for j in jobs if j["expert"] is None], [j for j in jobs if j["expert"] is not None]):
            refs = {}
            for spec in stage:
                _record(run, spec, "running")
                refs[task.remote(str(run.path), spec, threads, num_gpus > 0)] = spec
            bar = tqdm(total=len(refs), desc="ray tasks", unit="job", disable=not progress or not refs)
            pending = list(refs)
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                spec = refs[ready[0]]
                try:
                    _record(run, spec, "done", ray.get(ready[0]))
                except Exception as e:
                    _record(run, spec, "failed", error=f"{type(e).__name__}: {e}"[:2000])
                bar.update()
            bar.close()
            if run.manifest().get("seed", {}).get("status") == "failed":
                return


# ------------------------------------------------------------------------------------------------
# dense baseline and BTM branching


def train_dense(out, total_tokens: int, *, like=None, corpus=None, valid_fraction: float = 0.05,
                split_seed: int = 0, seed_model: str | Path | None = None, vocab_size: int | None = None,
                **kwargs) -> dict:
    """The compute-matched dense baseline: one model trained on every training document for
    ``total_tokens``, in its own run directory ``out`` (k=1). With ``like`` (a clustered run) it
    uses that run's corpus, train/valid split and tokenizer, so its losses compare with the experts';
    otherwise ``corpus`` (default: the embedded one) split by ``split_of``. Other arguments as
    :func:`train_experts`."""
    out = out if isinstance(out, RunDir) else RunDir(out)
    if like is not None:
        like = like if isinstance(like, RunDir) else RunDir(like)
        if Path(like.path).resolve() == Path(out.path).resolve():
            raise ValueError("the dense run needs its own directory, not the clustered run's")
        s = data.corpus_settings(like)
        data.write_assignments(out, data.dense_records(like), s["paths"], k=1, name="dense",
                               text_field=s["text_field"], id_field=s["id_field"], source=f"dense, like {like.path}")
        if not (out.tokenizer / "tokenizer_config.json").is_file():
            data.ensure_tokenizer(like, seed_model, vocab_size, kwargs.get("progress", True))
            data.copy_tokenizer(like, out)
    else:
        data.write_assignments(out, data.dense_records(None, corpus, valid_fraction, split_seed), corpus, k=1,
                               name="dense", source="dense")
    return train_experts(out, total_tokens, seed_model=seed_model, vocab_size=vocab_size, **kwargs)


def router_weights(run, cluster: int, sources: Sequence[int], temperature: float = 0.1,
                   max_documents: int = 1000) -> list[float]:
    """BTM mixture weights from the router: the mean over the training documents of ``cluster``
    of ``softmax_j(-||x - c_j||^2 / T)`` over the source experts' cluster centres."""
    from .router import Router

    run = run if isinstance(run, RunDir) else RunDir(run)
    router = Router.load(run.path, temperature=temperature)
    if any(not 0 <= c < router.n_experts for c in sources):
        raise ValueError(f"source clusters {list(sources)} are not all router clusters 0..{router.n_experts - 1}")
    texts = []
    for _, _, text in data.iter_documents(run, {(cluster, "train")}):
        texts.append(text)
        if len(texts) >= max_documents:
            break
    if not texts:
        raise ValueError(f"cluster {cluster} has no training documents to weight the mixture with")
    sub = Router(router.embedder, router.centers[list(sources)], temperature)
    return sub.document_weights(texts).astype(np.float64).mean(0).tolist()


def branch_from_mixture(run, cluster: int, *, sources: Sequence[int] | None = None,
                        weights: Sequence[float] | None = None, temperature: float = 0.1,
                        expert: int | None = None, tokens: int | None = None, train: bool = True,
                        device: str | None = None, threads: int | None = None, restart: bool = False,
                        progress: bool = True, callback: Callable[[dict], None] | None = None,
                        **settings) -> dict:
    """BTM branching: initialise expert ``expert`` (default: id ``cluster``) as the weighted parameter
    average of trained ``sources`` (default: every finished expert), then train it on ``cluster``'s
    documents for ``tokens`` (default: the run's per-expert budget). ``weights`` default to the
    router's weights on the cluster's training documents (:func:`router_weights`). Training
    settings default to the run's; ``settings`` override them. Returns the expert's manifest entry."""
    from .merge import average_experts, normalise_weights

    run = run if isinstance(run, RunDir) else RunDir(run)
    m = run.manifest()
    entries = {e["id"]: e for e in m.get("experts", [])}
    expert = int(cluster if expert is None else expert)
    if sources is None:
        sources = [i for i, e in sorted(entries.items()) if e.get("status") == "done" and i != expert]
    sources = [int(s) for s in sources]
    if not sources:
        raise ValueError("no trained experts to branch from: train some first (cbtm train)")
    for s in sources:
        if entries.get(s, {}).get("status") != "done" or not (run.path / entries[s]["path"] / "config.json").is_file():
            raise ValueError(f"source expert {s} is not trained in {run.path}")
    if expert in sources:
        raise ValueError(f"expert {expert} cannot be initialised from a mixture that contains itself")
    if entries.get(expert, {}).get("status") == "done" and not restart and entries[expert].get("mixture") is None:
        raise ValueError(f"expert {expert} already exists; choose another --expert id or pass --restart")
    method = "given"
    if weights is None:
        weights = router_weights(run, cluster, [entries[s]["cluster"] for s in sources], temperature)
        method = "router"
    weights = normalise_weights(weights, len(sources))
    base = m.get("train")
    if base is None:
        raise FileNotFoundError(f"{run.path} has no training settings: run `cbtm train` first")
    tokens = int(tokens if tokens is not None else base["total_tokens"] // base["k"])
    if tokens < 2:
        raise ValueError(f"tokens must be at least 2, got {tokens}")
    cfg = _make_config(TrainConfig(**base["config"]), settings)
    name = _expert_name(expert)
    init_dir = run.path / "init" / name
    mixture = {"sources": sources, "weights": weights, "method": method,
               "temperature": temperature if method == "router" else None}
    spec = _job(name, expert, [int(cluster)], tokens, {"path": f"init/{name}"}, f"experts/{name}", expert, cfg)
    if restart:
        _clear_job(run, spec)
    elif _has_progress(run, name) and not _same_training((_job_log(run, name) or {}).get("spec"), spec):
        raise ValueError(f"{name} was trained with other settings; pass --restart to train it from scratch")
    model = average_experts([run.path / entries[s]["path"] for s in sources], weights)
    models.save(model, init_dir)
    info = data.ensure_token_cache(run, [int(cluster)], progress=progress)
    if info[int(cluster)]["train"] < cfg.seq_len:
        raise ValueError(f"cluster {cluster} has too few training tokens ({info[int(cluster)]['train']}) "
                         f"for one block of seq_len={cfg.seq_len}")
    _update_entries(run, {expert: {"cluster": int(cluster), "path": spec["out"], "init": spec["init"],
                                   "tokens": tokens, "mixture": mixture, "status": "pending"}})
    if train:
        _run_recorded(run, spec, device=device, threads=threads, progress=progress, callback=callback)
    return {e["id"]: e for e in run.manifest()["experts"]}[expert]


# ------------------------------------------------------------------------------------------------
# command line


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None


def parse_count(text: str) -> int:
    """``"2M"``, ``"500k"``, ``"1.5e6"``, ``"3000"`` -> int."""
    t = str(text).strip().lower().replace("_", "")
    scale = {"k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if scale > 1 else t) * scale
    except ValueError:
        raise ValueError(f"not a token count: {text!r}") from None
    if value != int(value):
        raise ValueError(f"not a whole token count: {text!r}")
    return int(value)


def _add_train_options(p) -> None:
    d = TrainConfig()
    g = p.add_argument_group("optimisation")
    g.add_argument("--seq-len", type=int, default=None, help=f"tokens per training sequence (default {d.seq_len})")
    g.add_argument("--batch-size", type=int, default=None, help=f"sequences per forward pass and process ({d.batch_size})")
    g.add_argument("--grad-accum", type=int, default=None, help=f"forward passes per step ({d.grad_accum})")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the model size's)")
    g.add_argument("--warmup", type=float, default=None, help=f"warmup fraction of the steps ({d.warmup})")
    g.add_argument("--min-lr-ratio", type=float, default=None, help=f"final/peak learning rate ({d.min_lr_ratio})")
    g.add_argument("--weight-decay", type=float, default=None, help=f"AdamW weight decay ({d.weight_decay})")
    g.add_argument("--clip", type=float, default=None, help=f"gradient-norm clip, 0: off ({d.clip})")
    g.add_argument("--eval-every", type=int, default=None, help=f"steps between validation losses ({d.eval_every})")
    g.add_argument("--eval-tokens", type=parse_count, default=None, help=f"validation tokens ({d.eval_tokens})")
    g.add_argument("--ckpt-every", type=int, default=None, help=f"steps between checkpoints, 0: none ({d.ckpt_every})")
    g.add_argument("--keep-checkpoints", type=int, default=None, help=f"checkpoints kept per job ({d.keep_checkpoints})")
    g.add_argument("--seed", type=int, default=None, help=f"random seed ({d.seed})")
    g.add_argument("--no-bf16", dest="bf16", action="store_const", const=False, default=None,
                   help="no bf16 autocast on GPU")
    e = p.add_argument_group("execution")
    e.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    e.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    e.add_argument("--restart", action="store_true", help="discard checkpoints and outputs of the selected jobs")
    e.add_argument("--quiet", action="store_true", help="no progress bars")


def _settings(a) -> dict:
    names = ("seq_len", "batch_size", "grad_accum", "lr", "warmup", "min_lr_ratio", "weight_decay", "clip",
             "eval_every", "eval_tokens", "ckpt_every", "keep_checkpoints", "seed", "bf16")
    return {n: getattr(a, n) for n in names if getattr(a, n) is not None}


def _cli_train(a) -> None:
    kwargs = dict(model_size=a.model_size, seed_model=a.seed_model, seed_tokens=a.seed_tokens,
                  experts=_int_list(a.experts) if a.experts else None, backend=a.backend, parallel=a.parallel,
                  nproc_per_node=a.nproc_per_node, ray_address=a.ray_address, num_cpus=a.num_cpus,
                  num_gpus=a.num_gpus, retries=a.retries, vocab_size=a.vocab_size, device=a.device,
                  threads=a.threads, restart=a.restart, progress=not a.quiet, **_settings(a))
    try:
        if a.dense:
            train_dense(a.out, a.total_tokens, like=a.like, corpus=a.corpus or None, **kwargs)
        else:
            if a.like or a.corpus:
                raise ValueError("--like and corpus paths are for --dense; clustered runs use their own corpus")
            train_experts(a.out, a.total_tokens, **kwargs)
    except TrainingFailed as e:
        raise SystemExit(f"cbtm: error: {e}") from None


def _cli_branch(a) -> None:
    sources = None if a.from_mixture == "all" else _int_list(a.from_mixture)
    weights = [float(w) for w in a.weights.split(",")] if a.weights else None
    try:
        entry = branch_from_mixture(a.out, a.cluster, sources=sources, weights=weights, temperature=a.temperature,
                                    expert=a.expert, tokens=a.tokens, train=not a.no_train, device=a.device,
                                    threads=a.threads, restart=a.restart, progress=not a.quiet, **_settings(a))
    except TrainingFailed as e:
        raise SystemExit(f"cbtm: error: {e}") from None
    if not a.quiet:
        mix = ", ".join(f"{s}:{w:.3f}" for s, w in zip(entry["mixture"]["sources"], entry["mixture"]["weights"]))
        print(f"{_expert_name(entry['id'])} <- mixture ({entry['mixture']['method']}) {mix}; status {entry['status']}")


def add_cli(sub) -> None:
    """Register the ``train`` and ``branch`` subcommands on the ``cbtm`` parser's subparsers."""
    t = sub.add_parser("train", help="branch and train one expert per cluster (or a dense baseline), compute-matched",
                       description="Train k experts of total_tokens/k each, or with --dense one model of "
                       "total_tokens. Rerunning the same command resumes from checkpoints.")
    t.add_argument("corpus", nargs="*", help="--dense without --like: corpus files (default: the embedded corpus)")
    t.add_argument("--out", required=True, help="run directory (clustered by `cbtm cluster`, or new with --dense)")
    t.add_argument("--total-tokens", type=parse_count, required=True,
                   help="token budget T, e.g. 2M: each of k experts trains on T/k, a dense model on T")
    t.add_argument("--dense", action="store_true", help="train the dense baseline (k=1) in --out")
    t.add_argument("--like", default=None, help="--dense: the clustered run whose corpus, split and tokenizer to use")
    t.add_argument("--model-size", default="tiny", choices=tuple(models.SIZES), help="named config (default tiny)")
    t.add_argument("--seed-model", default=None, help="local Hugging Face causal LM directory to branch from")
    t.add_argument("--seed-tokens", type=parse_count, default=0,
                   help="first train a dense seed on all clusters for this many tokens (BTM seed phase)")
    t.add_argument("--experts", default=None, help="comma-separated expert ids to train (default: all)")
    t.add_argument("--vocab-size", type=int, default=None,
                   help=f"vocabulary of the BPE trained when the run has no tokenizer yet ({data.DEFAULT_VOCAB})")
    t.add_argument("--backend", choices=BACKENDS, default="local")
    t.add_argument("--parallel", type=int, default=1, help="local: experts at once, one process (and GPU) each")
    t.add_argument("--nproc-per-node", type=int, default=2, help="torchrun: DDP processes per job")
    t.add_argument("--ray-address", default=None, help="ray: address of an existing cluster (default: local Ray)")
    t.add_argument("--num-cpus", type=float, default=1, help="ray: CPUs per expert task (and its torch threads)")
    t.add_argument("--num-gpus", type=float, default=0, help="ray: GPUs per expert task")
    t.add_argument("--retries", type=int, default=2, help="ray: retries of a failed task (resumes its checkpoint)")
    _add_train_options(t)
    t.set_defaults(fn=_cli_train)

    b = sub.add_parser("branch", help="initialise a new expert as a weighted average of experts, then train it (BTM)")
    b.add_argument("--out", required=True, help="run directory with trained experts")
    b.add_argument("--from-mixture", nargs="?", const="all", default="all",
                   help="source expert ids, comma-separated (default: all trained experts)")
    b.add_argument("--cluster", type=int, required=True, help="cluster id of the new expert's training documents")
    b.add_argument("--weights", default=None, help="mixture weights, comma-separated (default: router weights)")
    b.add_argument("--temperature", type=float, default=0.1, help="router temperature for the weights (0.1)")
    b.add_argument("--expert", type=int, default=None, help="id of the new expert (default: the cluster id)")
    b.add_argument("--tokens", type=parse_count, default=None, help="its token budget (default: the run's T/k)")
    b.add_argument("--no-train", action="store_true", help="only write the initialisation (init/expert_XXX)")
    _add_train_options(b)
    b.set_defaults(fn=_cli_branch)


if __name__ == "__main__":  # torchrun entry point: python -m torch.distributed.run ... -m cbtm.train JOB.json
    from .rundir import read_json

    job = read_json(sys.argv[1])
    train_experts(job.pop("run"), job.pop("total_tokens"), **job)
