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
    buf = torch.full((sum(counts) + 3, o), float("nan"), dtype=dtype)
    for o_, out in ((offs, None), (None, None), (None, buf[2:-1])):  # grouped matmul, per-group loop, into out
        got = grouped_linear(x, w, counts, b, o_, out)
        assert got.shape == want.shape and got.dtype == dtype
        assert torch.allclose(got.double(), want, atol=tol, rtol=tol * 0.1)
    assert got.data_ptr() == buf[2].data_ptr() and buf[:2].isnan().all() and buf[-1].isnan().all()


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


@pytest.fixture(params=["scratch", "fresh"])
def scratch(request, monkeypatch):
    """Every in-layer product in reused per-thread buffers (the CPU path of large products), or none."""
    import cbtm.stacked as stacked_module

    monkeypatch.setattr(stacked_module, "SCRATCH_BYTES", 0 if request.param == "scratch" else 1 << 62)
    return request.param


@pytest.mark.parametrize("arch", ARCHS)
def test_stacked_forward_without_cache_equals_each_expert(arch, scratch):
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
    # keep: only some rows' hidden states (the others are context; the last layer skips their MLP)
    keep = torch.tensor([0, 3, 10, 11, 14, 23])
    with torch.no_grad():
        kept = st.forward(seg, experts, torch.zeros(3, dtype=torch.long), lengths, keep=keep)
    assert kept.shape == (6, h.shape[1]) and torch.allclose(kept, h[keep], atol=1e-5)
    # the experts still run their own forward (their parameters are views of the stacked weights)
    assert torch.allclose(models[1](input_ids=ids).logits[0], want[1], atol=1e-6)


@pytest.mark.parametrize("block_rows", [1, 4, 7])
def test_mlp_row_blocks_across_experts_equal_each_expert(block_rows, scratch, monkeypatch):
    """The gated MLP in row blocks (blocks that start and end inside an expert's rows and span two):
    the same hidden states as each expert's own forward, without and with autograd."""
    import cbtm.stacked as stacked_module

    models = _experts("llama")
    ids = torch.arange(5, 16)[None] * 7 % 97
    want = [m(input_ids=ids).logits[0] for m in models]
    st = StackedExperts.build(models)
    seg, lengths = torch.cat([ids, ids, ids]), torch.tensor([11, 4, 9])
    args = (seg, torch.tensor([0, 1, 2]), torch.zeros(3, dtype=torch.long), lengths)
    width = st.layers[0]["gate_up"].shape[2]
    monkeypatch.setattr(stacked_module, "MLP_BLOCK_BYTES", block_rows * width * 4)
    calls = []
    monkeypatch.setattr(st, "act", lambda t: calls.append(len(t)) or torch.nn.functional.silu(t))
    with torch.no_grad():
        got = st.logits(st.forward(*args), lengths.tolist())
    assert max(calls) == min(block_rows, 24) and sum(calls) == 24 * len(st.layers)
    a = 0
    for j, n in enumerate(lengths.tolist()):
        assert torch.allclose(got[a:a + n], want[j][:n], atol=1e-5), j
        a += n
    w = st.layers[0]["gate_up"].requires_grad_(True)  # autograd: the blocks are concatenated, not added in place
    st.logits(st.forward(*args), lengths.tolist()).square().sum().backward()
    blocked, w.grad = w.grad, None
    monkeypatch.setattr(stacked_module, "MLP_BLOCK_BYTES", 1 << 40)
    st.logits(st.forward(*args), lengths.tolist()).square().sum().backward()
    assert blocked is not None and torch.allclose(blocked, w.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows_per_chunk", [1, 5, 1000])
def test_target_logprobs_equal_each_experts_log_softmax(rows_per_chunk, scratch, monkeypatch):
    """Log-probs at the targets from rows grouped by expert (an empty expert among them), in chunks that
    cut across experts, against each expert's own float64 log-softmax."""
    from cbtm import stacked as stacked_module

    models = _experts("llama", k=4)
    st = StackedExperts.build(models)
    monkeypatch.setattr(stacked_module, "CHUNK_ELEMENTS", rows_per_chunk * st.head.shape[2])
    g = torch.Generator().manual_seed(rows_per_chunk)
    counts = [7, 0, 3, 12]
    h = torch.randn(sum(counts), st.head.shape[1], generator=g)
    targets = torch.randint(0, st.head.shape[2], (sum(counts),), generator=g)
    got = st.target_logprobs(h, counts, targets)
    a, want = 0, []
    for j, n in enumerate(counts):
        logits = h[a:a + n].double() @ models[j].lm_head.weight.double().T
        want.append(torch.log_softmax(logits, -1).gather(1, targets[a:a + n, None])[:, 0])
        a += n
    assert got.dtype == torch.float32 and got.shape == (sum(counts),)
    assert torch.allclose(got.double(), torch.cat(want), atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "llama-tied", "qwen2"])
