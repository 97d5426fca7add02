"""Branch-Train-MiX on CPU with random tiny Llama experts: the Mixtral export (identical experts give
the single model's logits for every gate mode; a two-expert export round-trips through
save_pretrained / from_pretrained with the expected config, shapes and tensors), the MiX phase
(resume after a kill is bit-identical; router-only trains only the routers), evaluation of MoE
runs, and bad inputs."""

import json
import shutil
from itertools import islice

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

from cbtm import cluster, evaluate, models, moe, tokens, training  # noqa: E402
from cbtm.branch import average_experts  # noqa: E402
from cbtm.cli import main  # noqa: E402
from cbtm.corpus import default_corpus_path, read_documents  # noqa: E402
from cbtm.ensemble import Ensemble  # noqa: E402
from cbtm.rundir import RunDir, expert_name  # noqa: E402

D, LAYERS, MLP = 32, 2, 64  # random tiny experts: a few seconds per test
FAST = dict(seq_len=32, batch_size=4, eval_every=2, eval_tokens=256, ckpt_every=2, threads=1, progress=False)


@pytest.fixture(scope="module")
def clustered(tmp_path_factory):
    """Every 40th document of the embedded corpus, clustered (k=2), with a 512-token BPE."""
    root = tmp_path_factory.mktemp("moe")
    corpus = root / "slice.jsonl"
    with open(corpus, "w") as fh:
        for doc in islice(read_documents(default_corpus_path()), 0, None, 40):
            fh.write(json.dumps({"id": doc.id, "text": doc.text}) + "\n")
    run = root / "base"
    cluster.fit(str(corpus), run, k=2, n_components=16, seed=0, progress=False)
    cluster.assign(None, run, workers=1, progress=False)
    tokens.ensure_tokenizer(run, vocab_size=512, progress=False)
    return run


def llama(seed: int, **overrides) -> LlamaForCausalLM:
    settings = dict(vocab_size=512, hidden_size=D, intermediate_size=MLP, num_hidden_layers=LAYERS,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    tie_word_embeddings=True, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    config = LlamaConfig(**{**settings, **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()


def with_experts(clustered, tmp_path, experts, name="run"):
    """A copy of the clustered run whose experts are the given models (recorded as trained)."""
    run = tmp_path / name
    shutil.copytree(clustered, run)
    r = RunDir(run)
    entries = []
    for i, m in enumerate(experts):
        models.save(m, r.expert_dir(i))
        entries.append({"id": i, "cluster": i % 2, "path": f"experts/{expert_name(i)}", "status": "done",
                        "sha256": models.weights_digest(r.expert_dir(i))})
    r.set_experts(entries)
    return run


def ids(n=2, length=24):
    return torch.randint(1, 512, (n, length), generator=torch.Generator().manual_seed(1))  # (n, L)


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits  # (n, L, V)


@pytest.mark.parametrize("gate", moe.GATES)
def test_identical_experts_give_the_single_models_logits(clustered, tmp_path, gate):
    single = llama(0)
    run = with_experts(clustered, tmp_path, [llama(0), llama(0), llama(0)])
    out = moe.export_moe(run, tmp_path / "moe", experts_per_token=2, gate=gate, gate_docs=4, progress=False)
    mix = models.load_model(out)
    assert type(mix).__name__ == "MixtralForCausalLM"
    x = ids()
    assert (logits(mix, x) - logits(single, x)).abs().max() <= 1e-5
    rows = mix.model.layers[0].mlp.gate.weight  # (3, D): centred, unit length
    assert torch.allclose(rows.norm(dim=1), torch.ones(3), atol=1e-5)


def test_two_expert_export_round_trips(clustered, tmp_path):
    a, b = llama(1), llama(2)
    run = with_experts(clustered, tmp_path, [a, b])
    out = moe.export_moe(run, tmp_path / "moe", experts_per_token=1, gate="hidden", gate_docs=4, progress=False)
    assert out == tmp_path / "moe" / "experts" / "expert_000"
    mix = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)  # plain transformers, as it is
    c = mix.config
    assert (c.model_type, c.num_local_experts, c.num_experts_per_tok) == ("mixtral", 2, 1)
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size) == (D, MLP, LAYERS, 512)
    assert c.rope_parameters["rope_theta"] == a.config.rope_parameters["rope_theta"]
    sizes = RunDir(run).section("assignments")["train_sizes"]
    reference = average_experts([run / "experts" / "expert_000", run / "experts" / "expert_001"], sizes)
    sd, ref = mix.state_dict(), reference.state_dict()
    for name in ("model.embed_tokens.weight", "model.layers.1.self_attn.k_proj.weight", "model.norm.weight",
                 "model.layers.0.post_attention_layernorm.weight"):
        assert torch.equal(sd[name], ref[name]), name
    for i in range(LAYERS):
        pre = f"model.layers.{i}.mlp."
        assert sd[pre + "gate.weight"].shape == (2, D)
        assert sd[pre + "experts.gate_up_proj"].shape == (2, 2 * MLP, D)
        assert sd[pre + "experts.down_proj"].shape == (2, D, MLP)
        for e, m in enumerate((a, b)):
            mlp = m.model.layers[i].mlp
            gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])  # (2 * MLP, D)
            assert torch.equal(sd[pre + "experts.gate_up_proj"][e], gate_up)
            assert torch.equal(sd[pre + "experts.down_proj"][e], mlp.down_proj.weight)
    # the file holds Mixtral's standard per-expert names (what vLLM reads), and saving again round-trips
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "model.layers.0.block_sparse_moe.experts.1.w2.weight" in set(f.keys())
    mix.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "again"), local_files_only=True)
    x = ids()
    assert torch.equal(logits(mix, x), logits(again, x))
    assert mix.generate(x[:1, :4], max_new_tokens=5, do_sample=False).shape == (1, 9)
    info = RunDir(tmp_path / "moe").section("moe")
    assert info["seq_len"] is None  # the source run records no training length
    per_expert = 3 * D * MLP * LAYERS
    assert info["params"] == models.num_params(mix) and info["active_params"] == info["params"] - per_expert
    assert info["weights"] == pytest.approx([s / sum(sizes) for s in sizes])


