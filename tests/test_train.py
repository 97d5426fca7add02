"""Branch and train on CPU with tiny models and a slice of the embedded corpus: tokenizer and
token caches, a step lowers the loss, compute matching, resume after a kill, DDP (2 gloo processes)
and Ray backends, the dense baseline, seed phase and seed models, weighted averaging, bad inputs."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from cbtm import assignments, cluster, models, tokens, training  # noqa: E402
from cbtm.branch import branch_from_mixture  # noqa: E402
from cbtm.cli import main  # noqa: E402
from cbtm.corpus import default_corpus_path, read_documents  # noqa: E402
from cbtm.branch import average_experts, average_state_dicts  # noqa: E402
from cbtm.router import mixture_weights  # noqa: E402
from cbtm.training.job import _step_rows  # noqa: E402
from cbtm.rundir import RunDir  # noqa: E402

# tiny jobs: 32-token rows, 4 per step (128 tokens per step), one thread for bitwise determinism
FAST = dict(seq_len=32, batch_size=4, eval_every=4, eval_tokens=1024, ckpt_every=4, threads=1, progress=False)
JOB = {k: v for k, v in FAST.items() if k not in ("threads", "progress")}  # a train_runs request's settings


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """Every 20th document of the embedded corpus, clustered (k=2), with a 512-token BPE and caches."""
    root = tmp_path_factory.mktemp("train")
    corpus = root / "slice.jsonl"
    with open(corpus, "w") as fh:
        for doc in islice(read_documents(default_corpus_path()), 0, None, 20):
            fh.write(json.dumps({"id": doc.id, "text": doc.text, **doc.meta}) + "\n")
    run = root / "base"
    cluster.fit(str(corpus), run, k=2, n_components=16, seed=0, progress=False)
    cluster.assign(None, run, workers=1, progress=False)
    tok = tokens.ensure_tokenizer(run, vocab_size=512, progress=False)
    tokens.ensure_token_cache(run, [0, 1], tok, progress=False)
    return run


def fresh(base_run, tmp_path, name="run") -> Path:
    """A copy of the clustered run (tokenizer and caches included, no training outputs)."""
    out = tmp_path / name
    shutil.copytree(base_run, out)
    return out


def weights(path) -> dict:
    return AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True).state_dict()


def same(a: dict, b: dict, atol=0.0) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=atol) for k in a)


@pytest.fixture
def one_thread():
    """torch on one thread for the test (bitwise reproducible, no oversubscription)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def trained(base_run, tmp_path_factory):
    """Two experts trained compute-matched on T=3001 tokens (budgets 1501 + 1500), local backend."""
    run = fresh(base_run, tmp_path_factory.mktemp("trained"))
    summary = training.train_experts(run, 3001, vocab_size=512, **FAST)
    return run, summary


# ------------------------------------------------------------------------------------------------


def test_every_file_of_a_trained_run_has_the_mode_of_an_ordinary_file(trained):
    """safetensors >= 0.8 writes files 0600 whatever the umask: a run directory shared with a group
    would keep its weights, centres and token caches from the group."""
    from cbtm.rundir import default_mode

    run, _ = trained
    files = [f for f in run.rglob("*") if f.is_file()]
    assert any(f.suffix == ".safetensors" for f in files) and any("checkpoints" in f.parts for f in files)
    wrong = {str(f.relative_to(run)): oct(f.stat().st_mode & 0o777) for f in files
             if f.stat().st_mode & 0o777 != default_mode(f.parent)}
    assert not wrong


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_atomic_writes_follow_the_umask(tmp_path, umask):
    from cbtm.rundir import atomic_save_safetensors, atomic_write_text, replace_dir

    def save(out):
        Path(out).mkdir()
        atomic_save_safetensors(Path(out) / "sub" / "w.safetensors", {"w": np.ones(2, np.float32)})

    old = os.umask(umask)
    try:
        paths = [atomic_save_safetensors(tmp_path / "a.safetensors", {"a": np.zeros(3, np.float32)}),
                 atomic_write_text(tmp_path / "a.txt", "x"),
                 replace_dir(tmp_path / "model", save, "model") / "sub" / "w.safetensors"]
    finally:
        os.umask(old)
    assert {oct(p.stat().st_mode & 0o777) for p in paths} == {oct(0o666 & ~umask)}
    assert not list(tmp_path.rglob("*.probe"))