def test_cached_prefill_catch_up_and_decode_in_one_call(arch, scratch):
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_decode_steps_equal_full_forward(arch, dtype, scratch):
    """Calls of one token per segment (attention read from the pool in place by the decode kernel),
    after prefills of different lengths, give each expert's full-forward logits at every position."""
    models = _experts(arch, dtype=dtype)
    ids = (torch.arange(30) * 11 + 3) % 97
    with torch.no_grad():
        want = [m(input_ids=ids[None]).logits[0].float() for m in models]
    st = StackedExperts.build(models)
    pool = st.new_pool(64)
    slots = torch.tensor([pool.take() for _ in range(3)])
    n = torch.tensor([5, 12, 1])  # positions each expert's slot holds after the prefill
    batch = torch.zeros(3, 12, dtype=torch.long)
    for j in range(3):
        batch[j, :n[j]] = ids[:n[j]]
    tol = 1e-5 if dtype == torch.float32 else 0.1
    with torch.no_grad():
        st.forward(batch, torch.arange(3), torch.zeros(3, dtype=torch.long), n, slots)
        for _ in range(10):
            h = st.forward(ids[n][:, None], torch.arange(3), n, torch.ones(3, dtype=torch.long), slots)
            got = st.logits(h, [1, 1, 1]).float()
            for j in range(3):
                assert torch.allclose(got[j], want[j][n[j]], atol=tol), (j, int(n[j]))
            n = n + 1


def test_scratch_buffers_are_per_thread(monkeypatch):
    """Two threads running one StackedExperts at once (each with its own reused buffers, sized
    differently) both get each expert's own logits."""
    import threading

    import cbtm.stacked as stacked_module

    monkeypatch.setattr(stacked_module, "SCRATCH_BYTES", 0)
    models = _experts("llama")
    st = StackedExperts.build(models)
    ids = (torch.arange(60) * 7 + 2) % 97
    want = [m(input_ids=ids[None]).logits[0] for m in models]
    errors, start = [], threading.Barrier(2)

    def work(n):
        start.wait()
        for _ in range(20):
            with torch.no_grad():
                h = st.forward(ids[:n].expand(3, -1), torch.arange(3), torch.zeros(3, dtype=torch.long),
                               torch.full((3,), n))
                got = st.logits(h, [n] * 3).reshape(3, n, -1)
            errors.extend(j for j in range(3) if not torch.allclose(got[j], want[j][:n], atol=1e-5))

    threads = [threading.Thread(target=work, args=(n,)) for n in (60, 23)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


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


# ---- decode attention over the KV pool (ops.decode_attention, the CPU kernel) -------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("P,hq,hk,L,D", [(1, 1, 1, 1, 1), (5, 4, 2, 20, 32), (33, 6, 3, 17, 7), (64, 8, 1, 130, 64),
                                         (3, 12, 12, 9, 128)])
