"""Tests for cbtm.corpus: formats, path resolution, bad-line accounting, unique ids, bad shards, splits,
the embedded corpus. Parquet, zstd and `datasets` sources: test_corpus_formats.py."""
import gzip
import json
import os
import shutil
from collections import Counter

import pytest

from cbtm.corpus import (CorpusReport, Document, DuplicateIdError, check_unique_ids, corpus_root, default_corpus_path,
                         fingerprint, list_shards, read_documents, split_of)

RECORDS = [
    {"id": "d1", "text": "first document", "domain": "bible"},
    {"id": 7, "text": "second document", "domain": "austen", "extra": [1, 2]},
    {"text": "no id here", "domain": "fortune"},
]


def write_jsonl(path, records):
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


@pytest.mark.parametrize("name", ["a.jsonl", "a.jsonl.gz", "a.json"])
def test_jsonl_formats_ids_and_meta(tmp_path, name):
    path = write_jsonl(tmp_path / name, RECORDS)
    docs = list(read_documents(path))
    assert [d.text for d in docs] == [r["text"] for r in RECORDS]
    assert [d.id for d in docs] == ["d1", "7", f"{name}:3"]  # numeric id as str; fallback "<path>:<line>"
    assert docs[0].meta == {"domain": "bible"}
    assert docs[1].meta == {"domain": "austen", "extra": [1, 2]}
    assert all(d.source == str(path) for d in docs) and [d.line for d in docs] == [1, 2, 3]
    assert isinstance(docs[0], Document)


def test_custom_fields(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"key": "k1", "body": "hello", "text": "ignored"}])
    (doc,) = read_documents(path, text_field="body", id_field="key")
    assert (doc.id, doc.text, doc.meta) == ("k1", "hello", {"text": "ignored"})