def test_hidden_routers_prefer_their_clusters_documents(clustered, tmp_path):
    """Layer 0 sees the same hidden states in the MoE as in the averaged model: each router row
    (the centred cluster mean) scores its own cluster's sample tokens higher on average."""
    run = with_experts(clustered, tmp_path, [llama(1), llama(2)])
    out = moe.export_moe(run, tmp_path / "moe", gate="hidden", gate_docs=4, progress=False)
    mix = models.load_model(out)
    samples = moe._samples(RunDir(run), [0, 1], 4, tokens.load_tokenizer(run / "tokenizer"))
    gap = []
    for c in (0, 1):
        with torch.no_grad():
            r = [mix(input_ids=x[None], output_router_logits=True).router_logits[0] for x in samples[c]]
        r = torch.cat(r)  # (tokens, 2)
        gap.append(float((r[:, 0] - r[:, 1]).mean()))
    assert gap[0] > gap[1]


def test_mix_resume_after_kill_is_bit_identical(clustered, tmp_path):
    run = with_experts(clustered, tmp_path, [llama(1), llama(2)])
    moe.export_moe(run, tmp_path / "moe", gate="random", progress=False)
    kw = dict(FAST, aux_loss_coef=0.01)
    ref = moe.train_moe(tmp_path / "moe", tmp_path / "ref", 768, **kw)  # 6 steps of 128 tokens
    assert ref["n_steps"] == 6 and ref["tokens_trained"] == 768

    class Killed(BaseException):
        pass

    def kill_at_step_3(info):
        if info["step"] == 3:
            raise Killed

    with pytest.raises(Killed):
        moe.train_moe(tmp_path / "moe", tmp_path / "mix", 768, callback=kill_at_step_3, **kw)
    assert [p.name for p in training.list_checkpoints(tmp_path / "mix" / "checkpoints" / "expert_000")] == \
        ["step_00000002"]
    log = moe.train_moe(tmp_path / "moe", tmp_path / "mix", 768, **kw)  # the same call again
    assert log["resumed_from_step"] == 2
    a = models.load_model(tmp_path / "ref" / "experts" / "expert_000").state_dict()
    b = models.load_model(tmp_path / "mix" / "experts" / "expert_000").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [v["valid_loss"] for v in log["valid"]] == [v["valid_loss"] for v in ref["valid"]]
    seed = models.load_model(tmp_path / "moe" / "experts" / "expert_000").state_dict()
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], seed["model.layers.0.self_attn.q_proj.weight"])
    m = RunDir(tmp_path / "mix").manifest()
    assert m["experts"][0]["status"] == "done" and m["mix"]["router_only"] is False
    # another setting in the same run is refused
    with pytest.raises(ValueError, match="other settings"):
        moe.train_moe(tmp_path / "moe", tmp_path / "mix", 768, **{**kw, "aux_loss_coef": 0.5})


