"""Streaming corpus I/O: JSON-lines and plain-text shards, bad-line accounting, splits, manifests.

Supported shards: ``.jsonl``, ``.jsonl.gz``, ``.json``, ``.json.gz`` (one JSON object per line) and
``.txt``, ``.txt.gz`` (plain text; one document per file, or one per blank-line-separated block).
Files are read line by line, never whole. Bad lines are skipped and recorded in a
:class:`CorpusReport` instead of aborting a long run.
"""
from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterable, Iterator, Union

PathLike = Union[str, os.PathLike]
Paths = Union[PathLike, Iterable[PathLike]]

JSON_SUFFIXES = (".jsonl.gz", ".json.gz", ".jsonl", ".json")
TEXT_SUFFIXES = (".txt.gz", ".txt")
_FORMATS = ("auto", "jsonl", "text")
_TEXT_MODES = ("file", "blocks")
_MAX_EXAMPLES = 20


@dataclass
class Document:
    """One corpus document: ``source`` is the shard it came from, ``line`` its first line (1-based)."""

    id: str
    text: str
    meta: dict
    source: str
    line: int


@dataclass
class CorpusReport:
    """Counts of documents read and lines skipped (by reason), with the first examples of each skip."""

    n_documents: int = 0
    skipped: dict = field(default_factory=dict)  # reason -> count
    examples: list = field(default_factory=list)  # "file:line: reason", first _MAX_EXAMPLES

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def skip(self, source: str, line: int, reason: str) -> None:
        """Record one skipped line (or block / file) of ``source``."""
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self.examples) < _MAX_EXAMPLES:
            self.examples.append(f"{source}:{line}: {reason}")

    def summary(self) -> str:
        """One human-readable paragraph: documents read, skips by reason, first examples."""
        out = f"{self.n_documents} documents read, {self.n_skipped} skipped"
        if self.skipped:
            reasons = ", ".join(f"{n} {r}" for r, n in sorted(self.skipped.items(), key=lambda kv: -kv[1]))
            out += f" ({reasons})\n" + "\n".join(f"  {e}" for e in self.examples)
        return out


def _suffix(path: Path) -> str | None:
    """The supported suffix ``path`` ends with, or None."""
    name = path.name.lower()
    return next((s for s in JSON_SUFFIXES + TEXT_SUFFIXES if name.endswith(s)), None)


def _stem(path: Path) -> str:
    """File name without its (possibly double) supported suffix: ``a.jsonl.gz`` -> ``a``."""
    suffix = _suffix(path)
    return path.name[: -len(suffix)] if suffix else path.stem


def _has_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def _supported_in(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if p.is_file() and _suffix(p)]


def list_shards(paths: Paths) -> list[Path]:
    """The files :func:`read_documents` would read, sorted and de-duplicated.

    Each entry of ``paths`` is a file, a directory (all supported files below it, recursively) or a
    glob pattern (``**`` allowed). A missing path raises FileNotFoundError; an entry that yields no
    supported file raises ValueError. An explicitly named file is always taken, whatever its suffix.
    """
    entries = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not entries:
        raise ValueError("no corpus path given")
    shards: set[Path] = set()
    for entry in entries:
        path = Path(entry)
        if path.is_file():
            found = [path]
        elif path.is_dir():
            found = _supported_in(path)
        elif _has_glob(str(entry)):
            found = []
            for match in map(Path, glob.glob(str(entry), recursive=True)):
                found += _supported_in(match) if match.is_dir() else [match] if _suffix(match) else []
        else:
            raise FileNotFoundError(f"corpus path not found: {entry}")
        if not found:
            raise ValueError(f"no supported corpus file ({', '.join(JSON_SUFFIXES + TEXT_SUFFIXES)}) in: {entry}")
        shards.update(found)
    return sorted(shards, key=str)


