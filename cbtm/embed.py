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
from itertools import chain, islice
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import scipy.sparse as sp
from safetensors.numpy import load_file

from .rundir import atomic_save_safetensors, atomic_write_text, read_json

NUMBER_TOKEN = "#NUMBER"
TOKEN_PATTERN = r"(?u)\b\w\w+\b"  # scikit-learn's default
_FORMAT = "cbtm.tfidf_embedder"
_SPLIT = re.compile(r"(\s+)")  # splits text into whitespace-separated chunks: no token and no lowercase context crosses them
_BATCH = 2048  # documents per transform batch
_MEMO = 1 << 20  # analysed chunks remembered by prefix_embeddings
_PREFIX_BATCH = 64  # texts embedded together by prefix_embeddings_batch


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
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))  # (N,)
    norms[norms < 10 * np.finfo(x.dtype).eps] = 1.0
    return (x / norms[:, None]).astype(np.float32)


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
        self._chunk_ids: dict[str, list[int]] = {}  # whitespace chunk -> term ids, shared by all calls

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
        Cost: one analysis of ``text`` plus one of each distinct partial word, O(words × D) arithmetic.
        """
        return self.prefix_embeddings_batch([text], [char_offsets])[0]

    def prefix_embeddings_batch(self, texts: Sequence[str],
                                offsets_list: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """``prefix_embeddings`` of several texts, vectorised over texts (in batches of ``_PREFIX_BATCH``)."""
        self._check_fitted()
        if len(texts) != len(offsets_list):
            raise ValueError(f"{len(texts)} texts but {len(offsets_list)} offset lists")
        out: list[np.ndarray] = []
        for i in range(0, len(texts), _PREFIX_BATCH):
            out += self._prefix_batch(texts[i:i + _PREFIX_BATCH], offsets_list[i:i + _PREFIX_BATCH])
        return out

    def _prefix_batch(self, texts: Sequence[str], offsets_list: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Prefix embeddings of a few texts laid end to end (one separator character apart).

        Tokens never span whitespace and lowercasing never looks across it (final sigma is the only
        context-dependent case; the token pattern matches word characters only), so ``text[:c]``
        analyses as the complete whitespace-separated chunks before ``c`` plus the partial chunk
        ``text[chunk_start:c]``, analysed on its own. Analyses are memoised across calls (the memo
        is dropped when it exceeds ``_MEMO`` entries).
        """
        memo = self._chunk_ids
        if len(memo) > _MEMO:
            memo.clear()
        get = memo.get

        def ids_of(s: str) -> list[int]:
            ids = get(s)
            if ids is None:
                ids = memo[s] = self._ids(s)
            return ids

        all_ids: list[list[int]] = []
        starts, ends, offs, first_chunk, sizes = [], [], [], [], []
        base = 0
        for text, char_offsets in zip(texts, offsets_list):
            if not isinstance(text, str):
                raise TypeError(f"text must be str, got {type(text).__name__}")
            o = np.asarray(char_offsets)
            if o.ndim != 1 or (o.size and o.dtype.kind not in "iu"):
                raise TypeError("char_offsets must be a 1-D sequence of integers")
            o = o.astype(np.int64)  # (M,)
            if o.size and (o.min() < 0 or o.max() > len(text)):
                bad = o[(o < 0) | (o > len(text))][0]
                raise ValueError(f"char offset {bad} out of range [0, {len(text)}]")
            pieces = _SPLIT.split(text)  # chunk, whitespace, chunk, ... (chunks may be empty at the ends)
            pos = np.zeros(len(pieces) + 1, dtype=np.int64)
            np.cumsum(np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces)), out=pos[1:])
            chunks = pieces[0::2]
            ids = [get(c) for c in chunks]
            for k, v in enumerate(ids):
                if v is None:
                    ids[k] = ids_of(chunks[k])
            first_chunk.append(len(all_ids))
            all_ids += ids
            starts.append(base + pos[0:-1:2])
            ends.append(base + pos[1::2])
            offs.append(base + o)
            sizes.append(len(o))
            base += len(text) + 1
        joined = "\n".join(texts)
        starts, ends, offs = np.concatenate(starts), np.concatenate(ends), np.concatenate(offs)  # global positions
        n_before = np.zeros(len(all_ids) + 1, dtype=np.int64)  # tokens before chunk k: (C+1,)
        np.cumsum(np.fromiter(map(len, all_ids), dtype=np.int64, count=len(all_ids)), out=n_before[1:])
        token_ids = np.fromiter(chain.from_iterable(all_ids), dtype=np.int64, count=int(n_before[-1]))  # (T,)
        running = np.zeros((len(token_ids) + 1, self.n_components))  # (T+1, D)
        np.cumsum(self._vec[token_ids], axis=0, out=running[1:])

        doc_tok0 = n_before[np.repeat(np.asarray(first_chunk, dtype=np.int64), sizes)]  # (M,)
        done = np.searchsorted(ends, offs, side="right")  # complete chunks before each offset: (M,)
        emb = running[n_before[done]] - running[doc_tok0]  # (M, D)
        cut = np.flatnonzero(done < len(all_ids))
        cut = cut[starts[done[cut]] < offs[cut]]  # offsets strictly inside a chunk
        if cut.size:
            part = [ids_of(joined[a:c]) for a, c in zip(starts[done[cut]].tolist(), offs[cut].tolist())]
            n_part = np.fromiter(map(len, part), dtype=np.int64, count=len(part))  # tokens per partial chunk
            flat = np.fromiter(chain.from_iterable(part), dtype=np.int64, count=int(n_part.sum()))
            if flat.size:
                has = n_part > 0
                first = np.concatenate([[0], np.cumsum(n_part[has])[:-1]])
                emb[cut[has]] += np.add.reduceat(self._vec[flat], first, axis=0)
        return np.split(_l2_normalise(emb), np.cumsum(sizes)[:-1])

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
        embedder = cls(config["n_components"], config["seed"])
        embedder.sklearn_version = config.get("sklearn_version")
        embedder._set_state(vocabulary, idf, components, config["stop_words"], config["token_pattern"],
                            config["lowercase"])
        return embedder
