"""The prefix router against scikit-learn fitted on the same prefixes, its routing of short contexts,
and its files as untrusted input (missing, stale, damaged)."""

import json
import shutil
from itertools import islice

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from cbtm import cluster
from cbtm.assignments import iter_documents, read_assignments, read_records, validation_documents
from cbtm.cli import main
from cbtm.corpus import default_corpus_path, read_documents
from cbtm.embed import TfidfEmbedder
from cbtm.router import LOGISTIC, Router, StalePrefixRouter, _cuts, fit_prefix_router, fit_prefix_routers
from cbtm.rundir import RunDir


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Every 12th document of the embedded corpus (all 8 domains)."""
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    docs = list(islice(read_documents(default_corpus_path()), 0, None, 12))
    path.write_text("".join(json.dumps({"id": d.id, "text": d.text, **d.meta}) + "\n" for d in docs))
    return path


def _assigned(corpus, root, k):
    run = root / f"run{k}"
    cluster.fit(str(corpus), run, k=k, sample=10_000, n_components=32, seed=0, progress=False)
    cluster.assign(None, run, workers=1, progress=False)
    return run


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """Clustered runs with k = 2 and k = 4, each with its prefix router."""
    root = tmp_path_factory.mktemp("runs")
    out = {k: _assigned(corpus, root, k) for k in (2, 4)}
    fit_prefix_routers(list(out.values()))  # one embedder per run: nothing shared
    return out


def _reference_proba(run, emb):
    """scikit-learn's own logistic regression fitted on the same prefixes, its predict_proba: (N, K)."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    records = read_records(run)
    train = {i: v for i, v in records.items() if v[1] == "train"}
    embedder = TfidfEmbedder.load(RunDir(run).router)
    texts, labels = [], []
    for c, _, text in iter_documents(run, records=train):
        texts.append(text)
        labels.append(c)
    offsets = [_cuts(t, 16, rng) for t in texts]
    x = np.concatenate(embedder.prefix_embeddings_batch(texts, offsets))
    y = np.repeat(labels, [len(o) for o in offsets])
    return LogisticRegression(**LOGISTIC).fit(x, y).predict_proba(emb)


