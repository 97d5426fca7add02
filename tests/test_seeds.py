"""Real users' seeds: small random-weight checkpoints of the architectures users branch from (GPT-2,
OPT, GPT-NeoX, Llama, Qwen2, Gemma; tied and untied embeddings; float16 / bfloat16; a vocabulary
padded past the tokenizer's; tokenizers without BOS or pad; a ``.bin``-only checkpoint), each as a
plain ``save_pretrained`` directory with its tokenizer, taken through cluster -> train ->
dense --like -> eval -> both decoders -> merge average -> reload in plain transformers."""

import json
import re
import shutil
from itertools import islice
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from cbtm import cluster  # noqa: E402
from cbtm.cli import main  # noqa: E402
from cbtm.corpus import default_corpus_path, read_documents  # noqa: E402
from cbtm.rundir import RunDir  # noqa: E402

TOKENIZER_SIZE = 1024
PADDED_VOCAB = 1088  # a model vocabulary past the tokenizer's (the way real checkpoints round it up)
TINY = dict(hidden=32, layers=1, heads=2, mlp=64, context=128)

# tokenizer styles: special tokens, and which of them are EOS / BOS (None: the tokenizer has none)
TOKENIZERS = {
    "gpt2": (["<|endoftext|>"], "<|endoftext|>", "<|endoftext|>"),    # BOS = EOS, no pad (GPT-2, Pythia)
    "llama": (["<unk>", "<s>", "</s>"], "</s>", "<s>"),              # BOS != EOS, no pad (Llama, Gemma, OPT)
    "qwen2": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|endoftext|>", None),  # no BOS, no pad
}


def corpus_texts(n: int = 240, step: int = 37) -> list[dict]:
    """Every ``step``-th document of the embedded corpus (``n`` of them), as JSON records."""
    return [{"id": d.id, "text": d.text, **d.meta} for d in islice(read_documents(default_corpus_path()), 0, None, step)][:n]


