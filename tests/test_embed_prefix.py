"""Prefix embeddings, path by path, against the plain reference: ``transform`` of every prefix ``text[:c]``.

Texts whose lowercase keeps every position take the token path (one tokenisation of the text); the
others (``İ`` lowercases to two characters, ``Σ`` depends on its neighbours) take the chunk path.
Each test pins the path it means to exercise by making the other one fail.
"""
import json
import random
from itertools import islice

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import cbtm.embed
from cbtm.corpus import default_corpus_path, read_documents
from cbtm.embed import TfidfEmbedder

TOL = 1e-5
STRIDE = 8
# position-preserving words: digits and digit-like (superscript two is a digit to str.isdigit), stop
# words and words that start with one, non-ASCII letters, the Kelvin sign (lowercases to ASCII k),
# a titlecase digraph, combining marks, underscores, apostrophes
WORDS = ["2024", "3rd", "42nd", "²nd", "v2", "x86_64", "the", "The", "THE", "them", "themselves", "about",
         "abouts", "otherwise", "others", "and", "andante", "café", "CAFÉ", "naïve", "straße", "\u212aelvin",
         "ǅungla", "e\u0301te\u0301", "foo_bar", "__init__", "don't", "word", "Words", "running", "runner",
         "run", "i", "a", "zz"]
SEPARATORS = [" ", "  ", "\n", "\t", "\u00a0", "\u3000", ", ", ". ", "-", "'", "", "!", "_", "(", "—"]
TRAPS = ["İstanbul", "ΑΣΑ", "ΣΟΦΟΣ", "ὈΔΥΣΣΕΎΣ"]  # lowercase moves positions or looks at neighbours


def prefix_reference(embedder, text, offsets):
    """The plain reference: every prefix re-embedded on its own."""
    return np.concatenate([embedder.transform([text[:c]]) for c in offsets])


def check(embedder, text, offsets):
    got = embedder.prefix_embeddings(text, offsets)
    assert got.shape == (len(offsets), embedder.n_components) and got.dtype == np.float32
    assert np.abs(got - prefix_reference(embedder, text, offsets)).max(initial=0) <= TOL


def _fail(*args):
    raise AssertionError("this path must not run here")


@pytest.fixture(scope="module")
def word_embedder():
    """Fitted on texts whose vocabulary holds every prefix of every word (so cut words are terms)."""
    rng = random.Random(5)
    pieces = [v[:i] for w in WORDS + TRAPS for v in (w, w.lower()) for i in range(1, len(v) + 1)]
    texts = [" ".join(rng.choices(pieces, k=40) + rng.choices(WORDS, k=20)) for _ in range(80)]
    return TfidfEmbedder(n_components=16, seed=2).fit(texts)


@pytest.fixture(scope="module")
def corpus_embedder():
    docs = [d.text for d in islice(read_documents(default_corpus_path()), 0, None, 2)]
    return TfidfEmbedder(n_components=100, seed=0).fit(docs[:1500]), docs[1500:]


plain_text = st.lists(st.tuples(st.sampled_from(WORDS), st.sampled_from(SEPARATORS)), max_size=16).map(
    lambda parts: "".join(w + s for w, s in parts))


@settings(max_examples=150, deadline=None)
@given(text=plain_text, data=st.data())
def test_token_path_equals_transform_of_every_prefix(word_embedder, text, data):
    every = list(range(len(text), -1, -1))  # every offset, unsorted: inside words, at 0 and at len
    drawn = data.draw(st.lists(st.integers(0, len(text)), max_size=10))  # random order, repeats
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TfidfEmbedder, "_chunk_terms", _fail)
        check(word_embedder, text, every + drawn)


def test_cut_numbers_and_stop_words(word_embedder):
    # '2024'[:2] and '²nd'[:2] are #NUMBER; 'abouts'[:5] and 'themselves'[:4] are stop words; 'andante'[:3] too
    text = "2024 ²nd 3rd abouts themselves andante otherwise THE zz"
    assert {"#NUMBER", "abou", "themselve", "andant", "th"} <= set(word_embedder.vocabulary)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TfidfEmbedder, "_chunk_terms", _fail)
        check(word_embedder, text, list(range(len(text) + 1)) + [3, 3, 0, len(text)])


def test_chunk_path_for_texts_whose_lowercase_moves(word_embedder):
    texts = ["İstanbul 2024 the", "ΑΣΑ abouts ΣΟΦΟΣ", "café ὈΔΥΣΣΕΎΣ running"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TfidfEmbedder, "_token_terms", _fail)
        for text in texts:
            check(word_embedder, text, list(range(len(text), -1, -1)) + [2, 2])


def test_both_paths_agree(word_embedder):
    """The chunk path is exact for every text, so on position-preserving texts it must equal the token path."""
    rng = random.Random(1)
    for _ in range(20):
        text = "".join(rng.choice(WORDS) + rng.choice(SEPARATORS) for _ in range(12))
        offsets = list(range(len(text) + 1))
        rng.shuffle(offsets)
        fast = word_embedder.prefix_embeddings(text, offsets)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(cbtm.embed, "_CONTEXT_LOWER", "")  # in every text: the chunk path for all
            slow = word_embedder.prefix_embeddings(text, offsets)
        assert np.abs(fast - slow).max() <= TOL


