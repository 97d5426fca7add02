"""Training data of the experts: the shared tokenizer, per-cluster token caches, packed blocks.

Training depends only on the run's assignment files (``id -> cluster, split``) and its corpus:

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

import hashlib
import json
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from .corpus import default_corpus_path, fingerprint, read_documents, split_of
from .rundir import RunDir, atomic_save_safetensors, atomic_write_text

EOS = "<|endoftext|>"
DEFAULT_VOCAB = 8192
SPLITS = ("train", "valid")
_ENCODE_BATCH = 512  # documents tokenized at once


def _run(run) -> RunDir:
    return run if isinstance(run, RunDir) else RunDir(run)


# ------------------------------------------------------------------------------------------------
# assignments and documents


def corpus_settings(run) -> dict:
    """Corpus paths, text/id fields and the number of clusters ``k`` of a run with assignments."""
    run = _run(run)
    m = run.manifest()
    a = m.get("assignments") or {}
    if not a.get("shard_keys"):
        raise FileNotFoundError(f"{run.path} has no assignments: run `cbtm cluster assign` first "
                                "(or write your own with cbtm.data.write_assignments)")
    paths = (m.get("corpus") or {}).get("paths")
    if not paths:
        raise FileNotFoundError(f"{run.manifest_path} names no corpus (manifest section 'corpus.paths')")
    c = m.get("cluster") or {}
    k = a.get("k", c.get("k"))
    return {"paths": list(paths), "k": None if k is None else int(k),
            "text_field": a.get("text_field", c.get("text_field", "text")),
            "id_field": a.get("id_field", c.get("id_field", "id"))}


def read_records(run) -> dict[str, tuple[int, str]]:
    """``{document id: (cluster, split)}`` from the run's assignment files, validated."""
    from .cluster import read_assignments

    out: dict[str, tuple[int, str]] = {}
    for r in read_assignments(_run(run).path):
        c, s = r.get("cluster"), r.get("split")
        if not isinstance(c, int) or c < 0 or s not in SPLITS:
            raise ValueError(f"bad assignment record {r!r}: needs an integer cluster >= 0 and split train/valid")
        out[str(r["id"])] = (c, s)
    return out


def num_clusters(run, records: dict | None = None) -> int:
    """``k``: from the manifest, else one more than the largest assigned cluster id."""
    k = corpus_settings(run)["k"]
    records = read_records(run) if records is None else records
    top = max((c for c, _ in records.values()), default=-1) + 1
    return max(k or 0, top)


def write_assignments(run, records: Iterable[dict], corpus=None, *, k: int | None = None, name: str = "custom",
                      text_field: str = "text", id_field: str = "id", source: str = "custom") -> dict:
    """Write a run's assignments from ``records`` (dicts with ``id``, ``cluster``, ``split``) so any
    grouping of documents (random, gold labels, one dense cluster) trains like a clustering.

    ``corpus`` defaults to the embedded corpus. Replaces the run's assignment list in the manifest.
    """
    run = _run(run)
    paths = [str(default_corpus_path())] if corpus is None else \
        [str(p) for p in (corpus if isinstance(corpus, (list, tuple)) else [corpus])]
    lines, sizes = [], Counter()
    for r in records:
        c, s = r["cluster"], r["split"]
        if not isinstance(c, (int, np.integer)) or c < 0 or s not in SPLITS:
            raise ValueError(f"bad assignment record {r!r}: needs an integer cluster >= 0 and split train/valid")
        lines.append(json.dumps({"id": str(r["id"]), "cluster": int(c), "split": s}, ensure_ascii=False))
        sizes[(int(c), s)] += 1
    if not lines:
        raise ValueError("no assignment records given")
    k = max(c for c, _ in sizes) + 1 if k is None else int(k)
    atomic_write_text(run.assignments / f"{name}.jsonl", "\n".join(lines) + "\n")
    summary = {"shard_keys": [name], "k": k, "source": source, "documents": len(lines),
               "train_sizes": [sizes[(c, "train")] for c in range(k)],
               "valid_sizes": [sizes[(c, "valid")] for c in range(k)],
               "text_field": text_field, "id_field": id_field}
    run.update(assignments=summary, corpus={"paths": paths, "fingerprint": fingerprint(paths)})
    return summary


def dense_records(like=None, corpus=None, valid_fraction: float = 0.05, seed: int = 0,
                  id_field: str = "id") -> list[dict]:
    """Every document in one cluster: the splits of run ``like``, or ``split_of`` over ``corpus``."""
    if like is not None:
        return [{"id": i, "cluster": 0, "split": s} for i, (_, s) in read_records(like).items()]
    paths = corpus if corpus is not None else default_corpus_path()
    return [{"id": d.id, "cluster": 0, "split": split_of(d.id, valid_fraction, seed)}
            for d in read_documents(paths, id_field=id_field)]