def make_tokenizer(out: Path, style: str, texts: list[str], size: int = TOKENIZER_SIZE):
    """A byte-level BPE of ``size`` tokens trained on ``texts``, with ``style``'s special tokens,
    saved as a transformers tokenizer; none has a pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials, eos, bos = TOKENIZERS[style]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=size, special_tokens=specials, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    assert tok.get_vocab_size() == size
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=bos,
                                   unk_token="<unk>" if "<unk>" in specials else None)
    fast.save_pretrained(out)
    return fast


def seed_config(arch: str, tokenizer, vocab: int, tied: bool):
    """A tiny config of ``arch`` for ``tokenizer`` with ``vocab`` embedding rows, without dropout (so a
    training step's loss is a function of the weights)."""
    from transformers import (GemmaConfig, GPT2Config, GPTNeoXConfig, LlamaConfig, OPTConfig, Qwen2Config)

    d, layers, heads, mlp, ctx = (TINY[k] for k in ("hidden", "layers", "heads", "mlp", "context"))
    ids = dict(eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=tied)
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=d, n_layer=layers, n_head=heads, n_inner=mlp, n_positions=ctx,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
    if arch == "opt":
        return OPTConfig(vocab_size=vocab, hidden_size=d, word_embed_proj_dim=d, num_hidden_layers=layers,
                         num_attention_heads=heads, ffn_dim=mlp, max_position_embeddings=ctx, pad_token_id=None,
                         dropout=0.0, attention_dropout=0.0, **ids)
    if arch == "gpt_neox":
        return GPTNeoXConfig(vocab_size=vocab, hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                             intermediate_size=mlp, max_position_embeddings=ctx, **ids)
    llama_like = dict(vocab_size=vocab, hidden_size=d, intermediate_size=mlp, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=1, max_position_embeddings=ctx, **ids)
    if arch == "llama":
        return LlamaConfig(**llama_like)
    if arch == "qwen2":
        return Qwen2Config(**llama_like)
    if arch == "gemma":
        return GemmaConfig(head_dim=d // heads, **llama_like)
    raise ValueError(arch)


def make_seed(out: Path, arch: str, texts: list[str], *, tokenizer: str = "gpt2", tied: bool = True,
              dtype: torch.dtype = torch.float32, vocab: int = TOKENIZER_SIZE, bin_only: bool = False,
              seed: int = 0) -> Path:
    """A random-weight ``arch`` checkpoint with its tokenizer in ``out``, as ``save_pretrained`` writes
    it (``bin_only``: the weights as ``pytorch_model.bin`` instead, as older revisions ship them)."""
    tok = make_tokenizer(out, tokenizer, texts)
    config = seed_config(arch, tok, vocab, tied)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(out)
    if bin_only:
        torch.save(model.state_dict(), out / "pytorch_model.bin")
        for f in out.glob("*.safetensors"):
            f.unlink()
    return out


# tiny jobs: 32-token rows, 4 per step; T = 512 gives each of 2 experts 2 steps, the dense model 4
TRAIN = ["--total-tokens", "512", "--seq-len", "32", "--batch-size", "4", "--eval-every", "0", "--eval-tokens", "256",
         "--threads", "1", "--quiet"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    """A 240-document slice of the embedded corpus as a JSON-lines file, and its texts."""
    docs = corpus_texts()
    path = tmp_path_factory.mktemp("corpus") / "slice.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path, [d["text"] for d in docs]


@pytest.fixture(scope="module")
def clustered(corpus, tmp_path_factory) -> Path:
    """The slice clustered (k=2), no tokenizer or experts yet."""
    run = tmp_path_factory.mktemp("clustered") / "run"
    cluster.fit(str(corpus[0]), run, k=2, n_components=16, seed=0, progress=False)
    cluster.assign(None, run, workers=1, progress=False)
    return run


def fresh(clustered: Path, tmp_path: Path, name: str = "run") -> Path:
    out = tmp_path / name
    shutil.copytree(clustered, out)
    return out


def test_pickled_seed_is_refused_with_how_to_convert_and_nothing_recorded(corpus, clustered, tmp_path, capsys,
                                                                          monkeypatch):
    seed = make_seed(tmp_path / "opt-bin", "opt", corpus[1], tokenizer="llama", dtype=torch.float16, bin_only=True)
    run = fresh(clustered, tmp_path)
    before = RunDir(run).manifest()
    with monkeypatch.context() as m:  # training never unpickles anything
        m.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
        assert main(["train", "--run", str(run), "--seed-model", str(seed), *TRAIN]) == 2
    err = capsys.readouterr().err
    assert "pytorch_model.bin" in err and "can run code" in err and f"cbtm convert {seed}" in err
    assert RunDir(run).manifest() == before  # no seed recorded as done, no expert pending or failed
    assert main(["merge", "add", "--run", str(run), "--expert", str(seed), "--docs", str(corpus[0])]) == 2
    assert f"cbtm convert {seed}" in capsys.readouterr().err and not (run / "experts").exists()

    # the explicit conversion: the same tensors and dtypes, as safetensors; then the seed trains
    converted = tmp_path / "opt-converted"
    assert main(["convert", str(seed), "--to", str(converted)]) == 0
    assert "weights_only=True" in capsys.readouterr().out
    assert not list(converted.glob("*.bin")) and (converted / "model.safetensors").is_file()
    assert (converted / "tokenizer.json").read_bytes() == (seed / "tokenizer.json").read_bytes()
    want = torch.load(seed / "pytorch_model.bin", weights_only=True)
    got = AutoModelForCausalLM.from_pretrained(converted, local_files_only=True, trust_remote_code=False,
                                               dtype="auto").state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert main(["train", "--run", str(run), "--seed-model", str(converted), *TRAIN]) == 0
    m = RunDir(run).manifest()
    assert m["seed"]["status"] == "done" and [e["status"] for e in m["experts"]] == ["done", "done"]


def test_convert_sharded_checkpoints_and_bad_input(corpus, tmp_path, capsys):
    seed = make_seed(tmp_path / "neox", "gpt_neox", corpus[1], tied=False, bin_only=True)
    state = torch.load(seed / "pytorch_model.bin", weights_only=True)
    (seed / "pytorch_model.bin").unlink()
    keys = list(state)
    shards = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    for name, ks in shards.items():
        torch.save({k: state[k] for k in ks}, seed / name)
    (seed / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: name for name, ks in shards.items() for k in ks}}))
    out = tmp_path / "converted"
    assert main(["convert", str(seed), "--to", str(out)]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    got = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, trust_remote_code=False).state_dict()
    assert all(torch.equal(got[k], state[k]) for k in state)
    # nothing to convert, a directory that is not a model, a pickle holding more than tensors
    capsys.readouterr()
    assert main(["convert", str(out), "--to", str(tmp_path / "again")]) == 2
    assert "already holds safetensors" in capsys.readouterr().err
    assert main(["convert", str(tmp_path), "--to", str(tmp_path / "x")]) == 2
    assert "no config.json" in capsys.readouterr().err
    evil = tmp_path / "evil"
    shutil.copytree(seed, evil, ignore=shutil.ignore_patterns("*.bin", "*.index.json"))
    torch.save({"w": torch.zeros(2), "x": print}, evil / "pytorch_model.bin")
    assert main(["convert", str(evil), "--to", str(tmp_path / "y")]) == 2
    assert "weights_only=True" in capsys.readouterr().err and not (tmp_path / "y").exists()


