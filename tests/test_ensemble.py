"""Router and sparse ensemble against slow references: every prefix re-embedded, every expert run
on every sequence, the mixture computed in float64."""

import json
import math
from itertools import islice

import numpy as np
import pytest
import torch

from cbtm import cluster
from cbtm.corpus import default_corpus_path, read_documents
from cbtm.ensemble import PACKED_PAD_FACTOR, Ensemble, _length_chunks
from cbtm.router import Router
from cbtm.rundir import RunDir

K = 3


@pytest.fixture(autouse=True)
def torch_mixture(request, monkeypatch):
    """The Triton interpreter is slow on CPU: the mixture takes its PyTorch reference path here
    (tests/test_mixture.py checks the kernels against it), except in tests marked `triton`."""
    if "triton" not in request.keywords and not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run directory with a fitted router, a BPE tokenizer and K random (peaked, distinct) GPT-2 experts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("ens")
    docs = list(islice(read_documents(default_corpus_path()), 0, None, 25))
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": d.id, "text": d.text, **d.meta}) + "\n" for d in docs))
    path = root / "run"
    cluster.fit(str(corpus), path, k=K, n_components=16, progress=False)
    cluster.assign(str(corpus), path, workers=1, progress=False)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([d.text for d in docs], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                            bos_token="<|endoftext|>").save_pretrained(path / "tokenizer")
    entries = []
    for j in range(K):
        torch.manual_seed(j)
        cfg = GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=48, n_embd=32, n_layer=1, n_head=2,
                         initializer_range=0.6)
        GPT2LMHeadModel(cfg).save_pretrained(path / f"experts/expert_{j:03d}")
        entries.append({"id": j, "cluster": j, "path": f"experts/expert_{j:03d}", "status": "done"})
    RunDir(path).update(experts=entries)
    return path


@pytest.fixture(scope="module")
def texts():
    docs = list(islice(read_documents(default_corpus_path()), 7, None, 1500))
    return [d.text[:160] for d in docs[:4]] + ["x"]  # one text shorter than a window, one of a single token


