"""Assignment records: which cluster and which split every document of a run's corpus belongs to.

``run/assignments/<shard>.jsonl`` holds one ``{"id", "cluster", "split"}`` line per document;
the manifest's ``assignments`` section lists the shards with the corpus fields and the split's
settings. These records are *the* train/validation split of a run: training reads its clusters'
``train`` documents from them and evaluation reads the ``valid`` ones from them (never a
recomputation from defaults), so no run is evaluated on a document it trained on.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from . import defaults
from .corpus import default_corpus_path, fingerprint, read_documents, split_of
from .rundir import RunDir, atomic_write_text

SPLITS = ("train", "valid")


def corpus_paths(corpus) -> list[str]:
    """A corpus argument (None: the embedded corpus; a path, glob or list of them) as absolute paths,
    so a run directory's manifest names its corpus whatever the working directory later is."""
    if corpus is None:
        return [str(default_corpus_path())]
    return [os.path.abspath(p) for p in (corpus if isinstance(corpus, (list, tuple)) else [corpus])]


def read_assignments(run) -> list[dict]:
    """Every assignment record of the run's shards (in shard order)."""
    run = RunDir.of(run)
    keys = run.section("assignments").get("shard_keys")
    if not keys:
        raise FileNotFoundError(f"{run.path} has no assignments: run `cbtm cluster assign` first "
                                "(or write your own with cbtm.assignments.write_assignments)")
    recs = []
    for key in keys:
        path = run.assignments / f"{key}.jsonl"
        try:
            with open(path, encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if line.strip():
                        try:
                            recs.append(json.loads(line))
                        except ValueError:
                            raise ValueError(f"{path}:{lineno}: not a JSON assignment record") from None
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} is listed in {run.manifest_path} but missing: "
                                    "rerun `cbtm cluster assign`") from None
    return recs


READ_OPTIONS = ("text_field", "id_field", "text_mode")  # how a run reads its corpus (read_documents' arguments)


def read_options(settings: dict) -> dict:
    """The ``read_documents`` keyword arguments of a run's corpus settings (a manifest section written
    before ``text_mode`` was recorded read plain-text files whole)."""
    return {"text_mode": "file", **{key: settings[key] for key in READ_OPTIONS if key in settings}}


def corpus_settings(run) -> dict:
    """Corpus paths, how to read it (``READ_OPTIONS``) and the number of clusters ``k`` of a run with
    assignments."""
    run = RunDir.of(run)
    m = run.manifest()
    a = m.get("assignments") or {}
    if not a.get("shard_keys"):
        raise FileNotFoundError(f"{run.path} has no assignments: run `cbtm cluster assign` first "
                                "(or write your own with cbtm.assignments.write_assignments)")
    paths = (m.get("corpus") or {}).get("paths")
    if not paths:
        raise FileNotFoundError(f"{run.manifest_path} names no corpus (manifest section 'corpus.paths')")
    missing = [f for f in ("k", "text_field", "id_field") if f not in a]
    if missing:
        raise FileNotFoundError(f"{run.manifest_path}: the assignments section lacks {missing}: "
                                "rerun `cbtm cluster assign`")
    return {"paths": list(paths), "k": int(a["k"]), **read_options(a)}


def read_records(run) -> dict[str, tuple[int, str]]:
    """``{document id: (cluster, split)}`` from the run's assignment files, validated."""
    out: dict[str, tuple[int, str]] = {}
    for r in read_assignments(run):
        c, s = (r.get("cluster"), r.get("split")) if isinstance(r, dict) else (None, None)
        if not isinstance(c, int) or isinstance(c, bool) or c < 0 or s not in SPLITS or "id" not in r:
            raise ValueError(f"bad assignment record {r!r} in {RunDir.of(run).assignments}: needs an id, "
                             "an integer cluster >= 0 and split train/valid")
        out[str(r["id"])] = (c, s)
    return out


def num_clusters(run, records: dict | None = None) -> int:
    """``k``: from the manifest, or one more than the largest assigned cluster id when larger."""
    k = corpus_settings(run)["k"]
    records = read_records(run) if records is None else records
    return max(k, max((c for c, _ in records.values()), default=-1) + 1)