def dtypes(path: Path, pattern: str = "*.safetensors") -> set:
    """The dtypes of the tensors in a directory's safetensors files."""
    from safetensors import safe_open

    out = set()
    for f in path.glob(pattern):
        with safe_open(str(f), framework="pt") as fh:
            out |= {fh.get_slice(k).get_dtype() for k in fh.keys()}
    return out


def test_half_precision_seeds_give_experts_averages_and_moes_of_their_dtype(corpus, clustered, tmp_path):
    seed = make_seed(tmp_path / "llama-bf16", "llama", corpus[1], tokenizer="llama", dtype=torch.bfloat16)
    run = fresh(clustered, tmp_path)
    assert main(["train", "--run", str(run), "--seed-model", str(seed), "--ckpt-every", "1", *TRAIN]) == 0
    for e in ("expert_000", "expert_001"):
        d = run / "experts" / e
        assert dtypes(d) == {"BF16"} and json.loads((d / "config.json").read_text())["dtype"] == "bfloat16"
        assert (d / "model.safetensors").stat().st_size < 1.2 * (seed / "model.safetensors").stat().st_size
    # training keeps float32 master weights: the checkpoint after step 1 holds them
    assert dtypes(run / "checkpoints" / "expert_000" / "step_00000001", "model.safetensors") == {"F32"}
    assert main(["merge", "average", "--run", str(run), "--to", str(tmp_path / "avg")]) == 0
    avg = AutoModelForCausalLM.from_pretrained(tmp_path / "avg", local_files_only=True, trust_remote_code=False,
                                               dtype="auto")
    assert avg.dtype == torch.bfloat16 and dtypes(tmp_path / "avg") == {"BF16"}
    assert main(["merge", "export-moe", "--run", str(run), "--to", str(tmp_path / "moe"), "--gate-docs", "2"]) == 0
    mix = tmp_path / "moe" / "experts" / "expert_000"
    assert dtypes(mix) == {"BF16"} and AutoConfig.from_pretrained(mix).dtype == torch.bfloat16
    # --save-dtype overrides, everywhere
    assert main(["merge", "average", "--run", str(run), "--to", str(tmp_path / "avg32"), "--save-dtype", "float32"]) == 0
    assert dtypes(tmp_path / "avg32") == {"F32"}
    run32 = fresh(clustered, tmp_path, "run32")
    assert main(["train", "--run", str(run32), "--seed-model", str(seed), "--save-dtype", "float32", *TRAIN]) == 0
    assert dtypes(run32 / "experts" / "expert_000") == {"F32"}
    with pytest.raises(SystemExit):
        main(["train", "--run", str(run32), "--save-dtype", "float8", *TRAIN])


# ------------------------------------------------------------------------------------------------
# every architecture through the whole pipeline

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
CASES = {  # name -> make_seed arguments (and the seed phase the run starts with)
    "gpt2": dict(arch="gpt2", tokenizer="gpt2", seed_tokens=256),
    "opt-fp16": dict(arch="opt", tokenizer="llama", dtype=F16),
    "neox-untied-bf16": dict(arch="gpt_neox", tokenizer="gpt2", tied=False, dtype=BF16),
    "llama-untied-padded-bf16": dict(arch="llama", tokenizer="llama", tied=False, dtype=BF16, vocab=PADDED_VOCAB),
    "qwen2-nobos-bf16": dict(arch="qwen2", tokenizer="qwen2", dtype=BF16),
    "gemma-padded-fp16": dict(arch="gemma", tokenizer="llama", dtype=F16, vocab=PADDED_VOCAB),
}
DENSE = ["--total-tokens", "512", "--eval-every", "0", "--threads", "1", "--quiet"]  # the README's command