def _reference(run, texts, top_k, kind="cluster", prior=None, window=None):
    """Per-token log-probs the slow way: full-sequence forwards of every expert (no windows beyond
    the context, which the texts fit in after splitting the same way), routing by re-embedding
    every prefix with transform()."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run / "tokenizer")
    router = Router.load(run, temperature=0.1, top_k=top_k)
    models = [AutoModelForCausalLM.from_pretrained(run / f"experts/expert_{j:03d}").eval() for j in range(K)]
    L = window or models[0].config.n_positions
    out = []
    for text in texts:
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, starts = enc["input_ids"], [s for s, _ in enc["offset_mapping"]]
        lps = np.zeros((K, len(ids)))
        for a in range(0, len(ids), L):  # the same consecutive windows as Ensemble.score
            inp = torch.tensor([[tok.eos_token_id if a == 0 else ids[a - 1]] + ids[a:a + L - 1]])
            for j, m in enumerate(models):
                with torch.no_grad():
                    logp = torch.log_softmax(m(inp).logits[0].double(), -1)  # (n, V)
                n = min(L, len(ids) - a)
                lps[j, a:a + n] = logp[torch.arange(n), torch.tensor(ids[a:a + n])].numpy()
        if kind == "cluster":
            w = router.weights(router.embedder.transform([text[:c] for c in starts]))  # (n, K)
        else:
            w = np.tile(np.full(K, 1 / K) if prior is None else prior, (len(ids), 1))
        with np.errstate(divide="ignore"):
            out.append(np.logaddexp.reduce(np.log(w.astype(np.float64)) + lps.T, axis=1))
    return out


def test_router_weights_match_the_formula(run, texts):
    router = Router.load(run, temperature=0.1)
    e = router.embedder.transform(texts)
    d2 = ((e[:, None, :].astype(np.float64) - router.centers[None]) ** 2).sum(-1)
    want = np.exp(-d2 / 0.1) / np.exp(-d2 / 0.1).sum(1, keepdims=True)
    assert np.allclose(router.weights(e), want, atol=1e-6)
    official = Router.load(run, temperature=0.1, official_distance=True).weights(e)
    want4 = np.exp(-(d2 ** 2) / 0.1) / np.exp(-(d2 ** 2) / 0.1).sum(1, keepdims=True)
    assert np.allclose(official, want4, atol=1e-6)
    top1 = Router.load(run, temperature=0.1, top_k=1).weights(e)
    assert ((top1 > 0).sum(1) == 1).all() and np.allclose(top1.sum(1), 1)
    assert (top1.argmax(1) == want.argmax(1)).all()
    top2 = Router.load(run, temperature=0.1, top_k=2).weights(e)
    keep = np.argsort(-want, 1)[:, :2]
    manual = np.zeros_like(want)
    np.put_along_axis(manual, keep, np.take_along_axis(want, keep, 1), 1)
    assert np.allclose(top2, manual / manual.sum(1, keepdims=True), atol=1e-6)
    # per-token weights are the weights of the re-embedded prefixes
    offsets = [0, 5, 17, len(texts[0])]
    assert np.allclose(router.token_weights([texts[0]], [offsets])[0],
                       router.weights(router.embedder.transform([texts[0][:c] for c in offsets])), atol=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        Router.load(run, temperature=0.0)


@pytest.mark.parametrize("top_k,chunk", [(1, None), (2, None), (None, None), (2, 7), (None, 1)])
def test_score_equals_dense_reference(run, texts, top_k, chunk):
    ens = Ensemble.load(run, top_k=top_k)
    if chunk is not None:  # every expert forward cut into many small length-sorted chunks
        ens.chunk_tokens = ens.packed_tokens = chunk
    got = ens.score(texts)
    want = _reference(run, texts, top_k)
    for g, w in zip(got, want):
        assert g.shape == (len(w),) and g.dtype == torch.float32
        assert np.allclose(g.numpy(), w, atol=2e-4)
    ppl = ens.perplexity(texts)
    n = sum(len(w) for w in want)
    assert ppl["tokens"] == n
    assert math.isclose(ppl["perplexity"], math.exp(-sum(w.sum() for w in want) / n), rel_tol=1e-4)


def test_scores_in_windows_of_the_trained_sequence_length(run, texts, tmp_path):
    """Experts trained on 20-token sequences (the manifest's train config) are scored in 20-token
    windows, not their 48-position maximum: no token is scored at a position never trained."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    RunDir(copy).update(train={"total_tokens": 100, "k": K, "config": {"seq_len": 20}})
    ens = Ensemble.load(copy, top_k=2)
    assert ens.context == 20 and Ensemble.load(run, top_k=2).context == 48
    for g, w in zip(ens.score(texts), _reference(copy, texts, 2, window=20)):
        assert np.allclose(g.numpy(), w, atol=2e-4)
    with pytest.raises(ValueError, match="context"):
        Ensemble(ens.pool.paths, ens.tokenizer, ens.router, context=0)


def test_only_routed_experts_run(run, texts):
    ens1 = Ensemble.load(run, top_k=1)
    ens1.score(texts)
    ensk = Ensemble.load(run, top_k=None)
    ensk.score(texts)
    windows = ensk.expert_calls[0]
    assert ensk.expert_calls == [windows] * K  # all experts run every window
    # top-1: each expert runs only the windows routed to it at least once
    assert max(ens1.expert_calls) <= windows < sum(ens1.expert_calls) < K * windows


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("need,budget", [([0, 5, 3, 0, 5, 1], 10), ([7], 3), ([0, 0], 4), ([2, 9, 4, 4, 1, 8], 8),
                                         ([1] * 20, 6), ([9] + [1] * 40, 12), ([3, 3, 3, 2, 2, 1], 9)])
def test_length_chunks_cover_each_needed_row_once(need, budget, packed):
    need = torch.tensor(need)
    chunks = _length_chunks(need, budget, packed=packed)
    rows = torch.cat(chunks).tolist() if chunks else []
    assert sorted(rows) == [i for i, n in enumerate(need.tolist()) if n > 0]
    lengths = [int(need[r]) for r in rows]
    assert lengths == sorted(lengths, reverse=True)  # longest first: little padding per chunk
    for c in chunks:
        if packed:  # positions, and (rows, longest) index tensors, within budget unless one row alone exceeds it
            assert len(c) == 1 or (int(need[c].sum()) <= budget and len(c) * int(need[c[0]]) <= PACKED_PAD_FACTOR * budget)
        else:
            assert len(c) == 1 or len(c) * int(need[c[0]]) <= budget
    if packed:  # greedy: no chunk could have taken the next chunk's first row
        for c, d in zip(chunks, chunks[1:]):
            n = int(need[d[0]])
            assert int(need[c].sum()) + n > budget or (len(c) + 1) * int(need[c[0]]) > PACKED_PAD_FACTOR * budget


@pytest.mark.triton
def test_score_through_the_triton_interpreter(run, texts):
    """A generation step mixes with the mixture kernels themselves (interpreted on CPU); scoring still
    matches the reference with them selected."""
    from cbtm.kernels import mixture_backend

    if not torch.cuda.is_available():
        assert mixture_backend(torch.zeros(1, 1)) == "triton"  # conftest: TRITON_INTERPRET=1
    ens = Ensemble.load(run, top_k=2)
    got = ens.score(texts[3:5])
    for g, w in zip(got, _reference(run, texts[3:5], 2)):
        assert np.allclose(g.numpy(), w, atol=2e-4)
    assert len(ens.generate(["a"], max_new_tokens=2, greedy=True)) == 1


def test_on_demand_loading_gives_identical_scores(run, texts):
    full = Ensemble.load(run, top_k=2).score(texts)
    lru = Ensemble.load(run, top_k=2, max_loaded=1, batch_size=2)
    # other batches give other padded shapes, so equal up to float rounding
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(full, lru.score(texts)))
    assert lru.pool.loads > K and len(lru.pool._loaded) == 1


