"""Training data of the experts: the shared tokenizer, per-cluster token caches, packed blocks.

```
run/ tokenizer/                   the shared tokenizer (AutoTokenizer.from_pretrained loads it)
     tokens/cluster_XXX.safetensors   {"train": uint16/int32[n], "valid": ...[m]}: each split's
                                  documents tokenized, EOS after every document, in corpus order
```

A cache is rebuilt when the tokenizer, the corpus or the cluster's document ids change. Blocks
of ``seq_len`` tokens are cut from the cached stream when training (:class:`BlockStream`), so
every expert, every restart and every block length reuses the same cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from . import defaults
from .assignments import SPLITS, corpus_settings, iter_documents, read_records
from .corpus import fingerprint
from .rundir import RunDir, atomic_save_safetensors, replace_dir

EOS = "<|endoftext|>"
DEFAULT_VOCAB = defaults.VOCAB_SIZE
_ENCODE_BATCH = 512  # documents tokenized at once
LONG_DOCUMENT = 1 << 20  # characters: longer documents are tokenized piece by piece


# ------------------------------------------------------------------------------------------------
# tokenizer


def train_tokenizer(texts: Iterable[str], out: str | Path, vocab_size: int = DEFAULT_VOCAB, min_frequency: int = 2):
    """Train a byte-level BPE (special token ``<|endoftext|>`` = EOS = BOS = PAD) on ``texts``, save
    it to ``out`` as a transformers tokenizer and return it. Deterministic for the same texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 257:
        raise ValueError(f"vocab_size must be at least 257 (256 bytes + EOS), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    if tok.get_vocab_size() <= 257:
        raise ValueError("the tokenizer learned no merges: the training text is empty or too small")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS, pad_token=EOS)
    replace_dir(out, fast.save_pretrained, "tokenizer")
    return fast


def load_tokenizer(path: str | Path):
    """A saved tokenizer (never downloads); it must define an EOS token. A run's tokenizer (the
    ``tokenizer`` directory beside a manifest that records its fingerprint) must match it. An
    unreadable tokenizer is a ValueError naming the directory."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {path}")
    _verify_run_tokenizer(path)
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # a garbage tokenizer.json: UnicodeDecodeError, JSON or tokenizers errors, ...
        raise ValueError(f"cannot read the tokenizer in {path}: {type(e).__name__}: {e}") from None
    if tok.eos_token_id is None:
        raise ValueError(f"the tokenizer in {path} has no EOS token, needed between packed documents")
    return tok


def start_token_id(tokenizer) -> int:
    """The token every sequence starts with when it is scored or generated from: the tokenizer's BOS, or
    its EOS when it has no BOS (Qwen2-style tokenizers; in training every document follows an EOS).
    Scoring, both decoders and the server use this one rule."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token")
    return int(start)


@dataclasses.dataclass
class DecodeState:
    """How much of a growing token list :meth:`Detokenizer.advance` has decoded for good: the text of
    its first ``n`` tokens, which ends on a complete character."""

    text: str = ""
    n: int = 0


