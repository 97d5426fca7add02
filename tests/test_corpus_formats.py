"""Parquet, zstd-compressed JSON lines and `datasets` directories through cbtm.corpus: the same
documents as the JSON-lines original, bad records and bad shards counted, the same clusters."""
import datetime
import json
import os
from itertools import islice

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from cbtm import cluster
from cbtm.corpus import CorpusReport, default_corpus_path, fingerprint, list_shards, read_documents

def _records(docs):
    return [{"id": d.id, "text": d.text, **d.meta} for d in docs]


def _zstd_frames(lines, n_frames=2):
    """``lines`` compressed as ``n_frames`` concatenated zstd frames (as multi-part dumps are)."""
    cut = len(lines) // n_frames
    parts = [lines[i * cut: None if i == n_frames - 1 else (i + 1) * cut] for i in range(n_frames)]
    return b"".join(zstandard.ZstdCompressor().compress("".join(p).encode()) for p in parts)


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    """Every 15th document of the embedded corpus as JSON lines and as Parquet (several row groups),
    `.jsonl.zst` (two frames) and a directory written by `datasets.Dataset.save_to_disk` (two files)."""
    d = tmp_path_factory.mktemp("formats")
    recs = _records(islice(read_documents(default_corpus_path()), 0, None, 15))
    lines = [json.dumps(r) + "\n" for r in recs]
    (d / "orig.jsonl").write_text("".join(lines))
    pq.write_table(pa.Table.from_pylist(recs), d / "copy.parquet", row_group_size=100)
    (d / "copy.jsonl.zst").write_bytes(_zstd_frames(lines))
    with pytest.MonkeyPatch.context() as mp:  # `datasets` must never reach the network
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        import datasets

        datasets.disable_progress_bars()
        datasets.Dataset.from_list(recs).save_to_disk(str(d / "copy_ds"), num_shards=2)
        datasets.DatasetDict(train=datasets.Dataset.from_list(recs[:3]),
                             test=datasets.Dataset.from_list(recs[3:5])).save_to_disk(str(d / "dict" / "dd"))
    return d


def _view(docs):
    return [(doc.id, doc.text, doc.meta) for doc in docs]


@pytest.mark.parametrize("name", ["copy.parquet", "copy.jsonl.zst", "copy_ds"])
def test_copies_read_identically(copies, name):
    orig = _view(read_documents(copies / "orig.jsonl"))
    reader = read_documents(copies / name)
    assert _view(reader) == orig and len(orig) == 604
    assert reader.report.n_skipped == 0 and reader.report.n_documents == len(orig)
    if name == "copy_ds":
        assert len(list(copies.glob("copy_ds/*.arrow"))) == 2


def test_discovery_finds_every_format(copies):
    splits = [copies / "dict" / "dd" / s for s in ["test", "train"]]
    expected = [copies / n for n in ["copy.jsonl.zst", "copy.parquet", "copy_ds"]] + splits + [copies / "orig.jsonl"]
    assert list_shards(copies) == expected  # a `datasets` directory is one source; its JSON files are not
    assert list_shards(str(copies / "*")) == expected
    assert list_shards(str(copies / "**" / "*.json*")) == [copies / "copy.jsonl.zst", copies / "orig.jsonl"]
    assert list_shards(copies / "copy_ds") == [copies / "copy_ds"]
    assert len(list(read_documents(copies / "dict"))) == 5
    before = fingerprint(copies / "copy_ds")  # a `datasets` source is fingerprinted by its files
    arrow = sorted(copies.glob("copy_ds/*.arrow"))[-1]
    os.utime(arrow, ns=(0, 10**18))
    assert fingerprint(copies / "copy_ds") != before


def test_parquet_bad_rows_fallback_ids_and_json_safe_meta(tmp_path):
    table = pa.table({
        "text": ["good", None, "  ", "good again"],
        "when": [datetime.datetime(2024, 5, 1, 12, 30)] * 4,
        "raw": [b"\x00\x01"] * 4,
        "tags": [["a", "b"]] * 4,
    })
    path = tmp_path / "rows.parquet"
    pq.write_table(table, path, row_group_size=2)
    report = CorpusReport()
    docs = list(read_documents(path, report=report))
    assert [(d.id, d.text, d.line) for d in docs] == [("rows.parquet:1", "good", 1), ("rows.parquet:4", "good again", 4)]
    assert docs[0].meta == {"when": "2024-05-01T12:30:00", "raw": "b'\\x00\\x01'", "tags": ["a", "b"]}
    json.dumps(docs[0].meta)
    assert report.examples == [f"{path}:2: missing field 'text'", f"{path}:3: empty text"]
    numbers = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), numbers)
    assert list(read_documents(numbers, report=report)) == []
    assert report.skipped["field 'text' is not a string"] == 2


def test_bad_shards_of_every_format(copies, tmp_path):
    data = (copies / "copy.jsonl.zst").read_bytes()
    (tmp_path / "cut.jsonl.zst").write_bytes(data[: len(data) // 3])  # ends inside the first frame
    (tmp_path / "plain.jsonl.zst").write_text('{"text": "not compressed"}\n')
    data = (copies / "copy.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])
    ds = tmp_path / "ds"
    ds.mkdir()
    for f in ["state.json", "dataset_info.json"]:
        (ds / f).write_bytes((copies / "copy_ds" / f).read_bytes())
    report = CorpusReport()
    docs = list(read_documents(tmp_path, report=report))
    orig = _view(read_documents(copies / "orig.jsonl"))
    kept = _view(d for d in docs if d.source.endswith("cut.jsonl.zst"))
    assert 0 < len(kept) < len(orig) and kept == orig[: len(kept)]  # whole documents before the cut
    assert len(docs) == len(kept) and report.skipped == {"unreadable file": 4}
    bad = dict(e.split(": ", 1) for e in report.bad_shards)
    assert bad.keys() == {f"{tmp_path}/cut.jsonl.zst:{len(kept) + 1}", f"{tmp_path}/cut.parquet:1",
                          f"{tmp_path}/ds:1", f"{tmp_path}/plain.jsonl.zst:1"}
    assert bad[f"{tmp_path}/cut.jsonl.zst:{len(kept) + 1}"].startswith("EOFError: zstd stream ended inside a frame")
    assert bad[f"{tmp_path}/plain.jsonl.zst:1"].startswith("ZstdError")
    assert "data-00000-of-00002.arrow" in bad[f"{tmp_path}/ds:1"]


def test_copies_cluster_like_the_original(copies, tmp_path):
    got = {}
    for name in ["orig.jsonl", "copy.parquet", "copy.jsonl.zst", "copy_ds"]:
        run = tmp_path / name
        cluster.fit(str(copies / name), run, k=3, sample=400, n_components=16, seed=0, progress=False)
        cluster.assign(str(copies / name), run, workers=1, progress=False)
        got[name] = [(r["id"], r["cluster"], r["split"]) for r in cluster.read_assignments(run)]
    orig = got.pop("orig.jsonl")
    assert len(orig) == 604 and {c for _, c, _ in orig} == {0, 1, 2}
    assert all(assigned == orig for assigned in got.values())
