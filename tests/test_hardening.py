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


# ------------------------------------------------------------------------------------------------
# training

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_train import FAST, base_run, fresh, trained  # noqa: E402,F401 (fixtures)

from cbtm import cluster, models, training  # noqa: E402
from cbtm.cli import main  # noqa: E402
from cbtm.rundir import RunDir, RunLocked  # noqa: E402


def _train_cli(run, *flags):
    return main(["train", "--run", str(run), "--total-tokens", "4096", "--experts", "0", "--seq-len", "32",
                 "--batch-size", "4", "--eval-every", "4", "--eval-tokens", "1024", "--ckpt-every", "4",
                 "--threads", "1", "--quiet", *flags])


def test_a_non_finite_loss_fails_the_job_with_its_step(base_run, tmp_path):
    run = fresh(base_run, tmp_path)
    with pytest.raises(training.NonFiniteLoss, match=r"expert_000 stopped at step \d+ of 16: non-finite"):
        training.train_experts(run, 4096, experts=[0], vocab_size=512, lr=1e6, **FAST)
    entry = RunDir(run).manifest()["experts"][0]
    assert entry["status"] == "failed" and "at step" in entry["error"]
    assert not (run / "experts" / "expert_000").exists()
    assert json.loads((run / "logs" / "expert_000.json").read_text())["status"] == "failed"
    with pytest.raises(SystemExit, match="stopped at step"):  # the command exits non-zero, one line
        _train_cli(run, "--lr", "1e6", "--restart")


def test_checkpoints_with_nan_weights_or_counters_out_of_range_are_refused(base_run, tmp_path):
    from safetensors.torch import load_file, save_file

    class Killed(BaseException):
        pass

    def kill(info):
        if info["step"] == 5:
            raise Killed

    run = fresh(base_run, tmp_path)
    with pytest.raises(Killed):
        training.train_experts(run, 4096, experts=[0], vocab_size=512, callback=kill, **FAST)
    ckpt = training.list_checkpoints(run / "checkpoints" / "expert_000")[-1]
    pristine = {f.name: f.read_bytes() for f in ckpt.iterdir()}

    def tamper(name, edit):
        for f, data in pristine.items():
            (ckpt / f).write_bytes(data)
        edit(ckpt / name)
        meta = json.loads((ckpt / "checkpoint.json").read_text())  # re-hashed: only the contents are wrong
        meta["files"][name] = {"bytes": (ckpt / name).stat().st_size, "blake2b": training.checkpoint.digest(ckpt / name)}
        (ckpt / "checkpoint.json").write_text(json.dumps(meta))

    def state(**fields):
        def edit(path):
            path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
        return edit

    for fields in ({"step": 10**18}, {"tokens": 10**18}, {"step": -1}, {"step": "4"}):
        tamper("state.json", state(**fields))
        with pytest.raises(training.CheckpointError, match="out of range"):
            training.train_experts(run, 4096, experts=[0], vocab_size=512, **FAST)

    def nan_weights(path):
        t = load_file(str(path))
        save_file({k: torch.full_like(v, float("nan")) for k, v in t.items()}, str(path))

    tamper("model.safetensors", nan_weights)
    with pytest.raises(training.NonFiniteLoss, match="stopped at step 5 of 16"):
        training.train_experts(run, 4096, experts=[0], vocab_size=512, **FAST)
    assert RunDir(run).manifest()["experts"][0]["status"] == "failed"


def test_a_full_disk_during_a_checkpoint_is_one_line(base_run, tmp_path, monkeypatch, capsys):
    import errno

    from cbtm.training import job

    run = fresh(base_run, tmp_path)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(job, "save_checkpoint", full)
    assert _train_cli(run) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write a checkpoint" in err and "No space left on device" in err
    assert "Traceback" not in err


# ------------------------------------------------------------------------------------------------
# one writer per run


