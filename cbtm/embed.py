"""The C-BTM document embedding: tf-idf → truncated SVD → L2 normalisation, with exact prefix embeddings.

Fitting uses scikit-learn (``TfidfVectorizer(stop_words="english")`` whose tokenizer maps every token
starting with a digit to ``#NUMBER``, then ``TruncatedSVD``); afterwards only plain arrays are kept
(vocabulary, idf, SVD components), saved as safetensors + JSON, and inference needs numpy and scipy
only. No pickle is written or read.

Why prefix embeddings are cheap: a document's tf-idf row is ``counts * idf`` scaled by its L2 norm,
the SVD projection is linear (``X @ components.T``, no centring) and the final L2 normalisation cancels
every positive scale. So ``embed(doc) = normalise(sum over tokens w of idf[w] * components[:, w])``
and the embedding of every prefix is a normalised running sum of per-token vectors.
"""
from __future__ import annotations

import json
import re
from itertools import chain, islice, repeat
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import scipy.sparse as sp
from safetensors.numpy import load_file

from .rundir import atomic_save_safetensors, atomic_write_text, read_json

NUMBER_TOKEN = "#NUMBER"
TOKEN_PATTERN = r"(?u)\b\w\w+\b"  # scikit-learn's default
_FORMAT = "cbtm.tfidf_embedder"
_MIN_TOKEN = 2  # TOKEN_PATTERN matches the maximal runs of word characters at least this long
_WORD_RUNS = re.compile(r"(\w{%d,})" % _MIN_TOKEN)  # TOKEN_PATTERN's tokens as one split's odd pieces
_CONTEXT_LOWER = "\u03a3"  # capital sigma: the one character whose lowercase depends on its neighbours
_SPLIT = re.compile(r"(\s+)")  # splits text into whitespace-separated chunks: no token and no lowercase context crosses them
_BATCH = 2048  # documents per transform batch
_MEMO = 1 << 20  # terms outside the vocabulary remembered by prefix_embeddings
_UNSEEN = -2  # a token not yet in that memo (known terms map to a column, the others to -1)


def _number_vectorizer():
    """A scikit-learn TfidfVectorizer (English stop words) mapping digit-initial tokens to ``#NUMBER``."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    class NumberNormalizingVectorizer(TfidfVectorizer):
        def build_tokenizer(self):
            tokenize = super().build_tokenizer()
            return lambda doc: [NUMBER_TOKEN if t[0].isdigit() else t for t in tokenize(doc)]

    return NumberNormalizingVectorizer(stop_words="english", token_pattern=TOKEN_PATTERN, lowercase=True)


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation as scikit-learn's Normalizer does it (near-zero rows left as they are)."""
    return np.divide(x, _row_norms(x)[1][:, None], out=np.empty(x.shape, np.float32), casting="same_kind")