class Detokenizer:
    """Texts of token lists with special tokens dropped, as ``tokenizer.batch_decode`` gives them (the
    fast tokenizer's Rust decoder directly when the tokenizer adds no clean-up of its own).

    :meth:`advance` decodes lists that grow at their end (generations) at a cost per call that does not
    grow with their length. That is exact where the decoder is byte-level (GPT-2, Llama 3, Qwen2 and
    cbtm's own tokenizers): the text is the UTF-8 of the tokens' bytes, so the text of the tokens up to
    a complete character never changes; only the tokens after it are decoded again. With any other
    decoder (whose output for a token can depend on its neighbours) each list is decoded in full.
    """

    def __init__(self, tokenizer):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
            self._batch = lambda b: backend.decode_batch([list(ids) for ids in b], skip_special_tokens=True)
            self.incremental = type(backend.decoder).__name__ == "ByteLevel"
        else:
            self._batch = lambda b: tokenizer.batch_decode([list(ids) for ids in b], skip_special_tokens=True)
            self.incremental = False
        self._pieces: dict[int, str] = {}  # token id -> its text alone

    def __call__(self, batch: Sequence[Sequence[int]]) -> list[str]:
        return self._batch(batch) if batch else []

    def advance(self, states: Sequence[DecodeState], batch: Sequence[Sequence[int]]) -> list[str]:
        """The whole text of each list (``states[i]`` belongs to ``batch[i]``, which only ever grew
        since the last call with that state)."""
        if not self.incremental:
            return self(batch)
        out: list[str | None] = [None] * len(batch)
        for i, (st, ids) in enumerate(zip(states, batch)):  # one token after a final text: its own text
            if len(ids) == st.n + 1:
                piece = self._piece(ids[-1])
                if piece is not None:
                    st.text, st.n = st.text + piece, st.n + 1
                    out[i] = st.text
        todo = [i for i, text in enumerate(out) if text is None]
        for i, tail in zip(todo, self([batch[i][states[i].n:] for i in todo])):
            st = states[i]
            if not tail.endswith("\ufffd"):  # ends on a complete character: final
                st.text, st.n = st.text + tail, len(batch[i])
                out[i] = st.text
            else:
                out[i] = st.text + tail
        return out

    def _piece(self, token: int) -> str | None:
        """A token's text alone, or None when its bytes are not whole characters."""
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = self([[token]])[0]
        return None if "\ufffd" in piece else piece


def _verify_run_tokenizer(path: Path) -> None:
    run = RunDir(path.parent)
    if path.name != "tokenizer" or not run.exists():
        return
    recorded = (run.manifest().get("tokenizer") or {}).get("fingerprint")
    run.inside(path, entries=True)  # no link in it leads outside the run
    if recorded is not None and tokenizer_fingerprint(path) != recorded:  # older runs recorded none
        raise ValueError(f"the tokenizer files in {path} do not match the fingerprint recorded in {run.manifest_path}: "
                         "they are damaged or were edited; restore them")


def tokenizer_fingerprint(path: str | Path) -> str:
    """Hash of the files of a saved tokenizer."""
    h = hashlib.blake2b(digest_size=8)
    for f in sorted(Path(path).iterdir()):
        if f.is_file():
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def ensure_tokenizer(run, seed_model: str | Path | None = None, vocab_size: int | None = None,
                     progress: bool = True):
    """The run's shared tokenizer, created on first use: a copy of the seed model's tokenizer, or a
    byte-level BPE of ``vocab_size`` (default 8192) trained on the run's training split (the
    validation split is never seen). Recorded in the manifest; asking later for another source
    (or another explicit ``vocab_size``) is an error."""
    run = RunDir.of(run)
    want = {"source": "seed_model", "seed_model": str(Path(seed_model).resolve())} if seed_model else \
        {"source": "bpe"} if vocab_size is None else {"source": "bpe", "vocab_size": int(vocab_size)}
    have = run.manifest().get("tokenizer")
    if (run.tokenizer / "tokenizer_config.json").is_file() and have:
        if any(have.get(key) != v for key, v in want.items()):
            raise ValueError(f"{run.tokenizer} was made from {have}, not {want}: train in a new run directory")
        return load_tokenizer(run.tokenizer)
    if have:
        run.drop("tokenizer")  # the entry of files no longer there
    if seed_model:
        tok = load_tokenizer(seed_model)
        replace_dir(run.tokenizer, tok.save_pretrained, "tokenizer")
    else:
        want["vocab_size"] = int(vocab_size or DEFAULT_VOCAB)
        if progress:
            print(f"training a {want['vocab_size']}-token byte-level BPE on the training split ...", flush=True)
        texts = (text for _, split, text in iter_documents(run) if split == "train")
        train_tokenizer(texts, run.tokenizer, want["vocab_size"])
    tok = load_tokenizer(run.tokenizer)
    run.update(tokenizer={**want, "path": "tokenizer", "size": len(tok), "eos_token_id": tok.eos_token_id,
                          "fingerprint": tokenizer_fingerprint(run.tokenizer)})
    return tok


