"""Corpus sources: which files and ``datasets`` directories a corpus argument names, the directory
fallback ids are relative to, fingerprints, and how each format's bytes are opened (gzip, a
truncation-checking zstd reader, Parquet / Arrow errors)."""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import os
import zlib
from pathlib import Path
from typing import IO, Iterable, Union

PathLike = Union[str, os.PathLike]
Paths = Union[PathLike, Iterable[PathLike]]

_LINE_SUFFIXES = (".jsonl", ".json", ".txt")
_COMPRESSIONS = ("", ".gz", ".zst")
SUFFIXES = tuple(s + c for s in _LINE_SUFFIXES for c in _COMPRESSIONS) + (".parquet",)
_ZSTD_CHUNK = 1 << 20  # compressed bytes read from disk at once ...
_ZSTD_FEED = 256       # ... and fed to the decompressor at once: a zstd block of >= 4 bytes holds at most
                       # 128 KiB, so one feed yields at most 8 MiB, however hostile the file
_DATASET_DICT = "dataset_dict.json"  # a DatasetDict's list of splits, not a corpus file


def _suffix(path: Path) -> str | None:
    """The supported suffix ``path`` ends with, or None."""
    name = path.name.lower()
    return next((s for s in SUFFIXES if name.endswith(s)), None)