def _row_norms(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Squared L2 norms of the rows of x (N, D), and what ``_l2_normalise`` divides them by: the norms,
    1 for near-zero rows. (N,) each."""
    sq = np.einsum("ij,ij->i", x, x)
    norms = np.sqrt(sq)
    norms[norms < 10 * np.finfo(x.dtype).eps] = 1.0
    return sq, norms


def _check_offsets(text: str, char_offsets: Sequence[int]) -> np.ndarray:
    """``char_offsets`` as int64 (M,), checked to be integers in [0, len(text)]."""
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    o = np.asarray(char_offsets)
    if o.ndim != 1 or (o.size and o.dtype.kind not in "iu"):
        raise TypeError("char_offsets must be a 1-D sequence of integers")
    o = o.astype(np.int64)
    if o.size and (o.min() < 0 or o.max() > len(text)):
        bad = o[(o < 0) | (o > len(text))][0]
        raise ValueError(f"char offset {bad} out of range [0, {len(text)}]")
    return o


class TfidfEmbedder:
    """tf-idf (English stop words, ``#NUMBER``) → ``TruncatedSVD(n_components)`` → L2, from plain arrays.

    ``transform`` reproduces ``make_pipeline(vectorizer, svd, Normalizer())`` of scikit-learn to float32
    precision. A document with no known non-stop-word token embeds to the zero vector, as in
    scikit-learn. After ``fit`` (or ``load``) the state is: ``vocabulary`` (terms in column order),
    ``idf`` float32[V], ``components`` float32[n_components, V], ``stop_words``, ``token_pattern``,
    ``lowercase``.
    """

    def __init__(self, n_components: int = 100, seed: int = 0):
        if not isinstance(n_components, (int, np.integer)) or n_components < 1:
            raise ValueError(f"n_components must be a positive integer, got {n_components!r}")
        self.n_components, self.seed = int(n_components), int(seed)
        self.vocabulary: list[str] | None = None
        self.sklearn_version: str | None = None

    # ---- fitting and state ----------------------------------------------------------------------

    def fit(self, texts: Iterable[str]) -> "TfidfEmbedder":
        """Fit tf-idf and the SVD with scikit-learn on an iterable of documents (read once)."""
        import sklearn
        from sklearn.decomposition import TruncatedSVD

        if isinstance(texts, str):
            raise TypeError("fit expects an iterable of documents, not a single string")
        vectorizer = _number_vectorizer()
        tfidf = vectorizer.fit_transform(texts)  # (N, V) sparse
        n_terms = tfidf.shape[1]
        if self.n_components >= n_terms:
            raise ValueError(f"n_components={self.n_components} must be smaller than the vocabulary size "
                             f"({n_terms} terms): fit on more text or ask for fewer components")
        svd = TruncatedSVD(self.n_components, random_state=self.seed).fit(tfidf)
        self.sklearn_version = sklearn.__version__
        self._set_state(vectorizer.get_feature_names_out().tolist(), vectorizer.idf_, svd.components_,
                        sorted(vectorizer.get_stop_words()), vectorizer.token_pattern, vectorizer.lowercase)
        return self

    def fit_transform(self, texts: Iterable[str]) -> np.ndarray:
        """``fit`` then ``transform`` (from the stored arrays) on the same documents."""
        texts = list(texts)
        return self.fit(texts).transform(texts)

    def _set_state(self, vocabulary: list[str], idf: np.ndarray, components: np.ndarray,
                   stop_words: list[str], token_pattern: str, lowercase: bool) -> None:
        self.vocabulary = list(vocabulary)
        self.idf = np.ascontiguousarray(idf, dtype=np.float32)  # (V,)
        # (D, V); C order matters: safetensors writes the raw buffer and ignores strides
        self.components = np.ascontiguousarray(components, dtype=np.float32)
        self.stop_words, self.token_pattern, self.lowercase = list(stop_words), token_pattern, bool(lowercase)
        self._index = {term: i for i, term in enumerate(self.vocabulary)}
        self._stop = frozenset(self.stop_words)
        self._token_re = re.compile(token_pattern)
        # per-term vector idf[w] * components[:, w], in float64 so running sums stay exact: (V, D)
        self._vec = np.ascontiguousarray(self.components.T, dtype=np.float64)
        self._vec *= self.idf.astype(np.float64)[:, None]
        # the column of every term a token can match (no stop word, no digit-initial term: those map to
        # -1 and #NUMBER); _term_ids adds the other tokens it meets, up to _MEMO of them
        self._lookup = {t: i for i, t in enumerate(self.vocabulary) if t not in self._stop and not t[:1].isdigit()}
        self._terms, self._terms_limit = dict(self._lookup), len(self._lookup) + _MEMO

    def _check_fitted(self) -> None:
        if self.vocabulary is None:
            raise RuntimeError("TfidfEmbedder is not fitted: call fit() or TfidfEmbedder.load() first")

    # ---- embedding ------------------------------------------------------------------------------

    def analyze(self, text: str) -> list[str]:
        """Terms of ``text``: lowercase → token regex → ``#NUMBER`` mapping → stop-word filter."""
        self._check_fitted()
        tokens = self._token_re.findall(text.lower() if self.lowercase else text)
        tokens = (NUMBER_TOKEN if t[0].isdigit() else t for t in tokens)
        return [t for t in tokens if t not in self._stop]

    def _ids(self, text: str) -> list[int]:
        """Column ids of the in-vocabulary terms of ``text``, with repeats."""
        index = self._index
        return [index[t] for t in self.analyze(text) if t in index]

    def _sums(self, rows: Sequence[list[int]]) -> np.ndarray:
        """Unnormalised embeddings: per row, the sum of the per-term vectors of its ids. (N, D) float64."""
        lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))  # (N,)
        indptr = np.concatenate([[0], np.cumsum(lengths)])
        indices = np.fromiter(chain.from_iterable(rows), dtype=np.int64, count=int(indptr[-1]))
        counts = sp.csr_matrix((np.ones(len(indices)), indices, indptr), shape=(len(rows), len(self._index)))
        return counts @ self._vec

    def transform(self, texts: Iterable[str]) -> np.ndarray:
        """Embed documents: float32 (N, n_components), unit rows (zero rows for term-less documents)."""
        self._check_fitted()
        if isinstance(texts, str):
            raise TypeError("transform expects an iterable of documents, not a single string")
        texts, out = iter(texts), []
        while batch := list(islice(texts, _BATCH)):
            for t in batch:
                if not isinstance(t, str):
                    raise TypeError(f"documents must be str, got {type(t).__name__}")
            out.append(_l2_normalise(self._sums([self._ids(t) for t in batch])))
        return np.concatenate(out) if out else np.zeros((0, self.n_components), np.float32)

    def prefix_embeddings(self, text: str, char_offsets: Sequence[int]) -> np.ndarray:
        """Embedding of ``text[:c]`` for every offset ``c``: float32 (len(char_offsets), n_components).

        Equal to ``transform([text[:c]])`` row by row; a word cut by the boundary counts as its
        truncated string. Offsets may come in any order and repeat; each must be in [0, len(text)].
        Cost: one tokenisation of ``text`` and one term lookup per token and per cut word, then
        O((tokens + offsets) × D) arithmetic.
        """
        return self.prefix_embeddings_batch([text], [char_offsets])[0]

    def prefix_embeddings_batch(self, texts: Sequence[str],
                                offsets_list: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """``prefix_embeddings`` of several texts: a list of float32 (len(offsets), n_components) arrays."""
        self._check_prefixes(texts, offsets_list)
        return [self._prefixes(text, offsets) for text, offsets in zip(texts, offsets_list)]

    def prefix_products(self, texts: Sequence[str], offsets_list: Sequence[Sequence[int]],
                        projection: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per text, ``(e @ A.T, |e|^2)`` float64 ((M, K), (M,)) of the prefix embedding e of ``text[:c]`` at
        every offset c, where ``projection = term_projection(A)``: ``prefix_embeddings_batch`` times A.T
        (in float64, without rounding e to float32) without multiplying the (M, D) embeddings by A."""
        self._check_prefixes(texts, offsets_list)
        projection = np.asarray(projection, np.float64)
        if projection.ndim != 2 or projection.shape[0] != len(self.vocabulary):
            raise ValueError(f"projection must be term_projection(A): ({len(self.vocabulary)}, K), "
                             f"got {projection.shape}")
        out = []
        for text, offsets in zip(texts, offsets_list):
            emb, cross = self._prefix_sums(text, offsets, projection)  # (M, D), (M, K)
            sq, norms = _row_norms(emb)  # emb / norms is the prefix embedding (_l2_normalise)
            out.append((cross / norms[:, None], sq / (norms * norms)))
        return out

    def term_projection(self, matrix: np.ndarray) -> np.ndarray:
        """Every term's vector projected on the rows of ``matrix`` (K, D): float64 (V, K), for ``prefix_products``."""
        self._check_fitted()
        matrix = np.asarray(matrix, np.float64)
        if matrix.ndim != 2 or matrix.shape[1] != self.n_components:
            raise ValueError(f"matrix must be (K, {self.n_components}), got {matrix.shape}")
        return self._vec @ matrix.T

    def _check_prefixes(self, texts: Sequence[str], offsets_list: Sequence[Sequence[int]]) -> None:
        self._check_fitted()
        if self.token_pattern != TOKEN_PATTERN:
            raise ValueError(f"prefix embeddings need the token pattern {TOKEN_PATTERN!r}, "
                             f"this embedder has {self.token_pattern!r}")
        if len(texts) != len(offsets_list):
            raise ValueError(f"{len(texts)} texts but {len(offsets_list)} offset lists")

    def _prefixes(self, text: str, char_offsets: Sequence[int]) -> np.ndarray:
        """``prefix_embeddings`` of one text."""
        return _l2_normalise(self._prefix_sums(text, char_offsets)[0])

    def _prefix_sums(self, text: str, char_offsets: Sequence[int], projection: np.ndarray | None = None):
        """The unnormalised prefix embeddings (M, D) float64 of a text at its offsets -- a running sum over
        its complete tokens plus the cut words -- and, with ``projection`` (V, K), their products (M, K)."""
        o = _check_offsets(text, char_offsets)
        low = text.lower() if self.lowercase else text
        if len(low) == len(text) and _CONTEXT_LOWER not in text:
            ids, ready, rows, extra = self._token_terms(low, o)
        else:
            ids, ready, rows, extra = self._chunk_terms(text, o)
        at = np.searchsorted(ready, o, side="right")  # (M,) complete terms before each offset
        hit, start = np.unique(rows, return_index=True)  # rows come sorted

        def summed(table: np.ndarray) -> np.ndarray:  # (V, W) -> (M, W)
            running = np.empty((len(ids) + 1, table.shape[1]))  # (T+1, W)
            running[0] = 0.0
            np.cumsum(table[ids], axis=0, out=running[1:])
            out = running[at]
            cut = table[extra]
            if len(hit) < len(rows):  # a cut chunk with several terms
                cut = np.add.reduceat(cut, start, axis=0)
            out[hit] += cut
            return out

        return summed(self._vec), None if projection is None else summed(projection)

    def _term_ids(self, terms: list[str]) -> np.ndarray:
        """Column id of every token, int64 (``-1``: stop word or out of vocabulary), memoised across calls."""
        memo = self._terms
        out = np.fromiter(map(memo.get, terms, repeat(_UNSEEN)), dtype=np.int64, count=len(terms))
        unseen = np.flatnonzero(out == _UNSEEN)
        if unseen.size:
            if len(memo) > self._terms_limit:
                memo.clear()
                memo.update(self._lookup)
            number = self._lookup.get(NUMBER_TOKEN, -1)
            for k in unseen.tolist():
                t = terms[k]
                out[k] = memo[t] = number if t[0].isdigit() else -1
        return out

    def _token_terms(self, low: str, offsets: np.ndarray):
        """Terms of the prefixes of a text whose lowercase ``low`` keeps every position.

        Then ``text[:c]`` lowercases to ``low[:c]``, whose tokens are the tokens of ``low`` that end
        by ``c`` plus the token cut at ``c`` truncated, if at least ``_MIN_TOKEN`` characters remain.
        Returns (term ids (T,), offset from which each counts (T,), cut offsets' rows, their term ids).
        """
        pieces = _WORD_RUNS.split(low)  # gap, token, gap, ..., gap
        tokens = pieces[1::2]
        bounds = np.cumsum(np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces)))
        starts, ends = bounds[0:-1:2], bounds[1::2]  # (T,)
        j = np.searchsorted(starts, offsets) - 1  # the last token starting before each offset
        rows = np.flatnonzero(j >= 0)
        rows = rows[(ends[j[rows]] > offsets[rows]) & (offsets[rows] - starts[j[rows]] >= _MIN_TOKEN)]
        cuts = [low[a:c] for a, c in zip(starts[j[rows]].tolist(), offsets[rows].tolist())]
        ids = self._term_ids(tokens + cuts)
        ids, cut = ids[:len(tokens)], ids[len(tokens):]
        return ids[ids >= 0], ends[ids >= 0], rows[cut >= 0], cut[cut >= 0]

    def _chunk_terms(self, text: str, offsets: np.ndarray):
        """``_token_terms`` for any text, by whitespace-separated chunks (lowercase may move positions).

        Tokens never span whitespace and lowercasing never looks across it (final sigma is the only
        context-dependent case; the token pattern matches word characters only), so ``text[:c]``
        analyses as the complete chunks before ``c`` plus the partial chunk ``text[chunk_start:c]``.
        """
        pieces = _SPLIT.split(text)  # chunk, whitespace, chunk, ... (chunks may be empty at the ends)
        pos = np.zeros(len(pieces) + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces)), out=pos[1:])
        starts, ends = pos[0:-1:2], pos[1::2]  # (C,)
        chunk_ids = [self._ids(c) for c in pieces[0::2]]
        ids = np.fromiter(chain.from_iterable(chunk_ids), dtype=np.int64)
        ready = np.repeat(ends, [len(c) for c in chunk_ids])
        k = np.searchsorted(ends, offsets, side="right")  # the chunk each offset falls in or before
        rows = np.flatnonzero(k < len(ends))
        rows = rows[starts[k[rows]] < offsets[rows]]  # offsets strictly inside a chunk
        part = [self._ids(text[a:c]) for a, c in zip(starts[k[rows]].tolist(), offsets[rows].tolist())]
        cut_rows = np.repeat(rows, [len(p) for p in part])
        return ids, ready, cut_rows, np.fromiter(chain.from_iterable(part), dtype=np.int64)

    def stream(self, text: str = "") -> "TextStream":
        """An embedding of a growing text, updated as it grows (see :class:`TextStream`)."""
        self._check_fitted()
        return TextStream(self, text)

    # ---- persistence ----------------------------------------------------------------------------

    def save(self, directory: str | Path) -> None:
        """Write ``embedder.safetensors`` (idf, components) and ``embedder.json`` (vocabulary, config)."""
        self._check_fitted()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors(directory / "embedder.safetensors", {"idf": self.idf, "components": self.components},
                                metadata={"format": _FORMAT})
        config = {"format": _FORMAT, "version": 1, "n_components": self.n_components, "seed": self.seed,
                  "token_pattern": self.token_pattern, "lowercase": self.lowercase,
                  "number_token": NUMBER_TOKEN, "sklearn_version": self.sklearn_version,
                  "stop_words": self.stop_words, "vocabulary": self.vocabulary}
        atomic_write_text(directory / "embedder.json", json.dumps(config, ensure_ascii=False))

    @classmethod
    def load(cls, directory: str | Path) -> "TfidfEmbedder":
        """Read an embedder written by ``save`` (safetensors + JSON only; scikit-learn is not needed)."""
        directory = Path(directory)
        config = read_json(directory / "embedder.json")
        if not isinstance(config, dict) or config.get("format") != _FORMAT:
            raise ValueError(f"{directory / 'embedder.json'} is not a {_FORMAT} file")
        try:
            arrays = load_file(str(directory / "embedder.safetensors"))
            idf, components, vocabulary = arrays["idf"], arrays["components"], config["vocabulary"]
        except FileNotFoundError:
            raise FileNotFoundError(f"{directory / 'embedder.safetensors'} not found") from None
        except Exception as e:  # safetensors' own error type, or a missing array / field
            raise ValueError(f"cannot read the embedder in {directory}: {type(e).__name__}: {e}") from None
        if idf.shape != (len(vocabulary),) or components.shape != (config["n_components"], len(vocabulary)):
            raise ValueError(f"inconsistent embedder in {directory}: idf {idf.shape}, components "
                             f"{components.shape}, {len(vocabulary)} terms, n_components={config['n_components']}")
        if not (np.isfinite(idf).all() and np.isfinite(components).all()):
            raise ValueError(f"{directory / 'embedder.safetensors'}: idf or components hold NaN or Inf (a damaged "
                             "embedder): fit it again with `cbtm cluster fit`")
        embedder = cls(config["n_components"], config["seed"])
        embedder.sklearn_version = config.get("sklearn_version")
        embedder._set_state(vocabulary, idf, components, config["stop_words"], config["token_pattern"],
                            config["lowercase"])
        return embedder


