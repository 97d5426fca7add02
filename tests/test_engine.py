"""The batched generation engine against its plain per-row reference (engine.generate_ref): the same
greedy tokens and mixture log-probs, for every routing kind and top-k, on the stacked and the generic
expert paths, whatever else is in the batch."""

import re
import shutil

import numpy as np
import pytest
import torch

from cbtm.engine import Engine, SamplingParams, generate_ref
from cbtm.ensemble import Ensemble
from cbtm.rundir import RunDir
from test_ensemble import K, run, texts, torch_mixture  # noqa: F401  (fixtures)

PROMPTS = ["And the king said", "Once", "The function returns the", "", "In the beginning God created the heaven"]


@pytest.fixture(scope="module")
def llama_run(run, tmp_path_factory):
    """The `run` fixture's router and tokenizer with K random (peaked, distinct) Llama experts: the
    stacked path. The experts' vocabulary is padded past the tokenizer's (as OPT, Pythia, Qwen2 do)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("llama") / "run"
    shutil.copytree(run, path, ignore=shutil.ignore_patterns("experts"))
    n = len(AutoTokenizer.from_pretrained(path / "tokenizer"))
    for j in range(K):
        torch.manual_seed(100 + j)
        cfg = LlamaConfig(vocab_size=n + 21, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=48,
                          tie_word_embeddings=False, initializer_range=0.5)
        LlamaForCausalLM(cfg).save_pretrained(path / f"experts/expert_{j:03d}")
    return path


def _params(n=16, **kw):
    return SamplingParams(max_new_tokens=n, temperature=0, **kw)


@pytest.mark.parametrize("which", ["run", "llama_run"])
@pytest.mark.parametrize("top_k", [1, 2, None])
def test_greedy_equals_reference(request, which, top_k):
    path = request.getfixturevalue(which)
    ens = Ensemble.load(path, top_k=top_k)
    want_lp, got_lp = [], []
    want = generate_ref(ens, PROMPTS, [_params()] * len(PROMPTS), want_lp)
    engine = Engine(ens)
    seqs = engine.generate(PROMPTS, [_params(logprobs=0)] * len(PROMPTS))
    assert [s.text for s in seqs] == want
    assert (ens.stacked() is not None) == (which == "llama_run")


@pytest.mark.parametrize("mixer", ["triton", "cpp"])
@pytest.mark.parametrize("which", ["run", "llama_run"])
@pytest.mark.parametrize("kind,top_k", [("cluster", 1), ("cluster", 2), ("cluster", None), ("uniform", 2),
                                        ("posterior", 1)])
def test_logprobs_equal_reference(request, which, kind, top_k, mixer, monkeypatch):
    """Tokens and mixture log-probs of the reference; the mixture by the Triton kernels (interpreted
    here) or, outside the interpreter, by the C++ kernel CPU tables take."""
    if mixer == "cpp":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    ens = Ensemble.load(request.getfixturevalue(which), top_k=top_k, kind=kind)
    want_lp = []
    want = generate_ref(ens, PROMPTS[:3], [_params(10)] * 3, want_lp)
    seqs, lps = _run(Engine(ens), PROMPTS[:3], [_params(10, logprobs=0)] * 3)
    assert [s.text for s in seqs] == want
    for got, exp in zip(lps, want_lp):
        assert np.allclose(got, exp, atol=1e-4), (got, exp)


def _run(engine, prompts, params, add_at=None):
    """Drive an engine step by step; ``add_at[i]``: the step before which prompt i joins. Returns the
    finished sequences and each one's per-token log-probs, in prompt order."""
    add_at = add_at or [0] * len(prompts)
    ids, lps, done, step = {}, {}, {}, 0
    while len(done) < len(prompts):
        for i, p in enumerate(prompts):
            if add_at[i] == step:
                sid = engine.add(p, params[i])
                ids[sid] = i
                lps[i] = []
        queued = {s.id: s for s in list(engine.waiting) + list(engine.running.values())}
        for e in engine.step():
            i = ids[e.seq_id]
            if e.token is not None and e.logprob is not None:
                lps[i].append(e.logprob)
            if e.finish_reason:
                done[i] = queued[e.seq_id]
        step += 1
        assert step < 1000
    return [done[i] for i in range(len(prompts))], [lps[i] for i in range(len(prompts))]


