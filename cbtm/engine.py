"""The batched sparse decoding engine under every C-BTM decoder (``Ensemble.generate``,
``EnsembleForCausalLM`` and the server).

Generation is a loop of steps over a set of live sequences. Per step: route every sequence at once
(the router's embedding of each decoded text, kept incrementally), run each routed expert **once** on
the rows routed to it, each (sequence, expert) pair continuing its own KV cache (a row newly routed
to an expert first feeds that expert its window, in the same call), mix the experts' next-token
distributions with the mixture kernel, sample per row, retire finished rows and admit waiting ones.

    engine = Engine(ensemble, max_batch=64)
    a = engine.add("Once upon", SamplingParams(max_new_tokens=20, temperature=0))
    while engine.has_work():
        for event in engine.step():   # one Event per sequence that advanced
            print(event.seq_id, event.text, event.finish_reason)

When every expert shares one Llama-family architecture (the usual case: all branch from one seed),
the experts run as :class:`~cbtm.stacked.StackedExperts` (one grouped matmul per layer for all
routed groups); otherwise each routed expert runs its own transformers forward per row.

A sequence's window is what the experts see: the start token (:func:`~cbtm.tokens.start_token_id`)
and its tokens; when it reaches the experts' context it becomes the start token and its last half
(and the caches are rebuilt), so prompts of any length and unbounded generations work. Routing
always reads the whole decoded text. A row's output never depends on its batch-mates.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from collections import deque
from typing import Sequence

import numpy as np
import torch

from . import defaults, models, ops
from .embed import normalise
from .router import keep_top_k
from .tokens import DecodeState, Detokenizer, start_token_id

_ALL = "all"  # SamplingParams.top_k for every expert


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one sequence is decoded.

    temperature: 0 means greedy (as does ``greedy=True``); top_p: nucleus mass in (0, 1]; seed: the
    row's own random generator (None: a fresh one per sequence from the engine's seed sequence).
    stop: strings that end the generation (the returned text stops before them); min_tokens /
    ignore_eos: EOS is not sampled before ``min_tokens`` tokens / at all. logprobs: also return the
    chosen token's log-prob and this many most likely alternatives (0: only the chosen one).
    top_k: experts per token (None: the ensemble's; "all"); experts: the experts this sequence may
    use (None: all); routing: "prefix" or "distance" (None: the ensemble's router); return_routing:
    report the experts and weights behind every token.
    """

    max_new_tokens: int = 50
    temperature: float = 1.0
    top_p: float = 1.0
    greedy: bool = False
    seed: int | None = None
    stop: tuple[str, ...] = ()
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None
    top_k: int | str | None = None
    experts: tuple[int, ...] | None = None
    routing: str | None = None
    return_routing: bool = False

    def checked(self, n_experts: int) -> "SamplingParams":
        """A validated copy (bad values are a ValueError naming the field)."""
        def integer(name, value, low, high):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
                raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
            return int(value)

        integer("max_new_tokens", self.max_new_tokens, 0, defaults.MAX_NEW_TOKENS)
        integer("min_tokens", self.min_tokens, 0, defaults.MAX_NEW_TOKENS)
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (math.isfinite(t) and t >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {t!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {p!r}")
        if self.seed is not None:
            integer("seed", self.seed, 0, 2**63 - 1)
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")
        if self.logprobs is not None:
            integer("logprobs", self.logprobs, 0, defaults.MAX_LOGPROBS)
        top_k = self.top_k
        if top_k is not None and top_k != _ALL:
            top_k = integer("top_k", top_k, 1, 1 << 30)
        experts = self.experts
        if experts is not None:
            experts = tuple(integer("experts", e, 0, n_experts - 1) for e in experts)
            if not experts:
                raise ValueError("experts must name at least one expert")
        if self.routing not in (None, "prefix", "distance"):
            raise ValueError(f"routing must be 'prefix' or 'distance', got {self.routing!r}")
        return dataclasses.replace(self, stop=stop, top_k=top_k, experts=experts, temperature=float(t),
                                   top_p=float(p))


@dataclasses.dataclass
class Event:
    """What one step did to one sequence.

    token: the token generated (None when the step only ended the sequence: EOS or abort); text: the
    new text released (held back while it may be the start of a stop string or an incomplete
    character); logprob / top_logprobs: the token's mixture log-prob and the most likely alternatives
    (when asked); routing: ``[(expert, weight), ...]`` that produced the token (when asked);
    finish_reason: None while running, then "stop" (EOS or a stop string), "length" or "abort".
    """

    seq_id: int
    token: int | None
    text: str
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None
    routing: list[tuple[int, float]] | None = None
    finish_reason: str | None = None


class SequenceState:
    """One sequence's state: its window, text, per-expert caches, sampler and output so far."""

    def __init__(self, seq_id: int, params: SamplingParams, prefix: str, tail: list[int], start: int,
                 stream, gen: torch.Generator | None, n_experts: int):
        self.id, self.params = seq_id, params
        self.prefix, self.tail = prefix, tail  # routing text: prefix + decode(tail)
        self.window = [start] + tail  # what the experts see
        self.new: list[int] = []  # generated tokens
        self.text = ""  # their decoded text (up to a stop string)
        self.raw: str | None = None  # their decoded text, as of the last step
        self.decoded, self.tail_decoded = DecodeState(), DecodeState()  # how far new / tail are decoded
        self.emitted = 0  # characters of text released
        self.experts: dict[int, list] = {}  # expert -> [cache handle, window tokens consumed]
        self.stream, self.gen = stream, gen
        self.loglik = np.zeros(n_experts)  # BTM posterior: log-likelihood of the generated tokens
        self.last_logits: dict[int, torch.Tensor] = {}  # posterior: each expert's last logits
        self.finish: str | None = None


class Engine:
    """Continuous batching over an :class:`~cbtm.ensemble.Ensemble` (see the module docstring).

    ``add`` queues a sequence, ``step`` advances every running one by one token (admitting queued ones
    up to ``max_batch``) and returns their :class:`Event`; ``abort`` ends one. The lower-level
    ``open`` / ``extend`` / ``fork`` / ``close`` serve ``EnsembleForCausalLM``, which feeds tokens
    itself. Not thread-safe: one thread drives an engine.
    """

    def __init__(self, ensemble, max_batch: int = defaults.MAX_BATCH, seed: int = 0):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
        self.ens, self.max_batch = ensemble, max_batch
        self.tok = ensemble.tokenizer
        self.start = start_token_id(self.tok)
        self.eos = self.tok.eos_token_id
        self.k = ensemble.n_experts
        self.vocab = ensemble.vocab_size
        self.real_vocab = len(self.tok)  # ids past it (a padded vocabulary) are never generated
        self.runner = _StackedRunner(ensemble) if _StackedRunner.usable(ensemble) else _ModelRunner(ensemble)
        self._decode = Detokenizer(self.tok)
        self.running: dict[int, SequenceState] = {}
        self.waiting: deque[SequenceState] = deque()
        self._ids = itertools.count()
        self._seeds = np.random.SeedSequence(seed)
        self._distance = None  # the distance router, for sequences that ask for it

    # ---- continuous batching --------------------------------------------------------------------

    def add(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> int:
        """Queue a prompt (text, or token ids without the start token); returns its sequence id."""
        params = (params or SamplingParams()).checked(self.k)
        if params.routing is not None:
            if self.ens.kind != "cluster":
                raise ValueError(f"routing applies to kind 'cluster', this ensemble is {self.ens.kind!r}")
            self._router(params.routing)  # the run has that router
        seq = self._new(prompt, params)
        self.waiting.append(seq)
        return seq.id

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def abort(self, seq_id: int) -> bool:
        """End a queued or running sequence now (its caches are freed); False if it is not here."""
        for seq in list(self.waiting):
            if seq.id == seq_id:
                self.waiting.remove(seq)
                return True
        seq = self.running.pop(seq_id, None)
        if seq is None:
            return False
        self.runner.release(seq)
        return True

    def step(self) -> list[Event]:
        """Advance every running sequence by one token; finished ones leave (their event says why)."""
        while self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting.popleft()
            self.running[seq.id] = seq
        seqs = list(self.running.values())
        if not seqs:
            return []
        events = [Event(s.id, None, "", finish_reason="length") for s in seqs if s.params.max_new_tokens == 0]
        for e in events:
            self._retire(self.running[e.seq_id])
        seqs = [s for s in seqs if s.finish is None]
        if seqs:
            for s in seqs:
                self._slide(s)
            w = self._route(seqs)  # (B, K)
            events += self._sample(seqs, *self._next(seqs, w), w)
        return events

    def generate(self, prompts: Sequence[str | Sequence[int]], params: Sequence[SamplingParams]) -> list[SequenceState]:
        """Run prompts to completion (their params one each); the finished sequences in prompt order."""
        ids = [self.add(p, q) for p, q in zip(prompts, params)]
        done: dict[int, SequenceState] = {}
        by_id = {s.id: s for s in self.waiting}
        while self.has_work():
            for e in self.step():
                if e.finish_reason is not None and e.seq_id in by_id:
                    done[e.seq_id] = by_id[e.seq_id]
        return [done[i] for i in ids]

    # ---- feeding tokens directly (EnsembleForCausalLM) ------------------------------------------

    def open(self) -> SequenceState:
        """A sequence outside the batch loop, fed by :meth:`extend` (its window holds the start token)."""
        return self._new([], SamplingParams().checked(self.k))

    def extend(self, seqs: Sequence[SequenceState], tokens: Sequence[Sequence[int]], all_positions: bool) -> list[torch.Tensor]:
        """Append tokens to sequences; the mixture's log-probs after each appended token (n, V), or after
        the last only (1, V) when not ``all_positions`` (then a window that outgrows the context slides,
        as in generation; with ``all_positions`` it must fit). A sequence's first tokens may begin with
        the start token; it is not added twice."""
        tokens = [[int(t) for t in new] for new in tokens]
        bad = [t for new in tokens for t in new if not 0 <= t < self.vocab]
        if bad:  # checked before any sequence changes
            raise ValueError(f"input_ids: token id {bad[0]} is outside the vocabulary [0, {self.vocab})")
        rows, weights, order = [], [], []
        for seq, new in zip(seqs, tokens):
            n = len(new)
            if seq.window == [self.start] and not seq.tail and new[:1] == [self.start]:
                new = new[1:]
            seq.tail += new
            seq.window += new
            if all_positions:
                if not n:
                    order.append(None)
                    continue
                if len(seq.window) > self.ens.context:
                    raise ValueError(f"{len(seq.window)} tokens: the experts' context is {self.ens.context} "
                                     "tokens (longer inputs slide only while generating)")
                weights.append(self._route_positions(seq, n))
            else:
                self._slide(seq)
            order.append(len(rows))
            rows.append(seq)
        if rows and not all_positions:  # every row routed at once on its whole text
            weights = [w[None] for w in self._route(rows)]
        out = self._forward(rows, weights) if rows else []
        return [out[i] if i is not None else torch.zeros(0, self.vocab) for i in order]

    def fork(self, seq: SequenceState) -> SequenceState:
        """A copy of a sequence with copies of its caches (beam search)."""
        twin = SequenceState(next(self._ids), seq.params, seq.prefix, list(seq.tail), self.start,
                         None, None, self.k)
        twin.window, twin.new, twin.text, twin.raw = list(seq.window), list(seq.new), seq.text, seq.raw
        twin.decoded, twin.tail_decoded = copy.copy(seq.decoded), copy.copy(seq.tail_decoded)
        if seq.tail is seq.new:
            twin.tail = twin.new
        twin.stream = self.ens.router.embedder.stream(seq.stream.text) if seq.stream is not None else None
        for j, (handle, done) in seq.experts.items():
            twin.experts[j] = [self.runner.copy(handle, done), done]
        return twin

    def close(self, seq: SequenceState) -> None:
        """Free an opened sequence's caches."""
        self.runner.release(seq)

    # ---- internals ------------------------------------------------------------------------------

    def _new(self, prompt, params: SamplingParams) -> SequenceState:
        if isinstance(prompt, str):
            prefix, tail = prompt, []
            ids = self.ens.encode(prompt)
        else:
            if isinstance(prompt, (bytes, bytearray)) or not hasattr(prompt, "__iter__"):
                raise TypeError(f"a prompt is a str or a sequence of token ids, got {type(prompt).__name__}")
            ids = [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < self.vocab]
            if bad:
                raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.vocab})")
            prefix, tail = "", ids
        seed = params.seed if params.seed is not None else int(self._seeds.spawn(1)[0].generate_state(1)[0])
        gen = torch.Generator().manual_seed(seed) if not (params.greedy or params.temperature == 0) else None
        stream = self.ens.router.embedder.stream() if self.ens.router is not None else None
        seq = SequenceState(next(self._ids), params, prefix, tail, self.start, stream, gen, self.k)
        if isinstance(prompt, str):
            seq.window = [self.start] + ids
            seq.tail = seq.new  # the routing text is the prompt and the generated tokens
        return seq

    def _slide(self, seq: SequenceState) -> None:
        """Keep the window inside the experts' context: the start token and its last half."""
        L = self.ens.context
        if len(seq.window) >= L:
            seq.window = [self.start] + seq.window[-(L // 2):]
            self.runner.release(seq)

    def _texts(self, seqs: Sequence[SequenceState]) -> list[str]:
        """Each sequence's routing text: its prefix and its decoded tail (text prompts: the generated
        tokens, decoded once per step by ``_sample``)."""
        todo = [s for s in seqs if s.tail is not s.new or s.raw is None]
        texts = self._decode.advance([s.tail_decoded for s in todo], [s.tail for s in todo])
        decoded = dict(zip(map(id, todo), texts))
        return [s.prefix + (decoded[id(s)] if id(s) in decoded else s.raw) for s in seqs]

    def _route(self, seqs: Sequence[SequenceState]) -> np.ndarray:
        """Weights (B, K) of each sequence's next token, from its whole text so far."""
        ens, B = self.ens, len(seqs)
        allowed = np.stack([self._allowed(s) for s in seqs])  # (B, K)
        top_k = [self._top_k(s) for s in seqs]
        if ens.kind == "cluster":
            for s, text in zip(seqs, self._texts(seqs)):
                s.stream.update(text)
            emb = normalise(np.stack([s.stream.vector() for s in seqs]))
            w = np.zeros((B, self.k), np.float32)
            for key in set(zip((s.params.routing for s in seqs), top_k)):
                rows = [b for b, s in enumerate(seqs) if (s.params.routing, top_k[b]) == key]
                w[rows] = self._router(key[0]).weights(emb[rows], allowed[rows], key[1])
            return w
        if ens.kind == "uniform":
            logp = np.log(np.tile(ens.prior, (B, 1)))
        else:  # BTM posterior: prior times the likelihood of the generated tokens
            logp = np.log(ens.prior)[None] + np.stack([s.loglik for s in seqs])
        logp = np.where(allowed, logp, -np.inf)
        p = np.exp(logp - logp.max(1, keepdims=True))
        return np.stack([keep_top_k(p[b:b + 1], top_k[b])[0] for b in range(B)]).astype(np.float32)

    def _top_k(self, seq: SequenceState) -> int:
        t = seq.params.top_k
        if t is None:
            t = self.ens.top_k
        return self.k if t is None or t == _ALL else min(int(t), self.k)

    def _allowed(self, seq: SequenceState) -> np.ndarray:
        """The experts a sequence may use: bool (K,)."""
        allowed = np.ones(self.k, bool)
        if seq.params.experts is not None:
            allowed[:] = False
            allowed[list(seq.params.experts)] = True
        return allowed

    def _router(self, routing: str | None):
        """The ensemble's experts routed by ``routing`` (None: the ensemble's router; "distance"; or
        "prefix" when the run has one)."""
        if routing is None or routing == self.ens.router.routing:
            return self.ens.router
        if routing == "distance":
            if self._distance is None:
                self._distance = self.ens.router.by_distance()
            return self._distance
        raise ValueError("routing='prefix' needs the run's prefix router (fit it with `cbtm cluster fit-prefix`); "
                         "this ensemble routes by distance")

    def _route_positions(self, seq: SequenceState, n: int) -> np.ndarray:
        """Weights (n, K) after each of the last n tokens of a sequence's tail (its contexts decoded)."""
        ens = self.ens
        if ens.kind != "cluster":
            return np.repeat(self._route([seq]), n, axis=0)
        ids = seq.tail
        texts = [seq.prefix + t for t in self._decode([ids[:t] for t in range(len(ids) - n + 1, len(ids) + 1)])]
        seq.stream.update(texts[-1])
        top_k = self._top_k(seq)
        full = texts[-1]
        if all(full.startswith(t) for t in texts):  # one text, its prefixes embedded incrementally
            emb = ens.router.embedder.prefix_embeddings(full, [len(t) for t in texts])
        else:  # a character split across tokens decodes differently alone: embed each context on its own
            emb = ens.router.embedder.transform(texts)
        return self._router(seq.params.routing).weights(emb, np.tile(self._allowed(seq), (n, 1)), top_k)

    def _forward(self, seqs: Sequence[SequenceState], weights: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Mixture log-probs (n_b, V) after each of the last n_b window tokens of every sequence, given
        the routing weights there (n_b, K): every expert routed to runs once for all its rows."""
        table, idx, logw = self._run(seqs, weights)
        mixed = self._mix(table, idx, logw)  # (R, V)
        starts = np.cumsum([0] + [len(w) for w in weights])
        return [mixed[starts[b]:starts[b + 1]] for b in range(len(seqs))]

    def _next(self, seqs: Sequence[SequenceState], w: np.ndarray) -> tuple[torch.Tensor, np.ndarray, bool]:
        """Every sequence's next-token scores after its whole window, routed by ``w`` (B, K): values
        (M, V), the row of each sequence in them (B,), and whether they are log-probs. When every
        sequence has one expert, the values are those experts' logits as they come (the same argmax
        and sampling distribution as their log-softmax, which is the mixture): no pass over (B, V)."""
        table, idx, logw = self._run(seqs, [x[None] for x in w])
        if len(idx) == 1 and self.ens.kind != "posterior":
            return table.cpu(), idx[0], False
        return self._mix(table, idx, logw), np.arange(len(seqs)), True

    def _mix(self, table: torch.Tensor, idx: np.ndarray, logw: np.ndarray) -> torch.Tensor:
        """Mixture log-probs (R, V): row r mixes table rows ``idx[:, r]`` with log-weights ``logw[r]``."""
        return ops.weighted_logsumexp_rows(table, torch.from_numpy(idx), torch.from_numpy(logw).float()).cpu()

    def _run(self, seqs: Sequence[SequenceState], weights: Sequence[np.ndarray]) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """Run the routed experts: their logits (M, V) at the positions the weights (n_b, K) route to,
        and how to mix them: ``idx`` (kmax, R) the table rows of each of the R = sum n_b positions
        (unused: row 0) and ``logw`` (R, kmax) their log-weights (unused: -inf)."""
        segments = []  # (row, expert, window position its cache has reached, stop, first position wanted)
        posterior = self.ens.kind == "posterior"
        if all(len(w) == 1 for w in weights):  # a decode step: each routed expert feeds through the end
            routed = np.ones((len(seqs), self.k), bool) if posterior else np.concatenate(weights) > 0
            for b, j in zip(*(a.tolist() for a in np.nonzero(routed))):
                handle, end = seqs[b].experts.get(j), len(seqs[b].window)
                segments.append((b, j, handle[1] if handle is not None else 0, end, end - 1))
        else:
            for b, (seq, w) in enumerate(zip(seqs, weights)):
                n, end = len(w), len(seq.window)
                routed = np.ones_like(w, bool) if posterior else w > 0  # (n, K)
                last = n - 1 - np.argmax(routed[::-1], axis=0)  # (K,) the last position routed to each expert
                for j in np.flatnonzero(routed.any(0)).tolist():
                    handle = seq.experts.get(j)
                    segments.append((b, j, handle[1] if handle is not None else 0, end - n + int(last[j]) + 1,
                                     end - n))
        table, base = self.runner.run(seqs, segments)  # (M, V): each segment's wanted positions, from base
        starts = np.cumsum([0] + [len(w) for w in weights])
        R = int(starts[-1])
        routed = np.concatenate([w > 0 for w in weights])  # (R, K)
        kmax = max(1, int(routed.sum(1).max()))
        idx = np.zeros((kmax, R), np.int64)  # the table row of each mixed (position, expert); unused: row 0
        logw = np.full((R, kmax), -np.inf)
        if R == len(seqs):  # one position per row (a decode step): every segment's one wanted row
            seg = np.array([(b, j) for b, j, *_ in segments], np.int64).reshape(-1, 2)
            w1 = np.concatenate(weights)[seg[:, 0], seg[:, 1]]
            keep = w1 > 0
            seg, rows0, w1 = seg[keep], np.asarray(base, np.int64)[keep], w1[keep]
            slot = np.arange(len(seg)) - np.searchsorted(seg[:, 0], seg[:, 0])  # segments come in row order
            idx[slot, seg[:, 0]] = rows0
            logw[seg[:, 0], slot] = np.log(w1.astype(np.float64))
            segments_left = []
        else:
            segments_left = list(zip(segments, base))
        filled = np.zeros(R, np.int64)
        for (b, j, done, stop, first), row0 in segments_left:
            n, end = len(weights[b]), len(seqs[b].window)
            t = np.arange(n)
            pos = end - n + t  # window index whose next token position t predicts
            ok = (weights[b][:, j] > 0) & (pos < stop)
            r = starts[b] + t[ok]
            idx[filled[r], r] = row0 + pos[ok] - first
            with np.errstate(divide="ignore"):
                logw[r, filled[r]] = np.log(weights[b][t[ok], j].astype(np.float64))
            filled[r] += 1
        if self.ens.kind == "posterior":
            for (b, j, done, stop, first), row0 in zip(segments, base):
                seqs[b].last_logits[j] = table[row0 + stop - 1 - first]
        return table, idx, logw

    def _sample(self, seqs: Sequence[SequenceState], values: torch.Tensor, rows: np.ndarray, normalised: bool,
                w: np.ndarray) -> list[Event]:
        """Choose each row's next token from its scores ``values[rows[b]]`` (log-probs when ``normalised``,
        else one expert's logits, whose log-softmax is the log-probs); update and retire rows. The masks
        of ids never generated are written into ``values``."""
        real, V = self.real_vocab, values.shape[1]
        reported = [b for b, s in enumerate(seqs) if s.params.logprobs is not None]
        lse = torch.zeros(len(seqs))  # what turns a row's values into log-probs
        top: dict[int, dict[int, float]] = {}  # the most likely alternatives, before any mask
        if reported:
            r = torch.from_numpy(rows[reported])
            if not normalised:
                lse[reported] = torch.logsumexp(values[r], -1)
            for b in reported:
                if seqs[b].params.logprobs:
                    t = torch.topk(values[rows[b], :real], seqs[b].params.logprobs)
                    top[b] = dict(zip(t.indices.tolist(), (t.values - lse[b]).tolist()))
        if real < V:
            values[:, real:] = -math.inf  # ids of a padded vocabulary are never generated
        no_eos = [b for b, s in enumerate(seqs) if self.eos is not None
                  and (s.params.ignore_eos or len(s.new) < s.params.min_tokens)]
        if no_eos:
            values[torch.from_numpy(rows[no_eos]), self.eos] = -math.inf
        best = values.max(dim=-1).indices.tolist()  # the first maximum, as argmax
        events, grown = [], []
        for b, s in enumerate(seqs):
            p = s.params
            row = int(rows[b])
            tok = best[row] if s.gen is None else _sample(values[row] / p.temperature, p.top_p, s.gen)
            ev = Event(s.id, tok, "")
            if p.logprobs is not None:
                ev.logprob = float(values[row, tok] - lse[b])
                ev.top_logprobs = top.get(b)
            if p.return_routing:
                ev.routing = [(int(j), float(w[b, j])) for j in np.flatnonzero(w[b] > 0)]
            if self.ens.kind == "posterior":
                for j, lg in s.last_logits.items():
                    s.loglik[j] += float(torch.log_softmax(lg.float(), -1)[tok])
            if tok == self.eos and not p.ignore_eos:
                ev.token, s.finish = None, "stop"
            else:
                s.new.append(tok)
                if s.tail is not s.new:
                    s.tail.append(tok)
                s.window.append(tok)
                grown.append((s, ev))
            events.append((s, ev))
        for (s, ev), text in zip(grown, self._decode.advance([s.decoded for s, _ in grown], [s.new for s, _ in grown])):
            s.raw = text
            self._release_text(s, ev)
            if s.finish is None and len(s.new) >= s.params.max_new_tokens:
                s.finish = "length"
        for s, ev in events:
            if s.finish is not None:
                ev.text += s.text[s.emitted:]
                s.emitted = len(s.text)
                ev.finish_reason = s.finish
                self._retire(s)
        return [ev for _, ev in events]

    def _release_text(self, seq: SequenceState, ev: Event) -> None:
        """End at a stop string in the decoded generated tokens (``seq.raw``); release the text that is final."""
        text = seq.raw
        stops = seq.params.stop
        hit = [i for i in (text.find(s, max(0, seq.emitted - len(s) + 1)) for s in stops) if i >= 0]
        if hit:
            seq.text, seq.finish = text[:min(hit)], "stop"
            return
        seq.text = text
        hold = 1 if text.endswith("\ufffd") else 0  # an incomplete character
        for s in stops:  # the end of the text may be the start of a stop string
            for n in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:n]):
                    hold = n
                    break
        ready = len(text) - hold
        if ready > seq.emitted:
            ev.text = text[seq.emitted:ready]
            seq.emitted = ready

    def _retire(self, seq: SequenceState) -> None:
        seq.finish = seq.finish or "length"
        self.running.pop(seq.id, None)
        self.runner.release(seq)


def _sample(logits: torch.Tensor, top_p: float, gen: torch.Generator) -> int:
    """Nucleus sampling from (V,) logits."""
    probs = torch.softmax(logits.double(), -1)
    if top_p < 1:
        sp, si = torch.sort(probs, descending=True)
        keep = torch.cumsum(sp, 0) - sp < top_p
        probs = torch.zeros_like(probs).scatter(0, si[keep], sp[keep])
    return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))


# ---------------------------------------------------------------------------------------------------
# expert runners: run segments (a sequence's window from what an expert's cache holds, through the
# last position it is routed at) and return the logits at the positions wanted


class _ModelRunner:
    """One transformers forward per (sequence, expert) segment, each pair with its own KV cache: the
    generic path, for experts of mixed architectures or more experts than fit in memory."""

    def __init__(self, ensemble):
        self.ens = ensemble
        self.cache_kw = models.cache_keyword()

    def run(self, seqs, segments) -> tuple[torch.Tensor, list[int]]:
        """Logits (M, V) on the mixing device of every segment's wanted positions, and the first row
        of each segment in them."""
        out = []
        for b, j, done, stop, first in segments:
            seq = seqs[b]
            past = seq.experts.get(j, (None, 0))[0]
            model, dev = self.ens.pool.get(j), self.ens.pool.device(j)
            with torch.no_grad():
                r = model(input_ids=torch.tensor([seq.window[done:stop]], device=dev), use_cache=True,
                          **{self.cache_kw: past})
            seq.experts[j] = [getattr(r, self.cache_kw), stop]
            self.ens.expert_calls[j] += 1
            out.append(r.logits[0, first - done:].float().to(self.ens.mix_device))
        return torch.cat(out), np.cumsum([0] + [len(o) for o in out])[:-1].tolist()

    def release(self, seq) -> None:
        seq.experts.clear()

    def copy(self, handle, n: int):
        return copy.deepcopy(handle)


class _StackedRunner:
    """All segments through :class:`~cbtm.stacked.StackedExperts`: one call for the rows that feed one
    token, and padded chunks for those that feed several (a prompt, or a window newly routed)."""

    def __init__(self, ensemble):
        self.ens = ensemble
        self.stacked = ensemble.stacked()
        self.pool = self.stacked.new_pool(ensemble.context)

    @staticmethod
    def usable(ensemble) -> bool:
        return ensemble.stacked() is not None

    def run(self, seqs, segments) -> tuple[torch.Tensor, list[int]]:
        """As :meth:`_ModelRunner.run`."""
        for b, j, done, stop, first in segments:
            seq = seqs[b]
            if j not in seq.experts:
                seq.experts[j] = [self.pool.take(), 0]
            self.ens.expert_calls[j] += 1
        singles = [i for i, s in enumerate(segments) if s[3] - s[2] == 1]
        longer = sorted((i for i, s in enumerate(segments) if s[3] - s[2] > 1),
                        key=lambda i: segments[i][2] - segments[i][3])
        groups = [singles] if singles else []
        budget, a = self.ens.chunk_tokens, 0
        while a < len(longer):
            per = max(1, budget // (segments[longer[a]][3] - segments[longer[a]][2]))
            groups.append(longer[a:a + per])
            a += per
        tables, starts, row = [], [0] * len(segments), 0
        for group in groups:
            group = sorted(group, key=lambda i: segments[i][1])  # by expert: one grouped matmul
            tables.append(self._run_group(seqs, [segments[i] for i in group]))
            for i in group:
                starts[i] = row
                row += segments[i][3] - segments[i][4]
        for b, j, done, stop, first in segments:
            seqs[b].experts[j][1] = stop
        return (tables[0] if len(tables) == 1 else torch.cat(tables)), starts

    def _run_group(self, seqs, seg) -> torch.Tensor:
        """Logits (M, V) of the wanted positions of segments sorted by expert, in their order."""
        st = self.stacked
        n = np.array([s[3] - s[2] for s in seg])  # tokens fed
        T = int(n.max())
        ids = torch.tensor([seqs[b].window[done:stop] + [0] * (T - stop + done) for b, _, done, stop, _ in seg])
        experts = np.array([s[1] for s in seg])
        want = n - np.array([s[4] - s[2] for s in seg])  # positions wanted, the last of each segment
        keep = None
        if T > 1:  # the rows are packed (sum n): segment p's start at the sum of the lengths before it
            first = np.cumsum(n) - want
            keep = torch.from_numpy(np.concatenate([a + np.arange(w) for a, w in zip(first, want)]))
        with torch.no_grad():
            h = st.forward(ids, torch.from_numpy(experts), torch.tensor([s[2] for s in seg]), torch.from_numpy(n),
                           torch.tensor([seqs[s[0]].experts[s[1]][0] for s in seg]), keep=keep)  # (wanted, d)
            counts = np.bincount(experts, weights=want, minlength=st.n_experts).astype(int).tolist()
            return st.logits(h, counts).float().to(self.ens.mix_device)

    def release(self, seq) -> None:
        for handle, _ in seq.experts.values():
            self.pool.release(handle)
        seq.experts.clear()

    def copy(self, handle, n: int):
        slot = self.pool.take()
        self.pool.copy(handle, slot, n)
        return slot


@torch.no_grad()
def generate_ref(ensemble, prompts: Sequence[str], params: Sequence[SamplingParams],
                 logprobs: list | None = None) -> list[str]:
    """The plain reference of the engine: one prompt at a time, one transformers forward per routed
    expert per step (each with its own cache), routing by re-embedding the whole text at every step.
    EOS, ``max_new_tokens``, greedy / temperature / top_p and the per-sequence seed; no stop strings.
    ``logprobs``: a list that receives, per prompt, the mixture log-prob of every generated token."""
    ens, tok = ensemble, ensemble.tokenizer
    start, eos, real = start_token_id(tok), tok.eos_token_id, len(tok)
    cache_kw = models.cache_keyword()
    out = []
    for prompt, p in zip(prompts, params):
        p = p.checked(ens.n_experts)
        gen = None if p.greedy or p.temperature == 0 else torch.Generator().manual_seed(p.seed or 0)
        ids, new, caches = [start] + ens.encode(prompt), [], {}
        loglik, chosen = np.zeros(ens.n_experts), []
        top_k = ens.n_experts if p.top_k == _ALL else p.top_k or ens.top_k
        for _ in range(p.max_new_tokens):
            if len(ids) >= ens.context:
                ids = [start] + ids[-(ens.context // 2):]
                caches.clear()
            text = prompt + tok.decode(new, skip_special_tokens=True)
            if ens.kind == "cluster":
                w = ens.router.weights(ens.router.embedder.transform([text]), top_k=top_k)[0]
            else:
                logp = np.log(ens.prior) + (loglik if ens.kind == "posterior" else 0)
                w = keep_top_k(np.exp(logp - logp.max())[None], top_k)[0].astype(np.float32)
            active = [j for j in range(ens.n_experts) if w[j] > 0 or ens.kind == "posterior"]
            logits = []
            for j in active:
                past, done = caches.get(j, (None, 0))
                r = ens.pool.get(j)(input_ids=torch.tensor([ids[done:]], device=ens.pool.device(j)),
                                    use_cache=True, **{cache_kw: past})
                caches[j] = (getattr(r, cache_kw), len(ids))
                logits.append(r.logits[0, -1:].float().to(ens.mix_device))  # (1, V)
            with np.errstate(divide="ignore"):
                lw = torch.from_numpy(np.log(w[active].astype(np.float64))).float()[None].to(ens.mix_device)
            logp = ops.weighted_logsumexp(logits, lw)[0].cpu()  # (V,)
            logp[real:] = -math.inf
            if eos is not None and (p.ignore_eos or len(new) < p.min_tokens):
                logp[eos] = -math.inf
            nxt = int(torch.argmax(logp)) if gen is None else _sample(logp / p.temperature, p.top_p, gen)
            if ens.kind == "posterior":
                loglik += np.array([float(torch.log_softmax(lg[0], -1)[nxt]) for lg in logits])
            if nxt == eos and not p.ignore_eos:
                break
            ids.append(nxt)
            new.append(nxt)
            chosen.append(float(logp[nxt]))
        out.append(tok.decode(new, skip_special_tokens=True))
        if logprobs is not None:
            logprobs.append(chosen)
    return out