def copy_tokenizer(src_run, dst_run) -> None:
    """Give ``dst_run`` the tokenizer of ``src_run`` (same files, same manifest entry)."""
    src, dst = RunDir.of(src_run), RunDir.of(dst_run)
    info = src.manifest().get("tokenizer")
    if not info or not src.tokenizer.is_dir():
        raise FileNotFoundError(f"{src.path} has no tokenizer yet")
    replace_dir(dst.tokenizer, lambda tmp: shutil.copytree(src.tokenizer, tmp), "tokenizer")
    dst.update(tokenizer=info)


# ------------------------------------------------------------------------------------------------
# token caches


def cache_path(run, cluster: int) -> Path:
    return RunDir.of(run).token_cache(cluster)


def _data_fingerprint(records: dict, cluster: int, corpus_fp: str, tok_fp: str) -> str:
    h = hashlib.blake2b(digest_size=12)
    h.update(f"{corpus_fp}\0{tok_fp}\0".encode())
    for i in sorted(i for i, (c, _) in records.items() if c == cluster):
        h.update(f"{i}\0{records[i][1]}\n".encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def ensure_token_cache(run, clusters: Sequence[int], tokenizer=None, progress: bool = True) -> dict[int, dict]:
    """Tokenize the train and valid documents of ``clusters`` (one pass over the corpus for all
    stale caches); return ``{cluster: {"train": n_tokens, "valid": n_tokens, ...}}``."""
    run = RunDir.of(run)
    tokenizer = load_tokenizer(run.tokenizer) if tokenizer is None else tokenizer
    records = read_records(run)
    corpus_fp = fingerprint(corpus_settings(run)["paths"])
    tok_fp = tokenizer_fingerprint(run.tokenizer)
    info, stale = {}, {}
    for c in sorted(set(clusters)):
        fp = _data_fingerprint(records, c, corpus_fp, tok_fp)
        meta = _cache_meta(cache_path(run, c))
        if meta and meta.get("data") == fp:
            info[c] = {key: int(v) for key, v in meta.items() if key != "data"}
        else:
            stale[c] = fp
    if not stale:
        return info
    eos = tokenizer.eos_token_id
    encode = _encoder(tokenizer)
    dtype = np.uint16 if len(tokenizer) <= 2**16 else np.int32
    parts: dict[tuple[int, str], list[np.ndarray]] = {(c, s): [] for c in stale for s in SPLITS}
    ndocs = Counter()
    want = set(parts)
    from tqdm.auto import tqdm

    bar = tqdm(total=sum(1 for v in records.values() if v in want), desc="tokenizing", unit="doc",
               disable=not progress)
    batch: list[tuple[int, str, str]] = []

    def flush():
        for (c, s, _), ids in zip(batch, encode_documents(encode, [t for _, _, t in batch], dtype)):
            parts[(c, s)].append(np.append(ids, np.asarray([eos], dtype)))
            ndocs[(c, s)] += 1
        bar.update(len(batch))
        batch.clear()

    for item in iter_documents(run, want, records):
        batch.append(item)
        if len(batch) >= _ENCODE_BATCH:
            flush()
    if batch:
        flush()
    bar.close()
    for c, fp in stale.items():
        arrays = {s: np.concatenate(parts[(c, s)]) if parts[(c, s)] else np.zeros(0, dtype) for s in SPLITS}
        meta = {"data": fp, "train": len(arrays["train"]), "valid": len(arrays["valid"]),
                "train_documents": ndocs[(c, "train")], "valid_documents": ndocs[(c, "valid")]}
        atomic_save_safetensors(cache_path(run, c), arrays, {key: str(v) for key, v in meta.items()})
        info[c] = {key: v for key, v in meta.items() if key != "data"}
    return info


def _encoder(tokenizer):
    """texts -> token id lists, without special tokens or length warnings (the fast backend when present)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return lambda texts: [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return lambda texts: tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def split_long(text: str, size: int = LONG_DOCUMENT) -> list[str]:
    """``text`` in pieces of about ``size`` characters, each cut before a single space between two
    non-space characters, where byte-level BPE's pre-tokenizer splits anyway: encoding the pieces
    gives the ids of the whole text (a piece is cut hard only when it holds no such space)."""
    pieces, start = [], 0
    while len(text) - start > size:
        end = start + size
        cut = text.rfind(" ", start + size // 2, end)
        while cut > start and (text[cut - 1].isspace() or text[cut + 1].isspace()):
            cut = text.rfind(" ", start + size // 2, cut)
        end = cut if cut > start else end
        pieces.append(text[start:end])
        start = end
    pieces.append(text[start:])
    return pieces


def encode_documents(encode, texts: list[str], dtype) -> list[np.ndarray]:
    """Token ids of each text: short texts encoded in one batch, long ones piece by piece
    (:func:`split_long`), so a huge document never holds more than one piece's encoding."""
    out: list[np.ndarray | None] = [None] * len(texts)
    short = [i for i, t in enumerate(texts) if len(t) <= LONG_DOCUMENT]
    for i, ids in zip(short, encode([texts[i] for i in short]) if short else []):
        out[i] = np.asarray(ids, dtype)
    for i, t in enumerate(texts):
        if out[i] is None:
            out[i] = np.concatenate([np.asarray(encode([p])[0], dtype) for p in split_long(t)])
    return out


def _cache_meta(path: Path) -> dict | None:
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            return f.metadata()
    except Exception:  # unreadable cache: rebuilt
        return None


def load_tokens(run, cluster: int, split: str) -> np.ndarray:
    """The cached token stream of one cluster's split (1-D)."""
    from safetensors import safe_open

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = cache_path(run, cluster)
    if not path.is_file():
        raise FileNotFoundError(f"no token cache {path}: call ensure_token_cache first")
    with safe_open(str(path), framework="np") as f:
        return f.get_tensor(split)


def pack(tokens: np.ndarray, seq_len: int, max_tokens: int | None = None) -> list[np.ndarray]:
    """Consecutive blocks of ``seq_len`` tokens (the last may be shorter; blocks of < 2 tokens are
    dropped), at most ``max_tokens`` tokens in all. For evaluation."""
    n = len(tokens) if max_tokens is None else min(len(tokens), max_tokens)
    return [tokens[i:i + seq_len] for i in range(0, n, seq_len) if min(seq_len, n - i) >= 2]


class BlockStream:
    """An endless, deterministic stream of ``seq_len``-token blocks cut from a token array: epoch
    ``e`` visits every full block once, in a permutation seeded by ``(seed, key, e)``. Row ``r`` of
    the stream is a pure function of ``r``, so training resumes from one integer."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int = 0, key: int = 0):
        self.tokens, self.seq_len, self.seed, self.key = tokens, int(seq_len), int(seed), int(key)
        self.n_blocks = len(tokens) // self.seq_len
        if self.n_blocks < 1:
            raise ValueError(f"only {len(tokens)} training tokens, fewer than one block of seq_len={seq_len}")
        self._epoch, self._perm = -1, None

    def row(self, r: int, length: int | None = None) -> np.ndarray:
        """Block ``r`` of the stream (its first ``length`` tokens): shape (length,)."""
        epoch, i = divmod(int(r), self.n_blocks)
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, self.key, epoch]).permutation(self.n_blocks)
            self._epoch = epoch
        start = int(self._perm[i]) * self.seq_len
        return self.tokens[start:start + (self.seq_len if length is None else length)]
