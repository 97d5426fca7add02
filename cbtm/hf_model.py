"""The sparse ensemble as a transformers model, so ``generate`` (greedy, sampling, beam search, stop
strings, streamers, batched left-padded inputs) decodes with C-BTM:

    model = cbtm.EnsembleForCausalLM.from_run("runs/demo/cbtm-k8", top_k=2)
    tok = model.tokenizer                       # the run's tokenizer: adds the start token, pads on the left
    batch = tok(["The king said", "Once"], return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=20, do_sample=False)

The logits are the mixture's log-probabilities. Each sequence is routed on its decoded text so far,
per token, exactly as ``Ensemble`` does, and the batch decodes on the batched engine
(:mod:`cbtm.engine`): every routed expert runs once per step for all rows routed to it, each
(row, expert) pair continuing its own KV cache; generation therefore equals ``Ensemble.generate``.
"""

from __future__ import annotations

import copy
import math
import weakref
from pathlib import Path

import torch
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from . import defaults, models
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


class EnsembleCache:
    """The generation state of a batch: one engine sequence per row (its tokens, the router's
    incremental embedding of its decoded text, and a KV cache per expert it was routed to). The
    sequences' caches are freed when the cache object is dropped."""

    def __init__(self, engine, batch_size: int):
        self.engine = engine
        self.rows = [engine.open() for _ in range(batch_size)]
        self._finalizer = weakref.finalize(self, _close_all, engine, self.rows)

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Beam search: row b continues row ``beam_idx[b]`` (copied when several rows continue one)."""
        taken, rows = set(), []
        for i in beam_idx.tolist():
            rows.append(self.rows[i] if i not in taken else self.engine.fork(self.rows[i]))
            taken.add(i)
        for i, row in enumerate(self.rows):
            if i not in taken:
                self.engine.close(row)
        self.rows[:] = rows


def _close_all(engine, rows) -> None:
    for row in rows:
        engine.close(row)


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
        self.engine = ensemble.engine()
        self.tokenizer = copy.deepcopy(ensemble.tokenizer)
        if self.tokenizer.bos_token_id != ensemble.bos:  # BOS-less (Qwen2-style): the start token is EOS
            self.tokenizer.bos_token = self.tokenizer.convert_ids_to_tokens(ensemble.bos)
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
                                vocab_size=ens.vocab_size, bos_token_id=ens.bos, eos_token_id=tok.eos_token_id,
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
                use_cache: bool = True, logits_to_keep: int = 0, **unused) -> CausalLMOutputWithPast:
        """input_ids (B, L); attention_mask (B, P + L) over the P tokens in ``cache`` and these
        (0 marks padding; position ids and other generate() keywords are not needed: the cache
        tracks each row's tokens). ``logits_to_keep=1`` (what ``generate`` asks for) computes the last
        position only, and then a window longer than the experts' context slides as in generation."""
        state = cache if cache is not None else past_key_values
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
            raise ValueError(f"input_ids must be a (batch, length) tensor of token ids, got "
                             f"{type(input_ids).__name__} {tuple(getattr(input_ids, 'shape', ()))}")
        B, L = input_ids.shape
        if state is None:
            state = EnsembleCache(self.engine, B)
        elif len(state.rows) != B:
            raise ValueError(f"input_ids has {B} rows but the cache holds {len(state.rows)}")
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask[:, -L:] > 0
        last_only = logits_to_keep == 1
        new = [input_ids[b][real[b]].tolist() for b in range(B)]
        out = self.engine.extend(state.rows, new, all_positions=not last_only)
        V = self.config.vocab_size
        if last_only:
            logits = torch.stack([o[-1] for o in out])[:, None]  # (B, 1, V)
        else:
            logits = torch.full((B, L, V), -math.log(V))  # (B, L, V); padding positions stay uniform
            for b, o in enumerate(out):
                logits[b, real[b].nonzero().flatten()[-len(o):] if len(o) else []] = o
        logits[..., len(self.tokenizer):] = -math.inf  # ids of a padded vocabulary are never generated
        return CausalLMOutputWithPast(logits=logits.to(self.device), **{CACHE_NAME: state if use_cache else None})
