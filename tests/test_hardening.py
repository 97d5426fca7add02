"""Hostile inputs, second pass (issue 26): bounded memory on compressed corpora, tamper-proof run
directories, no silent NaN, one writer per run, no lost results."""

import gzip
import json
import os
import tracemalloc

import numpy as np
import pytest

from cbtm import corpus, defaults
from cbtm.shards import open_binary


# ------------------------------------------------------------------------------------------------
# corpora


def test_zstd_bomb_decompresses_in_bounded_memory(tmp_path):
    """128 MiB of zeros in 4 KB of zstd: the reader holds a few MiB at a time, not the whole output."""
    zstandard = pytest.importorskip("zstandard")
    path = tmp_path / "bomb.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor(level=19).compress(b"\0" * (128 << 20)))
    tracemalloc.start()
    try:
        n = 0
        with open_binary(path) as fh:
            while block := fh.read(1 << 16):
                n += len(block)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert n == 128 << 20
    assert peak < 24 << 20


@pytest.mark.parametrize("suffix", [".jsonl.zst", ".jsonl.gz", ".txt.gz"])
def test_an_overlong_line_is_an_error_naming_file_and_line(tmp_path, monkeypatch, suffix):
    monkeypatch.setattr(defaults, "MAX_DOCUMENT_BYTES", 1 << 16)
    lines = [json.dumps({"id": "a", "text": "short"}), "\0" * (1 << 20)]
    data = ("\n".join(lines) + "\n").encode()
    path = tmp_path / f"c{suffix}"
    if suffix.endswith(".zst"):
        import zstandard

        path.write_bytes(zstandard.ZstdCompressor().compress(data))
    else:
        path.write_bytes(gzip.compress(data))
    with pytest.raises(corpus.DocumentTooLarge, match=f"{path}:2: .*longer than 65,536 bytes"):
        list(corpus.read_documents(path))
    # a text document of many short lines is capped too, named by its first line
    path = tmp_path / "many.txt"
    path.write_text("word\n" * (1 << 15))
    with pytest.raises(corpus.DocumentTooLarge, match=f"{path}:1: "):
        list(corpus.read_documents(path))


def test_a_fifo_is_never_opened(tmp_path):
    good = tmp_path / "a.jsonl"
    good.write_text(json.dumps({"text": "hello"}) + "\n")
    fifo = tmp_path / "b.jsonl"
    os.mkfifo(fifo)
    assert corpus.list_shards(str(tmp_path / "*.jsonl")) == [good]  # globs and directories skip it
    assert corpus.list_shards(tmp_path) == [good]
    with pytest.raises(ValueError, match="not a regular file or directory"):
        corpus.list_shards(fifo)


def test_parquet_binary_text_is_decoded_not_repr(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "c.parquet"
    table = pa.table({"id": pa.array([b"x", b"y"], pa.binary()),
                      "text": pa.array(["héllo".encode(), b"\xff\xfe"], pa.binary())})
    pq.write_table(table, path)
    reader = corpus.read_documents(path)
    docs = list(reader)
    assert [(d.id, d.text) for d in docs] == [("x", "héllo")]
    assert reader.report.skipped == {"not UTF-8": 1}


def test_a_lone_surrogate_is_skipped_and_counted(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "bad \\ud800 here"}\n{"text": "emoji \\ud83d\\ude00 fine"}\n'
                    '{"text": "ok", "meta": "\\uDFFF"}\n')
    reader = corpus.read_documents(path)
    assert [d.text for d in reader] == ["emoji \U0001F600 fine"]
    assert reader.report.skipped == {"lone surrogate (not Unicode text)": 2}
    assert reader.report.examples[0] == f"{path}:1: lone surrogate (not Unicode text)"