def test_uniform_and_posterior(run, texts):
    uni = Ensemble.load(run, top_k=None, kind="uniform").score(texts)
    for g, w in zip(uni, _reference(run, texts, None, kind="uniform")):
        assert np.allclose(g.numpy(), w, atol=2e-4)
    post = Ensemble.load(run, top_k=None, kind="posterior")
    prior = post.fit_prior(texts[:2])
    assert prior.shape == (K,) and math.isclose(prior.sum(), 1.0, rel_tol=1e-9)
    got = post.score(texts[:1])[0]
    # reference: weights prior * likelihood of the tokens before, renormalised
    ref_ll = []
    for j in range(K):
        single = Ensemble(post.pool.paths[j:j + 1], post.tokenizer, kind="uniform")
        ref_ll.append(single.score(texts[:1])[0].double().numpy())
    ref_ll = np.stack(ref_ll)  # (K, n)
    before = np.concatenate([np.zeros((K, 1)), np.cumsum(ref_ll, 1)[:, :-1]], 1)
    logpost = np.log(prior)[:, None] + before
    logpost -= np.logaddexp.reduce(logpost, axis=0)
    want = np.logaddexp.reduce(logpost + ref_ll, axis=0)
    assert np.allclose(got.numpy(), want, atol=2e-4)


@pytest.mark.filterwarnings("error::FutureWarning")  # the KV cache by the keyword of this transformers
def test_generate(run):
    ens = Ensemble.load(run, top_k=2)
    a = ens.generate(["And the king said"], max_new_tokens=8, greedy=True)
    assert a == ens.generate(["And the king said"], max_new_tokens=8, greedy=True)
    assert isinstance(a[0], str)
    s1 = ens.generate(["And the"], max_new_tokens=6, top_p=0.9, seed=3)
    assert s1 == ens.generate(["And the"], max_new_tokens=6, top_p=0.9, seed=3)
    # the first greedy token is the argmax of the mixture of the routed experts
    tok = ens.tokenizer
    prompt = "And the king said"
    ids = [ens.bos] + tok(prompt, add_special_tokens=False)["input_ids"]
    w = ens.router.token_weights([prompt], [[len(prompt)]])[0][0]
    mix = None
    for j in np.flatnonzero(w):
        with torch.no_grad():
            lp = torch.log_softmax(ens.pool.get(j)(torch.tensor([ids])).logits[0, -1].double(), -1)
        term = lp + math.log(w[j])
        mix = term if mix is None else torch.logaddexp(mix, term)
    best = int(mix.argmax())
    want = "" if best == tok.eos_token_id else tok.decode([best])
    assert ens.generate([prompt], max_new_tokens=1, greedy=True) == [want]
    # long generation slides past the context window
    long = ens.generate(["x"], max_new_tokens=60, greedy=True)
    assert isinstance(long[0], str)


