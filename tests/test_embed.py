"""Tests for cbtm.embed: equality with the scikit-learn pipeline, persistence, exact prefix embeddings."""
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from safetensors.numpy import load_file
from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import Normalizer

import cbtm.embed
from cbtm.corpus import default_corpus_path, read_documents
from cbtm.embed import TfidfEmbedder

TOL = 1e-5
# words that trap prefix computations: length-changing or context-dependent lowercasing (İ, final
# sigma), non-ASCII letters, combining marks, numbers, stop words, underscores, apostrophes
WORDS = ["İstanbul", "DİYARBAKIR", "ΟΔΥΣΣΕΥΣ", "ΣΟΦΟΣ", "ΑΣΑ", "ΑΣ", "Σίσυφος", "ὈΔΥΣΣΕΎΣ", "ΣΑ'Σ",
         "straße", "STRASSE", "Fußball", "café", "CAFÉ", "naïve", "résumé", "e\u0301te\u0301", "ﬁle", "ǅungla",
         "\u212aelvin", "ĲSSELMEER", "2024", "3rd", "1st", "42nd", "v2", "x86_64", "foo_bar", "_private",
         "__init__", "the", "The", "and", "of", "between", "nothing", "don't", "e-mail", "word", "Words", "WORDS",
         "running", "runner", "run", "i", "a"]
SEPARATORS = [" ", "  ", "\n", "\n\n", "\t", "\u00a0", "\u3000", ", ", ". ", "-", "'", "", "!", "_", "(", ")"]
TOKEN = re.compile(r"(?u)\b\w\w+\b")


def reference_pipeline(n_components, seed):
    """The paper's embedding built from scikit-learn parts only, independently of cbtm.embed."""
    tokenizer = lambda doc: ["#NUMBER" if t[0].isdigit() else t for t in TOKEN.findall(doc)]  # noqa: E731
    vectorizer = TfidfVectorizer(stop_words="english", tokenizer=tokenizer, token_pattern=None)
    return make_pipeline(vectorizer, TruncatedSVD(n_components, random_state=seed), Normalizer())


def synthetic_texts(n, rng):
    """Texts from WORDS whose vocabulary also holds every prefix of every word, raw and lowercased."""
    pieces = [v[:i] for w in WORDS for v in (w, w.lower()) for i in range(1, len(v) + 1)]
    return [" ".join(rng.choices(pieces, k=40) + rng.choices(WORDS, k=20)) for _ in range(n)]


@pytest.fixture(scope="module")
def corpus_texts():
    return [d.text for d in read_documents(default_corpus_path())]


@pytest.fixture(scope="module")
def corpus_embedder(corpus_texts):
    return TfidfEmbedder(n_components=100, seed=0).fit(corpus_texts[::30])


@pytest.fixture(scope="module")
def unicode_texts():
    return synthetic_texts(80, random.Random(0))


@pytest.fixture(scope="module")
def unicode_embedder(unicode_texts):
    return TfidfEmbedder(n_components=16, seed=3).fit(iter(unicode_texts))  # any iterable


def test_transform_matches_sklearn_pipeline(corpus_texts, corpus_embedder):
    fit_texts = corpus_texts[::30]
    reference = reference_pipeline(100, 0).fit(fit_texts)
    vectorizer = reference[0]
    assert corpus_embedder.vocabulary == vectorizer.get_feature_names_out().tolist()
    assert "#NUMBER" in corpus_embedder.vocabulary and "the" not in corpus_embedder.vocabulary
    held_out = corpus_texts[7::45] + ["", "the and of", "In 2024, the 3rd of 42 cats.", "zzzqqqxxx"]
    ours = corpus_embedder.transform(held_out)
    assert ours.dtype == np.float32 and ours.shape == (len(held_out), 100)
    assert np.abs(ours - reference.transform(held_out)).max() <= TOL
    assert np.abs(corpus_embedder.transform(fit_texts) - reference.transform(fit_texts)).max() <= TOL
    norms = np.linalg.norm(ours, axis=1)
    assert np.allclose(norms[:-4], 1, atol=1e-5) and np.all(ours[[-4, -3, -1]] == 0)  # term-less: zero