@pytest.fixture(scope="module")
def pipeline(corpus, clustered, tmp_path_factory):
    """case -> its directories after seed -> train -> dense --like -> eval -> merge average (built once)."""
    built = {}

    def get(case: str) -> dict:
        if case not in built:
            spec = dict(CASES[case])
            seed_tokens = spec.pop("seed_tokens", 0)
            root = tmp_path_factory.mktemp(case)
            seed = make_seed(root / "seed", texts=corpus[1], **spec)
            run, dense = fresh(clustered, root), root / "dense"
            assert main(["train", "--run", str(run), "--seed-model", str(seed), "--seed-tokens", str(seed_tokens),
                         *TRAIN]) == 0
            assert main(["train", "--dense", "--like", str(run), "--run", str(dense), *DENSE]) == 0
            assert main(["eval", f"cbtm={run}", f"dense={dense}", "--max-docs", "3", "--top-k", "1,all"]) == 0
            assert main(["merge", "average", "--run", str(run), "--to", str(root / "average")]) == 0
            built[case] = dict(seed=seed, run=run, dense=dense, average=root / "average",
                               dtype=spec.get("dtype", F32), vocab=spec.get("vocab", TOKENIZER_SIZE))
        return built[case]

    return get


def own_loss(model, rows: list) -> float:
    """The model's own mean next-token loss (transformers' ``labels``) over equal-length rows."""
    x = torch.from_numpy(torch.stack([torch.as_tensor(r.astype("int64")) for r in rows]).numpy())
    with torch.no_grad():
        return float(model(input_ids=x, labels=x).loss)


@pytest.mark.parametrize("case", list(CASES))
def test_every_architecture_trains_compute_matched_and_merges(pipeline, case):
    from cbtm import models, tokens
    from cbtm.training import TrainConfig

    p = pipeline(case)
    run, dense = RunDir(p["run"]), RunDir(p["dense"])
    m, d = run.manifest(), dense.manifest()
    assert [e["status"] for e in m["experts"]] == ["done", "done"] and d["experts"][0]["status"] == "done"
    # the dense baseline took the seed, seed phase, tokenizer and schedule of the run it is --like
    assert d["train"]["seed_model"] == m["train"]["seed_model"] == str(p["seed"].resolve())
    assert d["train"]["seed_tokens"] == m["train"]["seed_tokens"]
    assert TrainConfig(**d["train"]["config"]).trained_fields() == TrainConfig(**m["train"]["config"]).trained_fields()
    assert d["train"]["config"]["seq_len"] == 32 and d["experts"][0]["tokens_trained"] == 512
    assert d["tokenizer"] == m["tokenizer"]
    # saved in the seed's dtype, with its vocabulary
    for path in (run.expert_dir(0), run.expert_dir(1), dense.expert_dir(0), p["average"]):
        assert models.stored_dtype(path) == str(p["dtype"]).removeprefix("torch."), path
        assert models.load_config(path).vocab_size == p["vocab"]
    # the logged step-1 loss is the initial model's own loss on the step's rows
    log = json.loads((run.path / "logs" / "expert_000.json").read_text())
    init = models.load_model(run.path / log["spec"]["init"]["path"])  # the seed phase's output, or the seed model
    cfg = TrainConfig(**log["spec"]["config"])
    stream = tokens.BlockStream(tokens.load_tokens(run, 0, "train"), cfg.seq_len, cfg.seed, log["spec"]["key"])
    assert log["history"][0]["step"] == 1
    assert log["history"][0]["loss"] == pytest.approx(own_loss(init, [stream.row(r) for r in range(4)]), abs=1e-6)
    # evaluation: finite perplexities of both runs
    report = json.loads((run.path / "reports" / "eval.json").read_text())
    ppl = [v for r in report["runs"].values() for v in r["perplexity"].values()]
    assert len(ppl) >= 3 and all(1 < v < 10 * p["vocab"] for v in ppl)
    # the average reloads in plain transformers, with the run's tokenizer, in the seed's dtype
    avg = AutoModelForCausalLM.from_pretrained(p["average"], local_files_only=True, trust_remote_code=False, dtype="auto")
    tok = AutoTokenizer.from_pretrained(p["average"], local_files_only=True, trust_remote_code=False)
    assert avg.dtype == p["dtype"] and len(tok) == TOKENIZER_SIZE
    ids = tok("And the king said", return_tensors="pt", add_special_tokens=False)["input_ids"]
    assert torch.isfinite(avg(input_ids=ids).logits).all()
    experts = [models.load_model(run.expert_dir(i)).state_dict() for i in (0, 1)]
    for name, t in avg.state_dict().items():
        assert torch.equal(t, ((experts[0][name] + experts[1][name]) / 2).to(t.dtype)), name


