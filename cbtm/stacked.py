"""Experts of one architecture, their weights stacked: every layer runs for all routed groups at once.

C-BTM experts usually branch from one seed, so they share an architecture. Stacking their weights
``(K, out, in)`` lets each linear layer run for every expert's rows in one grouped matmul (the MoE /
multi-LoRA trick: Punica's SGMV, S-LoRA), and attention, which has no expert weights, runs for every
(sequence, expert) pair in one call over a shared pool of KV-cache slots. One forward then costs a
fixed number of tensor ops whatever the number of routed experts, instead of one model call per
expert (or per row).

Supported: the Llama family as transformers implements it (``llama``, ``mistral``, ``qwen2``: RMSNorm,
rotary positions of any rope type, grouped-query attention, gated MLP, optional biases, tied or untied
head). :meth:`StackedExperts.build` checks the stacked forward against each expert's own transformers
forward and returns ``None`` (the caller keeps one model call per expert) for anything else.
"""

from __future__ import annotations

import threading
import warnings
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import ops
from .training.loss import CHUNK_ELEMENTS

MODEL_TYPES = ("llama", "mistral", "qwen2")
CHECK_TOKENS = 12   # tokens of the self-check forward against transformers
CHECK_ATOL = 1e-3   # its tolerance on the logits (float32; half precision is checked 20x looser)
POOL_SLOTS = 16     # KV slots allocated at first (the pool doubles when full)
POOL_LENGTH = 128   # positions per slot allocated at first (doubles up to the experts' context)
SCRATCH_BYTES = 1 << 20    # CPU products at least this large that die within a layer go to reused buffers
MLP_BLOCK_BYTES = 1 << 22  # gated-MLP activations computed at once (row blocks: a large fresh allocation
                           # is page-faulted in again on every call, ~30% of the MLP's time on CPU)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: Sequence[int], bias: torch.Tensor | None = None,
                   offs: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of ``x`` (N, in) grouped by expert (``counts[j]`` consecutive rows for expert j, zeros allowed)
    times their expert's ``weight[j]`` (K, in, out) (+ ``bias[j]`` (K, out)): (N, out). One grouped
    matmul (``offs``: the cumulative counts, int32) where torch has it for this device and dtype, one
    matmul per non-empty group otherwise, or into ``out`` (N, out) when given (no autograd)."""
    if out is not None:
        a = 0
        for j, n in enumerate(counts):
            if n:
                torch.mm(x[a:a + n], weight[j], out=out[a:a + n])
                a += n
    elif offs is not None and _grouped_mm_ok(x):
        try:
            out = F.grouped_mm(x, weight, offs=offs)
        except RuntimeError:
            _GROUPED_MM_FAILED.add((x.device.type, x.dtype))
    if out is None:
        parts, a = [], 0
        for j, n in enumerate(counts):
            if n:
                parts.append(x[a:a + n] @ weight[j])
                a += n
        out = torch.cat(parts) if parts else x.new_zeros(0, weight.shape[2])
    if bias is not None:
        out += torch.repeat_interleave(bias, torch.as_tensor(counts, device=x.device), dim=0)
    return out


_GROUPED_MM_FAILED: set = set()


def _groups_within(ends: np.ndarray, counts: Sequence[int], a: int, b: int,
                   device: torch.device) -> tuple[list[int], torch.Tensor]:
    """Rows a..b-1 of rows grouped by expert (``counts[j]`` each, ``ends`` their cumulative sum): the
    rows of each expert among them and their cumulative sum (int32 on ``device``), for ``grouped_linear``."""
    c = np.clip(ends, a, b) - np.clip(ends - np.asarray(counts), a, b)
    return c.tolist(), torch.from_numpy(np.cumsum(c).astype(np.int32)).to(device)


def grouped_linear_ref(x: torch.Tensor, weight: torch.Tensor, counts: Sequence[int],
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """Plain reference of :func:`grouped_linear`, in float64: each expert's rows times its weight."""
    out, a = [], 0
    for j, n in enumerate(counts):
        y = x[a:a + n].double() @ weight[j].double()
        out.append(y + bias[j].double() if bias is not None else y)
        a += n
    return torch.cat(out)