def _is_dataset_dir(path: Path) -> bool:
    """A directory written by ``datasets.Dataset.save_to_disk``."""
    return (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def _has_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def _in_dataset_dir(path: Path) -> bool:
    return any(_is_dataset_dir(p) for p in path.parents)


def _supported_in(directory: Path) -> list[Path]:
    """The sources below ``directory``: supported files, and ``datasets`` directories as one each
    (a ``DatasetDict``'s splits are ``datasets`` directories)."""
    if _is_dataset_dir(directory):
        return [directory]
    found = []
    for top, dirs, files in os.walk(directory):
        sub = [Path(top, d) for d in dirs]
        found += [d for d in sub if _is_dataset_dir(d)]
        dirs[:] = [d.name for d in sub if not _is_dataset_dir(d)]
        found += [p for p in (Path(top, f) for f in files if f != _DATASET_DICT) if _suffix(p) and p.is_file()]
    return found


def _entries(paths: Paths) -> list:
    entries = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not entries:
        raise ValueError("no corpus path given")
    return entries


def list_shards(paths: Paths) -> list[Path]:
    """The sources :func:`read_documents` would read, sorted and de-duplicated.

    Each entry of ``paths`` is a file, a directory (all supported files below it, recursively; a
    ``datasets`` directory is one source) or a glob pattern (``**`` allowed). A missing path raises
    FileNotFoundError; an entry that yields no supported source, or names a FIFO, socket or device,
    raises ValueError (directories and globs take regular files only). An explicitly named file is
    always taken, whatever its suffix.
    """
    shards: set[Path] = set()
    for entry in _entries(paths):
        path = Path(entry)
        if path.is_file():
            found = [path]
        elif path.is_dir():
            found = _supported_in(path)
        elif path.exists():
            raise ValueError(f"corpus path {entry} is not a regular file or directory (a FIFO, socket or device "
                             "cannot be read as a corpus shard)")
        elif _has_glob(str(entry)):
            found = []
            for match in map(Path, glob.glob(str(entry), recursive=True)):
                if match.is_dir():
                    found += [] if _in_dataset_dir(match) else _supported_in(match)
                elif _suffix(match) and match.is_file() and match.name != _DATASET_DICT and not _in_dataset_dir(match):
                    found.append(match)
        else:
            raise FileNotFoundError(f"corpus path not found: {entry}")
        if not found:
            raise ValueError(f"no supported corpus file ({', '.join(SUFFIXES)}, or a `datasets` directory) "
                             f"in: {entry}")
        shards.update(found)
    return sorted(shards, key=str)


def corpus_root(paths: Paths) -> Path:
    """The directory fallback ids are relative to: the deepest one holding every entry of ``paths``
    (a directory entry counts as itself; a file or ``datasets`` directory as its parent; a glob as
    its leading part without wildcards). Ids stay the same when the whole corpus moves."""
    roots = []
    for entry in _entries(paths):
        path = Path(entry)
        if not path.exists() and _has_glob(str(entry)):
            fixed = []
            for part in path.parts:
                if _has_glob(part):
                    break
                fixed.append(part)
            base = Path(*fixed) if fixed else Path(".")
        else:
            base = path if path.is_dir() and not _is_dataset_dir(path) else path.parent
        roots.append(os.path.abspath(base))
    return Path(os.path.commonpath(roots))


def fingerprint(paths: Paths) -> str:
    """Cheap content fingerprint for manifests: hash of the sources' file names, sizes and mtimes."""
    h = hashlib.blake2b(digest_size=16)
    for shard in list_shards(paths):
        for f in sorted(p for p in shard.iterdir() if p.is_file()) if shard.is_dir() else [shard]:
            st = f.stat()
            h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


class _ZstdReader(io.RawIOBase):
    """The decompressed bytes of a ``.zst`` file, frame after frame, in bounded memory: compressed
    input goes to the decompressor ``_ZSTD_FEED`` bytes at a time and its output is served from an
    offset (no re-slicing). Unlike zstandard's ``stream_reader``, a file that ends inside a frame
    (truncated) raises EOFError."""

    def __init__(self, path: Path):
        import zstandard

        self._fh = open(path, "rb")
        self._dctx = zstandard.ZstdDecompressor()
        self._frame = None  # decompressor of the current frame
        self._out, self._pos = b"", 0  # decompressed bytes not yet served from self._pos on
        self._in, self._in_pos = b"", 0  # compressed bytes not yet fed from self._in_pos on

    def readable(self) -> bool:
        return True

    def _feed(self) -> bytes:
        """The next compressed bytes (at most ``_ZSTD_FEED``), b"" at the end of the file."""
        if self._in_pos >= len(self._in):
            self._in, self._in_pos = self._fh.read(_ZSTD_CHUNK), 0
        data = self._in[self._in_pos:self._in_pos + _ZSTD_FEED]
        self._in_pos += len(data)
        return data

    def readinto(self, buf) -> int:
        while self._pos >= len(self._out):
            data = b""
            if self._frame is not None and self._frame.eof:
                data, self._frame = self._frame.unused_data, None
            data = data or self._feed()
            if not data:
                if self._frame is not None:
                    raise EOFError("zstd stream ended inside a frame (truncated file)")
                return 0
            self._frame = self._frame or self._dctx.decompressobj()
            self._out = b""  # freed before the next output is made
            self._out, self._pos = self._frame.decompress(data), 0
        n = min(len(buf), len(self._out) - self._pos)
        buf[:n] = memoryview(self._out)[self._pos:self._pos + n]
        self._pos += n
        return n

    def close(self) -> None:
        self._fh.close()
        super().close()


def open_binary(path: Path) -> IO[bytes]:
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        return io.BufferedReader(_ZstdReader(path))
    return open(path, "rb")


def read_errors(path: Path) -> tuple:
    """The exceptions that mean a file is unreadable (corrupt, truncated, wrong format)."""
    errors: tuple = (OSError, EOFError, zlib.error)
    name = path.name.lower()
    if name.endswith(".zst"):
        import zstandard

        errors += (zstandard.ZstdError,)
    if path.is_dir() or name.endswith(".parquet"):
        import pyarrow

        errors += (pyarrow.ArrowException, ValueError)  # ValueError: a malformed state.json
    return errors


def dataset_files(path: Path) -> list[Path]:
    """The Arrow files of a ``save_to_disk`` directory, in order, from its ``state.json``."""
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    files = state.get("_data_files") if isinstance(state, dict) else None
    names = [f.get("filename") if isinstance(f, dict) else None for f in files or []]
    if not names or not all(isinstance(n, str) and n and Path(n).name == n for n in names):
        raise ValueError(f"{path / 'state.json'} lists no data files (`_data_files`) inside the directory")
    return [path / n for n in names]