@pytest.mark.parametrize("case", list(CASES))
def test_ensemble_generate(pipeline, case):
    from cbtm import Ensemble

    ens = Ensemble.load(pipeline(case)["run"], top_k=1)
    out = ens.generate(["And the king said", "def main():"], max_new_tokens=6, greedy=True)
    assert len(out) == 2 and all(isinstance(t, str) for t in out)


@pytest.mark.parametrize("case", list(CASES))
def test_both_decoders_agree(pipeline, case):
    """EnsembleForCausalLM's log-probs of a text are Ensemble.score's, and its greedy decoding is
    Ensemble.generate's."""
    from cbtm import Ensemble, EnsembleForCausalLM

    run = pipeline(case)["run"]
    ens = Ensemble.load(run, top_k=1)
    model = EnsembleForCausalLM.from_run(run, top_k=1)
    tok = model.tokenizer
    text = "And the king said unto them, Go"
    want = ens.score([text])[0]  # (n,): every token given the text before it
    ids = tok(text, return_tensors="pt")["input_ids"]  # (1, L)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]  # (L, V): the mixture's next-token log-probs
    n = len(want)
    assert ids.shape[1] == n + 1  # the text's tokens after one start token
    assert torch.allclose(logits[:-1].gather(-1, ids[0, 1:, None])[:, 0], want, atol=1e-4)
    prompts = ["And the king said", "def main():"]
    batch = tok(prompts, return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=6, do_sample=False)
    assert tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True) == \
        ens.generate(prompts, max_new_tokens=6, greedy=True)


def test_a_dense_run_loads_as_a_one_expert_ensemble(pipeline):
    from cbtm import Ensemble, models

    p = pipeline("opt-fp16")
    ens = Ensemble.load(p["dense"])
    text = "And the king said unto them"
    got = ens.score([text])[0]
    model = models.load_model(RunDir(p["dense"]).expert_dir(0))
    ids = ens.tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([[ens.bos] + ids[:-1]])).logits[0].float(), -1)
    assert torch.allclose(got, logp[torch.arange(len(ids)), torch.tensor(ids)], atol=1e-5)


def test_like_refuses_flags_that_break_compute_matching(pipeline, tmp_path, capsys):
    run = pipeline("gpt2")["run"]
    for flags, named in ((["--seq-len", "64"], "--seq-len 64 differs from .*: 32"),
                         (["--lr", "0.1"], "--lr 0.1 differs from .*: 0.0002"),
                         (["--model-size", "small"], "--model-size small differs from .*--seed-model"),
                         (["--seed-tokens", "0"], "--seed-tokens 0 differs from .*: 256"),
                         (["--seed-model", str(tmp_path)], f"--seed-model {tmp_path} differs"),
                         (["--vocab-size", "512"], "--vocab-size 512 differs from .*the seed model's, 1024 tokens")):
        capsys.readouterr()
        assert main(["train", "--dense", "--like", str(run), "--run", str(tmp_path / "dense"), *DENSE, *flags]) == 2
        err = capsys.readouterr().err
        assert re.search(named, err), err
        assert not (tmp_path / "dense" / "experts").exists()
    # the same values as the run's are fine (and other settings, such as evaluation, are free)
    assert main(["train", "--dense", "--like", str(run), "--run", str(tmp_path / "dense"), *DENSE,
                 "--seq-len", "32", "--seed-tokens", "256", "--eval-tokens", "128"]) == 0