def test_bad_inputs(run, tmp_path):
    with pytest.raises(ValueError, match="kind"):
        Ensemble.load(run, kind="nope")
    with pytest.raises(ValueError, match="top_k"):
        Ensemble.load(run, top_k=0)
    with pytest.raises(FileNotFoundError):
        Ensemble.load(tmp_path)
    ens = Ensemble.load(run, top_k=1)
    with pytest.raises(TypeError):
        ens.score("a single string")
    with pytest.raises(ValueError, match="temperature"):
        ens.generate(["a"], temperature=-1)
    assert ens.generate(["a"], temperature=0, max_new_tokens=4) == ens.generate(["a"], greedy=True, max_new_tokens=4)


def test_expert_logprobs_mix_equals_sparse_scores(run, texts):
    from cbtm.ensemble import mix

    dense = Ensemble.load(run, top_k=None).expert_logprobs(texts)
    for top_k in (1, 2, None):
        sparse = Ensemble.load(run, top_k=top_k).score(texts)
        for (lp, w), s in zip(dense, sparse):
            assert lp.shape == (K, len(s)) and w.shape == (len(s), K)
            assert np.allclose(mix(lp, w, top_k), s.numpy(), atol=1e-5)


def test_evaluate_table_plot_and_cli(run, tmp_path, capsys):
    import shutil

    from cbtm import evaluate
    from cbtm.assignments import (dense_records, read_records, validation_documents, validation_texts,
                                  write_assignments)
    from cbtm.cli import main

    dense = tmp_path / "dense"
    shutil.copytree(run / "experts" / "expert_001", dense / "experts" / "expert_000")
    shutil.copytree(run / "tokenizer", dense / "tokenizer")
    m = RunDir(run).manifest()
    RunDir(dense).update(experts=[{"id": 0, "path": "experts/expert_000", "status": "done"}])
    write_assignments(dense, dense_records(run), m["corpus"]["paths"], k=1, name="dense")
    rep = evaluate.evaluate({"cbtm": run, "dense": dense}, tmp_path / "out", top_ks=["1", "2", "4", "all"],
                            max_docs=6, progress=False)
    texts = validation_texts(run, limit=6)
    assert rep["documents"] == len(texts) == 6
    assert set(rep["perplexity"]["cbtm"]) == {"1", "2", "all"}  # top-4 of 3 experts is "all"
    assert set(rep["perplexity"]["dense"]) == {"all"}
    for t, top_k in (("1", 1), ("2", 2), ("all", None)):
        want = Ensemble.load(run, top_k=top_k).perplexity(texts)["perplexity"]
        assert math.isclose(rep["perplexity"]["cbtm"][t], want, rel_tol=1e-5)
    single = Ensemble.load(dense, top_k=None, kind="uniform").perplexity(texts)["perplexity"]
    assert math.isclose(rep["perplexity"]["dense"]["all"], single, rel_tol=1e-5)
    reports = tmp_path / "out" / "reports"
    assert json.loads((reports / "eval.json").read_text())["perplexity"] == rep["perplexity"]
    assert (reports / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| cbtm | 3 |" in (reports / "eval.md").read_text()
    by = rep["runs"]["cbtm"]["by_context"]
    assert math.isclose(by["top-1"]["all tokens"], rep["perplexity"]["cbtm"]["1"], rel_tol=1e-9)
    assert math.isclose(by["all"]["all tokens"], rep["perplexity"]["cbtm"]["all"], rel_tol=1e-9)
    assert list(rep["runs"]["dense"]["by_context"]) == ["all"]
    records = read_records(run)  # the own-cluster oracle: each document by its assigned cluster's expert
    scored = Ensemble.load(run, top_k=None).expert_logprobs(texts)
    own = [records[i][0] for i, _ in validation_documents(run, limit=6)]
    nll = -sum(lp[c].astype(np.float64).sum() for (lp, _), c in zip(scored, own)) / rep["tokens"]
    assert math.isclose(by["own cluster"]["all tokens"], math.exp(nll), rel_tol=1e-6)
    assert "| cbtm own cluster |" in (reports / "eval.md").read_text()
    assert "the same as all" in (reports / "eval.md").read_text()  # top-4 of 3 experts is blank
    assert main(["eval", f"cbtm={run}", "--max-docs", "2", "--top-k", "1,all"]) == 0
    assert "top-1" in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "missing")]) == 2