@pytest.mark.parametrize("which", ["run", "llama_run"])
def test_a_row_does_not_depend_on_its_batch_mates(request, which):
    """Greedy and seeded rows give the same tokens and log-probs alone, in a batch, joining late."""
    ens = Ensemble.load(request.getfixturevalue(which), top_k=2)
    target = [PROMPTS[2], PROMPTS[0]]
    tparams = [_params(14, logprobs=0), SamplingParams(max_new_tokens=14, temperature=0.9, top_p=0.8, seed=7,
                                                       logprobs=0)]
    alone = [_run(Engine(ens), [p], [q]) for p, q in zip(target, tparams)]
    others = PROMPTS[1:] + [t[:30] for t in PROMPTS]
    oparams = [SamplingParams(max_new_tokens=3 + i, temperature=1.3, seed=i, top_k="all" if i % 2 else 1)
               for i in range(len(others))]
    for add_at in (None, [3, 5] + list(range(len(others)))):
        seqs, lps = _run(Engine(ens, max_batch=4), target + others, tparams + oparams, add_at)
        for i in range(2):
            assert seqs[i].new == alone[i][0][0].new
            assert np.allclose(lps[i], alone[i][1][0], atol=1e-5)


@pytest.mark.parametrize("which", ["run", "llama_run"])
def test_sampling_equals_reference_per_row_seed(request, which):
    ens = Ensemble.load(request.getfixturevalue(which), top_k=2)
    params = [SamplingParams(max_new_tokens=12, temperature=t, top_p=p, seed=s)
              for t, p, s in [(1.0, 1.0, 0), (0.7, 0.9, 1), (1.5, 0.5, 2)]]
    want = generate_ref(ens, PROMPTS[:3], params)
    assert [s.text for s in Engine(ens).generate(PROMPTS[:3], params)] == want
    assert ens.generate(PROMPTS[:3], max_new_tokens=12, temperature=0.7, top_p=0.9, seed=5) == \
        generate_ref(ens, PROMPTS[:3], [SamplingParams(max_new_tokens=12, temperature=0.7, top_p=0.9, seed=5 + i)
                                        for i in range(3)])


def test_conventions_temperature_zero_stop_strings_lengths_long_prompts(llama_run):
    ens = Ensemble.load(llama_run, top_k=2)
    greedy = ens.generate(PROMPTS, max_new_tokens=20, greedy=True)
    assert ens.generate(PROMPTS, max_new_tokens=20, temperature=0) == greedy
    lengths = [0, 1, 5, 20, 3]
    full = Engine(ens).generate(PROMPTS, [_params(20)] * len(PROMPTS))
    short = Engine(ens).generate(PROMPTS, [_params(n) for n in lengths])
    for s, f, n in zip(short, full, lengths):  # a prefix of the longer greedy output, of n tokens at most
        assert f.new[:len(s.new)] == s.new and (len(s.new) == n or len(s.new) == len(f.new) < n)
    stop = next(g[2:4] for g in greedy if len(g) > 4)
    out = ens.generate(PROMPTS, max_new_tokens=20, temperature=0, stop=[stop, "zzzz"])
    for o, g in zip(out, greedy):
        assert o == (g[:g.index(stop)] if stop in g else g)
    long = " ".join(PROMPTS * 8)  # longer than the experts' 48-token context: keeps its last tokens
    assert len(ens.encode(long)) > ens.context
    assert ens.generate([long], max_new_tokens=8, temperature=0) == generate_ref(ens, [long], [_params(8)])


def test_streamed_text_is_the_final_text(llama_run):
    ens = Ensemble.load(llama_run, top_k=1)
    engine = Engine(ens)
    params = SamplingParams(max_new_tokens=25, temperature=0, stop=("the ",))
    sid = engine.add(PROMPTS[0], params)
    parts, seq = [], engine.waiting[0]
    while engine.has_work():
        parts += [e.text for e in engine.step() if e.seq_id == sid]
    assert "".join(parts) == seq.text and "the " not in seq.text