def write_assignments(run, records: Iterable[dict], corpus=None, *, k: int | None = None, name: str = "custom",
                      text_field: str = "text", id_field: str = "id", text_mode: str = "file",
                      source: str = "custom") -> dict:
    """Write a run's assignments from ``records`` (dicts with ``id``, ``cluster``, ``split``) so any
    grouping of documents (random, gold labels, one dense cluster) trains like a clustering.

    ``corpus`` defaults to the embedded corpus; ``text_field``, ``id_field``, ``text_mode``: how
    later stages read it (see ``read_documents``). Replaces the run's assignment list in the manifest.
    """
    run = RunDir.of(run)
    paths = corpus_paths(corpus)
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
               "text_field": text_field, "id_field": id_field, "text_mode": text_mode}
    run.update(assignments=summary, corpus={"paths": paths, "fingerprint": fingerprint(paths)})
    return summary


def dense_records(like=None, corpus=None, valid_fraction: float = defaults.VALID_FRACTION,
                  seed: int = defaults.SPLIT_SEED, id_field: str = "id") -> list[dict]:
    """Every document in one cluster: the splits of run ``like``, or ``split_of`` over ``corpus``."""
    if like is not None:
        return [{"id": i, "cluster": 0, "split": s} for i, (_, s) in read_records(like).items()]
    return [{"id": d.id, "cluster": 0, "split": split_of(d.id, valid_fraction, seed)}
            for d in read_documents(corpus_paths(corpus), id_field=id_field)]


def iter_documents(run, want: set[tuple[int, str]] | None = None,
                   records: dict | None = None) -> Iterator[tuple[int, str, str]]:
    """``(cluster, split, text)`` of every assigned document (those in ``want`` only), in corpus order.

    Raises ValueError when assigned documents are missing from the corpus.
    """
    for cluster, split, _, text in iter_assigned(run, want, records):
        yield cluster, split, text


def iter_assigned(run, want: set[tuple[int, str]] | None = None,
                  records: dict | None = None) -> Iterator[tuple[int, str, str, str]]:
    """``iter_documents`` with each document's id: ``(cluster, split, id, text)``."""
    s = corpus_settings(run)
    records = read_records(run) if records is None else records
    expected = sum(1 for v in records.values() if want is None or v in want)
    seen: set[str] = set()
    for doc in read_documents(s["paths"], **read_options(s)):
        key = records.get(doc.id)
        if key is None or (want is not None and key not in want) or doc.id in seen:
            continue
        seen.add(doc.id)
        yield key[0], key[1], doc.id, doc.text
    if len(seen) != expected:
        missing = [i for i, v in records.items() if (want is None or v in want) and i not in seen]
        raise ValueError(f"{len(missing)} assigned documents are not in the corpus {s['paths']} "
                         f"(first: {missing[:3]}): the assignments do not belong to this corpus")


def validation_documents(run, limit: int | None = None) -> list[tuple[str, str]]:
    """``(id, text)`` of the run's validation documents (its assignment records' ``valid`` split),
    in corpus order; at most ``limit``."""
    if limit is not None and (int(limit) != limit or limit < 1):
        raise ValueError(f"the number of validation documents must be a positive integer, got {limit!r}")
    records = read_records(run)
    want = {(c, "valid") for c, _ in records.values()}
    out = []
    for _, _, doc_id, text in iter_assigned(run, want, records):
        out.append((doc_id, text))
        if limit is not None and len(out) >= limit:
            break
    return out


def validation_texts(run: str | Path, limit: int | None = None) -> list[str]:
    """The texts of :func:`validation_documents`."""
    return [text for _, text in validation_documents(run, limit)]


def check_held_out(run, doc_ids: Iterable[str]) -> None:
    """Raise ValueError when any of ``doc_ids`` is a training document of ``run`` (evaluating it on
    them would measure memorisation, not generalisation)."""
    records = read_records(run)
    trained = [i for i in doc_ids if records.get(i, (None, "valid"))[1] == "train"]
    if trained:
        raise ValueError(f"{len(trained)} evaluation documents are training documents of {RunDir.of(run).path} "
                         f"(first: {trained[:3]}): its split differs from the evaluated split; evaluate runs "
                         "that share one split (same corpus, --seed and --valid-fraction)")