@pytest.mark.parametrize("k", [1, 3])
def test_context_breakdown_against_a_plain_reference(k):
    """Perplexity by context length, the own-cluster oracle and the top-1 agreement, against a
    token-by-token float64 loop (texts of awkward lengths, documents without an own cluster)."""
    from cbtm.evaluate import CONTEXT_BUCKETS, context_breakdown

    rng = np.random.default_rng(k)
    lengths = [0, 1, 7, 8, 9, 31, 33, 130, 200]
    scored = [(np.log(rng.dirichlet(np.ones(50), size=(k, n))[..., 0]).astype(np.float32),
               rng.dirichlet(np.ones(k), size=n).astype(np.float32)) for n in lengths]
    own = [int(rng.integers(k)) if t % 3 else None for t in range(len(lengths))] if k > 1 else None
    got = context_breakdown(scored, own)
    edges = list(CONTEXT_BUCKETS) + [math.inf]
    cols = ["0-7", "8-31", "32-127", "128+"]
    sums = {}  # (row, column) -> [negative log-likelihood, tokens]
    for t, (lp, w) in enumerate(scored):
        for i in range(lp.shape[1]):
            col = cols[next(b for b in range(len(cols)) if edges[b] <= i < edges[b + 1])]
            p = np.exp(lp[:, i].astype(np.float64))
            ll = {"all": math.log(float(p @ w[i].astype(np.float64)))}
            if k > 1:
                ll["top-1"] = math.log(p[int(np.argmax(w[i]))])
                if own[t] is not None:
                    ll["own cluster"] = math.log(p[own[t]])
                    ll["top-1 = own"] = float(int(np.argmax(w[i])) == own[t])
            for row, v in ll.items():
                for c in (col, "all tokens"):
                    acc = sums.setdefault((row, c), [0.0, 0])
                    acc[0] += v if row == "top-1 = own" else -v
                    acc[1] += 1
    rows = ["top-1", "all", "own cluster", "top-1 = own"] if k > 1 else ["all"]
    assert list(got) == rows
    for row in rows:
        assert set(got[row]) == {c for r, c in sums if r == row}
        for c, v in got[row].items():
            total, n = sums[(row, c)]
            want = total / n if row == "top-1 = own" else math.exp(total / n)
            assert math.isclose(v, want, rel_tol=1e-6), (row, c)


def test_evaluate_with_the_prefix_router(run, tmp_path):
    """A run with a prefix router is evaluated with it, and with the distance router on the same
    expert log-probs; both equal what the sparse ensemble computes with that router."""
    import shutil

    from cbtm import evaluate
    from cbtm.assignments import validation_texts
    from cbtm.cli import main
    from cbtm.router import fit_prefix_router

    prefixed = tmp_path / "run"
    shutil.copytree(run, prefixed)
    fit_prefix_router(prefixed)
    texts = validation_texts(prefixed, limit=5)
    res = evaluate.evaluate_run(prefixed, texts, top_ks=["1", "all"])
    assert res["routing"] == "prefix"
    for routing, got in (("prefix", res["perplexity"]), ("distance", res["distance_router"])):
        for t, top_k in (("1", 1), ("all", None)):
            want = Ensemble.load(prefixed, top_k=top_k, routing=routing).perplexity(texts)["perplexity"]
            assert math.isclose(got[t], want, rel_tol=1e-5), (routing, t)
    assert res["perplexity"]["1"] != res["distance_router"]["1"]
    plain = evaluate.evaluate_run(prefixed, texts, top_ks=["1", "all"], routing="distance")
    assert plain["routing"] == "distance" and "distance_router" not in plain
    assert plain["perplexity"] == pytest.approx(res["distance_router"], rel=1e-6)
    assert main(["eval", str(prefixed), "--max-docs", "2", "--top-k", "1,all", "--out", str(tmp_path / "o")]) == 0
    assert "distance router" in (tmp_path / "o" / "reports" / "eval.md").read_text()