@pytest.fixture
def holder(tmp_path):
    """``holder(path, output=False)``: another process holding the write lock of a run directory
    (or of an output directory); returns its PID. Killed at the end of the test."""
    import subprocess
    import sys

    procs = []

    def hold(path, output=False):
        take = "output_lock(p, 'merge average')" if output else "RunDir(p).lock('train')"
        code = (f"import sys, time\nfrom pathlib import Path\nfrom cbtm.rundir import RunDir, output_lock\n"
                f"p = Path(sys.argv[1])\nwith {take}:\n    print('held', flush=True)\n    time.sleep(120)\n")
        proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield hold
    for proc in procs:
        proc.kill()
        proc.wait()


def test_a_second_writer_is_refused_naming_the_holder(trained, tmp_path, holder):
    src, _ = trained
    run = fresh(src, tmp_path)
    proc = holder(run)
    pid = f"pid {proc.pid}, train"
    with pytest.raises(RunLocked, match=f"run directory {run} is being written by another cbtm process \\({pid}\\)"):
        cluster.assign(None, run, workers=1, progress=False)
    with pytest.raises(RunLocked, match=pid):
        training.train_experts(run, 3001, vocab_size=512, **FAST)
    with pytest.raises(RunLocked, match=pid):
        cluster.fit(None, run, k=2, force=True, progress=False)
    assert main(["merge", "remove", "--run", str(run), "--expert", "1"]) == 2
    assert RunDir(run).manifest()["experts"][1]["status"] == "done"
    proc.kill()  # a killed holder releases its lock
    proc.wait()
    training.train_experts(run, 3001, vocab_size=512, **FAST)  # resumes: nothing to do
    assert not (run / ".cbtm-lock").exists()


def test_two_averages_into_one_directory_do_not_replace_each_other(trained, tmp_path, holder):
    from cbtm import experts

    run, _ = trained
    to = tmp_path / "avg"
    proc = holder(to, output=True)
    with pytest.raises(RunLocked, match=f"{to} is being written by another cbtm process \\(pid {proc.pid}"):
        experts.average(run, to)
    assert not to.exists()


def test_the_run_lock_is_re_entrant_and_worker_pools_train_under_it(base_run, tmp_path):
    run = fresh(base_run, tmp_path)
    with RunDir(run).lock("test"):
        with RunDir(run).lock("nested"):
            assert (run / ".cbtm-lock").read_text().startswith(f"{os.getpid()}, test")
        summary = training.train_experts(run, 1024, parallel=2, vocab_size=512, **FAST)
    assert [e["status"] for e in summary["experts"]] == ["done", "done"]
    assert not (run / ".cbtm-lock").exists()


# ------------------------------------------------------------------------------------------------
# reassigning a trained run


def test_assign_nearest_on_a_trained_run_needs_force(trained, tmp_path):
    src, _ = trained
    run = fresh(src, tmp_path)
    before = {f.name: f.read_bytes() for f in (run / "assignments").iterdir() if f.is_file()}
    with pytest.raises(ValueError, match="experts trained on its current assignments.*--force"):
        cluster.assign(None, run, balanced=False, workers=1, progress=False)
    assert main(["cluster", "assign", "--run", str(run), "--nearest"]) == 2
    assert {f.name: f.read_bytes() for f in (run / "assignments").iterdir() if f.is_file()} == before
    assert [e["status"] for e in RunDir(run).expert_entries()] == ["done", "done"]
    cluster.assign(None, run, workers=1, progress=False)  # the same assignment again: nothing changes, allowed
    cluster.assign(None, run, balanced=False, workers=1, force=True, progress=False)
    m = RunDir(run).manifest()
    assert "experts" not in m and "train" not in m and m["assignments"]["balanced"] is False
    assert (run / "experts" / "expert_000" / "config.json").is_file()  # files are kept


# ------------------------------------------------------------------------------------------------
# tamper-proof run directories


def _edit_json(path, **fields):
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def _legacy(run):
    """The manifest of an older cbtm: each expert's sha256 covers its weights only."""
    m = json.loads((run / "cbtm.json").read_text())
    for e in m["experts"]:
        e["sha256"] = models.weights_digest(run / e["path"])
    (run / "cbtm.json").write_text(json.dumps(m))


