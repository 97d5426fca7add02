"""Few-shot classification against the sparse ensemble: per-token routing predicts what
Ensemble.score predicts at each top-k, prompt routing what an ensemble fixed to the prompt's weights
predicts; the shipped task holds held-out passages only; cbtm eval --fewshot reports it."""

import json
from pathlib import Path

import numpy as np
import pytest

from cbtm import fewshot
from cbtm.corpus import default_corpus_path, read_documents, split_of
from cbtm.ensemble import Ensemble
from cbtm.assignments import read_records
from test_ensemble import run, torch_mixture  # noqa: F401  (fixtures)

TOP_KS = ["1", "2", "all"]


@pytest.fixture(scope="module")
def task(run, tmp_path_factory):
    path = tmp_path_factory.mktemp("task") / "task.jsonl"
    fewshot.build_source_task(run, path, per_label=2, chars=30)
    return path


def _predict(ens_for, examples, labels, prompts):
    """The label whose continuation the ensemble ``ens_for(prompt)`` scores highest, per example."""
    out = []
    for prompt in prompts:
        ens = ens_for(prompt)
        scores = ens.score([f"{prompt} {label}" for label in labels])
        n = [fewshot._tokens_from(ens, f"{prompt} {label}", len(prompt)) for label in labels]
        out.append(labels[int(np.argmax([float(s[-k:].sum()) for s, k in zip(scores, n)]))])
    return out


def test_built_task_holds_held_out_passages(run, task):
    examples, labels = fewshot.read_task(task)
    records = read_records(run)
    assert examples and all(records[ex["id"]][1] == "valid" for ex in examples)
    assert set(labels) <= set(fewshot.SOURCE_NAMES.values()) and len(labels) >= 2
    assert all(len(ex["text"]) <= 30 for ex in examples)
    assert max(sum(ex["label"] == lab for ex in examples) for lab in labels) <= 2


@pytest.mark.parametrize("route", fewshot.ROUTES)
def test_predictions_equal_the_sparse_ensemble(run, task, route):
    got = fewshot.evaluate_fewshot(run, task, shots=1, route=route, top_ks=TOP_KS, limit=4)
    examples, labels = fewshot.read_task(task)
    prompts = fewshot.prompts(examples, 1)[:4]
    for key in TOP_KS:
        top_k = None if key == "all" else int(key)
        if route == "token":
            ens = Ensemble.load(run, top_k=top_k)
            want = _predict(lambda p: ens, examples, labels, prompts)
        else:  # every token weighted by the prompt's routing: a fixed-weight ensemble per example
            full = Ensemble.load(run, top_k=None)
            want = _predict(lambda p: Ensemble(full.pool.paths, full.tokenizer, kind="uniform", top_k=top_k,
                                               prior=full.router.document_weights([p])[0]), examples, labels, prompts)
        assert got["predictions"][key] == want, key
        gold = [ex["label"] for ex in examples[:4]]
        assert got["accuracy"][key] == np.mean([a == b for a, b in zip(want, gold)])


def test_shipped_task_is_held_out_and_matches_its_yaml():
    path = Path(fewshot.__file__).parent / "data" / "tasks" / "sources.jsonl"
    assert path.stat().st_size < 200_000
    examples, labels = fewshot.read_task(path)
    assert labels == sorted(fewshot.SOURCE_NAMES.values())
    ids = {ex["id"] for ex in examples}
    seen = {d.id for d in read_documents(default_corpus_path()) if d.id in ids}
    assert seen == ids and all(split_of(i) == "valid" for i in ids)
    yaml = (path.parent / "cbtm_sources.yaml").read_text()
    assert json.dumps(labels) in yaml


def test_eval_cli_reports_fewshot_accuracy(run, task, tmp_path, capsys):
    from cbtm.cli import main

    args = ["eval", f"cbtm={run}", "--max-docs", "2", "--top-k", "1,all", "--fewshot", str(task), "--shots", "1",
            "--fewshot-limit", "3", "--out", str(tmp_path)]
    assert main(args) == 0
    assert "Few-shot accuracy on task.jsonl (3 examples, 1 shots, routed once on the prompt)" in capsys.readouterr().out
    report = json.loads((tmp_path / "reports" / "eval.json").read_text())
    want = fewshot.evaluate_fewshot(run, task, shots=1, top_ks=["1", "all"], limit=3)["accuracy"]
    assert report["fewshot"]["accuracy"]["cbtm"] == want
    assert report["perplexity"]["cbtm"]  # the perplexity table is still there
    trained = next(i for i, (_, s) in read_records(run).items() if s == "train")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(task.read_text() + json.dumps({"id": trained, "text": "x", "label": "Bible"}) + "\n")
    assert main(args[:7] + [str(bad)] + args[8:]) == 2
    assert "training documents" in capsys.readouterr().err