def test_padded_vocabulary_and_stacked_scoring(llama_run, texts):
    """The experts' vocabulary is 21 ids wider than the tokenizer: those ids are never generated, and
    scoring through the stacked experts equals one forward per expert."""
    ens = Ensemble.load(llama_run, top_k=2)
    real = len(ens.tokenizer)
    assert ens.pool.vocab_size() == real + 21 and ens.stacked() is not None
    engine = Engine(ens)
    seqs = engine.generate(PROMPTS, [SamplingParams(max_new_tokens=30, temperature=2.0, seed=i, ignore_eos=True)
                                     for i in range(len(PROMPTS))])
    assert all(len(s.new) == 30 and max(s.new) < real for s in seqs)
    for top_k in (1, 2, None):
        ens = Ensemble.load(llama_run, top_k=top_k)
        stacked = ens.score(texts)
        calls = list(ens.expert_calls)
        ens.use_stacked = False
        plain = ens.score(texts)
        for a, b in zip(stacked, plain):
            assert torch.allclose(a, b, atol=1e-5)
        assert calls == [c - c0 for c, c0 in zip(ens.expert_calls, calls)]  # the same (window, expert) pairs


def test_stacked_and_generic_paths_agree_and_slots_are_freed(llama_run):
    ens = Ensemble.load(llama_run, top_k=2)
    engine = Engine(ens)
    lp_a = _run(engine, PROMPTS, [_params(12, logprobs=0)] * len(PROMPTS))
    pool = ens.stacked().pool
    assert len(pool.free) == pool.slots  # every finished row gave its KV slots back
    sid = engine.add(PROMPTS[0], _params(30))
    engine.step(), engine.step()
    assert len(pool.free) < pool.slots and engine.abort(sid) and len(pool.free) == pool.slots
    assert not engine.abort(sid)
    ens.use_stacked = False
    ens._stacked.clear()
    lp_b = _run(Engine(ens), PROMPTS, [_params(12, logprobs=0)] * len(PROMPTS))
    assert [s.new for s in lp_a[0]] == [s.new for s in lp_b[0]]
    for a, b in zip(lp_a[1], lp_b[1]):
        assert np.allclose(a, b, atol=1e-5)


def test_text_stream_equals_transform(run):
    """The router's incremental embedding of a growing text equals re-embedding the text."""
    from cbtm.embed import normalise
    from cbtm.router import Router

    emb = Router.load(run).embedder
    text = "The Quick brown fox's 3rd jump\tover  the lazy dog.\n\nΣίσυφος ΟΔΟΣ running 42 times naïve café"
    rng = np.random.default_rng(0)
    words = [m.start() for m in re.finditer(r"\s+", text)]  # growth by whole words, as tokens bring them
    for cuts in (list(range(0, len(text), 3)), words, np.cumsum(rng.integers(1, 7, len(text))).tolist()):
        stream = emb.stream()
        for cut in [c for c in cuts if c < len(text)] + [len(text)]:
            stream.update(text[:cut])
            assert np.allclose(normalise(stream.vector()[None]), emb.transform([text[:cut]]), atol=1e-6), cut
    stream.update("something else entirely")  # not an extension: embedded afresh
    assert np.allclose(normalise(stream.vector()[None]), emb.transform(["something else entirely"]), atol=1e-6)


def test_bos_less_tokenizer_one_start_rule(run, tmp_path):
    """A tokenizer without BOS (Qwen2-style): both decoders start sequences with EOS, and agree."""
    from transformers import AutoTokenizer

    from cbtm.hf_model import EnsembleForCausalLM

    path = tmp_path / "run"
    shutil.copytree(run, path, ignore=shutil.ignore_patterns("tokenizer"))
    for e in ("experts",):
        shutil.rmtree(path / e)
        shutil.copytree(run / e, path / e)
    tok = AutoTokenizer.from_pretrained(run / "tokenizer")
    tok.bos_token = None
    tok.save_pretrained(path / "tokenizer")
    model = EnsembleForCausalLM.from_run(path, top_k=2)
    assert model.ensemble.bos == tok.eos_token_id and model.tokenizer("x")["input_ids"][0] == tok.eos_token_id
    want = Ensemble.load(path, top_k=2).generate(PROMPTS[:3], max_new_tokens=10, temperature=0)
    mt = model.tokenizer
    text = "And the king said unto them"  # both score every token after the start token
    want_lp = Ensemble.load(path, top_k=2).score([text])[0]
    ids = mt(text, return_tensors="pt")["input_ids"]
    assert torch.allclose(model(input_ids=ids).logits[0, :-1].gather(-1, ids[0, 1:, None])[:, 0], want_lp, atol=1e-5)
    bare = torch.tensor([tok(text)["input_ids"]])  # without the start token: the engine adds it
    assert torch.allclose(model(input_ids=bare).logits[0, :-1].gather(-1, bare[0, 1:, None])[:, 0], want_lp[1:],
                          atol=1e-5)
    for p, w in zip(PROMPTS[:3], want):
        enc = mt([p], return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=10, do_sample=False)
        assert mt.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True) == w