def iter_documents(run, want: set[tuple[int, str]] | None = None,
                   records: dict | None = None) -> Iterator[tuple[int, str, str]]:
    """``(cluster, split, text)`` of every assigned document (those in ``want`` only), in corpus order.

    Raises ValueError when assigned documents are missing from the corpus.
    """
    s = corpus_settings(run)
    records = read_records(run) if records is None else records
    expected = sum(1 for v in records.values() if want is None or v in want)
    found = 0
    seen: set[str] = set()
    for doc in read_documents(s["paths"], text_field=s["text_field"], id_field=s["id_field"]):
        key = records.get(doc.id)
        if key is None or (want is not None and key not in want) or doc.id in seen:
            continue
        seen.add(doc.id)
        found += 1
        yield key[0], key[1], doc.text
    if found != expected:
        missing = [i for i, v in records.items() if (want is None or v in want) and i not in seen]
        raise ValueError(f"{len(missing)} assigned documents are not in the corpus {s['paths']} "
                         f"(first: {missing[:3]}): the assignments do not belong to this corpus")


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
    save_dir(out, fast.save_pretrained)
    return fast


def load_tokenizer(path: str | Path):
    """A saved tokenizer (never downloads); it must define an EOS token."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {path}")
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tok.eos_token_id is None:
        raise ValueError(f"the tokenizer in {path} has no EOS token, needed between packed documents")
    return tok


def tokenizer_fingerprint(path: str | Path) -> str:
    """Hash of the files of a saved tokenizer."""
    h = hashlib.blake2b(digest_size=8)
    for f in sorted(Path(path).iterdir()):
        if f.is_file():
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def save_dir(out: str | Path, save) -> Path:
    """``save(tmp_dir)`` then replace directory ``out`` with it (readers never see a partial one)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save(str(tmp))
    old = out.with_name(f".{out.name}.old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def ensure_tokenizer(run, seed_model: str | Path | None = None, vocab_size: int | None = None,
                     progress: bool = True):
    """The run's shared tokenizer, created on first use: a copy of the seed model's tokenizer, or a
    byte-level BPE of ``vocab_size`` (default 8192) trained on the run's training split (the
    validation split is never seen). Recorded in the manifest; asking later for another source
    (or another explicit ``vocab_size``) is an error."""
    run = _run(run)
    want = {"source": "seed_model", "seed_model": str(Path(seed_model).resolve())} if seed_model else \
        {"source": "bpe"} if vocab_size is None else {"source": "bpe", "vocab_size": int(vocab_size)}
    have = run.manifest().get("tokenizer")
    if (run.tokenizer / "tokenizer_config.json").is_file() and have:
        if any(have.get(key) != v for key, v in want.items()):
            raise ValueError(f"{run.tokenizer} was made from {have}, not {want}: train in a new run directory")
        return load_tokenizer(run.tokenizer)
    if seed_model:
        tok = load_tokenizer(seed_model)
        save_dir(run.tokenizer, tok.save_pretrained)
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
    src, dst = _run(src_run), _run(dst_run)
    info = src.manifest().get("tokenizer")
    if not info or not src.tokenizer.is_dir():
        raise FileNotFoundError(f"{src.path} has no tokenizer yet")
    save_dir(dst.tokenizer, lambda tmp: shutil.copytree(src.tokenizer, tmp))
    dst.update(tokenizer=info)


# ------------------------------------------------------------------------------------------------
# token caches


def cache_path(run, cluster: int) -> Path:
    return _run(run).path / "tokens" / f"cluster_{cluster:03d}.safetensors"


def _data_fingerprint(records: dict, cluster: int, corpus_fp: str, tok_fp: str) -> str:
    h = hashlib.blake2b(digest_size=12)
    h.update(f"{corpus_fp}\0{tok_fp}\0".encode())
    for i in sorted(i for i, (c, _) in records.items() if c == cluster):
        h.update(f"{i}\0{records[i][1]}\n".encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def ensure_token_cache(run, clusters: Sequence[int], tokenizer=None, progress: bool = True) -> dict[int, dict]:
    """Tokenize the train and valid documents of ``clusters`` (one pass over the corpus for all
    stale caches); return ``{cluster: {"train": n_tokens, "valid": n_tokens, ...}}``."""
    run = _run(run)
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
        for (c, s, _), ids in zip(batch, encode([t for _, _, t in batch])):
            parts[(c, s)].append(np.asarray(ids + [eos], dtype=dtype))
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


__all__ = ["EOS", "BlockStream", "copy_tokenizer", "corpus_settings", "dense_records", "ensure_token_cache",
           "ensure_tokenizer", "iter_documents", "load_tokenizer", "load_tokens", "num_clusters", "pack",
           "read_records", "save_dir", "tokenizer_fingerprint", "train_tokenizer", "write_assignments"]