def _grouped_mm_ok(x: torch.Tensor) -> bool:
    return (hasattr(F, "grouped_mm") and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and (x.device.type, x.dtype) not in _GROUPED_MM_FAILED)


class KVPool:
    """Key/value cache slots shared by every expert: per layer (slots, kv heads, positions, head dim).
    A slot holds one (sequence, expert) pair's cache; slots and positions grow by doubling."""

    def __init__(self, layers: int, heads: int, head_dim: int, max_length: int, dtype, device):
        self.layers, self.heads, self.head_dim, self.max_length = layers, heads, head_dim, max_length
        self.dtype, self.device = dtype, device
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.free: list[int] = []
        self._alloc(POOL_SLOTS, min(POOL_LENGTH, max_length))

    def _alloc(self, slots: int, length: int) -> None:
        old = len(self.k[0]) if self.k else 0
        new_k, new_v = [], []
        for layer in range(self.layers):
            k = torch.zeros(slots, self.heads, length, self.head_dim, dtype=self.dtype, device=self.device)
            v = torch.zeros_like(k)
            if old:
                n = self.k[layer].shape[2]
                k[:old, :, :n] = self.k[layer]
                v[:old, :, :n] = self.v[layer]
            new_k.append(k)
            new_v.append(v)
        self.k, self.v = new_k, new_v
        self.free += list(range(slots - 1, old - 1, -1))

    @property
    def slots(self) -> int:
        return self.k[0].shape[0]

    @property
    def length(self) -> int:
        return self.k[0].shape[2]

    def take(self) -> int:
        if not self.free:
            self._alloc(2 * self.slots, self.length)
        return self.free.pop()

    def release(self, slot: int) -> None:
        self.free.append(slot)

    def reserve(self, length: int) -> None:
        """Make every slot hold at least ``length`` positions."""
        if length > self.max_length:
            raise ValueError(f"{length} positions: the experts' context is {self.max_length}")
        if length > self.length:
            grown = self.length
            while grown < length:
                grown *= 2
            self._alloc(self.slots, min(grown, self.max_length))

    def copy(self, src: int, dst: int, n: int) -> None:
        """The first ``n`` positions of slot ``src`` into slot ``dst`` (a forked sequence)."""
        for k, v in zip(self.k, self.v):
            k[dst, :, :n] = k[src, :, :n]
            v[dst, :, :n] = v[src, :, :n]