def fingerprint(paths: Paths) -> str:
    """Cheap content fingerprint for manifests: hash of the shards' names, sizes and mtimes."""
    h = hashlib.blake2b(digest_size=16)
    for shard in list_shards(paths):
        st = shard.stat()
        h.update(f"{shard}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def split_of(doc_id: str, valid_fraction: float = 0.05, seed: int = 0) -> str:
    """Deterministic train/valid split of a document id: blake2b of ``f"{seed}:{id}"``."""
    if not 0.0 <= valid_fraction <= 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1], got {valid_fraction}")
    digest = hashlib.blake2b(f"{seed}:{doc_id}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return "valid" if int.from_bytes(digest, "big") < valid_fraction * 2**64 else "train"


def default_corpus_path() -> Path:
    """The embedded 8-domain demo corpus (9,053 documents; licences in ``cbtm/data/README.md``)."""
    path = Path(__file__).parent / "data" / "demo.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"embedded corpus missing from the installation: {path}")
    return path


def _open_binary(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _decode(raw: bytes, lineno: int) -> str:
    """UTF-8 decode one line (a BOM on line 1 is dropped); raises UnicodeDecodeError."""
    return raw.decode("utf-8-sig" if lineno == 1 else "utf-8")


class CorpusReader:
    """Iterator over the documents of one or more shards; ``report`` holds the skip statistics.

    Created by :func:`read_documents`. Shards are resolved eagerly (missing paths fail at once),
    documents are read lazily, one line at a time.
    """

    def __init__(self, paths: Paths, text_field: str = "text", id_field: str = "id", fmt: str = "auto",
                 report: CorpusReport | None = None, text_mode: str = "file"):
        if fmt not in _FORMATS:
            raise ValueError(f"fmt must be one of {_FORMATS}, got {fmt!r}")
        if text_mode not in _TEXT_MODES:
            raise ValueError(f"text_mode must be one of {_TEXT_MODES}, got {text_mode!r}")
        self.shards = list_shards(paths)
        self.text_field, self.id_field, self.fmt, self.text_mode = text_field, id_field, fmt, text_mode
        self.report = report if report is not None else CorpusReport()
        self._docs = self._generate()

    def __iter__(self) -> Iterator[Document]:
        return self

    def __next__(self) -> Document:
        return next(self._docs)

    def _generate(self) -> Iterator[Document]:
        for shard in self.shards:
            is_json = self.fmt == "jsonl" or (self.fmt == "auto" and _suffix(shard) not in TEXT_SUFFIXES)
            for doc in (self._read_jsonl if is_json else self._read_text)(shard):
                self.report.n_documents += 1
                yield doc

    def _read_jsonl(self, path: Path) -> Iterator[Document]:
        source, stem, skip = str(path), _stem(path), self.report.skip
        with _open_binary(path) as fh:
            for lineno, raw in enumerate(fh, start=1):
                try:
                    line = _decode(raw, lineno)
                except UnicodeDecodeError:
                    skip(source, lineno, "not UTF-8")
                    continue
                if not line.strip():
                    skip(source, lineno, "blank line")
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    skip(source, lineno, "invalid JSON")
                    continue
                if not isinstance(obj, dict):
                    skip(source, lineno, "not a JSON object")
                    continue
                text = obj.pop(self.text_field, None)
                if text is None:
                    skip(source, lineno, f"missing field {self.text_field!r}")
                elif not isinstance(text, str):
                    skip(source, lineno, f"field {self.text_field!r} is not a string")
                elif not text.strip():
                    skip(source, lineno, "empty text")
                else:
                    doc_id = obj.pop(self.id_field, None)
                    doc_id = f"{stem}:{lineno}" if doc_id is None else str(doc_id)
                    yield Document(doc_id, text, obj, source, lineno)

    def _read_text(self, path: Path) -> Iterator[Document]:
        """Plain text: the whole file, or each blank-line-separated block, is one document.

        A block (file) holding a non-UTF-8 line is skipped whole; ids are ``"<stem>:<block index>"``.
        """
        source, stem, blocks = str(path), _stem(path), self.text_mode == "blocks"
        lines: list[str] = []
        first, bad, index = 1, 0, 0  # bad: first non-UTF-8 line of the current block, 0 if none
        with _open_binary(path) as fh:
            for lineno, raw in enumerate(fh, start=1):
                try:
                    line = _decode(raw, lineno)
                except UnicodeDecodeError:
                    line, bad = "\ufffd", bad or lineno
                if blocks and not line.strip():
                    if lines:
                        yield from self._text_doc(lines, f"{stem}:{index}", source, first, bad, strip=True)
                        index += 1
                    lines, bad = [], 0
                    continue
                if not lines:
                    first = lineno
                lines.append(line)
        if lines or not blocks:
            yield from self._text_doc(lines, f"{stem}:{index}", source, first, bad, strip=blocks)

    def _text_doc(self, lines: list[str], doc_id: str, source: str, first: int, bad: int,
                  strip: bool) -> Iterator[Document]:
        """Yield the document made of ``lines`` (starting at line ``first``), or record why it is skipped."""
        if bad:
            self.report.skip(source, bad, "not UTF-8")
            return
        text = "".join(lines)
        if not text.strip():
            self.report.skip(source, first, "empty text")
            return
        yield Document(doc_id, text.rstrip("\r\n") if strip else text, {}, source, first)


def read_documents(paths: Paths, text_field: str = "text", id_field: str = "id", fmt: str = "auto",
                   report: CorpusReport | None = None, text_mode: str = "file") -> CorpusReader:
    """Stream :class:`Document` objects from files, directories, glob patterns or a list of these.

    JSON lines: the text is ``obj[text_field]``; the id is ``str(obj[id_field])``, or
    ``"<file stem>:<line number>"`` when absent; every other field goes to ``meta``.
    Plain text (``.txt``, ``.txt.gz``, or any file with ``fmt="text"``): ``text_mode="file"`` makes
    each file one document, ``"blocks"`` each blank-line-separated block. ``fmt="jsonl"`` reads every
    file as JSON lines, as ``"auto"`` does for explicitly named files of other suffixes.
    Skipped lines are counted in ``report`` (also the returned reader's ``.report``); the reader's
    ``.shards`` lists the files it reads.
    """
    return CorpusReader(paths, text_field, id_field, fmt, report, text_mode)