def test_bad_inputs_name_the_argument(llama_run):
    ens = Ensemble.load(llama_run, top_k=2)
    cases = [(dict(prompts=None), TypeError, "prompts"), (dict(prompts=[]), ValueError, "empty"),
             (dict(prompts=[3]), TypeError, "str"), (dict(max_new_tokens=-1), ValueError, "max_new_tokens"),
             (dict(max_new_tokens=10**12), ValueError, "max_new_tokens"),
             (dict(max_new_tokens=[1, 2]), ValueError, "max_new_tokens"),
             (dict(temperature=float("nan")), ValueError, "temperature"),
             (dict(temperature=-1), ValueError, "temperature"), (dict(top_p=0), ValueError, "top_p"),
             (dict(top_p=1.5), ValueError, "top_p"), (dict(seed=-3), ValueError, "seed"),
             (dict(stop=[""]), ValueError, "stop")]
    for kw, err, word in cases:
        args = {"prompts": ["a", "b", "c"], **kw}
        with pytest.raises(err, match=word):
            ens.generate(args.pop("prompts"), **args)
    engine = Engine(ens)
    with pytest.raises(ValueError, match="vocabulary"):
        engine.add([5, 10**6])
    with pytest.raises(ValueError, match="vocabulary"):
        engine.add([-1])
    with pytest.raises(ValueError, match="experts"):
        engine.add("x", SamplingParams(experts=(0, K)))
    with pytest.raises(ValueError, match="routing"):
        engine.add("x", SamplingParams(routing="bogus"))
    assert ens.router.routing == "distance"
    with pytest.raises(ValueError, match="prefix router"):  # refused at add, not in a later step
        engine.add("x", SamplingParams(routing="prefix"))
    assert engine.add("x", SamplingParams(routing="distance")) is not None
    engine.abort(engine.waiting[0].id)
    with pytest.raises(ValueError, match="max_batch"):
        Engine(ens, max_batch=0)
    assert not engine.has_work()  # nothing half-added


def test_expert_subset_and_per_request_top_k(llama_run):
    ens = Ensemble.load(llama_run, top_k=2)
    engine = Engine(ens)
    engine.add(PROMPTS[0], SamplingParams(max_new_tokens=8, temperature=0, experts=(1,), return_routing=True))
    engine.add(PROMPTS[1], SamplingParams(max_new_tokens=8, temperature=0, top_k="all", return_routing=True))
    engine.add(PROMPTS[2], SamplingParams(max_new_tokens=8, temperature=0, top_k=1, experts=(0, 2),
                                          return_routing=True))
    seen = {0: set(), 1: set(), 2: set()}
    counts = {0: set(), 1: set(), 2: set()}
    first = None
    while engine.has_work():
        for e in engine.step():
            first = e.seq_id if first is None else min(first, e.seq_id)
            i = e.seq_id - first
            if e.routing:
                seen[i] |= {j for j, _ in e.routing}
                counts[i].add(len(e.routing))
                assert abs(sum(w for _, w in e.routing) - 1) < 1e-5
    assert seen[0] == {1} and counts[1] == {K} and counts[2] == {1} and seen[2] <= {0, 2}


