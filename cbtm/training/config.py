"""Optimisation settings of a training job, compute matching and the learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

from .. import defaults

SEED_KEY = 1_000_003  # data-order key of the seed phase (experts use their id)


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
    fused_loss: bool = True      # cross-entropy fused with the output projection (same loss, less work)
    save_dtype: str = defaults.SAVE_DTYPE  # of the saved model; "auto": the initial weights' (training is float32)

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
        if self.save_dtype not in defaults.SAVE_DTYPES:
            raise ValueError(f"save_dtype must be one of {', '.join(defaults.SAVE_DTYPES)}, got {self.save_dtype!r}")

    def trained_fields(self) -> dict:
        """The settings that change the trained weights (evaluation and checkpoint cadence do not)."""
        skip = {"eval_every", "eval_tokens", "ckpt_every", "keep_checkpoints", "save_dtype"}
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


def make_config(config: TrainConfig | None, overrides: dict) -> TrainConfig:
    """``config`` (default: TrainConfig()) with ``overrides`` (TrainConfig field names) applied."""
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown training settings {unknown}; known: {sorted(known)}")
    return replace(config or TrainConfig(), **overrides)