def test_held_out_documents_every_stride(corpus_embedder):
    embedder, held_out = corpus_embedder
    few_kb = [t for t in held_out if 2000 <= len(t) < 8000][::40][:4]
    assert few_kb
    for text in few_kb:
        offsets = list(range(0, len(text) + 1, STRIDE)) + [len(text), 1, 1]
        check(embedder, text, offsets)
    got = embedder.prefix_embeddings_batch(few_kb, [[len(t)] for t in few_kb])
    assert np.abs(np.concatenate(got) - embedder.transform(few_kb)).max() <= TOL


def test_unseen_terms_memo_stays_exact_when_it_is_dropped(monkeypatch, corpus_embedder):
    embedder, held_out = corpus_embedder
    monkeypatch.setattr(cbtm.embed, "_MEMO", 0)  # drop the memo at every unseen term
    small = TfidfEmbedder(n_components=8, seed=0)
    small._set_state(embedder.vocabulary, embedder.idf, embedder.components[:8], embedder.stop_words,
                     embedder.token_pattern, embedder.lowercase)
    for i, text in enumerate(held_out[3:6]):  # each call meets unseen words, so each after the first drops the memo
        text = f"{text[:1500]} qqqzzx{i} 77abc qqqzzx{i}"
        check(small, text, list(range(0, len(text) + 1, 3)))
        assert f"qqqzzx{i}" in small._terms and f"qqqzzx{i - 1}" not in small._terms


def test_case_sensitive_embedder_and_foreign_token_pattern(tmp_path, word_embedder):
    word_embedder.save(tmp_path)
    config = json.loads((tmp_path / "embedder.json").read_text(encoding="utf-8"))
    (tmp_path / "embedder.json").write_text(json.dumps({**config, "lowercase": False}), encoding="utf-8")
    cased = TfidfEmbedder.load(tmp_path)
    for text in ["The THE the café CAFÉ 2024", "İstanbul ΑΣΑ The"]:  # both paths
        check(cased, text, list(range(len(text) + 1)))
    assert not np.array_equal(cased.transform(["THE CAFÉ"]), word_embedder.transform(["THE CAFÉ"]))
    (tmp_path / "embedder.json").write_text(json.dumps({**config, "token_pattern": r"\w+"}), encoding="utf-8")
    with pytest.raises(ValueError, match="token pattern"):
        TfidfEmbedder.load(tmp_path).prefix_embeddings("a text", [1])


def products_reference(embedder, text, offsets, matrix):
    """Every prefix re-embedded on its own, in float64 (the unit vector of its summed term vectors)."""
    x = np.stack([embedder._sums([embedder._ids(text[:c])])[0] for c in offsets])  # (M, D) float64
    norms = np.linalg.norm(x, axis=1)
    norms[norms < 10 * np.finfo(np.float64).eps] = 1.0
    e = x / norms[:, None]
    return e @ matrix.T, (e * e).sum(1)


@pytest.mark.parametrize("path", ["token", "chunk"])
def test_prefix_products_equal_the_float64_products_of_every_prefix(word_embedder, path):
    """``prefix_products`` (running sums of the terms' projections) against each prefix embedded on its own
    in float64 and multiplied by the matrix: cut words, numbers, stop words, offset 0 (the zero vector),
    repeats, any order."""
    rng = np.random.default_rng(3)
    matrix = rng.standard_normal((5, word_embedder.n_components))
    projection = word_embedder.term_projection(matrix)
    assert projection.shape == (len(word_embedder.vocabulary), 5)
    texts = ["2024 ²nd 3rd abouts themselves andante otherwise THE zz", "café naïve straße don't word",
             "the and a i", ""]
    if path == "chunk":
        texts += ["İstanbul 2024 the", "ΑΣΑ abouts ΣΟΦΟΣ", "café ὈΔΥΣΣΕΎΣ running"]
    offsets = [list(range(len(t), -1, -1)) + [0, len(t) // 2, len(t) // 2] for t in texts]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TfidfEmbedder, "_chunk_terms" if path == "token" else "_token_terms", _fail)
        if path == "chunk":
            mp.setattr(cbtm.embed, "_CONTEXT_LOWER", "")  # every text takes the chunk path
        got = word_embedder.prefix_products(texts, offsets, projection)
    assert len(got) == len(texts)
    for text, o, (cross, sq) in zip(texts, offsets, got):
        want_cross, want_sq = products_reference(word_embedder, text, o, matrix)
        assert cross.shape == (len(o), 5) and cross.dtype == np.float64 and sq.shape == (len(o),)
        np.testing.assert_allclose(cross, want_cross, rtol=0, atol=1e-12)
        np.testing.assert_allclose(sq, want_sq, rtol=0, atol=1e-12)
        assert sq[o.index(0)] == 0  # the empty prefix: the zero vector
    with pytest.raises(ValueError, match="projection"):
        word_embedder.prefix_products(texts[:1], offsets[:1], projection[:-1])
    with pytest.raises(ValueError, match="matrix"):
        word_embedder.term_projection(matrix[:, :-1])
    with pytest.raises(ValueError, match="offset lists"):
        word_embedder.prefix_products(texts, offsets[:1], projection)
