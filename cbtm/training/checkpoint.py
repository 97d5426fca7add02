"""Checkpoints: safetensors + JSON (model, optimizer, scheduler, RNG states, job state), committed by
renaming a complete directory, verified by sizes and hashes when loaded. No pickle."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..rundir import share_like_open
from .distributed import barrier, process_world

if TYPE_CHECKING:
    from .trainer import Trainer


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: corrupt, incomplete, or written with other settings."""


def digest(path: Path) -> str:
    """blake2b-128 of a file, streamed."""
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
    world, rank = process_world()
    final = root / f"step_{state['step']:08d}"
    tmp = root / f".{final.name}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    rng_tensors, rng_meta = _rng_state()
    save_file(rng_tensors, str(tmp / f"rng_rank{rank}.safetensors"))
    (tmp / f"rng_rank{rank}.json").write_text(json.dumps(rng_meta))
    barrier()
    if rank == 0:
        save_model(trainer.model, str(tmp / "model.safetensors"))
        opt_tensors, opt_meta = _flatten_optimizer(trainer.opt.state_dict())
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        body = {**state, "optimizer": opt_meta, "scheduler": trainer.sched.state_dict(), "world_size": world}
        (tmp / "state.json").write_text(json.dumps(body))
        share_like_open(tmp)
        files = {f.name: {"bytes": f.stat().st_size, "blake2b": digest(f)} for f in sorted(tmp.iterdir())}
        (tmp / "checkpoint.json").write_text(json.dumps({"format": "cbtm.checkpoint/1", "step": state["step"],
                                                         "files": files}, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in list_checkpoints(root)[:-trainer.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
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
            if f.stat().st_size != info["bytes"] or digest(f) != info["blake2b"]:
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
