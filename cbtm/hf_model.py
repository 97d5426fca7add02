"""The sparse ensemble as a transformers model, so ``generate`` (greedy, sampling, beam search, stop
strings, streamers, batched left-padded inputs) decodes with C-BTM:

    model = cbtm.EnsembleForCausalLM.from_run("runs/demo/cbtm-k8", top_k=2)
    tok = model.tokenizer                       # the run's tokenizer: adds BOS, pads on the left
    batch = tok(["The king said", "Once"], return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=20, do_sample=False)

The logits are the mixture's log-probabilities. Each sequence is routed on its decoded text so far,
per token, exactly as ``Ensemble`` does; only the experts routed to run, each with its own KV cache
per sequence (kept in :class:`EnsembleCache`).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import torch
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from . import defaults, models, ops
from .ensemble import Ensemble

CACHE_NAME = models.cache_keyword()


class EnsembleConfig(PretrainedConfig):
    """What the ensemble was loaded with (the weights stay in the run directory). The router's
    settings are not called ``top_k`` / ``temperature``: generate() would take those as its own."""

    model_type = "cbtm-ensemble"

    def __init__(self, run: str | None = None, router_top_k: int | None = defaults.TOP_K,
                 router_temperature: float = defaults.TEMPERATURE, kind: str = "cluster", vocab_size: int = 0,
                 routing: str = defaults.ROUTING, **kw):
        self.run, self.router_top_k, self.router_temperature = run, router_top_k, router_temperature
        self.routing = routing
        self.kind, self.vocab_size = kind, vocab_size
        super().__init__(**kw)


class _Row:
    """One sequence of the batch: its tokens (padding dropped), the tokens the experts see (``window``:
    the same until it outgrows the context, then BOS + its last half, as ``Ensemble.generate`` slides),
    and per expert that has run on it ``[KV cache, window tokens consumed]``."""

    __slots__ = ("ids", "window", "experts")

    def __init__(self):
        self.ids: list[int] = []
        self.window: list[int] = []
        self.experts: dict[int, list] = {}

    def clone(self) -> "_Row":
        row = _Row()
        row.ids, row.window = list(self.ids), list(self.window)
        row.experts = {j: [copy.deepcopy(c), n] for j, (c, n) in self.experts.items()}
        return row


class EnsembleCache:
    """The generation state of a batch: per sequence, its tokens (the router re-embeds their decoded
    text, exactly and incrementally, at every step) and one KV cache per expert it was routed to."""

    def __init__(self, batch_size: int):
        self.rows = [_Row() for _ in range(batch_size)]

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Beam search: row b continues row ``beam_idx[b]`` (copied when several rows continue one)."""
        taken, rows = set(), []
        for i in beam_idx.tolist():
            rows.append(self.rows[i] if i not in taken else self.rows[i].clone())
            taken.add(i)
        self.rows = rows


