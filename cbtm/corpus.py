"""Streaming corpus I/O: JSON lines, plain text, Parquet and Hugging Face ``datasets`` directories;
bad-record accounting, unique ids, splits, fingerprints.

Sources:
* ``.jsonl`` / ``.json`` (one JSON object per line) and ``.txt`` (plain text; one document per file,
  or one per blank-line-separated block), each optionally compressed as ``.gz`` or ``.zst``;
* ``.parquet`` files, streamed by row group;
* a directory written by ``datasets.Dataset.save_to_disk`` (``state.json`` + Arrow stream files), one source.

Nothing is read whole. Bad lines (rows) are skipped and recorded in a :class:`CorpusReport`; so is a
file that cannot be read to its end (truncated or corrupt), as one bad shard. Document ids must be
unique: a reader raises :class:`DuplicateIdError` naming both places.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from . import defaults
from .shards import (SUFFIXES, PathLike, Paths, corpus_root, dataset_files, fingerprint,  # noqa: F401 (public names)
                     list_shards, open_binary, read_errors)

_FORMATS = ("auto", "jsonl", "text")
_TEXT_MODES = ("file", "blocks")
_MAX_EXAMPLES = 20
_BATCH_ROWS = 1024  # Parquet rows converted to Python at once
_JSON_SCALARS = (str, int, float, bool, type(None))
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # a JSON escape of a UTF-16 surrogate


@dataclass
class Document:
    """One corpus document: ``source`` is the file (or ``datasets`` directory) it came from, ``line``
    its first line, or its row in a Parquet file or ``datasets`` directory (1-based)."""

    id: str
    text: str
    meta: dict
    source: str
    line: int


@dataclass
class CorpusReport:
    """Counts of documents read and lines skipped (by reason), with the first examples of each skip,
    and every shard that could not be read to its end (``bad_shards``: ``"file:line: error"``)."""

    n_documents: int = 0
    skipped: dict = field(default_factory=dict)  # reason -> count
    examples: list = field(default_factory=list)  # "file:line: reason", first _MAX_EXAMPLES
    bad_shards: list = field(default_factory=list)

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def skip(self, source: str, line: int, reason: str) -> None:
        """Record one skipped line (or block / file / row) of ``source``."""
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self.examples) < _MAX_EXAMPLES:
            self.examples.append(f"{source}:{line}: {reason}")

    def bad_shard(self, source: str, line: int, error: BaseException) -> None:
        """Record a shard whose reading failed at ``line`` (documents before it were kept)."""
        self.skip(source, line, "unreadable file")
        self.bad_shards.append(f"{source}:{line}: {type(error).__name__}: {error}")

    def summary(self) -> str:
        """One human-readable paragraph: documents read, skips by reason, first examples, bad shards."""
        out = f"{self.n_documents} documents read, {self.n_skipped} skipped"
        if self.skipped:
            reasons = ", ".join(f"{n} {r}" for r, n in sorted(self.skipped.items(), key=lambda kv: -kv[1]))
            out += f" ({reasons})\n" + "\n".join(f"  {e}" for e in self.examples)
        if self.bad_shards:
            out += "\nunreadable shards (documents before the error were kept):\n"
            out += "\n".join(f"  {e}" for e in self.bad_shards)
        return out


class DuplicateIdError(ValueError):
    """Two documents of a corpus share an id."""


class DocumentTooLarge(ValueError):
    """A line or document longer than ``defaults.MAX_DOCUMENT_BYTES`` (named by file and line)."""


def _too_large(source: str, line: int) -> DocumentTooLarge:
    limit = defaults.MAX_DOCUMENT_BYTES
    return DocumentTooLarge(f"{source}:{line}: a document (line) longer than {limit:,} bytes, the limit of one "
                            "document (cbtm.defaults.MAX_DOCUMENT_BYTES): split it into smaller documents")


def _lone_surrogate(obj) -> bool:
    """Whether a parsed JSON value holds a lone UTF-16 surrogate (``"\\ud800"``): not Unicode text,
    nothing could write it back as UTF-8."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


class _BadShard(Exception):
    """Reading a shard failed at ``line`` (1-based) with ``error``."""

    def __init__(self, line: int, error: BaseException):
        super().__init__(line, error)
        self.line, self.error = line, error


def split_of(doc_id: str, valid_fraction: float = defaults.VALID_FRACTION, seed: int = defaults.SPLIT_SEED) -> str:
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


def _decode(raw: bytes, lineno: int) -> str:
    """UTF-8 decode one line (a BOM on line 1 is dropped); raises UnicodeDecodeError."""
    return raw.decode("utf-8-sig" if lineno == 1 else "utf-8")


