"""The batched generation engine against its plain per-row reference (engine.generate_ref): the same
greedy tokens and mixture log-probs, for every routing kind and top-k, on the stacked and the generic
expert paths, whatever else is in the batch."""

import shutil

import numpy as np
import pytest
import torch

from cbtm.engine import Engine, SamplingParams, generate_ref
from cbtm.ensemble import Ensemble
from cbtm.rundir import RunDir
from test_ensemble import K, run, texts, torch_mixture  # noqa: F401  (fixtures)

PROMPTS = ["And the king said", "Once", "The function returns the", "", "In the beginning God created the heaven"]


@pytest.fixture(scope="module")
def llama_run(run, tmp_path_factory):
    """The `run` fixture's router and tokenizer with K random (peaked, distinct) Llama experts: the
    stacked path. The experts' vocabulary is padded past the tokenizer's (as OPT, Pythia, Qwen2 do)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("llama") / "run"
    shutil.copytree(run, path, ignore=shutil.ignore_patterns("experts"))
    n = len(AutoTokenizer.from_pretrained(path / "tokenizer"))
    for j in range(K):
        torch.manual_seed(100 + j)
        cfg = LlamaConfig(vocab_size=n + 21, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=48,
                          tie_word_embeddings=False, initializer_range=0.5)
        LlamaForCausalLM(cfg).save_pretrained(path / f"experts/expert_{j:03d}")
    return path


def _params(n=16, **kw):
    return SamplingParams(max_new_tokens=n, temperature=0, **kw)


@pytest.mark.parametrize("which", ["run", "llama_run"])
@pytest.mark.parametrize("top_k", [1, 2, None])
def test_greedy_equals_reference(request, which, top_k):
    path = request.getfixturevalue(which)
    ens = Ensemble.load(path, top_k=top_k)
    want_lp, got_lp = [], []
    want = generate_ref(ens, PROMPTS, [_params()] * len(PROMPTS), want_lp)
    engine = Engine(ens)
    seqs = engine.generate(PROMPTS, [_params(logprobs=0)] * len(PROMPTS))
    assert [s.text for s in seqs] == want
    assert (ens.stacked() is not None) == (which == "llama_run")