@pytest.mark.parametrize("k", [2, 4])
def test_weights_equal_sklearn_predict_proba(runs, k):
    run = runs[k]
    router = Router.load(run, "prefix")
    assert router.routing == "prefix"
    texts = [t for _, t in validation_documents(run)][:6]
    emb = router.embedder.transform(texts + [t[:12] for t in texts] + [""])  # (N, D), the empty context too
    ref = _reference_proba(run, emb)
    np.testing.assert_allclose(router.weights(emb), ref, atol=2e-5)
    # per token: the weights of every prefix are those of its embedding
    offs = [np.array([0, 5, len(t) // 2, len(t)]) for t in texts]
    for t, o, w in zip(texts, offs, router.token_weights(texts, offs)):
        np.testing.assert_allclose(w, router.weights(router.embedder.transform([t[:c] for c in o])), atol=1e-6)
    top1 = Router.load(run, "prefix", top_k=1).weights(emb)
    assert ((top1 > 0).sum(1) == 1).all() and np.array_equal(top1.argmax(1), ref.argmax(1))


def test_routes_short_contexts_better_than_the_centres(runs):
    """What the prefix router is for: on held-out documents, the cluster of a document from its
    first few words is guessed more often than by the nearest centre (which was fitted on whole
    documents)."""
    run = runs[4]
    cluster_of = {r["id"]: r["cluster"] for r in read_assignments(run)}
    docs = validation_documents(run)
    texts = [t for _, t in docs]
    right = {}
    for routing in ("prefix", "distance"):
        router, n = Router.load(run, routing), 0
        for words in (2, 5, 10):
            offs = [[min(len(" ".join(t.split()[:words])) + 1, len(t))] for t in texts]
            w = router.token_weights(texts, offs)
            n += sum(int(wi[0].argmax() == cluster_of[i]) for wi, (i, _) in zip(w, docs))
        right[routing] = n
    assert right["prefix"] > right["distance"], right


def test_cuts_are_distinct_word_starts(rng):
    text = "  The quick\tbrown fox\n\njumps over  the lazy dog "
    starts = {0} | {i for i in range(1, len(text) + 1) if text[i - 1].isspace() and (i == len(text) or not text[i].isspace())}
    for n in (1, 3, 50):
        c = _cuts(text, n, rng)
        assert 1 <= len(c) <= n and len(set(c.tolist())) == len(c) and set(c.tolist()) <= starts
    assert _cuts("", 4, rng).tolist() == [0]


def test_auto_routing_and_subsets(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs[4], run)
    assert Router.load(run).routing == "prefix"
    full = Router.load(run, "prefix")
    emb = full.embedder.transform([t for _, t in validation_documents(run)][:5])
    sub = full.subset([3, 1])
    w = full.weights(emb).astype(np.float64)[:, [3, 1]]
    np.testing.assert_allclose(sub.weights(emb), w / w.sum(1, keepdims=True), atol=1e-6)
    for name in ("prefix.json", "prefix.safetensors"):
        (run / "router" / name).unlink()
    assert Router.load(run).routing == "distance"
    with pytest.raises(FileNotFoundError, match="fit-prefix"):
        Router.load(run, "prefix")
    with pytest.raises(ValueError, match="routing must be one of"):
        Router.load(run, "nearest")


def test_damaged_or_stale_prefix_router_is_an_error(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs[2], run)
    weights, meta = run / "router" / "prefix.safetensors", run / "router" / "prefix.json"
    good_w, good_m = weights.read_bytes(), meta.read_text()
    t = load_file(str(weights))
    for bad in ({"coef": t["coef"][:1], "intercept": t["intercept"]},
                {"coef": t["coef"]},
                {"coef": np.full_like(t["coef"], np.nan), "intercept": t["intercept"]}):
        save_file(bad, str(weights))
        with pytest.raises(ValueError, match="prefix.safetensors"):
            Router.load(run)
    weights.write_bytes(good_w)
    meta.write_text(json.dumps({**json.loads(good_m), "format": "other"}))
    with pytest.raises(ValueError, match="prefix.json"):
        Router.load(run)
    meta.write_text(good_m)
    Router.load(run, "prefix")
    # new assignments (another k-means, or another split) make the fitted router stale: "auto" falls
    # back to the distance router, "prefix" is an error
    RunDir(run).update(assignments={**RunDir(run).section("assignments"), "train_sizes": [1, 2]})
    assert Router.load(run).routing == "distance"
    with pytest.raises(StalePrefixRouter, match="refit it"):
        Router.load(run, "prefix")


def test_a_new_centre_makes_the_prefix_router_stale(runs, tmp_path):
    """`merge add` appends a centre the prefix router never saw: the ensemble routes by distance."""
    from cbtm.kmeans import BalancedKMeans

    run = tmp_path / "run"
    shutil.copytree(runs[4], run)
    km = BalancedKMeans.load(run / "router")
    km.with_center(km.cluster_centers_.mean(0), count=3).save(run / "router")
    router = Router.load(run)
    assert router.routing == "distance" and router.n_experts == 5
    with pytest.raises(StalePrefixRouter):
        Router.load(run, "prefix")
    # refitting cannot mend it: the new cluster has no training documents, so a prefix router would
    # never route to it (it gave the added expert weight 0); the run keeps routing by distance
    assert fit_prefix_router(run)["absent_clusters"] == [4]
    router = Router.load(run)
    assert router.routing == "distance" and router.n_experts == 5
    with pytest.raises(StalePrefixRouter, match=r"no training documents of clusters \[4\]"):
        Router.load(run, "prefix")
    assert fit_prefix_router(runs[4], progress=False)["absent_clusters"] == []


def test_runs_sharing_an_embedder_share_the_prefixes(runs, tmp_path):
    """Several clusterings of one corpus with one embedder (the demo's): fitted together, each equals
    its own fit alone."""
    from cbtm.assignments import write_assignments

    base = runs[4]
    other = tmp_path / "other"
    shutil.copytree(base / "router", other / "router")
    recs = [{**r, "cluster": (r["cluster"] + 1) % 4} for r in read_assignments(base)]
    write_assignments(other, recs, RunDir(base).section("corpus")["paths"], k=4, name="shifted")
    alone = tmp_path / "alone"
    shutil.copytree(other, alone)
    fit_prefix_router(alone)
    together = fit_prefix_routers([base, other])
    assert together[1]["prefixes"] == together[0]["prefixes"]
    emb = Router.load(base).embedder.transform([t for _, t in validation_documents(base)][:5])
    np.testing.assert_allclose(Router.load(other).weights(emb), Router.load(alone).weights(emb), atol=1e-6)
    np.testing.assert_allclose(Router.load(other).weights(emb), np.roll(Router.load(base).weights(emb), 1, axis=1),
                               atol=1e-3)


def test_fitting_needs_assignments_that_match_the_centres(runs, tmp_path):
    from cbtm.assignments import write_assignments

    run = tmp_path / "run"
    shutil.copytree(runs[2] / "router", run / "router", ignore=shutil.ignore_patterns("prefix.*"))
    paths = RunDir(runs[2]).section("corpus")["paths"]
    recs = read_assignments(runs[2])
    write_assignments(run, [{**r, "cluster": 0} for r in recs], paths, k=2, name="one")
    with pytest.raises(ValueError, match="at least 2 clusters"):
        fit_prefix_router(run)
    write_assignments(run, [{**r, "cluster": i % 3} for i, r in enumerate(recs)], paths, k=3, name="three")
    with pytest.raises(ValueError, match="2 centres"):
        fit_prefix_router(run)
    assert not (run / "router" / "prefix.json").exists()


def test_cli_assign_fits_it_and_fit_prefix_refits(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["cluster", "fit", str(corpus), "--run", str(run), "-k", "3", "--n-components", "16"]) == 0
    assert main(["cluster", "assign", "--run", str(run), "--workers", "1"]) == 0
    meta = json.loads((run / "router" / "prefix.json").read_text())
    assert meta["k"] == 3 and meta["documents"] == sum(RunDir(run).section("assignments")["train_sizes"])
    assert main(["cluster", "fit-prefix", "--run", str(run), "--max-documents", "50", "--cuts", "4"]) == 0
    meta = json.loads((run / "router" / "prefix.json").read_text())
    assert meta["documents"] == 50 and meta["prefixes"] <= 200
    assert "prefix router fitted" in capsys.readouterr().out


@pytest.mark.parametrize("official", [False, True])
def test_distance_scores_equal_the_plain_differences(runs, official):
    """The distance router's scores (one matrix product) against squared differences summed in float64:
    random unit embeddings, the empty context's zero vector and a centre itself (distance 0)."""
    base = Router.load(runs[4], "distance")
    router = Router(base.embedder, base.centers, temperature=0.3, official_distance=official)
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((50, base.centers.shape[1]))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    emb = np.concatenate([emb, np.zeros((1, emb.shape[1])), base.centers[2:3]]).astype(np.float32)
    d2 = ((emb[:, None, :].astype(np.float64) - base.centers[None].astype(np.float64)) ** 2).sum(-1)
    want = -(d2 ** 2 if official else d2) / 0.3
    got = router.scores(emb)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert 0 >= got[-1, 2] >= -1e-12 and got.argmax(1)[-1] == 2  # never a negative distance


@pytest.mark.parametrize("routing", ["distance", "prefix"])
@pytest.mark.parametrize("top_k", [None, 1, 2])
def test_token_weights_equal_the_weights_of_every_prefix(runs, routing, top_k):
    """``token_weights`` (products of the prefixes from running sums of the terms' projections) against
    ``weights`` of each prefix re-embedded on its own, for both routers, held-out documents."""
    router = Router.load(runs[4], routing, top_k=top_k)
    assert router.routing == routing
    texts = [t for t in islice((d.text for d in read_documents(default_corpus_path())), 5, None, 97)][:4]
    offsets = [sorted(set(range(0, len(t) + 1, 23)) | {0, len(t)}) for t in texts]
    got = router.token_weights(texts, offsets)
    for text, o, w in zip(texts, offsets, got):
        want = router.weights(router.embedder.transform([text[:c] for c in o]))
        assert w.shape == want.shape == (len(o), 4) and w.dtype == np.float32
        np.testing.assert_allclose(w, want, rtol=0, atol=2e-6)
        if top_k is not None:
            assert ((w > 0).sum(1) <= top_k).all()