class StackedExperts:
    """K experts of one Llama-family architecture with stacked weights (see the module docstring).

    After :meth:`build`, the experts' own parameters are views into the stacked tensors (no second
    copy of the weights), so their transformers forward keeps working. On CPU each thread that runs
    :meth:`forward` or :meth:`target_logprobs` keeps a buffer for each large product that dies within
    its layer (q/k/v, the attention output's projection, an MLP block, a chunk of logits): reused by
    every layer and call instead of mapped afresh, as large as the largest such product so far.
    """

    def __init__(self, models: Sequence[torch.nn.Module]):
        first = models[0]
        cfg = first.config
        self.config = cfg
        self.n_experts = len(models)
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.eps = cfg.rms_norm_eps
        self.act = first.model.layers[0].mlp.act_fn
        self.rotary = first.model.rotary_emb
        self.scaling = first.model.layers[0].self_attn.scaling
        self.device, self.dtype = first.lm_head.weight.device, first.lm_head.weight.dtype
        self.tied = first.lm_head.weight is first.model.embed_tokens.weight

        def stack(get, *, fuse=None, transpose=False):
            """(K, ...) of one parameter (or of several concatenated along dim 0), rebinding every
            expert's parameters to views of it; ``transpose``: matrices stored (K, in, out), the layout
            grouped matmuls read fastest."""
            names = fuse or [None]
            parts = [[get(m, n) for n in names] for m in models]
            if parts[0][0] is None:
                return None
            cat = [torch.cat([p.detach() for p in ps]) for ps in parts]
            out = torch.stack([c.T for c in cat] if transpose else cat).contiguous()
            for j, ps in enumerate(parts):
                a = 0
                for p in ps:
                    p.data = out[j, :, a:a + p.shape[0]].T if transpose else out[j, a:a + p.shape[0]]
                    a += p.shape[0]
            return out

        # (K, d, V) when the head is tied to the embedding (both read it), else embedding (K, V, d)
        self.embed = stack(lambda m, _: m.model.embed_tokens.weight, transpose=self.tied)
        self.head = self.embed if self.tied else stack(lambda m, _: m.lm_head.weight, transpose=True)  # (K, d, V)
        self.norm = stack(lambda m, _: m.model.norm.weight)  # (K, d)
        self.layers = []
        for i in range(cfg.num_hidden_layers):
            def sub(name, field):
                return lambda m, n: getattr(getattr(getattr(m.model.layers[i], name), n), field)

            def bias(name):
                return lambda m, n: getattr(getattr(m.model.layers[i], name), n).bias

            qkv = ["q_proj", "k_proj", "v_proj"]
            self.layers.append({
                "ln1": stack(lambda m, _: m.model.layers[i].input_layernorm.weight),
                "ln2": stack(lambda m, _: m.model.layers[i].post_attention_layernorm.weight),
                "qkv": stack(sub("self_attn", "weight"), fuse=qkv, transpose=True),
                "qkv_b": stack(bias("self_attn"), fuse=qkv),
                "o": stack(lambda m, _: m.model.layers[i].self_attn.o_proj.weight, transpose=True),
                "o_b": stack(lambda m, _: m.model.layers[i].self_attn.o_proj.bias),
                "gate_up": stack(sub("mlp", "weight"), fuse=["gate_proj", "up_proj"], transpose=True),
                "gate_up_b": stack(bias("mlp"), fuse=["gate_proj", "up_proj"]),
                "down": stack(lambda m, _: m.model.layers[i].mlp.down_proj.weight, transpose=True),
                "down_b": stack(lambda m, _: m.model.layers[i].mlp.down_proj.bias),
            })
        self.pool: KVPool | None = None
        self._rope_table: tuple[torch.Tensor, torch.Tensor] | None = None
        self._buffers = threading.local()  # per thread: name -> a flat tensor reused by every forward

    # ---- construction ---------------------------------------------------------------------------

    @classmethod
    def build(cls, models: Sequence[torch.nn.Module]) -> "StackedExperts | None":
        """Stack the experts when they share one supported architecture, configuration, device and dtype
        and the stacked forward reproduces each one's own forward; otherwise ``None``."""
        reason = _unsupported(models)
        if reason is not None:
            return None
        probe = torch.randint(0, models[0].config.vocab_size, (1, CHECK_TOKENS),
                              generator=torch.Generator().manual_seed(0)).to(models[0].lm_head.weight.device)
        with torch.no_grad():
            want = [m(input_ids=probe).logits[0].float() for m in models]
        stacked = cls(models)
        tol = CHECK_ATOL * (1 if stacked.dtype == torch.float32 else 20)
        k = len(models)
        with torch.no_grad():
            h = stacked.forward(probe.expand(k, -1), torch.arange(k, device=probe.device),
                                torch.zeros(k, dtype=torch.long), torch.full((k,), CHECK_TOKENS))  # (k * n, d)
            got = stacked.logits(h, [CHECK_TOKENS] * k).float().reshape(k, CHECK_TOKENS, -1)
        worst = max(float((g - w).abs().max()) for g, w in zip(got, want))
        if not worst <= tol:
            warnings.warn(f"stacked experts differ from their own forward by {worst:.3g} (> {tol:g}): "
                          "running one forward per expert instead", RuntimeWarning, stacklevel=2)
            return None
        return stacked

    # ---- forward --------------------------------------------------------------------------------

    def forward(self, ids: torch.Tensor, experts: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor,
                slots: torch.Tensor | None = None, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states (N, d) of P segments, packed: segment p feeds ``ids[p, :lengths[p]]`` (the
        rest of the row is padding) to expert ``experts[p]`` at window positions ``starts[p]...``, and
        its ``lengths[p]`` rows follow those of segment p - 1 (N = lengths.sum()). ``experts`` must be
        sorted. With ``slots`` (P,), segment p continues the cache in KV slot ``slots[p]`` (which holds
        its first ``starts[p]`` positions) and extends it; without, every segment starts at 0 with no
        cache. The linear layers see only the N real tokens; segments that attend only to themselves
        (no slots, or every start 0) run packed (``ops.varlen_attention``), others pad their queries to T.
        ``keep``: increasing indices of the packed rows whose hidden states are wanted (then (len(keep), d)
        is returned); the other rows are context only, so the last layer computes just their keys and
        values (no output projection, MLP or final norm)."""
        P, T = ids.shape
        dev = self.device
        ids, experts = ids.to(dev), experts.to(dev)
        starts, lengths = starts.to(dev), lengths.to(dev)
        valid = torch.arange(T, device=dev)[None, :] < lengths[:, None]  # (P, T)
        vp, vt = valid.nonzero(as_tuple=True)  # (N,) segment-major: rows grouped by expert
        N = len(vp)
        tok_expert = experts[vp]
        counts, offs = self._groups(tok_expert)
        positions = starts[vp] + vt  # (N,)
        tokens = ids[vp, vt]
        x = self.embed[tok_expert, :, tokens] if self.tied else self.embed[tok_expert, tokens]  # (N, d)
        cos, sin = self._rope(x, positions)  # (N, hd)
        hq, hk, hd = self.heads, self.kv_heads, self.head_dim
        decode = slots is not None and T == 1  # one token per segment: attention reads the pool in place
        fresh = slots is None or not bool(starts.any())  # every segment attends only to itself
        pad = end = mask = None
        if slots is not None:
            slots = slots.to(dev)
            end = int((starts + lengths).max())
            self.pool.reserve(end)
            if not decode and not fresh:
                pad = ~valid if N != P * T else None  # (P, T): the padding of each segment, if any
                query_pos = starts[:, None] + torch.arange(T, device=dev)  # (P, T)
                mask = torch.arange(end, device=dev)[None, None, None, :] <= query_pos[:, None, :, None]  # (P, 1, T, end)
        for i, layer in enumerate(self.layers):
            h = ops.grouped_rms_norm(x, layer["ln1"], tok_expert, self.eps)
            qkv = grouped_linear(h, layer["qkv"], counts, layer["qkv_b"], offs,
                                 self._scratch("qkv", h, layer["qkv"]))  # (N, (hq + 2 hk) hd)
            qk = ops.rotary_(qkv[:, :(hq + hk) * hd].view(N, hq + hk, hd), cos, sin)  # queries and keys at once
            q, k = qk[:, :hq], qk[:, hq:]
            v = qkv[:, (hq + hk) * hd:].view(N, hk, hd)
            if slots is not None:
                pk, pv = self.pool.k[i], self.pool.v[i]
                pk[slots[vp], :, positions] = k
                pv[slots[vp], :, positions] = v
            if decode:
                a = ops.decode_attention(q, pk, pv, slots, starts + 1, self.scaling).reshape(N, hq * hd)
            elif fresh:
                a = ops.varlen_attention(qkv, lengths, hq, hk, self.scaling)
            else:
                a = self._attend_pool(q, i, vp, vt, pad, P, T, slots, end, mask)
            if keep is not None and i == len(self.layers) - 1:  # what follows only the kept rows need
                keep = keep.to(dev)
                a, x, tok_expert = a[keep], x[keep], tok_expert[keep]
                counts, offs = self._groups(tok_expert)
            o = grouped_linear(a, layer["o"], counts, layer["o_b"], offs, self._scratch("o", a, layer["o"]))
            x = x + o if x.requires_grad or o.requires_grad else x.add_(o)  # x is this forward's own tensor
            x = self._mlp(x, ops.grouped_rms_norm(x, layer["ln2"], tok_expert, self.eps), layer, counts, offs)
        return ops.grouped_rms_norm(x, self.norm, tok_expert, self.eps)

    def _groups(self, tok_expert: torch.Tensor) -> tuple[list[int], torch.Tensor]:
        """Rows per expert of rows sorted by expert (``tok_expert`` (N,)), and their cumulative sum (int32),
        for ``grouped_linear``."""
        counts = torch.bincount(tok_expert, minlength=self.n_experts)
        return counts.tolist(), torch.cumsum(counts, 0).to(torch.int32)

    def _scratch(self, name: str, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
        """A (rows of x, weight's outputs) buffer this thread reuses across forwards, for a product that
        dies within its layer; None on GPUs (their allocator caches), under autograd and below
        ``SCRATCH_BYTES``. On CPU a fresh tensor of megabytes is mapped and page-faulted in by the OS
        on every allocation."""
        n = x.shape[0] * weight.shape[2]
        if (x.device.type != "cpu" or n * x.element_size() < SCRATCH_BYTES
                or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
            return None
        buf = getattr(self._buffers, name, None)
        if buf is None or buf.numel() < n or buf.dtype != x.dtype:
            buf = torch.empty(n, dtype=x.dtype)
            setattr(self._buffers, name, buf)
        return buf[:n].view(x.shape[0], weight.shape[2])

    def _mlp(self, x: torch.Tensor, h: torch.Tensor, layer: dict, counts: Sequence[int],
             offs: torch.Tensor) -> torch.Tensor:
        """x + the gated MLP of h (both (N, d), rows grouped by expert: ``counts[j]`` each, ``offs`` their
        cumulative sum), in row blocks of about ``MLP_BLOCK_BYTES`` of (rows, 2 * intermediate)
        activations; without autograd the blocks add into x in place."""
        n = h.shape[0]
        block = max(1, MLP_BLOCK_BYTES // (layer["gate_up"].shape[2] * h.element_size()))
        ends = np.cumsum(counts) if n > block else None
        grad = h.requires_grad or x.requires_grad
        parts = []
        for a in range(0, n, block):
            b = min(n, a + block)
            c = counts
            if ends is not None:
                c, offs = _groups_within(ends, counts, a, b, h.device)
            gate, up = grouped_linear(h[a:b], layer["gate_up"], c, layer["gate_up_b"], offs,
                                      self._scratch("gate_up", h[a:b], layer["gate_up"])).chunk(2, dim=-1)
            g = self.act(gate)
            g = g * up if grad else g.mul_(up)
            y = grouped_linear(g, layer["down"], c, layer["down_b"], offs, self._scratch("down", g, layer["down"]))
            if grad:
                parts.append(y)
            else:
                x[a:b].add_(y)
        return x + torch.cat(parts) if grad else x

    def _attend_pool(self, q, i, vp, vt, pad, P, T, slots, end, mask) -> torch.Tensor:
        """Attention of packed query rows q (N, Hq, hd) of segments that continue a KV slot (written
        already, keys and values up to ``end``): (N, Hq hd). The queries are padded to T per segment."""
        hq, hk, hd, N = self.heads, self.kv_heads, self.head_dim, len(vp)
        pk, pv = self.pool.k[i], self.pool.v[i]
        keys, values = pk[:, :, :end].index_select(0, slots), pv[:, :, :end].index_select(0, slots)
        rows = q.reshape(N, hq * hd)
        if pad is not None:  # zeros at the padding (never attended to by a real row, but it must not be NaN)
            per_segment = rows.new_empty(P, T, hq * hd)
            per_segment[vp, vt] = rows
            per_segment[pad] = 0
        else:
            per_segment = rows.view(P, T, hq * hd)
        a = F.scaled_dot_product_attention(per_segment.view(P, T, hq, hd).transpose(1, 2), keys, values,
                                           attn_mask=mask, scale=self.scaling, enable_gqa=hk != hq)  # (P, Hq, T, hd)
        a = a.transpose(1, 2)[vp, vt] if pad is not None else a.transpose(1, 2).reshape(N, hq, hd)
        return a.reshape(N, hq * hd)

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (N, hd) at the positions (N,): the experts' own rotary module, its values for
        positions 0..n-1 kept once computed unless the rope type rescales with the length ("dynamic")."""
        if getattr(self.rotary, "rope_type", "default") == "dynamic":
            return self.rotary(x, positions)
        need = int(positions.max()) + 1
        if self._rope_table is None or self._rope_table[0].shape[0] < need:
            n = max(need, 2 * (self._rope_table[0].shape[0] if self._rope_table else 64))
            cos, sin = self.rotary(x, torch.arange(n, device=x.device)[None])
            self._rope_table = (cos[0], sin[0])
        return self._rope_table[0][positions], self._rope_table[1][positions]

    def logits(self, h: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """Logits (N, V) of final hidden states h (N, d) grouped by expert (``counts[j]`` rows each)."""
        counts = list(counts) + [0] * (self.n_experts - len(counts))
        offs = torch.cumsum(torch.tensor(counts), 0).to(torch.int32).to(h.device)
        return grouped_linear(h, self.head, counts, None, offs)

    def target_logprobs(self, h: torch.Tensor, counts: Sequence[int], targets: torch.Tensor) -> torch.Tensor:
        """``log_softmax(logits)[n, targets[n]]`` (N,) float32 of final hidden states h (N, d) grouped by
        expert (``counts[j]`` rows each): chunks of rows, each one grouped matmul whatever experts it
        spans, then cross-entropy; the (N, V) logits are never held."""
        counts = list(counts) + [0] * (self.n_experts - len(counts))
        n, V = h.shape[0], self.head.shape[2]
        ends = np.cumsum(counts)
        chunk = max(1, CHUNK_ELEMENTS // V)
        out = torch.empty(n, dtype=torch.float32, device=h.device)
        targets = targets.to(h.device)
        for a in range(0, n, chunk):
            c, offs = _groups_within(ends, counts, a, min(n, a + chunk), h.device)
            z = grouped_linear(h[a:a + chunk], self.head, c, None, offs,
                               self._scratch("head", h[a:a + chunk], self.head))  # (chunk, V)
            out[a:a + chunk] = -F.cross_entropy(z.float(), targets[a:a + chunk], reduction="none")
        return out

    # ---- KV slots ---------------------------------------------------------------------------------

    def new_pool(self, max_length: int) -> KVPool:
        """The KV pool (created on first use) for windows of at most ``max_length`` positions."""
        if self.pool is None:
            self.pool = KVPool(len(self.layers), self.kv_heads, self.head_dim, max_length, self.dtype, self.device)
        return self.pool


def _unsupported(models: Sequence[torch.nn.Module]) -> str | None:
    """Why these experts cannot be stacked, or None."""
    first = models[0]
    cfg = first.config
    if cfg.model_type not in MODEL_TYPES:
        return f"model_type {cfg.model_type!r}"
    keys = {"_name_or_path", "transformers_version", "dtype", "torch_dtype"}
    ref = {k: v for k, v in cfg.to_dict().items() if k not in keys}
    for m in models[1:]:
        if {k: v for k, v in m.config.to_dict().items() if k not in keys} != ref:
            return "the experts' configs differ"
    if getattr(cfg, "sliding_window", None) and cfg.sliding_window < (cfg.max_position_embeddings or 0) \
            and getattr(cfg, "use_sliding_window", True):
        return "sliding-window attention"
    params = [p for m in models for p in m.parameters()]
    if len({(p.device, p.dtype) for p in params}) != 1:
        return "the experts are on several devices or dtypes"
    for layer in first.model.layers:
        extra = set(dict(layer.self_attn.named_children())) - {"q_proj", "k_proj", "v_proj", "o_proj"}
        extra |= set(dict(layer.mlp.named_children())) - {"gate_proj", "up_proj", "down_proj", "act_fn"}
        if extra:
            return f"layer modules {sorted(extra)}"
        if "RMSNorm" not in type(layer.input_layernorm).__name__:
            return "a norm other than RMSNorm"
    return None