def test_malformed_lines_are_skipped_and_counted(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [
        b'{"id": "ok1", "text": "good"}',  # 1
        b'{"id": "x", "text": ',  # 2 invalid JSON
        b"[1, 2, 3]",  # 3 not an object
        b'{"id": "y", "body": "no text field"}',  # 4 missing text
        b'{"id": "z", "text": 123}',  # 5 text not a string
        b'{"id": "w", "text": "  \\n "}',  # 6 whitespace-only text
        b"",  # 7 blank line
        b'{"id": "v", "text": "caf\xe9"}',  # 8 latin-1 byte, not UTF-8
        b'{"id": "ok2", "text": "good again"}',  # 9
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    report = CorpusReport()
    reader = read_documents(path, report=report)
    assert [d.id for d in reader] == ["ok1", "ok2"]
    assert reader.report is report and report.n_documents == 2 and report.n_skipped == 7
    assert report.skipped == {"invalid JSON": 1, "not a JSON object": 1, "missing field 'text'": 1,
                              "field 'text' is not a string": 1, "empty text": 1, "blank line": 1,
                              "not UTF-8": 1}
    assert report.examples == [f"{path}:2: invalid JSON", f"{path}:3: not a JSON object",
                               f"{path}:4: missing field 'text'", f"{path}:5: field 'text' is not a string",
                               f"{path}:6: empty text", f"{path}:7: blank line", f"{path}:8: not UTF-8"]
    summary = report.summary()
    assert "2 documents read, 7 skipped" in summary and f"{path}:8: not UTF-8" in summary


def test_report_keeps_first_20_examples_and_reader_streams(tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_text('{"text": "first"}\n' + "not json\n" * 30)
    reader = read_documents(path)
    assert next(reader).text == "first" and reader.report.n_skipped == 0  # lazily read, line by line
    assert list(reader) == []
    assert reader.report.skipped == {"invalid JSON": 30}
    assert reader.report.examples == [f"{path}:{i}: invalid JSON" for i in range(2, 22)]


def test_utf8_bom_and_crlf(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "one"}\r\n{"text": "two"}\r\n')
    assert [d.text for d in read_documents(path)] == ["one", "two"]


def test_directories_globs_and_lists(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [{"text": "b"}])
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "sub" / "a.jsonl.gz", [{"text": "a"}])
    (tmp_path / "sub" / "c.txt").write_text("c text")
    (tmp_path / "sub" / "ignored.csv").write_text("x,y")
    expected = [tmp_path / "b.jsonl", tmp_path / "sub" / "a.jsonl.gz", tmp_path / "sub" / "c.txt"]
    assert list_shards(tmp_path) == expected
    assert [d.text for d in read_documents(str(tmp_path))] == ["b", "a", "c text"]
    assert list_shards(str(tmp_path / "**" / "*.jsonl*")) == expected[:2]
    # a list of entries: de-duplicated and sorted
    assert list_shards([tmp_path / "sub" / "c.txt", tmp_path / "b.jsonl", tmp_path]) == expected


def test_missing_and_unsupported_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_documents(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="no supported corpus file"):
        read_documents(tmp_path)  # empty directory
    (tmp_path / "only.csv").write_text("a,b")
    with pytest.raises(ValueError, match="no supported corpus file"):
        list_shards(tmp_path)
    with pytest.raises(ValueError, match=r"\*\.jsonl"):
        list_shards(str(tmp_path / "*.jsonl"))
    with pytest.raises(ValueError, match="fmt"):
        read_documents(tmp_path / "only.csv", fmt="parquet")
    with pytest.raises(ValueError, match="text_mode"):
        read_documents(tmp_path / "only.csv", text_mode="paragraphs")


def test_plain_text_modes(tmp_path):
    text = "Para one,\nline two.\n\n\n  \nPara two.\n\nPara three\n"
    (tmp_path / "t.txt").write_text(text)
    (tmp_path / "g.txt.gz").write_bytes(gzip.compress(text.encode()))
    (doc,) = read_documents(tmp_path / "t.txt")
    assert (doc.id, doc.text, doc.line, doc.meta) == ("t.txt:0", text, 1, {})
    for name in ["t.txt", "g.txt.gz"]:
        docs = list(read_documents(tmp_path / name, text_mode="blocks"))
        assert [d.text for d in docs] == ["Para one,\nline two.", "Para two.", "Para three"]
        assert [d.id for d in docs] == [f"{name}:0", f"{name}:1", f"{name}:2"]
        assert [d.line for d in docs] == [1, 6, 8]


def test_plain_text_bad_blocks(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"good block\n\nbad \xff block\nmore\n\nlast\n")
    report = CorpusReport()
    docs = list(read_documents(path, text_mode="blocks", report=report))
    assert [(d.id, d.text) for d in docs] == [("bad.txt:0", "good block"), ("bad.txt:2", "last")]
    assert report.examples == [f"{path}:3: not UTF-8"]
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n")
    assert list(read_documents(empty, report=report)) == []
    assert report.skipped == {"not UTF-8": 1, "empty text": 1}


def test_fmt_overrides_suffix(tmp_path):
    data = write_jsonl(tmp_path / "records.data", [{"text": "json inside"}])
    assert [d.text for d in read_documents(data, fmt="jsonl")] == ["json inside"]
    (doc,) = read_documents(data, fmt="text")
    assert doc.text == '{"text": "json inside"}\n'
    with pytest.raises(ValueError):  # not picked up from a directory without fmt
        list_shards(tmp_path)


def test_split_is_deterministic_and_proportional():
    ids = [f"doc-{i}" for i in range(20000)]
    splits = [split_of(i) for i in ids]
    assert splits == [split_of(i, 0.05, 0) for i in ids]
    assert set(splits) == {"train", "valid"}
    assert abs(splits.count("valid") / len(ids) - 0.05) < 0.01
    assert abs([split_of(i, 0.3) for i in ids].count("valid") / len(ids) - 0.3) < 0.02
    reseeded = [split_of(i, seed=1) for i in ids]
    assert reseeded != splits and abs(reseeded.count("valid") / len(ids) - 0.05) < 0.01
    assert {split_of(i, 0.0) for i in ids[:500]} == {"train"}
    assert {split_of(i, 1.0) for i in ids[:500]} == {"valid"}
    with pytest.raises(ValueError):
        split_of("x", 1.5)


def test_fingerprint_tracks_files(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", RECORDS)
    first = fingerprint(tmp_path)
    assert first == fingerprint([path]) and len(first) == 32
    os.utime(path, ns=(0, 10**18))
    touched = fingerprint(tmp_path)
    assert touched != first
    write_jsonl(tmp_path / "b.jsonl", RECORDS)
    assert fingerprint(tmp_path) not in (first, touched)


def test_embedded_corpus():
    path = default_corpus_path()
    assert path.is_file() and (path.parent / "README.md").read_text().count("| public domain") >= 4
    reader = read_documents(path)
    docs = list(reader)
    assert len(docs) == 9053 and reader.report.n_skipped == 0
    assert len({d.id for d in docs}) == len(docs)
    domains = Counter(d.meta["domain"] for d in docs)
    assert len(domains) == 8 and domains["bible"] == 1168 and domains["fortune"] == 2289
    assert all(d.text.strip() and "source" in d.meta for d in docs)


def test_fallback_ids_are_unique_per_path_and_survive_a_move(tmp_path):
    corpus = tmp_path / "corpus"
    for name in ["a/x.jsonl", "b/x.jsonl", "b/x.json", "b/x.jsonl.gz"]:
        (corpus / name).parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(corpus / name, [{"text": f"{name} one"}, {"text": f"{name} two"}])
    (corpus / "b" / "x.txt").write_text("plain")
    ids = [d.id for d in read_documents(corpus)]
    assert ids == ["a/x.jsonl:1", "a/x.jsonl:2", "b/x.json:1", "b/x.json:2", "b/x.jsonl:1", "b/x.jsonl:2",
                   "b/x.jsonl.gz:1", "b/x.jsonl.gz:2", "b/x.txt:0"]
    # the same ids from two files named explicitly (their common folder is the root), from a glob,
    # and from one shard read alone with the corpus root (as a per-shard worker does)
    assert [d.id for d in read_documents([corpus / "a" / "x.jsonl", corpus / "b" / "x.jsonl"])] == \
        ["a/x.jsonl:1", "a/x.jsonl:2", "b/x.jsonl:1", "b/x.jsonl:2"]
    assert [d.id for d in read_documents(str(corpus / "*" / "x.jsonl"))] == \
        ["a/x.jsonl:1", "a/x.jsonl:2", "b/x.jsonl:1", "b/x.jsonl:2"]
    assert corpus_root(corpus) == corpus and corpus_root(corpus / "a" / "x.jsonl") == corpus / "a"
    assert [d.id for d in read_documents(corpus / "b" / "x.json", root=corpus_root(corpus))] == \
        ["b/x.json:1", "b/x.json:2"]
    moved = shutil.move(str(corpus), str(tmp_path / "elsewhere"))
    assert [d.id for d in read_documents(moved)] == ids


def test_duplicate_explicit_ids_are_an_error_naming_both_places(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"id": "d1", "text": "one"}, {"id": "d2", "text": "two"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"id": "d3", "text": "three"}, {"id": "d2", "text": "again"}])
    for _ in range(2):  # every pass over the corpus raises, after the same documents
        reader = read_documents(tmp_path)
        seen = []
        with pytest.raises(DuplicateIdError) as err:
            seen += [d.id for d in reader]
        assert seen == [] and reader.report.n_documents == 3
        assert str(err.value).startswith(f"duplicate document id 'd2': {a}:2 and {b}:2")
    assert isinstance(err.value, ValueError)
    # one shard at a time sees no duplicate: check_unique_ids reads the corpus once, up front
    assert [d.id for d in read_documents(b)] == ["d3", "d2"]
    with pytest.raises(DuplicateIdError, match=f"{a}:2 and {b}:2"):
        check_unique_ids([a, b])
    assert check_unique_ids(a).n_documents == 2
    # within one file, and an explicit id equal to another line's fallback id
    c = write_jsonl(tmp_path / "c.jsonl", [{"id": "c.jsonl:2", "text": "x"}, {"text": "y"}])
    with pytest.raises(DuplicateIdError, match=f"{c}:1 and {c}:2"):
        list(read_documents(c))


@pytest.mark.parametrize("name", ["t.jsonl.gz", "t.txt.gz"])
def test_truncated_gzip_is_a_bad_shard(tmp_path, name):
    records = [{"id": f"d{i}", "text": f"document {i} " + "word " * 40} for i in range(400)]
    data = gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode())
    bad = tmp_path / name
    bad.write_bytes(data[: len(data) // 2])
    good = write_jsonl(tmp_path / "u.jsonl", [{"id": "u", "text": "after the bad shard"}])
    report = CorpusReport()
    docs = list(read_documents([bad, good], report=report))
    kept = [d for d in docs if d.source == str(bad)]
    if name.endswith(".jsonl.gz"):  # the documents before the truncation are kept, in order, whole
        assert 0 < len(kept) < len(records)
        assert [(d.id, d.text) for d in kept] == [(r["id"], r["text"]) for r in records[: len(kept)]]
    else:  # one document per file: the truncated file yields none
        assert kept == []
    assert docs[-1].id == "u" and report.skipped == {"unreadable file": 1}
    (entry,) = report.bad_shards
    assert entry.startswith(f"{bad}:{len(kept) + 1 if name.endswith('.jsonl.gz') else ''}")
    assert "EOFError" in entry and entry in report.summary()


def test_plain_file_named_gz_is_a_bad_shard(tmp_path):
    path = write_jsonl(tmp_path / "plain.jsonl", [{"text": "not compressed"}]).rename(tmp_path / "plain.jsonl.gz")
    report = CorpusReport()
    assert list(read_documents(path, report=report)) == []
    assert report.n_skipped == 1 and report.examples == [f"{path}:1: unreadable file"]
    assert report.bad_shards == [f"{path}:1: BadGzipFile: Not a gzipped file (b'{{\"')"]