def test_tokenizer_and_token_cache(base_run):
    tok = AutoTokenizer.from_pretrained(str(base_run / "tokenizer"), local_files_only=True)
    assert len(tok) == 512 and tok.eos_token == tokens.EOS
    m = RunDir(base_run).manifest()
    assert m["tokenizer"]["source"] == "bpe" and m["tokenizer"]["size"] == 512
    records = assignments.read_records(base_run)
    for c in (0, 1):
        ids = tokens.load_tokens(base_run, c, "train")
        n_docs = sum(1 for v in records.values() if v == (c, "train"))
        assert ids.dtype == np.uint16 and (ids == tok.eos_token_id).sum() == n_docs  # EOS after every document
        first = next(text for cc, s, text in assignments.iter_documents(base_run, {(c, "train")}))
        end = int(np.argmax(ids == tok.eos_token_id))
        assert tok.decode(ids[:end].tolist()) == first
        valid = tokens.load_tokens(base_run, c, "valid")
        assert (valid == tok.eos_token_id).sum() == sum(1 for v in records.values() if v == (c, "valid"))
    # the BPE is deterministic, and a cache is reused while tokenizer and assignments are unchanged
    before = tokens.cache_path(base_run, 0).stat().st_mtime_ns
    tokens.ensure_token_cache(base_run, [0], progress=False)
    assert tokens.cache_path(base_run, 0).stat().st_mtime_ns == before
    texts = [t for _, s, t in islice(assignments.iter_documents(base_run), 60)]
    a = tokens.train_tokenizer(texts, base_run.parent / "tokA", 300).backend_tokenizer.to_str()
    b = tokens.train_tokenizer(texts, base_run.parent / "tokB", 300).backend_tokenizer.to_str()
    assert a == b


def test_block_stream_is_a_function_of_the_row():
    ids = np.arange(100, dtype=np.uint16)
    s1, s2 = tokens.BlockStream(ids, 10, seed=1, key=3), tokens.BlockStream(ids, 10, seed=1, key=3)
    rows = [s1.row(r).tolist() for r in range(25)]
    assert sorted(map(tuple, rows[:10])) == [tuple(range(i, i + 10)) for i in range(0, 100, 10)]  # one epoch
    assert rows[10:20] != rows[:10]  # reshuffled next epoch
    assert [s2.row(r).tolist() for r in (24, 3, 17)] == [rows[24], rows[3], rows[17]]  # random access
    assert _step_rows(2, 650, 256, 64) == [(8, 64), (9, 64), (10, 10)]  # budget ends inside a row
    assert training.split_budget(3001, 2) == [1501, 1500] and sum(training.split_budget(10**6 + 5, 7)) == 10**6 + 5


def test_training_steps_lower_the_loss_and_accumulation_is_exact(base_run, one_thread):
    tok = tokens.load_tokenizer(base_run / "tokenizer")
    stream = tokens.BlockStream(tokens.load_tokens(base_run, 0, "train"), 32)
    rows = [stream.row(r) for r in range(8)]
    cfg = training.TrainConfig(seq_len=32, batch_size=8, lr=3e-3, warmup=0.0)
    t = training.Trainer(models.new_model("tiny", tok, seed=0), cfg, total_steps=30)
    losses = [t.step(rows)["loss"] for _ in range(12)]
    assert losses[-1] < losses[0] - 1.0 and losses[0] == pytest.approx(np.log(512), abs=0.3)
    # the same global batch as 8 rows at once, or 4 micro-batches of 2 accumulated
    results = []
    for batch in (8, 2):
        t = training.Trainer(models.new_model("tiny", tok, seed=0), training.TrainConfig(seq_len=32, batch_size=batch, lr=1e-3),
                          total_steps=3)
        for _ in range(2):
            t.step(rows)
        results.append(t.model.state_dict())
    assert same(*results, atol=1e-5)