def _jsonable(value):
    """``value`` with what JSON cannot hold made JSON-safe: dates and times as ISO strings,
    tuples as lists, anything else (bytes, decimals) as ``str``."""
    if isinstance(value, _JSON_SCALARS):
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    return str(value)


class CorpusReader:
    """Iterator over the documents of one or more sources; ``report`` holds the skip statistics.

    Created by :func:`read_documents`. Sources are resolved eagerly (missing paths fail at once),
    documents are read lazily. Raises :class:`DuplicateIdError` at the second document with an id
    already read.
    """

    def __init__(self, paths: Paths, text_field: str = "text", id_field: str = "id", fmt: str = "auto",
                 report: CorpusReport | None = None, text_mode: str = "file", root: PathLike | None = None):
        if fmt not in _FORMATS:
            raise ValueError(f"fmt must be one of {_FORMATS}, got {fmt!r}")
        if text_mode not in _TEXT_MODES:
            raise ValueError(f"text_mode must be one of {_TEXT_MODES}, got {text_mode!r}")
        self.shards = list_shards(paths)
        self.root = Path(os.path.abspath(root)) if root is not None else corpus_root(paths)
        self.text_field, self.id_field, self.fmt, self.text_mode = text_field, id_field, fmt, text_mode
        self.report = report if report is not None else CorpusReport()
        self._docs = self._generate()

    def __iter__(self) -> Iterator[Document]:
        return self

    def __next__(self) -> Document:
        return next(self._docs)

    def _generate(self) -> Iterator[Document]:
        seen: set[str] = set()
        for shard in self.shards:
            for doc in self._read_shard(shard):
                if doc.id in seen:
                    raise DuplicateIdError(self._duplicate_message(doc))
                seen.add(doc.id)
                self.report.n_documents += 1
                yield doc

    def _duplicate_message(self, doc: Document) -> str:
        again = CorpusReader(self.shards, self.text_field, self.id_field, self.fmt, None, self.text_mode, self.root)
        first = next(d for d in again if d.id == doc.id)
        return (f"duplicate document id {doc.id!r}: {first.source}:{first.line} and {doc.source}:{doc.line} "
                f"(ids in field {self.id_field!r} must be unique across the corpus)")

    def _read_shard(self, shard: Path) -> Iterator[Document]:
        """The documents of one source; a read error ends it and is recorded as a bad shard."""
        prefix = Path(os.path.relpath(os.path.abspath(shard), self.root)).as_posix()
        name = shard.name.lower()
        if shard.is_dir() or name.endswith(".parquet"):
            docs = self._read_rows(shard, prefix)
        elif self.fmt == "text" or (self.fmt == "auto" and name.endswith((".txt", ".txt.gz", ".txt.zst"))):
            docs = self._read_text(shard, prefix)
        else:
            docs = self._read_jsonl(shard, prefix)
        try:
            yield from docs
        except _BadShard as bad:
            self.report.bad_shard(str(shard), bad.line, bad.error)

    def _lines(self, path: Path) -> Iterator[tuple[int, bytes]]:
        """``(line number, raw line)`` of a file, never reading more than ``defaults.MAX_DOCUMENT_BYTES``
        of one line (a longer one raises DocumentTooLarge); a read error raises _BadShard."""
        limit, lineno = defaults.MAX_DOCUMENT_BYTES, 0
        try:
            with open_binary(path) as fh:
                while raw := fh.readline(limit + 1):
                    lineno += 1
                    if len(raw) > limit:
                        raise _too_large(str(path), lineno)
                    yield lineno, raw
        except read_errors(path) as e:
            raise _BadShard(lineno + 1, e) from e

    def _rows(self, path: Path) -> Iterator[tuple[int, dict]]:
        """``(row number, record)`` of a Parquet file or ``datasets`` directory; errors raise _BadShard."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        row = 0
        try:
            if path.is_dir():
                batches = (b for f in dataset_files(path) for b in pa.ipc.open_stream(pa.memory_map(str(f))))
            else:
                batches = pq.ParquetFile(path).iter_batches(batch_size=_BATCH_ROWS)
            for batch in batches:
                for obj in batch.to_pylist():
                    row += 1
                    yield row, obj
        except read_errors(path) as e:
            raise _BadShard(row + 1, e) from e

    def _record(self, obj: dict, source: str, prefix: str, n: int) -> Document | None:
        """The document of one JSON object or table row (line or row ``n``), or None when skipped."""
        text = obj.pop(self.text_field, None)
        if text is None:
            self.report.skip(source, n, f"missing field {self.text_field!r}")
        elif not isinstance(text, str):
            self.report.skip(source, n, f"field {self.text_field!r} is not a string")
        elif not text.strip():
            self.report.skip(source, n, "empty text")
        elif len(text) > defaults.MAX_DOCUMENT_BYTES:
            raise _too_large(source, n)
        else:
            doc_id = obj.pop(self.id_field, None)
            return Document(f"{prefix}:{n}" if doc_id is None else str(doc_id), text, obj, source, n)
        return None

    def _read_rows(self, path: Path, prefix: str) -> Iterator[Document]:
        source = str(path)
        for row, obj in self._rows(path):
            try:  # a binary (bytes) text or id column holds UTF-8 text
                obj.update({f: bytes(obj[f]).decode("utf-8") for f in (self.text_field, self.id_field)
                            if isinstance(obj.get(f), (bytes, bytearray))})
            except UnicodeDecodeError:
                self.report.skip(source, row, "not UTF-8")
                continue
            doc = self._record({k: _jsonable(v) for k, v in obj.items()}, source, prefix, row)
            if doc is not None:
                yield doc

    def _read_jsonl(self, path: Path, prefix: str) -> Iterator[Document]:
        source, skip = str(path), self.report.skip
        for lineno, raw in self._lines(path):
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
            if _SURROGATE_ESCAPE.search(line) and _lone_surrogate(obj):
                skip(source, lineno, "lone surrogate (not Unicode text)")
                continue
            doc = self._record(obj, source, prefix, lineno)
            if doc is not None:
                yield doc

    def _read_text(self, path: Path, prefix: str) -> Iterator[Document]:
        """Plain text: the whole file, or each blank-line-separated block, is one document.

        A block (file) holding a non-UTF-8 line is skipped whole; ids are ``"<path>:<block index>"``.
        """
        source, blocks = str(path), self.text_mode == "blocks"
        lines: list[str] = []
        first, bad, index, size = 1, 0, 0, 0  # bad: first non-UTF-8 line of the current block, 0 if none
        for lineno, raw in self._lines(path):
            size += len(raw)
            if size > defaults.MAX_DOCUMENT_BYTES:
                raise _too_large(source, first)
            try:
                line = _decode(raw, lineno)
            except UnicodeDecodeError:
                line, bad = "\ufffd", bad or lineno
            if blocks and not line.strip():
                if lines:
                    yield from self._text_doc(lines, f"{prefix}:{index}", source, first, bad, strip=True)
                    index += 1
                lines, bad, size = [], 0, 0
                continue
            if not lines:
                first = lineno
            lines.append(line)
        if lines or not blocks:
            yield from self._text_doc(lines, f"{prefix}:{index}", source, first, bad, strip=blocks)

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
                   report: CorpusReport | None = None, text_mode: str = "file",
                   root: PathLike | None = None) -> CorpusReader:
    """Stream :class:`Document` objects from files, directories, glob patterns or a list of these.

    JSON lines, Parquet and ``datasets`` rows: the text is ``record[text_field]``; the id is
    ``str(record[id_field])``, or, when absent, ``"<path>:<line or row>"`` with the source's path
    relative to ``root`` (default :func:`corpus_root` of ``paths``; pass the whole corpus's root when
    reading one shard of it); every other field goes to ``meta`` (JSON-safe).
    Plain text (``.txt[.gz|.zst]``, or any file with ``fmt="text"``): ``text_mode="file"`` makes each
    file one document, ``"blocks"`` each blank-line-separated block. ``fmt="jsonl"`` reads every file
    but Parquet as JSON lines, as ``"auto"`` does for explicitly named files of other suffixes.
    Skipped lines and unreadable shards are counted in ``report`` (also the returned reader's
    ``.report``); the reader's ``.shards`` lists the sources it reads. A repeated id raises
    :class:`DuplicateIdError` naming both places.
    """
    return CorpusReader(paths, text_field, id_field, fmt, report, text_mode, root)


def check_unique_ids(paths: Paths, text_field: str = "text", id_field: str = "id", fmt: str = "auto",
                     text_mode: str = "file") -> CorpusReport:
    """Read the whole corpus once and raise :class:`DuplicateIdError` if two documents share an id;
    for stages that read one shard at a time and so cannot see duplicates across shards."""
    reader = read_documents(paths, text_field, id_field, fmt, None, text_mode)
    deque(reader, maxlen=0)
    return reader.report