def test_unicode_transform_and_analyzer_match_sklearn(unicode_texts, unicode_embedder):
    reference = reference_pipeline(16, 3).fit(unicode_texts)
    analyzer = reference[0].build_analyzer()
    probes = synthetic_texts(20, random.Random(1)) + WORDS
    for text in probes:
        assert unicode_embedder.analyze(text) == analyzer(text)
    assert np.abs(unicode_embedder.transform(probes) - reference.transform(probes)).max() <= TOL


def test_fit_transform_equals_transform(unicode_texts):
    embedder = TfidfEmbedder(n_components=8, seed=1)
    first = embedder.fit_transform(t for t in unicode_texts)
    assert np.array_equal(first, embedder.transform(unicode_texts))
    assert not np.array_equal(first, TfidfEmbedder(n_components=8, seed=2).fit_transform(unicode_texts))


def test_save_load_round_trip_without_pickle(tmp_path, corpus_texts, corpus_embedder):
    corpus_embedder.save(tmp_path / "router")
    files = sorted(p.name for p in (tmp_path / "router").iterdir())
    assert files == ["embedder.json", "embedder.safetensors"]
    config = json.loads((tmp_path / "router" / "embedder.json").read_text(encoding="utf-8"))
    assert config["vocabulary"] == corpus_embedder.vocabulary and config["n_components"] == 100
    arrays = load_file(str(tmp_path / "router" / "embedder.safetensors"))
    assert set(arrays) == {"idf", "components"} and arrays["components"].dtype == np.float32
    loaded = TfidfEmbedder.load(tmp_path / "router")
    texts = corpus_texts[3::300]
    assert np.array_equal(loaded.transform(texts), corpus_embedder.transform(texts))
    offsets = list(range(0, len(texts[0]) + 1, 7))
    assert np.array_equal(loaded.prefix_embeddings(texts[0], offsets),
                          corpus_embedder.prefix_embeddings(texts[0], offsets))
    # loading and embedding do not need scikit-learn
    script = ("import sys; sys.modules['sklearn'] = None\n"
              "from cbtm.embed import TfidfEmbedder\n"
              f"print(TfidfEmbedder.load({str(tmp_path / 'router')!r}).transform(['holy king']).tolist())")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert np.allclose(json.loads(out.stdout), corpus_embedder.transform(["holy king"]), atol=0)


def check_prefixes(embedder, text, offsets):
    got = embedder.prefix_embeddings(text, offsets)
    assert got.shape == (len(offsets), embedder.n_components) and got.dtype == np.float32
    want = np.concatenate([embedder.transform([text[:c]]) for c in offsets]) if offsets else got
    assert np.abs(got - want).max(initial=0) <= TOL


text_strategy = st.one_of(
    st.lists(st.tuples(st.sampled_from(WORDS), st.sampled_from(SEPARATORS)), max_size=20)
    .map(lambda parts: "".join(w + s for w, s in parts)),
    st.text(alphabet=st.sampled_from("".join(WORDS + SEPARATORS) + "\u0130\u03a3\u0345\u2028\r9"), max_size=80),
)


@settings(max_examples=150, deadline=None)
@given(text=text_strategy, data=st.data())
def test_prefix_embeddings_equal_transform_of_prefix(unicode_embedder, text, data):
    every = list(range(len(text), -1, -1))  # all offsets, unsorted
    drawn = data.draw(st.lists(st.integers(0, len(text)), max_size=12))  # random order, repeats
    check_prefixes(unicode_embedder, text, every + drawn)