def test_compute_matching_manifest_and_outputs(trained):
    run, summary = trained
    experts = summary["experts"]
    assert [e["tokens_trained"] for e in experts] == [1501, 1500] and summary["tokens_trained"] == 3001
    m = RunDir(run).manifest()
    assert m["train"]["per_expert_tokens"] == [1501, 1500] and m["train"]["k"] == 2
    assert m["seed"]["source"] == "config" and (run / "seed" / "model.safetensors").is_file()
    for e in m["experts"]:
        assert e["status"] == "done" and e["final_valid_loss"] > 0 and e["params"] > 0 and e["seconds"] > 0
        assert sorted(os.listdir(run / e["path"])) == [".cbtm-output", "config.json", "generation_config.json", "model.safetensors"]
        log = json.loads((run / e["log"]).read_text())
        assert log["status"] == "done" and log["tokens_trained"] == e["tokens"] and log["valid"]
        assert log["valid"][-1]["valid_loss"] == e["final_valid_loss"]
    # a later stage loads experts and tokenizer with the plain transformers API
    tok = AutoTokenizer.from_pretrained(str(run / "tokenizer"), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(run / "experts" / "expert_001"), local_files_only=True)
    ids = tok("The king said", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape == (1, ids.shape[1], 512)
    # rerunning the same call skips finished experts
    t0 = time.perf_counter()
    again = training.train_experts(run, 3001, vocab_size=512, **FAST)
    assert [e["final_valid_loss"] for e in again["experts"]] == [e["final_valid_loss"] for e in experts]
    assert time.perf_counter() - t0 < 10


def test_resume_after_kill_equals_uninterrupted(base_run, tmp_path):
    kw = dict(FAST, experts=[0], vocab_size=512)
    ref = fresh(base_run, tmp_path, "ref")
    training.train_experts(ref, 4096, **kw)  # expert 0: 2048 tokens = 16 steps

    class Killed(BaseException):
        pass

    def kill_at_step_7(info):
        if info["step"] == 7:
            raise Killed

    run = fresh(base_run, tmp_path, "killed")
    with pytest.raises(Killed):
        training.train_experts(run, 4096, callback=kill_at_step_7, **kw)
    assert [p.name for p in training.list_checkpoints(run / "checkpoints" / "expert_000")] == ["step_00000004"]
    assert RunDir(run).manifest()["experts"][0]["status"] == "running"
    training.train_experts(run, 4096, **kw)  # the same command again
    log = json.loads((run / "logs" / "expert_000.json").read_text())
    assert log["resumed_from_step"] == 4 and log["tokens_trained"] == 2048
    assert same(weights(ref / "experts" / "expert_000"), weights(run / "experts" / "expert_000"))
    assert [v["valid_loss"] for v in log["valid"]] == \
        [v["valid_loss"] for v in json.loads((ref / "logs" / "expert_000.json").read_text())["valid"]]

    # a real SIGKILL of the command line, then the same command to completion
    cli = fresh(base_run, tmp_path, "sigkill")
    cmd = [sys.executable, "-m", "cbtm.cli", "train", "--out", str(cli), "--total-tokens", "4096", "--experts", "0",
           "--vocab-size", "512", "--seq-len", "32", "--batch-size", "4", "--eval-every", "4", "--eval-tokens", "1024",
           "--ckpt-every", "1", "--threads", "1", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = cli / "checkpoints" / "expert_000"
    deadline = time.time() + 60
    while not training.list_checkpoints(ckpts) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert training.list_checkpoints(ckpts), "the command ended before writing a checkpoint"
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    assert same(weights(ref / "experts" / "expert_000"), weights(cli / "experts" / "expert_000"))


def test_ddp_two_gloo_processes_match_one_process(base_run, tmp_path):
    one = fresh(base_run, tmp_path, "one")
    kw = dict(FAST, experts=[1], vocab_size=512, ckpt_every=3)
    training.train_experts(one, 2048, **{**kw, "batch_size": 4})  # 1024 tokens, 8 steps of 4 rows
    ddp = fresh(base_run, tmp_path, "ddp")
    summary = training.train_experts(ddp, 2048, backend="torchrun", nproc_per_node=2, **{**kw, "batch_size": 2})
    assert summary["experts"][0]["status"] == "done" and summary["experts"][0]["tokens_trained"] == 1024
    log = json.loads((ddp / "logs" / "expert_001.json").read_text())
    assert log["world_size"] == 2 and log["tokens_per_step"] == 128
    assert {"rng_rank0.safetensors", "rng_rank1.safetensors"} <= \
        set(os.listdir(training.list_checkpoints(ddp / "checkpoints" / "expert_001")[-1]))
    assert same(weights(one / "experts" / "expert_001"), weights(ddp / "experts" / "expert_001"), atol=1e-4)
    ref = json.loads((one / "logs" / "expert_001.json").read_text())
    assert log["final_valid_loss"] == pytest.approx(ref["final_valid_loss"], abs=1e-4)


def test_ray_trains_two_experts_in_parallel(trained, base_run, tmp_path):
    pytest.importorskip("ray")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ref, _ = trained
    run = fresh(base_run, tmp_path)
    summary = training.train_experts(run, 3001, backend="ray", num_cpus=1, vocab_size=512, **FAST)
    assert [e["status"] for e in summary["experts"]] == ["done", "done"]
    logs = [json.loads((run / "logs" / f"expert_00{i}.json").read_text()) for i in (0, 1)]
    # two Ray worker processes, not the driver (no wall-clock test: overlap depends on machine load)
    pids = {log["last_session"]["pid"] for log in logs}
    assert len(pids) == 2 and os.getpid() not in pids
    assert all(log["threads"] == 1 for log in logs)
    for i in (0, 1):  # the same job gives the same expert whichever backend runs it
        assert same(weights(ref / "experts" / f"expert_00{i}"), weights(run / "experts" / f"expert_00{i}"))


def test_local_backend_runs_experts_in_parallel_processes(trained, base_run, tmp_path):
    ref, _ = trained
    run = fresh(base_run, tmp_path)
    summary = training.train_experts(run, 3001, parallel=2, vocab_size=512, **FAST)
    assert [e["status"] for e in summary["experts"]] == ["done", "done"]
    for i in (0, 1):
        assert same(weights(ref / "experts" / f"expert_00{i}"), weights(run / "experts" / f"expert_00{i}"))


def test_train_runs_pools_several_runs_and_gives_each_the_weights_of_its_own_training(trained, base_run, tmp_path):
    """Two runs and a dense baseline in one pool of 2 processes: every model is bitwise the one the
    same job trains alone (a job is a pure function of its spec), and each manifest records its own."""
    ref, _ = trained
    a, b = fresh(base_run, tmp_path, "a"), fresh(base_run, tmp_path, "b")
    alone = training.train_dense(tmp_path / "dense-alone", 2000, like=ref, vocab_size=512, **FAST)
    dense = training.prepare_dense(tmp_path / "dense", like=ref, vocab_size=512, progress=False)
    summaries = training.train_runs([dict(run=a, total_tokens=3001, vocab_size=512, **JOB),
                                     dict(run=dense, total_tokens=2000, vocab_size=512, **JOB),
                                     dict(run=b, total_tokens=3001, experts=[1], vocab_size=512, **JOB)],
                                    parallel=2, threads=1, progress=False)
    assert [s["run"] for s in summaries] == [str(a), str(dense.path), str(b)]
    assert [[e["id"] for e in s["experts"]] for s in summaries] == [[0, 1], [0], [1]]
    assert all(e["status"] == "done" for s in summaries for e in s["experts"])
    for i in (0, 1):
        assert same(weights(ref / "experts" / f"expert_00{i}"), weights(a / "experts" / f"expert_00{i}"))
    assert same(weights(ref / "experts" / "expert_001"), weights(b / "experts" / "expert_001"))
    assert not (b / "experts" / "expert_000").exists()  # only the experts asked for
    assert alone["experts"][0]["tokens_trained"] == summaries[1]["experts"][0]["tokens_trained"] == 2000
    assert same(weights(tmp_path / "dense-alone" / "experts" / "expert_000"), weights(dense.path / "experts" / "expert_000"))
    pids = {json.loads((r / "logs" / f"expert_00{i}.json").read_text())["last_session"]["pid"]
            for r, i in ((a, 0), (a, 1), (dense.path, 0), (b, 1))}
    assert os.getpid() not in pids  # worker processes, not the caller


def test_train_runs_checks_every_request_before_training_any(base_run, tmp_path):
    a, b = fresh(base_run, tmp_path, "a"), fresh(base_run, tmp_path, "b")
    ok = dict(run=a, total_tokens=3001, vocab_size=512, **JOB)
    with pytest.raises(ValueError, match="experts \\[5\\] do not exist"):
        training.train_runs([ok, dict(run=b, total_tokens=3001, experts=[5], vocab_size=512, **JOB)], progress=False)
    assert not (a / "experts").exists() and not (a / "logs").exists()
    with pytest.raises(ValueError, match="requested twice"):
        training.train_runs([ok, dict(ok)], progress=False)
    with pytest.raises(ValueError, match="missing \\['total_tokens'\\]"):
        training.train_runs([dict(run=a)], progress=False)
    with pytest.raises(TypeError, match="unknown training settings \\['lr_peak'\\]"):
        training.train_runs([dict(ok, lr_peak=1e-3)], progress=False)
    with pytest.raises(ValueError, match="parallel must be a positive integer"):
        training.train_runs([ok], parallel=0, progress=False)


def test_dense_baseline_is_compute_matched(trained, tmp_path):
    run, _ = trained
    dense = tmp_path / "dense"
    s = training.train_dense(dense, 3001, like=run, vocab_size=512, **FAST)
    assert len(s["experts"]) == 1 and s["experts"][0]["tokens_trained"] == 3001
    m = RunDir(dense).manifest()
    assert m["assignments"]["k"] == 1 and m["train"]["per_expert_tokens"] == [3001]
    assert (dense / "tokenizer" / "tokenizer.json").read_bytes() == (run / "tokenizer" / "tokenizer.json").read_bytes()
    ids = assignments.read_records(run)
    assert assignments.read_records(dense) == {i: (0, split) for i, (_, split) in ids.items()}  # same split


def test_seed_phase_and_seed_model(base_run, tmp_path):
    run = fresh(base_run, tmp_path)
    s = training.train_experts(run, 1024, seed_tokens=640, vocab_size=512, **FAST)
    m = RunDir(run).manifest()
    assert m["seed"]["source"] == "seed_phase" and m["seed"]["status"] == "done" and m["seed"]["tokens_trained"] == 640
    assert json.loads((run / "logs" / "seed.json").read_text())["clusters"] == [0, 1]
    assert all(e["init"] == {"path": "seed"} and e["status"] == "done" for e in s["experts"])

    # an existing local HF model (with its tokenizer) as the seed of a new run
    seed_dir = tmp_path / "my_model"
    shutil.copytree(run / "seed", seed_dir)
    shutil.copytree(run / "tokenizer", seed_dir, dirs_exist_ok=True)
    run2 = fresh(base_run, tmp_path, "from_seed")
    shutil.rmtree(run2 / "tokenizer")
    shutil.rmtree(run2 / "tokens")
    s2 = training.train_experts(run2, 512, seed_model=seed_dir, experts=[1], **FAST)
    m2 = RunDir(run2).manifest()
    assert m2["tokenizer"]["source"] == "seed_model" and m2["seed"]["path"] == str(seed_dir.resolve())
    assert s2["experts"][0]["tokens_trained"] == 256 and m2["train"]["config"]["lr"] == models.SEED_MODEL_LR


def test_weighted_average_and_branch(trained, tmp_path):
    run, _ = trained
    paths = [run / "experts" / "expert_000", run / "experts" / "expert_001", run / "seed"]
    w = [0.5, 1.0, 2.5]
    sds = [weights(p) for p in paths]
    manual = {k: sum(wi / 4.0 * sd[k] for wi, sd in zip(w, sds)) for k in sds[0]}
    assert same(average_experts(paths, w).state_dict(), manual, atol=1e-6)
    assert same(average_state_dicts(sds, w), manual, atol=1e-6)
    assert same(average_experts(paths[:1]).state_dict(), sds[0])

    # BTM branching: given weights, and the router's weights on the new expert's data
    branch = fresh(run, tmp_path, "branch")
    e = branch_from_mixture(branch, 1, [1, 3], sources=[0, 1], expert=2, train=False, progress=False)
    assert e["mixture"]["weights"] == [0.25, 0.75] and e["status"] == "pending"
    assert same(weights(branch / "init" / "expert_002"), average_state_dicts(sds[:2], [1, 3]), atol=1e-6)
    rw = mixture_weights(branch, 1, [0, 1])
    assert len(rw) == 2 and sum(rw) == pytest.approx(1.0) and rw[1] > rw[0]  # cluster 1's data is nearer centre 1
    with pytest.warns(DeprecationWarning):  # the old import path keeps working, router weights by default
        from cbtm import train as old_train
    e = old_train.branch_from_mixture(branch, 1, expert=2, tokens=300, restart=True, **FAST)
    assert e["status"] == "done" and e["tokens_trained"] == 300 and e["mixture"]["method"] == "router"
    assert e["mixture"]["sources"] == [0, 1] and (branch / "experts" / "expert_002" / "model.safetensors").is_file()


def test_cli_train_dense_and_branch(base_run, tmp_path, capsys):
    run = fresh(base_run, tmp_path)
    opts = ["--vocab-size", "512", "--seq-len", "32", "--batch-size", "4", "--eval-every", "0", "--threads", "1", "--quiet"]
    assert main(["train", "--out", str(run), "--total-tokens", "1k", "--experts", "1", *opts]) == 0
    m = RunDir(run).manifest()
    assert [(e["id"], e["status"]) for e in m["experts"]] == [(0, "pending"), (1, "done")]
    assert m["experts"][1]["tokens_trained"] == 500
    dense = tmp_path / "dense"
    assert main(["train", "--dense", "--like", str(run), "--out", str(dense), "--total-tokens", "1000", *opts]) == 0
    assert RunDir(dense).manifest()["experts"][0]["tokens_trained"] == 1000
    assert main(["branch", "--out", str(run), "--from-mixture", "1", "--cluster", "0", "--tokens", "200",
                 "--seq-len", "32", "--batch-size", "4", "--threads", "1", "--quiet"]) == 0
    e = RunDir(run).manifest()["experts"][0]
    assert e["status"] == "done" and e["mixture"] == {"sources": [1], "weights": [1.0], "method": "router",
                                                     "temperature": 0.1}
    assert main(["train", "--out", str(tmp_path / "nowhere"), "--total-tokens", "1k"]) == 2
    assert "not a cbtm run directory" in capsys.readouterr().err


def test_bad_inputs_give_clear_errors(base_run, tmp_path):
    run = fresh(base_run, tmp_path)
    with pytest.raises(ValueError, match="larger than the model's context of 512"):
        training.train_experts(run, 10_000, **{**FAST, "seq_len": 1024})
    with pytest.raises(FileNotFoundError, match="seed model not found"):
        training.train_experts(run, 10_000, seed_model=tmp_path / "missing", **FAST)
    with pytest.raises(ValueError, match="unknown model size"):
        training.train_experts(run, 10_000, model_size="huge", **FAST)
    with pytest.raises(ValueError, match="experts \\[5\\] do not exist"):
        training.train_experts(run, 10_000, experts=[5], **FAST)
    with pytest.raises(ValueError, match="too small"):
        training.train_experts(run, 3, **FAST)
    with pytest.raises(ValueError, match="weights must be finite, non-negative"):
        average_state_dicts([{"a": torch.ones(2)}, {"a": torch.zeros(2)}], [1.0, -1.0])
    with pytest.raises(ValueError, match="different shapes"):
        average_state_dicts([{"a": torch.ones(2)}, {"a": torch.zeros(3)}])

    # a cluster with no documents (assignments written by a caller: k=3, nothing in cluster 2)
    custom = fresh(base_run, tmp_path, "custom")
    recs = [{"id": i, "cluster": c, "split": s} for i, (c, s) in assignments.read_records(base_run).items()]
    assignments.write_assignments(custom, recs, RunDir(base_run).manifest()["corpus"]["paths"], k=3)
    with pytest.raises(ValueError, match="cluster 2 has no training documents"):
        training.train_experts(custom, 10_000, vocab_size=512, **FAST)

    # a corrupt checkpoint
    class Killed(BaseException):
        pass

    def kill(info):
        if info["step"] == 5:
            raise Killed

    with pytest.raises(Killed):
        training.train_experts(run, 4096, experts=[0], vocab_size=512, callback=kill, **FAST)
    ckpt = training.list_checkpoints(run / "checkpoints" / "expert_000")[-1]
    blob = bytearray((ckpt / "optimizer.safetensors").read_bytes())
    blob[-10] ^= 0xFF
    (ckpt / "optimizer.safetensors").write_bytes(bytes(blob))
    with pytest.raises(training.CheckpointError, match="corrupt .*optimizer.safetensors.*delete"):
        training.train_experts(run, 4096, experts=[0], vocab_size=512, **FAST)
    assert RunDir(run).manifest()["experts"][0]["status"] == "failed"
    # other settings on top of existing progress are refused, --restart starts over
    with pytest.raises(ValueError, match="trained with other settings"):
        training.train_experts(run, 8192, experts=[0], vocab_size=512, **FAST)
    s = training.train_experts(run, 4096, experts=[0], vocab_size=512, restart=True, **FAST)
    assert s["experts"][0]["status"] == "done"


def test_hardening_of_training_inputs(base_run, tmp_path, monkeypatch):
    run = fresh(base_run, tmp_path)
    training.train_experts(run, 512, experts=[0], vocab_size=512, **FAST)
    # a context overflow is named as such, even where other settings would also differ from the run's
    with pytest.raises(ValueError, match="larger than the model's context of 512"):
        training.train_experts(run, 512, experts=[0], vocab_size=512, **{**FAST, "seq_len": 100_000})
    # bad flags are user errors (exit 2), not tracebacks
    assert main(["train", "--run", str(run), "--total-tokens", "1k", "--device", "tpu", "--quiet"]) == 2
    for flags in (["--workers", "0"], ["--workers", "-2"]):
        with pytest.raises(SystemExit) as e:
            main(["cluster", "assign", "--run", str(run), *flags])
        assert e.value.code == 2
    # refitting the router of a run with experts would silently re-route them: refused without --force
    with pytest.raises(ValueError, match="--force"):
        cluster.fit(None, run, k=2, n_components=16, progress=False)
    assert main(["cluster", "fit", "--run", str(run), "-k", "2", "--n-components", "16"]) == 2
    assert RunDir(run).manifest()["experts"][0]["status"] == "done"  # nothing was dropped


def test_long_documents_tokenize_piecewise_to_the_same_ids(base_run, monkeypatch):
    tok = tokens.load_tokenizer(base_run / "tokenizer")
    encode = tokens._encoder(tok)
    text = " ".join(t for _, _, t in islice(assignments.iter_documents(base_run), 40))
    whole = np.asarray(encode([text])[0])
    monkeypatch.setattr(tokens, "LONG_DOCUMENT", 4096)
    pieces = tokens.split_long(text, 4096)
    assert len(pieces) > 3 and "".join(pieces) == text and max(map(len, pieces)) <= 4096
    got = tokens.encode_documents(encode, [text, "short text"], np.int32)
    assert np.array_equal(got[0], whole)
    assert np.array_equal(got[1], np.asarray(encode(["short text"])[0]))
