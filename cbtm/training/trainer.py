"""The optimisation of one model: AdamW, warmup + cosine, clipping, accumulation, DDP."""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .config import TrainConfig, lr_factor
from .distributed import process_world
from .loss import IGNORE, fused_head, linear_cross_entropy


class NonFiniteLoss(ArithmeticError):
    """A training or validation loss (or gradient norm) is NaN or infinite: the job stops."""


def _micro_batches(rows: Sequence[np.ndarray], size: int) -> list[list[np.ndarray]]:
    """Consecutive groups of at most ``size`` rows of equal length."""
    out: list[list[np.ndarray]] = []
    for r in rows:
        if out and len(out[-1]) < size and len(out[-1][0]) == len(r):
            out[-1].append(r)
        else:
            out.append([r])
    return out


class CausalLMLoss(torch.nn.Module):
    """``forward(x, labels)`` -> summed next-token cross-entropy of a causal LM; fused with the output
    projection (:func:`linear_cross_entropy`, no (b, L, V) logits) where the architecture allows.
    One module, so DDP wraps the loss computation whichever path it takes."""

    def __init__(self, model, fused: bool = True):
        super().__init__()
        self.model = model
        self.fused = fused_head(model) if fused else None

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # x, labels: (b, L); labels IGNORE where there is no next token
        if self.fused is not None:
            body, weight = self.fused
            hidden = body(input_ids=x, use_cache=False).last_hidden_state  # (b, L, d)
            return linear_cross_entropy(hidden.flatten(0, 1), weight, labels.flatten())
        logits = self.model(input_ids=x, use_cache=False).logits  # (b, L, V)
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum")


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
        self.world, self.rank = process_world()
        self.model = model.to(self.device).train()
        self.loss = CausalLMLoss(self.model, cfg.fused_loss)
        self.net = self.loss
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.loss, device_ids=ids)
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
        labels[:, -1] = IGNORE  # (b, L): next token, none after the last (no slicing of the logits)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return net(x, labels)

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
        if not (torch.isfinite(total) and torch.isfinite(norm)):  # checked before the weights change
            self.opt.zero_grad(set_to_none=True)
            raise NonFiniteLoss(f"non-finite training loss {float(total) / denom} (gradient norm {float(norm)})")
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
            acc[0] += self._loss_sum(self.loss, mb).double()
            acc[1] += sum(len(r) - 1 for r in mb)
        if self.world > 1:
            torch.distributed.all_reduce(acc)
        self.model.train()
        return float(acc[0] / acc[1])