def test_wrapper_bad_inputs_name_the_argument(llama_run):
    from cbtm.hf_model import EnsembleForCausalLM

    model = EnsembleForCausalLM.from_run(llama_run, top_k=2)
    V = model.config.vocab_size
    assert V == len(model.tokenizer) + 21  # the experts' (padded) width
    for bad in ([[5, V]], [[5, -1]]):
        with pytest.raises(ValueError, match="input_ids.*vocabulary"):
            model(input_ids=torch.tensor(bad))
    with pytest.raises(ValueError, match="input_ids"):
        model(input_ids=torch.tensor([5, 6]))  # not (batch, length)
    assert model(input_ids=torch.zeros(2, 0, dtype=torch.long)).logits.shape == (2, 0, V)  # nothing to score
    # padded ids are never generated; the real ids keep the experts' own log-probs (not renormalised)
    out = model(input_ids=torch.tensor([[model.ensemble.bos, 5, 6]])).logits
    n = len(model.tokenizer)
    assert torch.isinf(out[..., n:]).all() and (out[..., :n].exp().sum(-1) < 1).all()
    want = model.ensemble.score([model.tokenizer.decode([5, 6])])[0]
    assert torch.allclose(out[0, :2].gather(-1, torch.tensor([[5], [6]]))[:, 0], want, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("which", ["run", "llama_run"])
def test_engine_on_cuda_equals_cpu(request, which, monkeypatch):
    """Both expert paths on a GPU (stacked weights, KV slots and the Triton mixture on the device) give
    the CPU's greedy tokens and log-probs."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    path = request.getfixturevalue(which)
    for top_k in (1, 2):  # one expert per row: sampled from its logits as they come; two: the mixture
        params = [_params(12, logprobs=0)] * len(PROMPTS)
        cpu = _run(Engine(Ensemble.load(path, top_k=top_k)), PROMPTS, params)
        gpu = _run(Engine(Ensemble.load(path, top_k=top_k, device="cuda")), PROMPTS, params)
        assert [s.new for s in gpu[0]] == [s.new for s in cpu[0]]
        for a, b in zip(gpu[1], cpu[1]):
            assert np.allclose(a, b, atol=1e-3)


@pytest.mark.gpu
def test_stacked_scoring_on_cuda_equals_cpu(llama_run, texts):
    """Scoring with the stacked experts on a GPU (padded SDPA for the packed segments, the grouped output
    layer) gives the CPU's log-probs, top-1 and top-2."""
    for top_k in (1, 2):
        cpu = Ensemble.load(llama_run, top_k=top_k).score(texts)
        gpu = Ensemble.load(llama_run, top_k=top_k, device="cuda")
        assert gpu.stacked() is not None
        assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(cpu, gpu.score(texts)))


@pytest.mark.parametrize("top_k", [1, None])
def test_generation_past_the_context_slides_like_the_reference(llama_run, top_k):
    """60 new tokens through a 48-token context: every pair's KV slot is freed and refilled when the
    window slides, and the tokens stay the reference's."""
    ens = Ensemble.load(llama_run, top_k=top_k)
    params = [SamplingParams(max_new_tokens=60, temperature=0, ignore_eos=True)] * 2
    want = generate_ref(ens, PROMPTS[:2], params)
    seqs = Engine(ens).generate(PROMPTS[:2], params)
    assert [s.text for s in seqs] == want and all(len(s.new) == 60 for s in seqs)
    assert len(ens.stacked().pool.free) == ens.stacked().pool.slots


def test_detokenizer_advance_equals_full_decode(run):
    """Growing token lists decoded incrementally give the full decode's text after every step: random
    ids (arbitrary bytes, invalid UTF-8 included), multi-byte characters split across tokens, special
    tokens; a decoder that is not byte-level is decoded in full."""
    from tokenizers import Tokenizer, decoders, models as tok_models
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from cbtm.tokens import DecodeState, Detokenizer

    tok = AutoTokenizer.from_pretrained(run / "tokenizer")
    detok = Detokenizer(tok)
    assert detok.incremental
    rng = np.random.default_rng(0)
    text = "naïve café — 😀🎉 日本語 ok " * 3
    lists = [tok.encode(text), rng.integers(0, len(tok), 300).tolist(),
             [tok.eos_token_id] + tok.encode("a é 😀") + [tok.eos_token_id] * 2 + tok.encode(" b")]
    states, grown, held = [DecodeState() for _ in lists], [[] for _ in lists], 0
    while any(len(g) < len(ids) for g, ids in zip(grown, lists)):
        for g, ids in zip(grown, lists):
            g += ids[len(g):len(g) + int(rng.integers(1, 4))]
        got = detok.advance(states, grown)
        assert got == tok.batch_decode(grown, skip_special_tokens=True)
        held += sum(st.n < len(g) for st, g in zip(states, grown))  # a character still incomplete
    assert held

    wordpiece = Tokenizer(tok_models.WordPiece({"[UNK]": 0, "ab": 1, "##cd": 2, "ef": 3}, unk_token="[UNK]"))
    wordpiece.decoder = decoders.WordPiece()
    other = Detokenizer(PreTrainedTokenizerFast(tokenizer_object=wordpiece, unk_token="[UNK]"))
    assert not other.incremental
    state, ids = DecodeState(), []
    for t in [1, 2, 3, 2, 1]:  # "##cd" joins the token before it: not local, decoded in full
        ids.append(t)
        assert other.advance([state], [ids]) == [wordpiece.decode(ids)]