def test_training_loss_adds_the_load_balancing_loss(clustered, tmp_path):
    from cbtm.training.mix import MixTrainer

    run = with_experts(clustered, tmp_path, [llama(1), llama(2)])
    mix = models.load_model(moe.export_moe(run, tmp_path / "moe", gate="random", progress=False))
    rows = [r.numpy() for r in ids(3, 16)]
    cfg = training.TrainConfig(seq_len=16, lr=1e-3)
    plain, aux = training.Trainer(mix, cfg, 1), MixTrainer(mix, cfg, 1, aux_loss_coef=0.5)
    x = torch.from_numpy(np.stack(rows))
    with torch.no_grad():
        reference = mix(input_ids=x, output_router_logits=True).aux_loss  # transformers' own
        loss, with_aux = plain._loss_sum(plain.net, rows), aux._loss_sum(aux.net, rows)
        assert float(with_aux - loss) == pytest.approx(0.5 * float(reference) * 3 * 15, rel=1e-5)
        mix.eval()
        assert torch.equal(aux._loss_sum(aux.net, rows), plain._loss_sum(plain.net, rows))  # validation: plain


def test_router_only_trains_only_the_routers_and_eval_reads_moe_runs(clustered, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the mixture's PyTorch path (the interpreter takes minutes)
    run = with_experts(clustered, tmp_path, [llama(1), llama(1)])
    RunDir(run).update(train={"config": {"seq_len": 24}})
    moe.export_moe(run, tmp_path / "moe", gate="random", progress=False)
    # the MoE is scored in windows of the length its experts were trained on, as its source run is
    assert Ensemble.load(tmp_path / "moe", kind="uniform").context == Ensemble.load(run).context == 24
    moe.train_moe(tmp_path / "moe", tmp_path / "mix", 256, router_only=True, **FAST)
    before = models.load_model(tmp_path / "moe" / "experts" / "expert_000").state_dict()
    after = models.load_model(tmp_path / "mix" / "experts" / "expert_000").state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"model.layers.{i}.mlp.gate.weight" for i in range(LAYERS)}
    # identical experts: the ensemble, the MoE and the MiX-trained MoE score the same (routing is moot);
    # texts within one window of the shortest trained sequence length (the MiX run's 32 tokens)
    tok = tokens.load_tokenizer(RunDir(run).tokenizer)
    texts = [tok.decode(tok(t, add_special_tokens=False)["input_ids"][:24])
             for _, t in evaluate.validation_documents(run, limit=2)]
    runs = (run, tmp_path / "moe", tmp_path / "mix")
    ppl = [evaluate.evaluate_run(r, texts, ["all"])["perplexity"]["all"] for r in runs]
    assert np.allclose(ppl, ppl[0], rtol=1e-4)


def test_bad_inputs(clustered, tmp_path, capsys):
    run = with_experts(clustered, tmp_path, [llama(1), llama(2, intermediate_size=2 * MLP)])
    with pytest.raises(ValueError, match="do not share an architecture.*intermediate_size"):
        moe.export_moe(run, tmp_path / "moe", progress=False)
    run = with_experts(clustered, tmp_path, [llama(1), llama(2, rope_theta=500.0)], name="rope")
    assert main(["merge", "export-moe", "--run", str(run), "--to", str(tmp_path / "moe")]) == 2
    assert "do not share an architecture" in capsys.readouterr().err
    run = with_experts(clustered, tmp_path, [llama(1), llama(2)], name="ok")
    assert main(["merge", "export-moe", "--run", str(run), "--to", str(run / "moe")]) == 2
    assert "inside (or contains) the run directory" in capsys.readouterr().err
    to = str(tmp_path / "m")
    assert main(["merge", "export-moe", "--run", str(run), "--to", to, "--experts-per-token", "3"]) == 2
    assert "--experts-per-token must be between 1 and the 2 experts" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert main(["merge", "export-moe", "--run", str(run), "--to", str(tmp_path / "mine"), "--gate", "random"]) == 2
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert main(["train", "--moe", str(run), "--run", str(tmp_path / "mix"), "--total-tokens", "1k"]) == 2
    assert "describes no MoE" in capsys.readouterr().err
    assert main(["train", "--run", str(run), "--total-tokens", "1k", "--router-only"]) == 2
    assert "--router-only needs --moe" in capsys.readouterr().err