def test_evaluate_names_each_router_and_flags_other_tokenizers(run, tmp_path):
    """The table says how each run was routed (a stale prefix router falls back to distance, visibly)
    and warns when runs tokenize differently (per-token perplexities are then not comparable)."""
    import shutil

    from cbtm import evaluate
    from cbtm.kmeans import BalancedKMeans
    from cbtm.router import fit_prefix_router

    prefixed, stale, other = tmp_path / "prefixed", tmp_path / "stale", tmp_path / "other"
    shutil.copytree(run, prefixed)
    fit_prefix_router(prefixed)
    shutil.copytree(prefixed, stale)
    km = BalancedKMeans.load(stale / "router")
    km.with_center(km.cluster_centers_.mean(0), count=1).save(stale / "router")
    shutil.copytree(run, other)
    tok = json.loads((other / "tokenizer" / "tokenizer.json").read_text())
    tok["normalizer"] = {"type": "Lowercase"}
    (other / "tokenizer" / "tokenizer.json").write_text(json.dumps(tok))
    rep = evaluate.evaluate({"p": prefixed, "s": stale, "d": run}, tmp_path / "out", top_ks=["1", "all"], max_docs=2,
                            progress=False)
    md = (tmp_path / "out" / "reports" / "eval.md").read_text()
    assert "| p | 3 | prefix |" in md and "| s | 3 | distance (its prefix router is stale) |" in md
    assert "| d | 3 | distance |" in md and rep["tokenizers"] == {"p": "A", "s": "A", "d": "A"}
    assert "tokenize differently" not in md
    rep = evaluate.evaluate({"d": run, "o": other}, tmp_path / "out2", top_ks=["all"], max_docs=2, progress=False)
    assert rep["tokenizers"] == {"d": "A", "o": "B"}
    assert "tokenize differently" in (tmp_path / "out2" / "reports" / "eval.md").read_text()


def test_btm_merge_operations(run, tmp_path, texts):
    import shutil

    from transformers import AutoModelForCausalLM

    from cbtm import experts as merge
    from cbtm.cli import main

    work = tmp_path / "run"
    shutil.copytree(run, work)
    avg_dir = merge.average(work, tmp_path / "avg", weights=[1, 2, 1])
    avg = AutoModelForCausalLM.from_pretrained(avg_dir).state_dict()
    sds = [AutoModelForCausalLM.from_pretrained(work / f"experts/expert_{j:03d}").state_dict() for j in range(K)]
    for name, t in avg.items():
        if t.is_floating_point():
            want = (sds[0][name] + 2 * sds[1][name] + sds[2][name]) / 4
            assert torch.allclose(t, want, atol=1e-6), name
    assert (avg_dir / "tokenizer.json").is_file()

    from cbtm.router import fit_prefix_router

    fit_prefix_router(work, max_documents=200, cuts=2, progress=False)
    assert Ensemble.load(work).router.routing == "prefix"
    new = merge.add_expert(work, work / "experts/expert_001", texts[:2])
    assert new == K
    ens = Ensemble.load(work, top_k=2)
    assert ens.n_experts == K + 1 and ens.router.centers.shape[0] == K + 1
    e = ens.router.embedder.transform(texts[:2]).mean(0)
    assert np.allclose(ens.router.centers[K], e, atol=1e-6)
    assert len(ens.score(texts[:1])[0]) > 0
    merge.remove_expert(work, 0)
    assert Ensemble.load(work, top_k=2).n_experts == K
    with pytest.raises(ValueError, match="no expert"):
        merge.remove_expert(work, 0)
    assert main(["merge", "export", "--out", str(work), "--to", str(tmp_path / "ens.json")]) == 0
    spec = json.loads((tmp_path / "ens.json").read_text())
    assert [x["id"] for x in spec["experts"]] == [1, 2, K] and spec["routing"]["top_k"] == 2
    # the added expert made the prefix router stale: the ensemble routes by distance, and says so
    assert (work / "router" / "prefix.json").is_file() and Ensemble.load(work).router.routing == "distance"
    assert spec["routing"]["router"] == "distance" and spec["routing"]["weights"].startswith("softmax(-||e")


