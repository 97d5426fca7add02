"""The clustering stage end to end on a slice of the embedded corpus: fit, assign (local
processes and Ray), resume after a kill, per-cluster documents, report, CLI."""

import json
from itertools import islice
from pathlib import Path

import numpy as np
import pytest

from cbtm import cluster, defaults
from cbtm.cli import main
from cbtm.corpus import default_corpus_path, read_documents
from cbtm.rundir import RunDir


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Every 12th document of the embedded corpus (all 8 domains), in 3 JSONL shards, plus a bad line."""
    d = tmp_path_factory.mktemp("corpus")
    docs = list(islice(read_documents(default_corpus_path()), 0, None, 12))
    for s in range(3):
        with open(d / f"part{s}.jsonl", "w") as fh:
            for doc in docs[s::3]:
                fh.write(json.dumps({"id": doc.id, "text": doc.text, **doc.meta}) + "\n")
    with open(d / "part0.jsonl", "a") as fh:
        fh.write("{not json\n")
    return d, len(docs)


@pytest.fixture(scope="module")
def fitted(shards, tmp_path_factory):
    corpus, _ = shards
    run = tmp_path_factory.mktemp("run")
    cluster.fit(str(corpus), run, k=4, sample=10_000, n_components=32, seed=0, progress=False)
    return run


def _outputs(run: Path) -> dict:
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in sorted((run / "assignments").rglob("*.jsonl"))}


def test_fit_writes_router_and_manifest(fitted, shards):
    m = RunDir(fitted).manifest()
    assert m["cluster"]["k"] == 4 and m["cluster"]["balanced"]
    assert m["cluster"]["skipped_lines"] == 1
    assert m["corpus"]["fingerprint"]
    assert {"numpy", "torch", "scikit-learn"} <= set(m["versions"])
    files = {p.name for p in (fitted / "router").iterdir()}
    assert files == {"embedder.json", "embedder.safetensors", "kmeans.json", "kmeans.safetensors"}
    sizes = m["cluster"]["sample_cluster_sizes"]
    assert m["cluster"]["max_size_ratio"] == defaults.MAX_SIZE_RATIO
    assert max(sizes) <= max(-(-sum(sizes) // 4), int(defaults.MAX_SIZE_RATIO * sum(sizes) / 4))


def test_exactly_balanced_fit_and_assign(shards, tmp_path):
    """max_size_ratio=1 is C-BTM's exact balance: the sample and every shard split into ceil(n / K)."""
    corpus, n_docs = shards
    run = tmp_path / "run"
    cluster.fit(str(corpus), run, k=4, sample=10_000, n_components=32, max_size_ratio=1.0, progress=False)
    sizes = RunDir(run).manifest()["cluster"]["sample_cluster_sizes"]
    assert max(sizes) == -(-sum(sizes) // 4)
    s = cluster.assign(None, run, workers=1, progress=False)
    per_shard = [json.loads(p.read_text()) for p in (run / "assignments").glob("*.json")]
    assert s["capacity"] == sum(-(-m["documents"] // 4) for m in per_shard) and s["documents"] == n_docs
    for m in per_shard:
        by_cluster = {}
        for key, n in m["sizes"].items():
            by_cluster[key.split(":")[0]] = by_cluster.get(key.split(":")[0], 0) + n
        assert max(by_cluster.values()) <= -(-m["documents"] // 4)


def test_assign_balanced_report_and_resume(fitted, shards):
    _, n_docs = shards
    s = cluster.assign(None, fitted, workers=2, write_docs=True, label_field="domain", progress=False)
    assert s["documents"] == n_docs and s["resumed"] == 0 and s["skipped_lines"] == 1
    recs = cluster.read_assignments(fitted)
    assert len(recs) == n_docs and len({r["id"] for r in recs}) == n_docs
    sizes = np.bincount([r["cluster"] for r in recs], minlength=4)
    assert sizes.max() <= s["capacity"]
    # the documents split per cluster hold every document exactly once, in its cluster
    by_cluster = {}
    for f in (fitted / "assignments" / "clusters").rglob("*.jsonl"):
        c = int(f.parent.name.split("_")[1])
        for line in f.read_text().splitlines():
            by_cluster[json.loads(line)["id"]] = c
    assert by_cluster == {r["id"]: r["cluster"] for r in recs}
    rep = cluster.report(fitted, progress=False)
    assert rep["within_capacity"] and 0.0 <= rep["nmi"] <= 1.0
    assert np.array(rep["table"]).sum() == n_docs and len(rep["labels"]) == 8
    assert (fitted / "reports" / "cluster_report.md").read_text().startswith("# Cluster report")

    # a rerun skips every finished shard
    before = _outputs(fitted)
    again = cluster.assign(None, fitted, workers=2, write_docs=True, label_field="domain", progress=False)
    assert again["resumed"] == 3 and _outputs(fitted) == before

    # a run killed after its first shard resumes and ends with identical output
    for p in (fitted / "assignments").rglob("*"):
        if p.is_file():
            p.unlink()
    real = cluster._assign_shard
    calls = []

    def dying(*args):
        if calls:
            raise KeyboardInterrupt("simulated kill")
        calls.append(1)
        return real(*args)

    cluster._assign_shard = dying
    try:
        with pytest.raises(KeyboardInterrupt):
            cluster.assign(None, fitted, workers=1, write_docs=True, label_field="domain", progress=False)
    finally:
        cluster._assign_shard = real
    resumed = cluster.assign(None, fitted, workers=1, write_docs=True, label_field="domain", progress=False)
    assert resumed["resumed"] == 1
    assert _outputs(fitted) == before


def test_nearest_centre_option_differs_only_in_balance(fitted):
    s = cluster.assign(None, fitted, balanced=False, workers=1, progress=False)
    assert s["resumed"] == 0  # a different mode never reuses balanced outputs
    _, km = cluster.load_router(fitted)
    assert km.n_clusters == 4


def test_ray_backend_matches_local(fitted, tmp_path, monkeypatch):
    pytest.importorskip("ray")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    cluster.assign(None, fitted, workers=1, label_field="domain", progress=False)
    local = _outputs(fitted)
    for p in (fitted / "assignments").glob("*.json"):
        p.unlink()
    s = cluster.assign(None, fitted, backend="ray", workers=2, label_field="domain", progress=False)
    assert s["resumed"] == 0 and s["backend"] == "ray"
    assert _outputs(fitted) == local


def test_cli_and_clear_errors(shards, tmp_path, capsys):
    corpus, n_docs = shards
    run = tmp_path / "run"
    assert main(["cluster", "fit", str(corpus / "part1.jsonl"), "--out", str(run), "-k", "3",
                 "--n-components", "16"]) == 0
    assert main(["cluster", "assign", "--out", str(run), "--label-field", "domain"]) == 0
    out = capsys.readouterr().out
    assert "Cluster report: k=3" in out and "NMI" in out
    assert main(["cluster", "assign", "--out", str(tmp_path / "nothing")]) == 2
    assert "not a cbtm run directory" in capsys.readouterr().err
    assert main(["cluster", "fit", str(tmp_path / "missing.jsonl"), "--out", str(run), "-k", "3"]) == 2
    with pytest.raises(ValueError, match="fewer than k"):
        cluster.fit(str(corpus / "part1.jsonl"), tmp_path / "r2", k=10_000, sample=20_000, progress=False)
    # nothing read because of a wrong --text-field: the error says what was skipped, and where
    assert main(["cluster", "fit", str(corpus / "part1.jsonl"), "--run", str(tmp_path / "r3"), "-k", "2",
                 "--text-field", "body"]) == 2
    err = capsys.readouterr().err
    assert "fewer than k=2" in err and "missing field 'body'" in err and "part1.jsonl:1:" in err
    for bad in ("0.5", "nan", "inf", "x"):
        with pytest.raises(SystemExit):
            main(["cluster", "fit", str(corpus / "part1.jsonl"), "--run", str(tmp_path / "r4"), "-k", "2",
                  "--max-size-ratio", bad])
        assert "--max-size-ratio" in capsys.readouterr().err
    assert not (tmp_path / "r4").exists()


def test_assign_ids_of_same_named_files_in_subfolders(tmp_path):
    """Id-less documents of a/x.jsonl and b/x.jsonl get distinct fallback ids in every stage, so
    the per-shard assignment covers the whole corpus (it used to collide on `x:line`)."""
    from cbtm.assignments import iter_documents, read_records

    docs = list(islice(read_documents(default_corpus_path()), 0, 1200, 8))
    for sub, part in (("a", docs[::2]), ("b", docs[1::2])):
        (tmp_path / "corpus" / sub).mkdir(parents=True)
        with open(tmp_path / "corpus" / sub / "x.jsonl", "w") as fh:
            fh.writelines(json.dumps({"text": d.text}) + "\n" for d in part)
    run = tmp_path / "run"
    cluster.fit(str(tmp_path / "corpus"), run, k=2, n_components=8, progress=False)
    cluster.assign(None, run, workers=1, progress=False)
    records = read_records(run)
    assert len(records) == len(docs)
    assert sum(1 for _ in iter_documents(run)) == len(docs)


def test_manifest_names_the_corpus_by_absolute_path(shards, tmp_path, monkeypatch):
    """A run fitted from a relative corpus path keeps working from any working directory."""
    from cbtm.assignments import iter_documents

    corpus, n_docs = shards
    monkeypatch.chdir(corpus.parent)
    run = tmp_path / "run"
    cluster.fit(corpus.name, run, k=2, n_components=8, progress=False)
    cluster.assign(None, run, workers=1, progress=False)
    assert RunDir(run).manifest()["corpus"]["paths"] == [str(corpus)]
    monkeypatch.chdir(tmp_path)
    assert sum(1 for _ in iter_documents(run)) == n_docs


def test_text_blocks_mode_reaches_every_stage(tmp_path, capsys):
    """`cluster fit --text-mode blocks`: every stage reads each blank-line-separated block of the
    .txt files as one document (assign used to read each whole file as one)."""
    from cbtm.assignments import corpus_settings, dense_records, iter_assigned, read_options, write_assignments

    docs = list(islice(read_documents(default_corpus_path()), 0, 1800, 10))
    blocks = [" ".join(d.text.split()) for d in docs]
    (tmp_path / "corpus").mkdir()
    for f in range(3):
        (tmp_path / "corpus" / f"part{f}.txt").write_text("\n\n".join(blocks[f::3]) + "\n")
    run = tmp_path / "run"
    assert main(["cluster", "fit", str(tmp_path / "corpus"), "--run", str(run), "-k", "3", "--n-components", "16",
                 "--text-mode", "blocks"]) == 0
    assert main(["cluster", "assign", "--run", str(run)]) == 0
    capsys.readouterr()
    assert RunDir(run).manifest()["assignments"]["documents"] == len(blocks)
    assert corpus_settings(run)["text_mode"] == "blocks"
    assert sorted(text for _, _, _, text in iter_assigned(run)) == sorted(blocks)
    # a dense run made like it (train dense --like, the MoE and MiX runs) reads it the same way
    s = corpus_settings(run)
    write_assignments(tmp_path / "dense", dense_records(run), s["paths"], k=1, **read_options(s))
    assert sorted(text for _, _, _, text in iter_assigned(tmp_path / "dense")) == sorted(blocks)
    with pytest.raises(SystemExit):
        main(["cluster", "fit", str(tmp_path / "corpus"), "--run", str(tmp_path / "r2"), "-k", "3",
              "--text-mode", "lines"])
    assert "--text-mode" in capsys.readouterr().err
