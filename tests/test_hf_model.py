"""EnsembleForCausalLM against the ensemble it wraps: its log-probs are Ensemble.score's, its greedy
output is Ensemble.generate's, and every generate() option decodes from the same distribution."""

import numpy as np
import pytest
import torch
from transformers import TextIteratorStreamer

from cbtm.ensemble import Ensemble
from cbtm.hf_model import CACHE_NAME, EnsembleForCausalLM
from test_ensemble import run, texts, torch_mixture  # noqa: F401  (fixtures)

PROMPTS = ["And the king said", "Once", "The function returns"]


@pytest.fixture(scope="module")
def model(run):
    return EnsembleForCausalLM.from_run(run, top_k=2)


def _fresh_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    """The model's log-probs of a batch of unpadded sequences from one forward without a cache: (B, L, V)."""
    return model(input_ids=ids).logits


def _prompt(batch, b: int) -> torch.Tensor:
    """Row b of a left-padded batch without its padding."""
    return batch["input_ids"][b][batch["attention_mask"][b].bool()]


def test_forward_equals_ensemble_score(model, run, texts):
    tok = model.tokenizer
    texts = [t[:40] for t in texts]  # within the experts' 48-token context
    assert model.generation_config.temperature in (None, 1.0)  # the router's T is not generate()'s
    for top_k in (1, 2, None):
        m = EnsembleForCausalLM.from_run(run, top_k=top_k)
        want = Ensemble.load(run, top_k=top_k).score(texts[:4])
        batch = tok(texts[:4], return_tensors="pt", padding=True)  # left-padded, BOS first
        logp = m(**batch).logits  # (B, L, V)
        assert torch.allclose(logp.exp().sum(-1)[batch["attention_mask"] > 0], torch.tensor(1.0), atol=1e-5)
        for b, w in enumerate(want):
            n = len(w)
            ids = batch["input_ids"][b, -n:]
            got = logp[b, -n - 1:-1].gather(1, ids[:, None])[:, 0]  # log p(token | tokens before)
            assert torch.allclose(got, w, atol=1e-5), (top_k, b)


def test_incremental_cache_equals_full_forward(model):
    """Feeding a text token by token through the cache gives the full forward's log-probs, and only
    routed experts run."""
    tok = model.tokenizer
    ids = tok(["And the king said unto them, go"], return_tensors="pt")["input_ids"]
    full = _fresh_logprobs(model, ids)
    before = list(model.ensemble.expert_calls)
    out = model(input_ids=ids[:, :3])
    steps = [out.logits]
    for t in range(3, ids.shape[1]):
        out = model(input_ids=ids[:, t:t + 1], **{CACHE_NAME: getattr(out, CACHE_NAME)})
        steps.append(out.logits)
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
    calls = np.array(model.ensemble.expert_calls) - before
    assert calls.sum() < model.ensemble.n_experts * (ids.shape[1] - 2)  # not every expert every step


def test_greedy_equals_ensemble_generate(model, run):
    ens = Ensemble.load(run, top_k=2)
    want = ens.generate(PROMPTS, max_new_tokens=12, greedy=True)
    tok = model.tokenizer
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=12, do_sample=False)
    got = tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert got == want
    one = model.generate(**tok(PROMPTS[:1], return_tensors="pt"), max_new_tokens=12, do_sample=False)
    assert tok.decode(one[0, len(tok(PROMPTS[0])["input_ids"]):], skip_special_tokens=True) == want[0]
    # past the experts' 48-token context both slide the window the same way
    long = model.generate(**tok(["x"], return_tensors="pt"), max_new_tokens=60, do_sample=False)
    assert tok.decode(long[0, 2:], skip_special_tokens=True) == ens.generate(["x"], max_new_tokens=60, greedy=True)[0]
    assert long.shape[1] > model.ensemble.context + 2 or tok.eos_token_id in long[0, 2:]


def test_sampling_draws_from_the_mixture(model):
    tok = model.tokenizer
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    P = batch["input_ids"].shape[1]
    greedy = model.generate(**batch, max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(**batch, max_new_tokens=8, do_sample=True, top_k=1), greedy)
    torch.manual_seed(0)
    a = model.generate(**batch, max_new_tokens=8, do_sample=True, temperature=0.7, top_p=0.5)
    torch.manual_seed(0)
    assert torch.equal(a, model.generate(**batch, max_new_tokens=8, do_sample=True, temperature=0.7, top_p=0.5))
    for b in range(len(PROMPTS)):  # every sampled token lies in the nucleus of a fresh forward's mixture
        prompt, new = _prompt(batch, b), a[b, P:]
        logp = _fresh_logprobs(model, torch.cat([prompt, new])[None])[0]  # (L, V)
        for t, token in enumerate(new.tolist()):
            p = torch.softmax(logp[len(prompt) - 1 + t].double() / 0.7, -1)
            sp, si = p.sort(descending=True)
            assert token in si[: int((sp.cumsum(0) - sp < 0.5).sum())].tolist()
            if token == tok.eos_token_id:
                break


def test_beam_search_scores_match_fresh_forwards(model):
    tok = model.tokenizer
    batch = tok(PROMPTS[:2], return_tensors="pt", padding=True)
    P = batch["input_ids"].shape[1]
    out = model.generate(**batch, max_new_tokens=6, num_beams=3, num_return_sequences=2, length_penalty=0.0,
                         early_stopping=True, do_sample=False, output_scores=True, return_dict_in_generate=True)
    assert out.sequences.shape[0] == 4
    for r, seq in enumerate(out.sequences):
        prompt, new = _prompt(batch, r // 2), seq[P:]
        if (new == tok.eos_token_id).any():  # finished: the EOS counts, the padding after it does not
            new = new[: int((new == tok.eos_token_id).nonzero()[0]) + 1]
        logp = _fresh_logprobs(model, torch.cat([prompt, new])[None])[0]  # (L, V)
        want = logp[torch.arange(len(prompt) - 1, len(prompt) + len(new) - 1), new].sum()
        assert torch.isclose(out.sequences_scores[r], want, atol=1e-4)


def test_stop_strings_streamer_and_max_new_tokens(model, run):
    tok = model.tokenizer
    ens = Ensemble.load(run, top_k=2)
    full = ens.generate(PROMPTS[:1], max_new_tokens=20, greedy=True)[0]
    batch = tok(PROMPTS[:1], return_tensors="pt")
    P = batch["input_ids"].shape[1]
    out = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert out.shape[1] - P <= 5 and full.startswith(tok.decode(out[0, P:], skip_special_tokens=True))
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert stop.strip(), full
    out = model.generate(**batch, max_new_tokens=20, do_sample=False, stop_strings=[stop], tokenizer=tok)
    text = tok.decode(out[0, P:], skip_special_tokens=True)
    assert stop in text and full.startswith(text) and len(text) < len(full)
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    out = model.generate(**batch, max_new_tokens=10, do_sample=False, streamer=streamer)
    assert "".join(streamer) == tok.decode(out[0, P:], skip_special_tokens=True)


def test_bad_inputs(run, model):
    with pytest.raises(ValueError, match="posterior"):
        EnsembleForCausalLM.from_run(run, kind="posterior")
    ctx = model.ensemble.context
    with pytest.raises(ValueError, match=f"context is {ctx}"):
        model(input_ids=torch.zeros(1, ctx + 1, dtype=torch.long))
    out = model(input_ids=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="rows"):
        model(input_ids=torch.zeros(1, 1, dtype=torch.long), **{CACHE_NAME: getattr(out, CACHE_NAME)})