def test_run_directory_is_untrusted_input(run, tmp_path, texts):
    """A shared run directory can neither run code nor read files outside itself, and damage is named."""
    import shutil

    from cbtm import experts, models
    from cbtm.cli import main
    from cbtm.rundir import ManifestError

    work = tmp_path / "run"
    shutil.copytree(run, work)
    manifest = work / "cbtm.json"
    good = json.loads(manifest.read_text())

    def with_manifest(change):
        m = json.loads(json.dumps(good))
        change(m)
        manifest.write_text(json.dumps(m))

    # custom code named by auto_map (model config and tokenizer config) is never imported
    sentinel = tmp_path / "code-ran"
    for d in (work / "experts/expert_000", work / "tokenizer"):
        (d / "evil.py").write_text(f"open({str(sentinel)!r}, 'w').write('x')\n")
    cfg = json.loads((work / "experts/expert_000/config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.Config", "AutoModelForCausalLM": "evil.Model"}
    (work / "experts/expert_000/config.json").write_text(json.dumps(cfg))
    tcfg = json.loads((work / "tokenizer/tokenizer_config.json").read_text())
    tcfg["auto_map"] = {"AutoTokenizer": ["evil.Tok", None]}
    (work / "tokenizer/tokenizer_config.json").write_text(json.dumps(tcfg))
    assert len(Ensemble.load(work, top_k=None).score(texts[:1])[0]) > 0
    assert not sentinel.exists()

    # paths from the manifest stay inside the run; malformed manifests are errors naming the file
    for change, msg in ((lambda m: m["experts"][0].update(path="../../outside"), "inside the run directory"),
                        (lambda m: m["experts"][0].update(path="/etc"), "inside the run directory"),
                        (lambda m: m.update(experts="expert_000"), "must be a list"),
                        (lambda m: m["experts"][0].pop("path"), "has no 'path'"),
                        (lambda m: m["experts"][0].update(status="finished"), "status must be one of"),
                        (lambda m: m["cluster"].update(k="4"), "cluster.k must be int")):
        with_manifest(change)
        with pytest.raises(ManifestError, match=msg) as e:
            Ensemble.load(work)
        assert "cbtm.json" in str(e.value)
    manifest.write_text("{not json")
    with pytest.raises(ValueError, match="cbtm.json is not valid JSON"):
        Ensemble.load(work)
    assert main(["eval", str(work)]) == 2

    # damaged weights: a recorded checksum catches a flipped byte; non-finite outputs are an error
    with_manifest(lambda m: [e.update(sha256=models.weights_digest(work / e["path"])) for e in m["experts"]])
    weights = work / "experts/expert_001/model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-3] ^= 0x40
    weights.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="do not match the checksum"):
        Ensemble.load(work, top_k=None).perplexity(texts[:2])
    with_manifest(lambda m: None)
    model = models.load_model(work / "experts/expert_001")
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    model.save_pretrained(work / "experts/expert_001")
    with pytest.raises(ValueError, match="non-finite"):
        Ensemble.load(work, top_k=None, kind="uniform").perplexity(texts[:2])

    # devices that cannot be used are user errors
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            Ensemble.load(run, device="cuda")
    with pytest.raises(ValueError, match="unsupported device"):
        Ensemble.load(run, device="meta")


def test_merge_average_never_deletes_what_it_did_not_write(run, tmp_path, capsys):
    from cbtm.cli import main

    unrelated = tmp_path / "mine"
    unrelated.mkdir()
    (unrelated / "notes.txt").write_text("keep me")
    assert main(["merge", "average", "--run", str(run), "--to", str(unrelated)]) == 2
    assert (unrelated / "notes.txt").read_text() == "keep me" and len(list(unrelated.iterdir())) == 1
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    for target in (run, run / "experts", run / "experts" / "expert_000", run.parent):
        assert main(["merge", "average", "--run", str(run), "--to", str(target)]) == 2
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    out = tmp_path / "avg"
    assert main(["merge", "average", "--run", str(run), "--to", str(out)]) == 0
    assert main(["merge", "average", "--run", str(run), "--to", str(out), "--weights", "1,2,1"]) == 0  # its own output
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert f"-> {out}" in capsys.readouterr().out  # it says what it wrote
    with pytest.raises(SystemExit) as exit_:  # a bad --weights value names the flag and the choices
        main(["merge", "average", "--run", str(run), "--to", str(out), "--weights", "size"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--weights" in err and "uniform, sizes or comma-separated numbers" in err