def test_an_edited_expert_config_is_refused(trained, tmp_path):
    from cbtm.ensemble import Ensemble

    src, _ = trained
    run = fresh(src, tmp_path)
    expert = run / "experts" / "expert_000"
    sha = RunDir(run).expert_entries()[0]["sha256"]
    models.load_model(expert, sha256=sha)  # untouched: loads
    _edit_json(expert / "config.json", rms_norm_eps=0.5)  # same shapes, other model: only the digest sees it
    with pytest.raises(ValueError, match="weights or config.json.*do not match the checksum"):
        models.load_model(expert, sha256=sha)
    with pytest.raises(ValueError, match="do not match the checksum"):
        Ensemble.load(run, top_k=None).score(["In the beginning God created the heaven and the earth."])


@pytest.mark.parametrize("edit, error", [
    ({"num_hidden_layers": 1}, "describes a model of [0-9,]+ parameters but its weights hold"),
    ({"num_hidden_layers": 0}, "describes a model of [0-9,]+ parameters but its weights hold"),
    ({"num_hidden_layers": 10**6}, "describes a model of [0-9,]+ parameters but its weights hold"),
    ({"model_type": "bert"}, "parameters but its weights hold|cannot build a causal LM"),
    ({"num_attention_heads": 0}, "config.json: ZeroDivisionError"),
])
def test_a_config_that_does_not_describe_the_weights_is_refused_before_allocating(trained, tmp_path, edit, error):
    """Also in runs whose manifest recorded only the weights' digest (older cbtm)."""
    src, _ = trained
    run = fresh(src, tmp_path)
    _legacy(run)
    expert = run / "experts" / "expert_000"
    sha = RunDir(run).expert_entries()[0]["sha256"]
    models.load_model(expert, sha256=sha)  # an older manifest's digest is still accepted
    _edit_json(expert / "config.json", **edit)
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=error):
            models.load_model(expert, sha256=sha)
        assert tracemalloc.get_traced_memory()[1] < 64 << 20
    finally:
        tracemalloc.stop()


