"""Training a Mixtral mixture-of-experts (BTX's MiX phase): the routers' load-balancing loss, and
training the routers alone."""

from __future__ import annotations

import numpy as np
import torch

from .config import TrainConfig
from .trainer import Trainer

DEFAULT_AUX_LOSS_COEF = 0.01  # weight of the load-balancing loss (Switch Transformer, BTX)


class MixTrainer(Trainer):
    """:class:`Trainer` for a Mixtral model: while training, the loss of a step adds
    ``aux_loss_coef`` times Mixtral's load-balancing loss (transformers' ``load_balancing_loss_func``
    over every layer's router logits) per predicted token; validation losses stay the plain
    cross-entropy. ``router_only``: every parameter but the routers' is frozen."""

    def __init__(self, model, cfg: TrainConfig, total_steps: int, device: str | torch.device = "cpu", *,
                 aux_loss_coef: float = DEFAULT_AUX_LOSS_COEF, router_only: bool = False):
        from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

        gates = [m for m in model.modules() if isinstance(m, MixtralTopKRouter)]
        if not gates:
            raise ValueError(f"{type(model).__name__} has no Mixtral routers: MiX trains a Mixtral model")
        if router_only:
            keep = {id(p) for g in gates for p in g.parameters()}
            for p in model.parameters():
                p.requires_grad_(id(p) in keep)
        self.aux_loss_coef = float(aux_loss_coef)
        self.n_experts, self.top_k = model.config.num_local_experts, model.config.num_experts_per_tok
        self._router_logits: list[torch.Tensor] = []  # (tokens, experts) per layer of the last forward
        for g in gates:
            g.register_forward_hook(lambda module, args, out: self._router_logits.append(out[0]))
        super().__init__(model, cfg, total_steps, device)

    def _loss_sum(self, net, rows: list[np.ndarray]) -> torch.Tensor:
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

        self._router_logits.clear()
        loss = super()._loss_sum(net, rows)
        if not self.model.training or not self.aux_loss_coef:
            return loss
        aux = load_balancing_loss_func(tuple(self._router_logits), self.n_experts, self.top_k)
        return loss + self.aux_loss_coef * aux * sum(len(r) - 1 for r in rows)  # aux is a mean: weigh by tokens
