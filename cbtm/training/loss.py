"""The training loss: next-token cross-entropy fused with the output projection.

``linear_cross_entropy(h, W, t)`` equals ``F.cross_entropy(h @ W.T, t, reduction="sum")`` without ever
holding the (N, V) logits: rows are processed in chunks, each chunk's logits are turned into the
loss and, in the same pass, into the gradients of ``h`` and ``W`` (the backward only scales them).
On a small model the output projection and the softmax over the vocabulary are most of the work;
this removes the log-softmax, its backward and the (N, V) gradient buffer (Liger-Kernel's idea,
in plain PyTorch so it runs on any device).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100
CHUNK_ELEMENTS = 1 << 21  # logits per chunk (8 MB in float32)
FUSED_ARCHITECTURES = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"}  # logits = h @ W.T exactly


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk):
        # h: (N, d), weight: (V, d), targets: (N,) int64 (IGNORE: no loss)
        want_h, want_w = h.requires_grad, weight.requires_grad
        grad_h = torch.empty_like(h) if want_h else None
        acc = torch.promote_types(h.dtype, torch.float32)  # logits, softmax and sums in at least float32
        grad_w = torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, acc), device=weight.device) \
            if want_w else None
        loss = torch.zeros((), dtype=torch.float64, device=h.device)
        w = weight.to(h.dtype)
        for s in range(0, h.shape[0], chunk):
            hc, tc = h[s:s + chunk], targets[s:s + chunk]
            z = (hc @ w.T).to(acc)  # (c, V) logits of the chunk
            keep = tc != IGNORE
            safe = torch.where(keep, tc, 0)
            target_logit = z.gather(1, safe[:, None]).squeeze(1)  # (c,)
            m = z.amax(1, keepdim=True)
            p = z.sub_(m).exp_()  # (c, V) unnormalised softmax, in place of the logits
            total = p.sum(1, keepdim=True)
            lse = m.squeeze(1) + total.squeeze(1).log()
            loss += torch.where(keep, lse - target_logit, 0.0).sum(dtype=torch.float64)
            if want_h or want_w:
                g = p.div_(total)  # (c, V) softmax = d loss / d logits, minus the one-hot below
                rows = torch.arange(len(tc), device=g.device)
                g[rows, safe] -= keep.to(g.dtype)
                dropped = rows[~keep]
                if len(dropped):
                    g.index_fill_(0, dropped, 0.0)
                if want_h:
                    grad_h[s:s + chunk] = (g.to(w.dtype) @ w).to(h.dtype)
                if want_w:
                    grad_w.addmm_(g.T, hc.to(acc))
        ctx.save_for_backward(*(t for t in (grad_h, grad_w) if t is not None))
        ctx.want = (want_h, want_w)
        ctx.weight_dtype = weight.dtype
        return loss.to(acc)

    @staticmethod
    def backward(ctx, grad_out):
        saved = list(ctx.saved_tensors)
        want_h, want_w = ctx.want
        gh = saved.pop(0) * grad_out if want_h else None  # the loss is linear in its scale
        gw = (saved.pop(0) * grad_out).to(ctx.weight_dtype) if want_w else None
        return gh, gw, None, None


def _check(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int | None) -> int:
    """Validate the shapes of h (N, d), weight (V, d), targets (N,); the rows per chunk to use."""
    if h.ndim != 2 or weight.ndim != 2 or h.shape[1] != weight.shape[1] or targets.shape != h.shape[:1]:
        raise ValueError(f"shapes: h (N, d), weight (V, d), targets (N,); got {tuple(h.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(targets.shape)}")
    return chunk or max(1, CHUNK_ELEMENTS // weight.shape[0])


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int | None = None) -> torch.Tensor:
    """Summed next-token cross-entropy of the logits ``h @ weight.T`` (never materialised).
    h: (N, d), weight: (V, d), targets: (N,) with -100 for positions without a target; a scalar in
    float32 (float64 for float64 inputs)."""
    chunk = _check(h, weight, targets, chunk)
    return _LinearCrossEntropy.apply(h, weight, targets.long(), int(chunk))


@torch.no_grad()
def linear_target_logprobs(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                           chunk: int | None = None) -> torch.Tensor:
    """``log_softmax(h @ weight.T)[i, targets[i]]`` per row without holding the (N, V) logits (scoring).
    h: (N, d), weight: (V, d), targets: (N,) -> (N,) float32 (float64 for float64 inputs)."""
    chunk = _check(h, weight, targets, chunk)
    acc = torch.promote_types(h.dtype, torch.float32)
    out = torch.empty(h.shape[0], dtype=acc, device=h.device)
    w = weight.to(h.dtype)
    for s in range(0, h.shape[0], chunk):
        z = (h[s:s + chunk] @ w.T).to(acc)  # (c, V)
        out[s:s + chunk] = -F.cross_entropy(z, targets[s:s + chunk].long(), reduction="none")
    return out


def fused_head(model):
    """``(body, weight)`` when ``model``'s logits are exactly ``body(...).last_hidden_state @ weight.T``
    (a bias-free output projection, no logit scaling or soft-capping), else None."""
    if type(model).__name__ not in FUSED_ARCHITECTURES:
        return None
    head, cfg = model.get_output_embeddings(), model.config
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        return None
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None) not in (None, 1, 1.0):
        return None
    return model.base_model, head.weight


def linear_cross_entropy_ref(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The plain reference: full logits, then ``F.cross_entropy(..., reduction="sum")``."""
    logits = (h @ weight.to(h.dtype).T).to(torch.promote_types(h.dtype, torch.float32))
    return F.cross_entropy(logits, targets.long(), ignore_index=IGNORE, reduction="sum")