class EnsembleForCausalLM(PreTrainedModel, GenerationMixin):
    """A C-BTM :class:`~cbtm.ensemble.Ensemble` behind the transformers causal-LM interface.

    ``forward(input_ids, attention_mask, cache)`` returns float32 logits (B, L, V) that are the
    mixture's log-probabilities at every non-padding position (``-log V`` at padding), and an
    :class:`EnsembleCache` to continue from. Inputs should start with BOS (``model.tokenizer`` adds
    it), as ``Ensemble.score`` and ``Ensemble.generate`` do.
    """

    config_class = EnsembleConfig
    main_input_name = "input_ids"

    def __init__(self, config: EnsembleConfig, ensemble: Ensemble):
        super().__init__(config)
        if ensemble.kind == "posterior":
            raise ValueError("EnsembleForCausalLM supports kind 'cluster' and 'uniform'; the BTM posterior "
                             "(kind='posterior') needs every expert on every token: use cbtm.Ensemble")
        self.ensemble = ensemble
        self.tokenizer = copy.deepcopy(ensemble.tokenizer)
        self.tokenizer.add_bos_token = True
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.post_init()

    @classmethod
    def from_run(cls, run: str | Path, top_k: int | None = defaults.TOP_K, temperature: float = defaults.TEMPERATURE,
                 kind: str = "cluster", device: str = "cpu", **ensemble_kw) -> "EnsembleForCausalLM":
        """The ensemble of a trained run directory (through ``Ensemble.load``: no code from the run
        runs, weights checked against the manifest); other keywords go to ``Ensemble.load``."""
        ens = Ensemble.load(run, top_k=top_k, temperature=temperature, kind=kind, device=device, **ensemble_kw)
        tok = ens.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        config = EnsembleConfig(run=str(run), router_top_k=top_k, router_temperature=temperature, kind=kind,
                                routing=ens.router.routing if ens.router is not None else "none",
                                vocab_size=len(tok), bos_token_id=ens.bos, eos_token_id=tok.eos_token_id,
                                pad_token_id=pad)
        model = cls(config, ens)
        model.generation_config.update(bos_token_id=ens.bos, eos_token_id=tok.eos_token_id, pad_token_id=pad)
        return model

    @property
    def device(self) -> torch.device:
        return self.ensemble.mix_device

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # forward creates its own EnsembleCache

    @torch.no_grad()
    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                cache: EnsembleCache | None = None, past_key_values: EnsembleCache | None = None,
                use_cache: bool = True, **unused) -> CausalLMOutputWithPast:
        """input_ids (B, L); attention_mask (B, P + L) over the P tokens in ``cache`` and these
        (0 marks padding; position ids and other generate() keywords are not needed: the cache
        tracks each row's tokens)."""
        state = cache if cache is not None else past_key_values
        B, L = input_ids.shape
        if state is None:
            state = EnsembleCache(B)
        elif len(state.rows) != B:
            raise ValueError(f"input_ids has {B} rows but the cache holds {len(state.rows)}")
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask[:, -L:] > 0
        V = self.config.vocab_size
        logits = torch.full((B, L, V), -math.log(V))  # (B, L, V); padding positions stay uniform
        for b, row in enumerate(state.rows):
            pos = real[b].nonzero().flatten().cpu()
            if len(pos):
                logits[b, pos] = self._extend(row, input_ids[b, pos].tolist()).cpu()
        return CausalLMOutputWithPast(logits=logits.to(self.device), **{CACHE_NAME: state if use_cache else None})

    def _extend(self, row: _Row, new: list[int]) -> torch.Tensor:
        """Append ``new`` tokens to a row: the mixture's log-probs after each, float32 (n, V)."""
        ens, n = self.ensemble, len(new)
        row.ids += new
        row.window += new
        if n == 1 and len(row.window) > 1 and len(row.window) >= ens.context:  # as Ensemble.generate slides
            row.window = [ens.bos] + row.window[-(ens.context // 2):]
            row.experts.clear()
        elif len(row.window) > ens.context:
            raise ValueError(f"{len(row.window)} tokens: the experts' context is {ens.context} tokens (longer "
                             "inputs slide only while generating, one token at a time)")
        w = self._weights(row.ids, n)  # (n, K)
        active = np.flatnonzero(w.any(0))
        logits, start = [], len(row.window) - n  # window index of the first new token
        for j in active:
            last = int(np.flatnonzero(w[:, j])[-1])  # the last new position routed to j
            cache, done = row.experts.get(j, (None, 0))
            model, dev = ens.pool.get(j), ens.pool.device(j)
            feed = torch.tensor([row.window[done:start + last + 1]], device=dev)
            out = model(input_ids=feed, use_cache=True, **{CACHE_NAME: cache})
            row.experts[j] = [getattr(out, CACHE_NAME), start + last + 1]
            ens.expert_calls[j] += 1
            lj = torch.zeros(n, out.logits.shape[-1], device=ens.mix_device)  # (n, V)
            lj[:last + 1] = out.logits[0, -(last + 1):].float().to(ens.mix_device)
            logits.append(lj)
        with np.errstate(divide="ignore"):
            logw = torch.from_numpy(np.log(w[:, active].astype(np.float64))).float().to(ens.mix_device)  # (n, k)
        return ops.weighted_logsumexp(logits, logw)

    def _weights(self, ids: list[int], n: int) -> np.ndarray:
        """Routing weights after each of the last n tokens of ``ids``: the context is the decoded
        text through that token, special tokens dropped, as ``Ensemble`` routes: (n, K)."""
        texts = self.tokenizer.batch_decode([ids[:t] for t in range(len(ids) - n + 1, len(ids) + 1)],
                                            skip_special_tokens=True)
        full = texts[-1]
        if all(full.startswith(t) for t in texts):  # one text, its prefixes embedded incrementally
            return self.ensemble._context_weights([full], [np.array([len(t) for t in texts])])[0]
        # a character split across tokens decodes differently alone: embed each context on its own
        return np.concatenate(self.ensemble._context_weights(texts, [np.array([len(t)]) for t in texts]))