def test_prefix_embeddings_on_corpus_documents(corpus_texts, corpus_embedder):
    rng = random.Random(0)
    for text in corpus_texts[11::3000]:
        offsets = list(range(len(text) + 1))
        rng.shuffle(offsets)
        check_prefixes(corpus_embedder, text, offsets[:600] + [0, len(text), len(text), 5])
        full = corpus_embedder.prefix_embeddings(text, [len(text)])
        assert np.abs(full - corpus_embedder.transform([text])).max() <= TOL


def test_prefix_embeddings_of_traps(unicode_embedder):
    # final sigma: 'ΑΣΑ'[:2] lowers to 'ας', not to the prefix 'ασ' of 'ασα'; 'İ' lowers to 2 chars
    for text in ["ΑΣΑ ΑΣ", "ΑΣΑΣ ΣΟΦΟΣ", "İstanbul İİ straße", "ΣΑ'Σ ΟΔΥΣΣΕΥΣ 2024 3rd x86_64"]:
        check_prefixes(unicode_embedder, text, list(range(len(text) + 1)))
    # the traps matter: analysing a slice of the lowercased text gives other terms
    assert unicode_embedder.analyze("ΑΣΑ"[:2]) != unicode_embedder.analyze("ΑΣΑ".lower()[:2])
    assert not np.array_equal(unicode_embedder.prefix_embeddings("ΑΣΑ", [2]),
                              unicode_embedder.transform(["ΑΣΑ".lower()[:2]]))


def test_prefix_embeddings_batch_and_empty(unicode_embedder):
    texts = ["straße and café 2024", "", "ΣΟΦΟΣ"]
    offsets = [[20, 3, 3, 0], [0], []]
    got = unicode_embedder.prefix_embeddings_batch(texts, offsets)
    for text, offs, emb in zip(texts, offsets, got):
        assert np.array_equal(emb, unicode_embedder.prefix_embeddings(text, offs))
    assert got[2].shape == (0, 16) and np.all(got[1] == 0)
    with pytest.raises(ValueError, match="offset lists"):
        unicode_embedder.prefix_embeddings_batch(texts, offsets[:2])


def test_errors(unicode_embedder):
    fresh = TfidfEmbedder()
    for call in (lambda: fresh.transform(["a text"]), lambda: fresh.prefix_embeddings("a text", [1]),
                 lambda: fresh.save("unused")):
        with pytest.raises(RuntimeError, match="not fitted"):
            call()
    with pytest.raises(ValueError, match="vocabulary size"):
        TfidfEmbedder(n_components=3).fit(["alpha beta gamma", "beta gamma"])
    with pytest.raises(ValueError, match="n_components"):
        TfidfEmbedder(n_components=0)
    with pytest.raises(TypeError, match="single string"):
        unicode_embedder.transform("a single string")
    with pytest.raises(TypeError, match="single string"):
        TfidfEmbedder().fit("a single string")
    with pytest.raises(TypeError, match="str"):
        unicode_embedder.transform(["ok", 3])
    for bad in ([-1], [0, 13], [99]):
        with pytest.raises(ValueError, match="out of range"):
            unicode_embedder.prefix_embeddings("twelve chars", bad)
    with pytest.raises(TypeError, match="integers"):
        unicode_embedder.prefix_embeddings("twelve chars", [1.5])
    with pytest.raises(TypeError, match="str"):
        unicode_embedder.prefix_embeddings(b"bytes", [0])


def test_load_rejects_foreign_or_inconsistent_files(tmp_path, unicode_embedder):
    unicode_embedder.save(tmp_path)
    config_path = tmp_path / "embedder.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config_path.write_text(json.dumps({**config, "vocabulary": config["vocabulary"][:-1]}), encoding="utf-8")
    with pytest.raises(ValueError, match="inconsistent"):
        TfidfEmbedder.load(tmp_path)
    config_path.write_text(json.dumps({**config, "format": "other"}), encoding="utf-8")
    with pytest.raises(ValueError, match="not a"):
        TfidfEmbedder.load(tmp_path)
    with pytest.raises(FileNotFoundError):
        TfidfEmbedder.load(Path(tmp_path) / "missing")
