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

from cbtm import training  # noqa: E402
from cbtm.cli import main  # noqa: E402
from cbtm.rundir import RunDir  # noqa: E402


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