def test_decode_attention_matches_ref(P, hq, hk, L, D, dtype):
    """The kernel against the float64 per-row reference: random slots (repeats allowed), lengths from 1
    to the whole slot, grouped-query heads, awkward head sizes; and the PyTorch gather + SDPA path."""
    from cbtm import ops

    g = torch.Generator().manual_seed(P * 1000 + D)
    S = P + 3
    q = (torch.randn(P, hq, D, generator=g) * 2).to(dtype)
    k = (torch.randn(S, hk, L, D, generator=g) * 2).to(dtype)
    v = torch.randn(S, hk, L, D, generator=g).to(dtype)
    slots = torch.randint(0, S, (P,), generator=g)
    lengths = torch.randint(1, L + 1, (P,), generator=g)
    lengths[0] = L
    scale = D ** -0.5
    want = ops.decode_attention_ref(q, k, v, slots, lengths, scale).double()
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]  # float32 sums of 130 terms
    got = ops.decode_attention(q, k, v, slots, lengths, scale)
    assert got.dtype == dtype and got.shape == (P, hq, D)
    assert (got.double() - want).abs().max() <= tol
    torch_path = ops._decode_attention_torch(q, k, v, slots, lengths, scale)
    assert (torch_path.double() - want).abs().max() <= tol


def test_decode_attention_reads_only_the_slot_prefix():
    """Positions past a row's length and other slots never leak in: poisoning them changes nothing."""
    from cbtm import ops

    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(4, 2, 8, generator=g), torch.randn(6, 2, 10, 8, generator=g), torch.randn(6, 2, 10, 8, generator=g)
    slots, lengths = torch.tensor([5, 0, 2, 5]), torch.tensor([3, 10, 1, 7])
    before = ops.decode_attention(q, k, v, slots, lengths, 0.3)
    k2, v2 = k.clone(), v.clone()
    for s in (1, 3, 4):
        k2[s], v2[s] = 1e4, float("nan")
    k2[5, :, 7:], v2[5, :, 7:] = 1e4, float("nan")
    k2[2, :, 1:], v2[2, :, 1:] = 1e4, float("nan")
    assert torch.equal(ops.decode_attention(q, k2, v2, slots, lengths, 0.3), before)


@pytest.mark.parametrize("case,match", [
    ("slot", r"slots must lie in \[0, 6\)"), ("length0", r"lengths must lie in \[1, 10\]"),
    ("length_big", r"lengths must lie in \[1, 10\]"), ("dtype", "share a float dtype"), ("heads", "multiple of kv_heads"),
    ("shape", "q \\(P, Hq, D\\)"), ("rows", r"shape \(4,\)")])
def test_decode_attention_bad_input(case, match):
    from cbtm import ops

    q, k, v = torch.randn(4, 2, 8), torch.randn(6, 2, 10, 8), torch.randn(6, 2, 10, 8)
    slots, lengths = torch.tensor([5, 0, 2, 5]), torch.tensor([3, 10, 1, 7])
    if case == "slot":
        slots[1] = 6
    elif case == "length0":
        lengths[2] = 0
    elif case == "length_big":
        lengths[2] = 11
    elif case == "dtype":
        q = q.double()
    elif case == "heads":
        q = torch.randn(4, 3, 8)
    elif case == "shape":
        q = q[:, :, :4]
    elif case == "rows":
        slots = slots[:3]
    with pytest.raises((ValueError, TypeError), match=match):
        ops.decode_attention(q, k, v, slots, lengths, 0.3)


# ---- causal attention of packed variable-length segments (ops.varlen_attention) ------------------