class TextStream:
    """The unnormalised embedding of a text that grows at its end (a decoded generation).

    Words never span whitespace (nor does lowercasing look across it), so the whitespace-separated
    chunks before the text's last whitespace are final: their term vectors are summed once, and only
    the last, unfinished chunk is analysed again on each update. ``normalise(stream.vector())`` equals
    ``transform([text])`` (up to float64 summation order). A text that does not extend the previous one
    (a decoded character completed by a later token) is embedded afresh.
    """

    def __init__(self, embedder: TfidfEmbedder, text: str = ""):
        self.embedder = embedder
        self.text, self.closed = "", 0  # chunks of text[:closed] are summed in self.base
        self.base, self.partial = np.zeros(embedder.n_components), None  # partial: of text[closed:]
        self.update(text)

    def update(self, text: str) -> None:
        extends = text.startswith(self.text)
        if not extends:
            self.closed, self.base, self.partial = 0, np.zeros(self.embedder.n_components), None
        prev, self.text = len(self.text), text
        if text[-1:].isspace():
            cut = len(text)
        else:  # after the last whitespace (str.split's whitespace is str.isspace's)
            cut = max(self.closed, len(text) - len(text.rsplit(None, 1)[-1]) if text else 0)
        if cut > self.closed:
            start = self.closed
            if extends and start < prev < cut and text[prev].isspace():  # the last partial chunk ended as it was
                if self.partial is not None:
                    self.base = self.base + self.partial
                start = prev
            ids = self.embedder._ids(text[start:cut]) if not text[start:cut].isspace() else None
            if ids:
                self.base = self.base + self.embedder._vec[ids].sum(0)
            self.closed = cut
        ids = self.embedder._ids(text[self.closed:])
        self.partial = self.embedder._vec[ids].sum(0) if ids else None

    def vector(self) -> np.ndarray:
        """The embedding's direction, float64 (D,): the sum of the text's term vectors."""
        return self.base if self.partial is None else self.base + self.partial


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Embeddings (N, D) of summed term vectors, as ``transform`` gives them: float32 unit rows."""
    return _l2_normalise(np.asarray(vectors, np.float64))