def test_weights_that_do_not_fit_the_config_are_an_error_naming_them(trained, tmp_path):
    from safetensors.torch import load_file, save_file

    src, _ = trained
    expert = tmp_path / "expert"
    import shutil

    shutil.copytree(src / "experts" / "expert_000", expert)
    t = load_file(str(expert / "model.safetensors"))
    t["model.final_norm.weight"] = t.pop("model.norm.weight")  # same count, another name
    save_file(t, str(expert / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"the weights in {expert} do not fit .*config.json: missing keys "
                                         r"\['model.norm.weight'\]; unexpected keys \['model.final_norm.weight'\]"):
        models.load_model(expert)


def test_an_edited_or_garbage_tokenizer_is_named(trained, tmp_path):
    import shutil

    from cbtm import tokens

    src, _ = trained
    run = fresh(src, tmp_path)
    tokens.load_tokenizer(RunDir(run).tokenizer)
    vocab = json.loads((run / "tokenizer" / "tokenizer.json").read_text())
    vocab["model"]["vocab"] = {k: (1 - v if v < 2 else v) for k, v in vocab["model"]["vocab"].items()}  # swap 2 ids
    (run / "tokenizer" / "tokenizer.json").write_text(json.dumps(vocab))
    with pytest.raises(ValueError, match=f"tokenizer files in {run / 'tokenizer'} do not match the fingerprint"):
        tokens.load_tokenizer(RunDir(run).tokenizer)
    loose = tmp_path / "tok"
    shutil.copytree(src / "tokenizer", loose)
    for garbage in (b"\xff\xfe\x00garbage", b'{"model": {"type": "BPE", "vocab": 3}}'):
        (loose / "tokenizer.json").write_bytes(garbage)
        with pytest.raises(ValueError, match=f"cannot read the tokenizer in {loose}: "):
            tokens.load_tokenizer(loose)


def test_links_leading_outside_the_run_are_refused(trained, base_run, tmp_path):
    import shutil

    from cbtm.ensemble import Ensemble
    from cbtm.router import Router
    from cbtm.rundir import ManifestError

    src, _ = trained
    outside = tmp_path / "outside"
    outside.mkdir()
    run = fresh(src, tmp_path)
    km = run / "router" / "kmeans.safetensors"
    shutil.move(km, outside / km.name)
    km.symlink_to(outside / km.name)
    with pytest.raises(ManifestError, match="kmeans.safetensors is a link leading outside the run directory"):
        Router.load(run)
    with pytest.raises(ManifestError, match="link leading outside"):
        cluster.load_router(run)

    run = fresh(src, tmp_path, "run2")
    shutil.move(run / "tokenizer", outside / "tokenizer")
    (run / "tokenizer").symlink_to(outside / "tokenizer")
    with pytest.raises(ManifestError, match="tokenizer is a link leading outside"):
        Ensemble.load(run)

    class Killed(BaseException):
        pass

    def kill(info):
        if info["step"] == 5:
            raise Killed

    run = fresh(base_run, tmp_path, "run3")
    with pytest.raises(Killed):
        training.train_experts(run, 4096, experts=[0], vocab_size=512, callback=kill, **FAST)
    step = training.list_checkpoints(run / "checkpoints" / "expert_000")[-1]
    shutil.move(step, outside / step.name)
    step.symlink_to(outside / step.name)
    with pytest.raises(ManifestError, match=f"{step.name} is a link leading outside"):
        training.train_experts(run, 4096, experts=[0], vocab_size=512, **FAST)


def test_nan_in_the_router_or_embedder_is_named_at_load(trained, tmp_path):
    from safetensors.numpy import load_file, save_file

    from cbtm.router import Router

    src, _ = trained
    for name, array in (("kmeans", "cluster_centers"), ("embedder", "components")):
        run = fresh(src, tmp_path, name)
        path = run / "router" / f"{name}.safetensors"
        t = load_file(str(path))
        t[array][0, 0] = np.nan
        save_file(t, str(path))
        with pytest.raises(ValueError, match=f"{path}: .*NaN or Inf"):
            Router.load(run)


# ------------------------------------------------------------------------------------------------
# smaller silent cases


@pytest.mark.parametrize("seq_len", ["abc", 0, -3, 2.5, True])
def test_a_manifest_seq_len_must_be_a_positive_integer(trained, tmp_path, seq_len):
    from cbtm.rundir import ManifestError

    src, _ = trained
    run = fresh(src, tmp_path)
    m = json.loads((run / "cbtm.json").read_text())
    m["train"]["config"]["seq_len"] = seq_len
    (run / "cbtm.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="train.config.seq_len must be a positive integer"):
        RunDir(run).manifest()


def test_size_weights_need_a_size_for_every_expert(trained, tmp_path):
    from cbtm import experts, moe

    src, _ = trained
    run = fresh(src, tmp_path)
    m = json.loads((run / "cbtm.json").read_text())
    m["assignments"]["train_sizes"] = m["assignments"]["train_sizes"][:1]
    (run / "cbtm.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"train_sizes lists 1 clusters, not the clusters \[1\]"):
        experts.average(run, tmp_path / "avg", "sizes")
    with pytest.raises(ValueError, match=r"train_sizes lists 1 clusters"):
        moe.export_moe(run, tmp_path / "moe", progress=False)
    assert not (tmp_path / "avg").exists() and not (tmp_path / "moe").exists()


def test_export_moe_checks_its_output_before_working(trained, tmp_path, monkeypatch):
    from cbtm import moe

    src, _ = trained
    to = tmp_path / "taken"
    to.mkdir()
    (to / "notes.txt").write_text("mine")

    def never(*args, **kwargs):
        raise AssertionError("averaged the experts before checking --to")

    monkeypatch.setattr(moe, "average_experts", never)
    with pytest.raises(FileExistsError, match=f"refusing to replace {to}"):
        moe.export_moe(src, to, progress=False)
    assert (to / "notes.txt").read_text() == "mine"


def test_eval_prints_its_table_before_an_unwritable_report(trained, tmp_path, monkeypatch, capsys):
    import errno

    from cbtm import evaluate

    src, _ = trained

    def read_only(path, obj):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(evaluate, "atomic_write_json", read_only)
    assert main(["eval", f"k2={src}", "--max-docs", "2", "--top-k", "1"]) == 2
    out, err = capsys.readouterr()
    assert "| k2 |" in out
    assert f"cannot write the evaluation report to {src / 'reports' / 'eval.json'}: Permission denied" in err
    assert "--out" in err and "Traceback" not in err
