"""The lm-evaluation-harness adapter end to end on local tasks (JSON lines + task YAML, nothing
downloaded), its answers compared with Ensemble.score and Ensemble.generate."""

import json

import numpy as np
import pytest

from cbtm.ensemble import Ensemble
from test_ensemble import run, texts, torch_mixture  # noqa: F401  (fixtures)

pytest.importorskip("lm_eval")

CHOICES = ["bible", "python", "fortune"]
TASKS = {
    "tiny_mc": dict(output_type="multiple_choice", doc_to_text="{{text}}", doc_to_choice="choices",
                    doc_to_target="label", metric_list=[{"metric": "acc"}]),
    "tiny_ppl": dict(output_type="loglikelihood_rolling", doc_to_text="", doc_to_target="{{text}}",
                     metric_list=[{"metric": "word_perplexity"}]),
    "tiny_gen": dict(output_type="generate_until", doc_to_text="{{text}}", doc_to_target="{{label}}",
                     generation_kwargs={"until": ["e"], "max_gen_toks": 5, "do_sample": False},
                     metric_list=[{"metric": "exact_match"}]),
}


@pytest.fixture(scope="module")
def tasks(tmp_path_factory, texts):
    """Task YAMLs and their JSON-lines data in one directory (YAML is a superset of JSON)."""
    root = tmp_path_factory.mktemp("tasks")
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t[:30], "choices": CHOICES, "label": i % 3}) + "\n"
                            for i, t in enumerate(texts[:4])))
    for name, cfg in TASKS.items():
        (root / f"{name}.yaml").write_text(json.dumps(
            {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
             "test_split": "test", **cfg}))
    return root


@pytest.fixture(scope="module")
def samples(run, tasks):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from cbtm.harness import CbtmLM

    lm = CbtmLM(run=str(run), top_k=2, batch_size=3)
    manager = TaskManager(include_path=str(tasks), include_defaults=False)  # indexing lm-eval's own tasks takes 20 s
    out = lm_eval.simple_evaluate(model=lm, tasks=list(TASKS), task_manager=manager, log_samples=True)
    return out["samples"]


def _continuation_logprob(ens, context: str, continuation: str) -> float:
    """log p(continuation | context) from Ensemble.score of the whole text."""
    n_ctx = len(ens.tokenizer(context.rstrip(), add_special_tokens=False)["input_ids"])
    return float(ens.score([context + continuation])[0][n_ctx:].double().sum())


def test_loglikelihood_equals_ensemble_score(run, samples):
    ens = Ensemble.load(run, top_k=2)
    for s in samples["tiny_mc"]:
        got = [r[0] for r in s["resps"]]  # per choice: [(log-likelihood, is_greedy)]
        want = [_continuation_logprob(ens, *a) for a in s["arguments"]]
        assert np.allclose([g[0] for g in got], want, atol=1e-4)
        assert s["acc"] == float(int(np.argmax(want)) == s["target"])


def test_loglikelihood_rolling_equals_ensemble_score_summed(run, samples):
    ens = Ensemble.load(run, top_k=2)
    for s in samples["tiny_ppl"]:
        text = s["arguments"][0][0]
        assert np.isclose(s["resps"][0][0], float(ens.score([text])[0].double().sum()), atol=1e-4)


def test_generate_until_equals_ensemble_generate(run, samples):
    ens = Ensemble.load(run, top_k=2)
    for s in samples["tiny_gen"]:
        context = s["arguments"][0][0]
        want = ens.generate([context], max_new_tokens=5, greedy=True)[0].split("e")[0]
        assert s["resps"][0][0] == want


def test_command_line_prints_the_table(run, tasks, capsys, monkeypatch):
    from functools import partialmethod

    from lm_eval.tasks import TaskManager

    from cbtm.harness import main

    monkeypatch.setattr(TaskManager, "__init__", partialmethod(TaskManager.__init__, include_defaults=False))
    main(["--model", "cbtm", "--model_args", f"run={run},top_k=2", "--tasks", "tiny_mc",
          "--include_path", str(tasks)])
    out = capsys.readouterr().out
    assert "|tiny_mc|" in out.replace(" ", "") and "acc" in out


def test_routing_model_argument(run, tmp_path):
    """`routing=` reaches the ensemble: a run with a prefix router uses it unless told `distance`."""
    import shutil

    from cbtm.harness import CbtmLM
    from cbtm.router import fit_prefix_router

    prefixed = tmp_path / "run"
    shutil.copytree(run, prefixed)
    fit_prefix_router(prefixed)
    assert CbtmLM(run=str(prefixed), top_k="all").ensemble.router.routing == "prefix"
    lm = CbtmLM(run=str(prefixed), top_k="all", routing="distance")
    assert lm.ensemble.router.routing == "distance" and lm.model.config.routing == "distance"
    with pytest.raises(ValueError, match="routing must be one of"):
        CbtmLM(run=str(prefixed), routing="nearest")


def test_unknown_model_args_and_degenerate_generation_arguments(run):
    from types import SimpleNamespace

    from cbtm.harness import CbtmLM

    with pytest.raises(ValueError, match=r"unknown cbtm model_args \['topk'\]"):
        CbtmLM.create_from_arg_string(f"run={run},topk=1", {"batch_size": 2, "max_batch_size": None})
    lm = CbtmLM.create_from_arg_string(f"run={run},top_k=1", {"batch_size": 2, "max_batch_size": 4})
    context = "In the beginning"
    request = lambda **kw: SimpleNamespace(args=(context, {"do_sample": False, **kw}))  # noqa: E731
    assert lm.generate_until([request(until=["\n"], max_gen_toks=0)]) == [""]
    want = lm.generate_until([request(until=[], max_gen_toks=3)])
    assert want[0] and lm.generate_until([request(until=[""], max_gen_toks=3)]) == want