def _packed(lengths, hq, hk, D, seed, scale_in=1.5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(sum(lengths), (hq + 2 * hk) * D, generator=g) * scale_in, torch.tensor(lengths)


@pytest.mark.parametrize("hq,hk", [(1, 1), (4, 4), (4, 1), (6, 2)])
@pytest.mark.parametrize("D", [1, 3, 16, 17, 64, 80, 128])
@pytest.mark.parametrize("lengths", [[1], [5, 0, 3], [33, 1, 64, 17], [130, 7], [300, 255, 31, 2]])
def test_varlen_attention_matches_ref(hq, hk, D, lengths):
    """The kernel against the float64 per-segment reference over head counts (grouped-query too), awkward
    head sizes (not a multiple of a vector) and segment lengths (empty, 1, around tile and panel edges);
    bfloat16 inputs; and the padded PyTorch SDPA path that CUDA and autograd use."""
    from cbtm import ops

    qkv, lengths = _packed(lengths, hq, hk, D, seed=D * 100 + hq)
    scale = D ** -0.5
    want = ops.varlen_attention_ref(qkv.double(), lengths, hq, hk, scale)
    got = ops.varlen_attention(qkv, lengths, hq, hk, scale)
    assert got.dtype == torch.float32 and got.shape == (qkv.shape[0], hq * D)
    assert (got.double() - want).abs().max() <= 2e-5
    assert (ops._varlen_attention_torch(qkv, lengths, hq, hk, scale).double() - want).abs().max() <= 2e-5
    bf = ops.varlen_attention(qkv.bfloat16(), lengths, hq, hk, scale)
    want_bf = ops.varlen_attention_ref(qkv.bfloat16().double(), lengths, hq, hk, scale)
    assert bf.dtype == torch.bfloat16 and (bf.double() - want_bf).abs().max() <= 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_varlen_attention_on_cuda_matches_ref(dtype):
    from cbtm import ops

    qkv, lengths = _packed([130, 1, 0, 64, 17], 8, 2, 64, seed=5)
    want = ops.varlen_attention_ref(qkv.double(), lengths, 8, 2, 0.125)
    got = ops.varlen_attention(qkv.to("cuda", dtype), lengths, 8, 2, 0.125)
    assert got.is_cuda and got.dtype == dtype
    assert (got.cpu().double() - want).abs().max() <= (2e-5 if dtype == torch.float32 else 3e-2)


def test_varlen_attention_is_causal_within_each_segment():
    """A row sees only the rows before it in its own segment: changing later rows (to huge values or NaN)
    or other segments leaves it bit for bit the same; a strided qkv (a view of a wider tensor) is read as is."""
    from cbtm import ops

    qkv, lengths = _packed([40, 1, 70, 9], 4, 2, 24, seed=3)
    before = ops.varlen_attention(qkv, lengths, 4, 2, 0.2)
    poisoned = qkv.clone()
    poisoned[41 + 30:111] = float("nan")  # segment 2 after its row 30
    poisoned[111:] = 1e30  # segment 3
    after = ops.varlen_attention(poisoned, lengths, 4, 2, 0.2)
    assert torch.equal(after[:41 + 30], before[:41 + 30])
    assert after[41 + 30:].isnan().any()
    wide = torch.zeros(qkv.shape[0], qkv.shape[1] + 5)
    wide[:, 2:2 + qkv.shape[1]] = qkv
    assert torch.equal(ops.varlen_attention(wide[:, 2:2 + qkv.shape[1]], lengths, 4, 2, 0.2), before)


def test_varlen_attention_every_instruction_set(worst_on_every_isa):
    """Each micro-kernel this CPU can run against the float64 reference."""
    code = ("import torch; from cbtm import ops\n"
            "g = torch.Generator().manual_seed(0); worst = 0.0\n"
            "for hq, hk, D, lens in [(4, 2, 64, [200, 13, 1]), (3, 3, 17, [47, 0, 96]), (2, 1, 5, [9])]:\n"
            "    qkv = torch.randn(sum(lens), (hq + 2 * hk) * D, generator=g); n = torch.tensor(lens)\n"
            "    d = ops.varlen_attention(qkv, n, hq, hk, D ** -0.5).double() - "
            "ops.varlen_attention_ref(qkv.double(), n, hq, hk, D ** -0.5)\n"
            "    worst = max(worst, float(d.abs().max()))\n")
    for isa, worst in worst_on_every_isa(code).items():
        assert worst <= 2e-5, (isa, worst)


@pytest.mark.parametrize("case,match", [
    ("sum", "summing to qkv's 12 rows"), ("negative", "integers >= 0"), ("columns", "not \\(heads \\+ 2 kv_heads\\)"),
    ("heads", "not \\(heads \\+ 2 kv_heads\\)"), ("scale", "scale must be positive"), ("nan_scale", "scale must be positive"),
    ("ndim", "2-D float tensor"), ("int", "2-D float tensor"), ("numpy", "takes torch tensors")])
def test_varlen_attention_bad_input(case, match):
    from cbtm import ops

    qkv, lengths, hq, hk, scale = torch.randn(12, 4 * 8), torch.tensor([5, 7]), 2, 1, 0.3
    if case == "sum":
        lengths = torch.tensor([5, 6])
    elif case == "negative":
        lengths = torch.tensor([13, -1])
    elif case == "columns":
        qkv = torch.randn(12, 4 * 8 + 1)
    elif case == "heads":
        hq = 3
    elif case == "scale":
        scale = 0.0
    elif case == "nan_scale":
        scale = float("nan")
    elif case == "ndim":
        qkv = qkv.view(12, 4, 8)
    elif case == "int":
        qkv = qkv.long()
    elif case == "numpy":
        qkv = qkv.numpy()
    with pytest.raises((ValueError, TypeError), match=match):
        ops.varlen_attention(qkv, lengths, hq, hk, scale)


# ---- the layers' small fused kernels (ops.grouped_rms_norm, ops.rotary_) -------------------------


@pytest.mark.parametrize("n,d,k", [(1, 1, 1), (7, 24, 3), (64, 128, 8), (300, 33, 5), (2, 4096, 2)])
def test_grouped_rms_norm_matches_ref(n, d, k):
    from cbtm import ops

    g = torch.Generator().manual_seed(n * d)
    x = torch.randn(n, d, generator=g) * 3
    w = torch.randn(k, d, generator=g)
    e = torch.randint(0, k, (n,), generator=g)
    want = ops.grouped_rms_norm_ref(x.double(), w.double(), e, 1e-5)
    got = ops.grouped_rms_norm(x, w, e, 1e-5)
    assert got.dtype == torch.float32 and (got.double() - want).abs().max() <= 2e-6 * max(1.0, float(want.abs().max()))
    # other dtypes, and tensors that need grad, take the PyTorch path: transformers' own rounding
    bf = ops.grouped_rms_norm(x.bfloat16(), w.bfloat16(), e, 1e-5)
    assert torch.equal(bf, ops.grouped_rms_norm_ref(x.bfloat16(), w.bfloat16(), e, 1e-5))
    xg = x.clone().requires_grad_()
    ops.grouped_rms_norm(xg, w, e, 1e-5).sum().backward()
    assert xg.grad is not None


@pytest.mark.parametrize("n,h,d", [(1, 1, 2), (5, 3, 8), (64, 12, 32), (17, 2, 128)])
def test_rotary_matches_ref_in_place(n, h, d):
    from cbtm import ops

    g = torch.Generator().manual_seed(n + h + d)
    qkv = torch.randn(n, (h + 1) * d, generator=g)  # rotated: the first h heads, as in a fused projection
    cos, sin = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    rest = qkv[:, h * d:].clone()
    x = qkv[:, :h * d].view(n, h, d)
    want = ops.rotary_ref(x.double(), cos.double(), sin.double())
    assert ops.rotary_(x, cos, sin) is x
    assert (x.double() - want).abs().max() <= 1e-5
    assert torch.equal(qkv[:, h * d:], rest)  # columns past the rotated heads untouched
    y = torch.randn(n, h, d, generator=g).bfloat16()
    want16 = ops.rotary_ref(y, cos.bfloat16(), sin.bfloat16())
    assert torch.equal(ops.rotary_(y, cos.bfloat16(), sin.bfloat16()), want16)


def test_layer_kernels_bad_input():
    from cbtm import ops

    x, w = torch.randn(4, 8), torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"expert ids must lie in \[0, 2\)"):
        ops.grouped_rms_norm(x, w, torch.tensor([0, 1, 2, 0]), 1e-6)
    with pytest.raises(ValueError, match="grouped_rms_norm: x"):
        ops.grouped_rms_norm(x, torch.randn(2, 7), torch.tensor([0, 1, 1, 0]), 1e-6)
    with pytest.raises(ValueError, match="rotary_: x"):
        ops.rotary_(torch.randn(4, 2, 8), torch.randn(4, 6), torch.randn(4, 6))
    with pytest.raises(ValueError, match="D even"):
        ops.rotary_(torch.randn(4, 2, 7), torch.randn(4, 7), torch.randn(4, 7))
