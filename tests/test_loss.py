"""The fused output-projection + cross-entropy loss against the plain reference (float64 where it
matters), over shapes, chunkings, dtypes and ignored targets; and a Trainer step with and without it."""

import numpy as np
import pytest
import torch

from cbtm.training.loss import (IGNORE, fused_head, linear_cross_entropy, linear_cross_entropy_ref,
                               linear_target_logprobs)


@pytest.mark.parametrize("n,d,v,chunk", [(1, 1, 2, None), (7, 5, 11, 3), (64, 16, 300, None), (130, 32, 1000, 17),
                                         (33, 8, 257, 64), (16, 4, 50, 1)])
def test_matches_the_float64_reference(n, d, v, chunk, rng):
    h = torch.tensor(rng.standard_normal((n, d)), requires_grad=True)
    w = torch.tensor(rng.standard_normal((v, d)), requires_grad=True)
    t = torch.tensor(rng.integers(0, v, n))
    t[::4] = IGNORE
    got = linear_cross_entropy(h, w, t, chunk)
    (got * 2.5).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    want = linear_cross_entropy_ref(h, w, t)
    (want * 2.5).backward()
    assert got.dtype == torch.float64
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-10)
    assert torch.allclose(gh, h.grad, rtol=1e-10, atol=1e-12) and torch.allclose(gw, w.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_low_precision_inputs_against_float64(dtype, tol, rng):
    h64, w64 = torch.tensor(rng.standard_normal((50, 24))), torch.tensor(rng.standard_normal((333, 24)) * 0.3)
    t = torch.tensor(rng.integers(0, 333, 50))
    h, w = h64.to(dtype).requires_grad_(), w64.to(dtype).requires_grad_()
    got = linear_cross_entropy(h, w, t, 16)
    got.backward()
    ref_h, ref_w = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    want = linear_cross_entropy_ref(ref_h, ref_w, t)
    want.backward()
    assert got.dtype == torch.float32 and h.grad.dtype == dtype and w.grad.dtype == dtype
    got, want = float(got.detach()), float(want.detach())
    assert abs(got - want) <= tol * abs(want)
    assert torch.allclose(h.grad.double(), ref_h.grad, atol=tol * 10, rtol=tol * 10)
    assert torch.allclose(w.grad.double(), ref_w.grad, atol=tol * 10, rtol=tol * 10)


@pytest.mark.parametrize("n,d,v,chunk", [(1, 1, 2, None), (7, 5, 11, 3), (130, 32, 1000, 17), (33, 8, 257, 64)])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
def test_target_logprobs_against_float64(n, d, v, chunk, dtype, tol, rng):
    """Per-row log p(target) for scoring, chunked, against log_softmax of the float64 logits."""
    h64, w64 = torch.tensor(rng.standard_normal((n, d))), torch.tensor(rng.standard_normal((v, d)) * 0.5)
    t = torch.tensor(rng.integers(0, v, n))
    got = linear_target_logprobs(h64.to(dtype), w64.to(dtype), t, chunk)
    ref = torch.log_softmax(h64.to(dtype).double() @ w64.to(dtype).double().T, 1)[torch.arange(n), t]
    assert got.shape == (n,) and got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.allclose(got.double(), ref, rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="shapes"):
        linear_target_logprobs(h64, w64, t[:-1] if n > 1 else torch.zeros(2, dtype=torch.long))


def test_every_target_ignored_and_bad_shapes():
    h, w = torch.randn(4, 3, requires_grad=True), torch.randn(5, 3, requires_grad=True)
    loss = linear_cross_entropy(h, w, torch.full((4,), IGNORE))
    loss.backward()
    assert float(loss.detach()) == 0.0 and not h.grad.any() and not w.grad.any()
    with pytest.raises(ValueError, match="shapes"):
        linear_cross_entropy(h, torch.randn(5, 4), torch.zeros(4))
    with pytest.raises(ValueError, match="shapes"):
        linear_cross_entropy(h, w, torch.zeros(3))


def test_trainer_fused_loss_equals_the_logits_path():
    from cbtm import models
    from cbtm.training import TrainConfig, Trainer

    class Tok:
        eos_token_id = bos_token_id = pad_token_id = 0

        def __len__(self):
            return 500

    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 500, 32).astype(np.uint16) for _ in range(6)]
    runs = []
    for fused in (True, False):
        cfg = TrainConfig(seq_len=32, batch_size=6, lr=1e-3, warmup=0.0, fused_loss=fused)
        t = Trainer(models.new_model("tiny", Tok(), seed=0), cfg, total_steps=3)
        assert (t.loss.fused is not None) == fused
        loss = t._loss_sum(t.net, rows)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in t.model.named_parameters()}
        t.opt.zero_grad(set_to_none=True)
        losses = [t.step(rows)["loss"] for _ in range(3)]
        runs.append((float(loss.detach()), grads, losses, t.evaluate(rows)))
    (la, ga, sa, ea), (lb, gb, sb, eb) = runs
    assert la == pytest.approx(lb, rel=1e-6) and ea == pytest.approx(eb, rel=1e-6)
    for name in ga:
        scale = float(gb[name].abs().max()) or 1.0
        assert torch.allclose(ga[name], gb[name], atol=1e-5 * scale, rtol=1e-4), name
    assert np.allclose(sa, sb, rtol=1e-5)
    assert fused_head(torch.nn.Linear(2, 2)) is None  # not a causal LM: the plain path
