"""Stacked experts against their references: the grouped matmul against a float64 loop, and the stacked
forward (packed segments, KV-cache slots, prefill and decode in one call) against each expert's own
transformers forward, over Llama-family architectures, dtypes and awkward sizes."""

import pytest
import torch

from cbtm.stacked import KVPool, StackedExperts, grouped_linear, grouped_linear_ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("counts", [[3, 0, 5], [0, 0, 1], [7], [1, 2, 3, 4, 0, 13]])
@pytest.mark.parametrize("bias", [False, True])
def test_grouped_linear_equals_loop(counts, dtype, bias, rng):
    g = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
    K, d, o = len(counts), 17, 33
    x = torch.randn(sum(counts), d, generator=g).to(dtype)
    w = torch.randn(K, d, o, generator=g).to(dtype)
    b = torch.randn(K, o, generator=g).to(dtype) if bias else None
    offs = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
    want = grouped_linear_ref(x, w, counts, b)
    tol = 1e-4 if dtype == torch.float32 else 0.15
    for o_ in (offs, None):  # the grouped matmul and the per-group loop
        got = grouped_linear(x, w, counts, b, o_)
        assert got.shape == want.shape and got.dtype == dtype
        assert torch.allclose(got.double(), want, atol=tol, rtol=tol * 0.1)


def _experts(arch: str, k: int = 3, dtype=torch.float32, vocab: int = 97):
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    cls = {"llama": (LlamaConfig, LlamaForCausalLM), "llama-tied": (LlamaConfig, LlamaForCausalLM),
           "llama-bias": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
           "mistral": (MistralConfig, MistralForCausalLM)}[arch]
    kw = dict(vocab_size=vocab, hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=arch == "llama-tied")
    if arch == "llama-bias":
        kw.update(attention_bias=True, mlp_bias=True, head_dim=8)
    out = []
    for j in range(k):
        torch.manual_seed(j)
        m = cls[1](cls[0](**kw)).eval()
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(0, 0.25)
        out.append(m.to(dtype))
    return out


ARCHS = ["llama", "llama-tied", "llama-bias", "qwen2", "mistral"]


@pytest.mark.parametrize("arch", ARCHS)
def test_stacked_forward_without_cache_equals_each_expert(arch):
    models = _experts(arch)
    want = [m(input_ids=torch.arange(5, 16)[None] * 7 % 97).logits[0] for m in models]
    st = StackedExperts.build(models)
    assert st is not None
    ids = torch.arange(5, 16)[None] * 7 % 97
    # segments of different lengths and experts, one padded to the longest (experts sorted)
    seg = torch.cat([ids, ids, ids])
    lengths = torch.tensor([11, 4, 9])
    experts = torch.tensor([0, 1, 2])
    with torch.no_grad():
        h = st.forward(seg, experts, torch.zeros(3, dtype=torch.long), lengths)  # (24, d) packed
        got = st.logits(h, lengths.tolist())
    a = 0
    for j, n in enumerate(lengths.tolist()):
        assert torch.allclose(got[a:a + n], want[j][:n], atol=1e-5), (arch, j)
        a += n
    # the experts still run their own forward (their parameters are views of the stacked weights)
    assert torch.allclose(models[1](input_ids=ids).logits[0], want[1], atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "llama-tied", "qwen2"])
def test_cached_prefill_catch_up_and_decode_in_one_call(arch):
    """Pairs continue their KV slots: a decode row, a catch-up of 3 tokens and a fresh prefill share
    one call, and give the logits of one full forward at every position."""
    models = _experts(arch)
    ids = (torch.arange(40) * 13 + 5) % 97
    want = [m(input_ids=ids[None]).logits[0] for m in models]
    st = StackedExperts.build(models)
    pool = st.new_pool(64)
    slots = [pool.take() for _ in range(3)]
    with torch.no_grad():
        st.forward(torch.stack([ids[:20], ids[:20]]), torch.tensor([0, 1]), torch.tensor([0, 0]),
                   torch.tensor([20, 17]), torch.tensor(slots[:2]))
        batch = torch.zeros(3, 25, dtype=torch.long)
        batch[0, :1], batch[1, :3], batch[2, :25] = ids[20:21], ids[17:20], ids[:25]
        h = st.forward(batch, torch.tensor([0, 1, 2]), torch.tensor([20, 17, 0]), torch.tensor([1, 3, 25]),
                       torch.tensor(slots))
        got = st.logits(h, [1, 3, 25])
    assert torch.allclose(got[0], want[0][20], atol=1e-5)
    assert torch.allclose(got[1:4], want[1][17:20], atol=1e-5)
    assert torch.allclose(got[4:], want[2][:25], atol=1e-5)
    # the pool grew past its first length and slots keep their data when copied
    dst = pool.take()
    pool.copy(slots[2], dst, 25)
    assert torch.equal(pool.k[0][dst, :, :25], pool.k[0][slots[2], :, :25])


def test_half_precision_and_refusals():
    bf = StackedExperts.build(_experts("llama", dtype=torch.bfloat16))
    assert bf is not None and bf.dtype == torch.bfloat16
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt = [GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2)) for _ in range(2)]
    assert StackedExperts.build(gpt) is None  # not a Llama-family model
    mixed = _experts("llama", k=2) + _experts("qwen2", k=1)
    assert StackedExperts.build(mixed) is None  # configs differ
    pool = KVPool(1, 2, 4, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="context"):
        pool.reserve(9)
