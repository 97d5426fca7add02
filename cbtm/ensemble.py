"""The sparse C-BTM ensemble: route each context to its top-k experts, run only those experts
(batched by expert), and mix their next-token distributions with the Triton mixture kernels.

    ens = cbtm.Ensemble.load("runs/demo", top_k=2, temperature=0.1, device="cpu")
    ens.score(["some text"])          # per-token log-probs
    ens.perplexity(texts)             # {"perplexity", "nll", "tokens"}
    ens.generate(["Once upon"], max_new_tokens=40)
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from . import defaults, models
from .assignments import validation_texts
from .engine import Engine, SamplingParams
from .pool import ExpertPool
from .router import Router, keep_top_k
from .rundir import RunDir
from .stacked import StackedExperts
from .tokens import load_tokenizer, start_token_id
from .training.loss import fused_head, linear_target_logprobs

KINDS = ("cluster", "uniform", "posterior")
PACKED_PAD_FACTOR = 4  # a packed chunk's (rows, longest) index tensors: at most this x its position budget


def resolve_devices(device: str | Sequence[str]) -> list[str]:
    """A device or list of devices; "cuda" means every visible GPU. Unusable devices are errors."""
    names = [device] if isinstance(device, str) else list(device)
    if not names:
        raise ValueError("no devices given")
    out = []
    for name in names:
        dev = models.parse_device(name)
        if dev.type == "cuda" and dev.index is None:  # every visible GPU
            out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        else:
            out.append(str(dev))
    return out


class Ensemble:
    """A C-BTM / BTM ensemble of causal LMs sharing one tokenizer.

    kind: "cluster" (the router's weights of the context: distance to the cluster centres, or the
        run's prefix classifier),
        "uniform" (every expert 1/k), or "posterior" (BTM: weights proportional to a prior times
        the likelihood each expert gave the tokens so far; the prior from ``fit_prior``).
    top_k: experts kept per context (None: all). Only experts with a non-zero weight run.
    devices: where experts live (round-robin); max_loaded: experts held in memory at once.
    context: tokens per scoring window and generation context (default and at most: the experts'
        maximum context; ``load`` uses the sequence length the run's experts were trained on).
    """

    def __init__(self, experts: Sequence[str | Path], tokenizer, router: Router | None = None, kind: str = "cluster",
                 top_k: int | None = None, devices: Sequence[str] = ("cpu",), max_loaded: int | None = None,
                 dtype: torch.dtype | None = None, prior: np.ndarray | None = None,
                 batch_size: int = defaults.EVAL_BATCH, digests: Sequence[str | None] | None = None,
                 context: int | None = None):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if kind == "cluster" and router is None:
            raise ValueError("kind='cluster' needs a router")
        self.pool = ExpertPool(experts, devices, max_loaded, dtype, digests)
        k = len(self.pool)
        if router is not None and router.n_experts != k:
            raise ValueError(f"the router has {router.n_experts} centres but there are {k} experts")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        self.tokenizer, self.kind = tokenizer, kind
        self.top_k = None if top_k is None or top_k >= k else int(top_k)
        if router is not None:  # a copy: the caller's router keeps its own top_k
            router = router.subset(range(k), self.top_k)
        self.router = router
        self.prior = np.full(k, 1.0 / k) if prior is None else np.asarray(prior, np.float64)
        self.batch_size = int(batch_size)
        self.chunk_tokens = defaults.EVAL_CHUNK_TOKENS
        self.packed_tokens = defaults.EVAL_PACKED_TOKENS
        self.bos = start_token_id(tokenizer)  # what every scored or generated sequence starts with
        if context is not None and (int(context) != context or context < 1):
            raise ValueError(f"context must be a positive integer, got {context!r}")
        longest = self.pool.context_length()  # reads every expert's config
        self.vocab_size = self.pool.vocab_size()  # the experts' output width (>= the tokenizer's length)
        self.context = min(longest, int(context)) if context is not None else longest
        self.mix_device = self.pool.device(0)
        self.expert_calls = [0] * k  # rows each expert has processed (tests check sparsity with it)
        self.expert_positions = [0] * k  # window positions each expert has computed while scoring
        self.use_stacked = True  # run same-architecture experts with stacked weights (False: one forward each)
        self._stacked: list = []  # [StackedExperts or None] once built

    @classmethod
    def load(cls, run: str | Path, top_k: int | None = defaults.TOP_K, temperature: float = defaults.TEMPERATURE,
             kind: str = "cluster", device: str | Sequence[str] = "cpu", max_loaded: int | None = None,
             official_distance: bool = False, dtype: torch.dtype | None = None,
             batch_size: int = defaults.EVAL_BATCH, routing: str = defaults.ROUTING) -> "Ensemble":
        """The experts, tokenizer and router of a trained run directory (``routing``: see
        :class:`~cbtm.router.Router`; "auto" uses the run's prefix router when it has one). ``device`` is a device or a
        list of devices ("cuda" means every visible GPU). Expert paths must stay inside the run and
        their weights match the checksums the manifest recorded. Texts are scored in windows of the
        sequence length the experts were trained on (positions beyond it were never trained)."""
        run = RunDir.of(run)
        entries = run.expert_entries()
        if not entries:
            raise FileNotFoundError(f"{run.path} has no trained experts: run `cbtm train` first")
        missing = [e["id"] for e in entries if e["status"] != "done"]
        if missing:
            raise ValueError(f"experts {missing} of {run.path} are not trained (status != done)")
        paths = [run.resolve(e["path"]) for e in entries]
        if kind == "cluster" and len(entries) == 1 and not (run.router / "kmeans.json").is_file():
            kind = "uniform"  # a dense run (or an exported MoE): a one-expert ensemble needs no router
        router = None
        if kind == "cluster":
            full = Router.load(run.path, routing, temperature=temperature, official_distance=official_distance)
            clusters = [int(e.get("cluster", e["id"])) for e in entries]
            bad = [c for c in clusters if not 0 <= c < full.n_experts]
            if bad:
                raise ValueError(f"{run.manifest_path}: experts name clusters {bad} but the router has "
                                 f"{full.n_experts} centres")
            router = full.subset(clusters)
        devices = resolve_devices(device)
        m = run.manifest()  # the experts' training length; an exported MoE keeps its source's
        trained = ((m.get("train") or {}).get("config") or {}).get("seq_len") or (m.get("moe") or {}).get("seq_len")
        return cls(paths, load_tokenizer(run.tokenizer), router, kind, top_k, devices, max_loaded, dtype,
                   batch_size=batch_size, digests=[e.get("sha256") for e in entries],
                   context=trained if isinstance(trained, int) and trained > 0 else None)

    @property
    def n_experts(self) -> int:
        return len(self.pool)

    # ---------------------------------------------------------------------------------------
    # routing

    def _topk(self, w: np.ndarray) -> np.ndarray:
        """Keep the top_k weights per row and renormalise: (N, K) -> (N, K)."""
        return keep_top_k(w, self.top_k)

    def _context_weights(self, texts: Sequence[str], offsets: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Weights of the context before every token: per text (n_tokens, K)."""
        if self.kind == "cluster":
            return self.router.token_weights(texts, offsets)
        return [self._topk(np.tile(self.prior, (len(o), 1))) for o in offsets]

    def token_weights(self, texts: Sequence[str], router: Router | None = None) -> list[np.ndarray]:
        """``router``'s weights (default: this ensemble's) of the context before every token of each
        text, as the ensemble tokenizes it: per text (n_tokens, K)."""
        return (router or self.router).token_weights(texts, [self._encode(t)[1] for t in _as_texts(texts)])

    # ---------------------------------------------------------------------------------------
    # scoring

    def stacked(self) -> StackedExperts | None:
        """The experts as :class:`~cbtm.stacked.StackedExperts` (built on first use), or None when they
        cannot be stacked (mixed architectures, several devices, evicting pool) or ``use_stacked`` is off."""
        if not self.use_stacked:
            return None
        if not self._stacked:
            ok = self.pool.all_resident() and len({str(self.pool.device(j)) for j in range(self.n_experts)}) == 1
            self._stacked.append(StackedExperts.build([self.pool.get(j) for j in range(self.n_experts)]) if ok else None)
        return self._stacked[0]

    def encode(self, text: str) -> list[int]:
        """Token ids of a text, without special tokens (the start token is the engine's to add)."""
        if not isinstance(text, str):
            raise TypeError(f"expected a str, got {type(text).__name__}")
        return self._encode(text)[0]

    def _encode(self, text: str) -> tuple[list[int], np.ndarray]:
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        starts = np.array([s for s, _ in enc["offset_mapping"]], np.int64)
        return list(enc["input_ids"]), starts

    def _expert_logprobs(self, j: int, inputs: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log p_j(target) at every position of the given windows: (n, L) float32 on the mix device."""
        model = self.pool.get(j)
        dev = self.pool.device(j)
        n, L = inputs.shape
        fused = fused_head(model)  # logits = h @ W.T: the (n, L, V) logits need not be held
        with torch.no_grad():
            if fused is not None:
                body, weight = fused
                h = body(input_ids=inputs.to(dev), attention_mask=mask.to(dev)).last_hidden_state  # (n, L, d)
                lp = linear_target_logprobs(h.reshape(n * L, -1), weight, targets.to(dev).reshape(-1)).float()
            else:
                logits = model(input_ids=inputs.to(dev), attention_mask=mask.to(dev)).logits  # (n, L, V)
                lp = -torch.nn.functional.cross_entropy(logits.reshape(n * L, -1).float(),
                                                        targets.to(dev).reshape(-1), reduction="none")
        self.expert_calls[j] += n
        return lp.reshape(n, L).to(self.mix_device)

    def score(self, texts: Sequence[str]) -> list[torch.Tensor]:
        """Log-probability of every token of every text given the tokens before it (the first
        token given BOS): a float32 tensor (n_tokens,) per text. Long texts are scored in
        consecutive windows of the experts' context length."""
        return [mixed for mixed, _, _ in self._score(texts, every_expert=False)]

    def expert_logprobs(self, texts: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per text: the log-prob every expert gives every token, float64 (K, n), and the routing
        weights of each token's context, (n, K). Runs every expert on every text (dense): for
        evaluating several top-k settings from one pass (``mix``), not for serving."""
        out = []
        for _, lp, logw in self._score(texts, every_expert=True):
            out.append((lp.double().numpy(), logw.double().exp().numpy()))
        return out

    def _score(self, texts: Sequence[str], every_expert: bool) -> list[tuple]:
        texts = _as_texts(texts)
        out: list[tuple] = []
        for i in range(0, len(texts), self.batch_size):
            out += self._score_batch(texts[i:i + self.batch_size], every_expert)
        return out

    def _score_batch(self, texts: list[str], every_expert: bool) -> list[tuple]:
        """Per text: (mixed log-probs (n,), expert log-probs (K, n), log weights (n, K))."""
        enc = [self._encode(t) for t in texts]
        weights = self._context_weights(texts, [s for _, s in enc]) if self.kind != "posterior" else None
        L, k = self.context, self.n_experts
        rows = []  # (text index, first token of the window, window length)
        for i, (ids, _) in enumerate(enc):
            rows += [(i, a, min(L, len(ids) - a)) for a in range(0, len(ids), L)]
        if not rows:
            return [(torch.zeros(0), torch.zeros(k, 0), torch.zeros(0, k)) for _ in texts]
        R = len(rows)
        inputs = torch.zeros(R, L, dtype=torch.long)
        targets = torch.zeros(R, L, dtype=torch.long)
        mask = torch.zeros(R, L, dtype=torch.long)
        logw = torch.full((R, L, k), -math.inf)  # (R, L, K)
        for r, (i, a, n) in enumerate(rows):
            ids = enc[i][0]
            inputs[r, 0] = self.bos if a == 0 else ids[a - 1]
            inputs[r, 1:n] = torch.tensor(ids[a:a + n - 1])
            targets[r, :n] = torch.tensor(ids[a:a + n])
            mask[r, :n] = 1
            if weights is not None:
                with np.errstate(divide="ignore"):
                    logw[r, :n] = torch.from_numpy(np.log(weights[i][a:a + n].astype(np.float64))).float()
        if self.kind == "posterior" or every_expert:
            need = mask.bool()[:, :, None].expand(R, L, k)  # the posterior needs every expert's likelihood
        else:
            need = logw > -math.inf  # (R, L, K): positions whose context routes to expert j
        # a causal LM needs the window only up to the last position that uses it
        last = torch.where(need, torch.arange(1, L + 1)[None, :, None], 0).amax(1)  # (R, K)
        lp = torch.full((k, R, L), -math.inf)  # (K, R, L) log p_j of each target
        for j, n in enumerate(last.sum(0).tolist()):
            self.expert_positions[j] += n
        if self.stacked() is not None:
            self._stacked_logprobs(inputs, targets, last, need, lp)
        else:
            for j in range(k):
                for sel in _length_chunks(last[:, j], self.chunk_tokens):
                    n = int(last[sel[0], j])
                    lp[j, sel, :n] = self._expert_logprobs(j, inputs[sel, :n], mask[sel, :n], targets[sel, :n]).cpu()
        if self.kind == "posterior":
            logw = self._posterior_logw(lp, rows, len(texts))
        mixed = torch.logsumexp(logw + lp.permute(1, 2, 0), dim=-1)  # (R, L)
        per_text: list[list[tuple]] = [[] for _ in texts]
        for r, (i, a, n) in enumerate(rows):
            per_text[i].append((mixed[r, :n], lp[:, r, :n], logw[r, :n]))
        return [(torch.cat([m for m, _, _ in p]), torch.cat([e for _, e, _ in p], 1), torch.cat([w for _, _, w in p]))
                if p else (torch.zeros(0), torch.zeros(k, 0), torch.zeros(0, k)) for p in per_text]

    def _stacked_logprobs(self, inputs: torch.Tensor, targets: torch.Tensor, last: torch.Tensor,
                          wanted: torch.Tensor, lp: torch.Tensor) -> None:
        """``_expert_logprobs`` of every (window, expert) pair that ``last`` (R, K) asks for, through the
        stacked experts: pairs of all experts share each packed forward (``packed_tokens`` positions); into lp,
        at the positions ``wanted`` (R, L, K) marks (the others a pair computes only as context)."""
        st = self.stacked()
        pairs = last.nonzero()  # (P, 2): (window, expert)
        need = last[pairs[:, 0], pairs[:, 1]]
        for sel in _length_chunks(need, self.packed_tokens, packed=True):
            sel = sel[torch.argsort(pairs[sel, 1], stable=True)]  # grouped by expert
            r, j, n = pairs[sel, 0], pairs[sel, 1], need[sel]
            T = int(n.max())
            valid = torch.arange(T)[None, :] < n[:, None]  # (P, T)
            keep = wanted[r, :T, j][valid]  # the packed rows whose log-probs are wanted
            with torch.no_grad():
                h = st.forward(inputs[r, :T], j, torch.zeros_like(n), n,
                               keep=None if keep.all() else keep.nonzero().flatten())  # (kept, d)
                tgt = targets[r, :T][valid][keep]
                rows = r[:, None].expand_as(valid)[valid][keep]
                cols = torch.arange(T).expand_as(valid)[valid][keep]
                expert = j.repeat_interleave(n)[keep]
                lp[expert, rows, cols] = st.target_logprobs(h, torch.bincount(expert, minlength=self.n_experts).tolist(),
                                                            tgt).cpu()
            for e, m in enumerate(torch.bincount(j, minlength=self.n_experts).tolist()):
                self.expert_calls[e] += m

    def _posterior_logw(self, lp: torch.Tensor, rows: list, n_texts: int) -> torch.Tensor:
        """BTM posterior weights before each token: log prior + log-likelihood of the earlier
        tokens of the same text, normalised (then top-k): (R, L, K)."""
        k, R, L = lp.shape
        logw = torch.full((R, L, k), -math.inf)
        prior = torch.from_numpy(np.log(self.prior)).float()
        seen = {i: torch.zeros(k) for i in range(n_texts)}  # log-likelihood so far per text
        for r, (i, a, n) in enumerate(rows):
            cum = torch.cumsum(lp[:, r, :n].T, 0)  # (n, K) through each token
            before = torch.cat([seen[i][None], seen[i][None] + cum[:-1]])  # (n, K) before each token
            seen[i] = seen[i] + cum[-1]
            post = torch.log_softmax(prior + before, dim=-1)
            w = self._topk(post.exp().double().numpy())
            with np.errstate(divide="ignore"):
                logw[r, :n] = torch.from_numpy(np.log(w)).float()
        return logw

    def fit_prior(self, texts: Sequence[str]) -> np.ndarray:
        """BTM prior: the average, over a few (validation) documents, of the posterior over
        experts after reading each whole document. Stored in ``self.prior`` and returned."""
        texts = _as_texts(texts)
        kind, top_k, self.kind, self.top_k = self.kind, self.top_k, "uniform", None
        try:
            posts = []
            for t in texts:
                ids, _ = self._encode(t)
                if not ids:
                    continue
                ll = []
                for j in range(self.n_experts):
                    inp = torch.tensor([[self.bos] + ids[:-1]])[:, : self.context]
                    tgt = torch.tensor([ids])[:, : self.context]
                    ll.append(float(self._expert_logprobs(j, inp, torch.ones_like(inp), tgt).sum()))
                ll = np.array(ll)
                posts.append(np.exp(ll - ll.max()) / np.exp(ll - ll.max()).sum())
        finally:
            self.kind, self.top_k = kind, top_k
        if not posts:
            raise ValueError("fit_prior needs at least one non-empty text")
        self.prior = np.mean(posts, axis=0)
        return self.prior

    def perplexity(self, texts: Sequence[str] | str | Path) -> dict:
        """Token-level perplexity over texts (or the validation split of a run directory's
        corpus): {"perplexity", "nll" (mean per token), "tokens", "documents"}."""
        if isinstance(texts, (str, Path)) and Path(texts).is_dir():
            texts = validation_texts(texts)
        scores = self.score(texts)
        n = sum(len(s) for s in scores)
        if n == 0:
            raise ValueError("no tokens to score")
        nll = -float(sum(s.double().sum() for s in scores)) / n
        if not math.isfinite(nll):
            raise ValueError(f"the ensemble's log-likelihood is {nll}: an expert produced non-finite outputs "
                             "(damaged weights?)")
        return {"perplexity": math.exp(nll), "nll": nll, "tokens": n, "documents": len(scores)}

    # ---------------------------------------------------------------------------------------
    # generation

    def engine(self, max_batch: int = defaults.MAX_BATCH, seed: int = 0) -> Engine:
        """A continuous-batching :class:`~cbtm.engine.Engine` over this ensemble (add / step / abort)."""
        return Engine(self, max_batch=max_batch, seed=seed)

    @torch.no_grad()
    def generate(self, prompts: str | Sequence[str], max_new_tokens: int | Sequence[int] = 50,
                 temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False, seed: int = 0,
                 stop: str | Sequence[str] | None = None, max_batch: int = defaults.MAX_BATCH) -> list[str]:
        """Continue each prompt, all prompts decoded together (the batched engine). ``temperature=0``
        or ``greedy`` decodes greedily; prompt i samples with its own generator seeded ``seed + i``;
        ``max_new_tokens`` may be one per prompt; generation ends at EOS, at a ``stop`` string (not
        included) or after ``max_new_tokens``. Routing is recomputed from the text so far at every step."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if prompts is None or not hasattr(prompts, "__iter__"):
            raise TypeError(f"prompts must be a str or a list of str, got {type(prompts).__name__}")
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts is empty: nothing to generate")
        bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
        if bad:
            raise TypeError(f"prompts must be str, got {bad[0]}")
        if isinstance(max_new_tokens, (list, tuple)):
            if len(max_new_tokens) != len(prompts):
                raise ValueError(f"max_new_tokens has {len(max_new_tokens)} values for {len(prompts)} prompts")
            lengths = list(max_new_tokens)
        else:
            lengths = [max_new_tokens] * len(prompts)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        stops = tuple([stop] if isinstance(stop, str) else stop or ())
        params = [SamplingParams(max_new_tokens=n, temperature=temperature, top_p=top_p, greedy=greedy,
                                 seed=seed + i, stop=stops) for i, n in enumerate(lengths)]
        seqs = self.engine(max_batch=max_batch).generate(prompts, params)
        return [s.text for s in seqs]


def _length_chunks(need: torch.Tensor, budget: int, packed: bool = False) -> list[torch.Tensor]:
    """Rows with ``need > 0`` (positions an expert must compute per row: (R,)) longest first, cut into
    chunks of at most ``budget`` positions (at least one row each): padded positions (rows x the longest,
    little padding per forward), or with ``packed`` the rows' own positions (a packed forward holds no
    padding; its (rows, longest) index tensors stay under ``PACKED_PAD_FACTOR x budget``)."""
    rows = need.nonzero().flatten()
    rows = rows[torch.argsort(need[rows], descending=True, stable=True)]
    lengths = need[rows].tolist()
    padded_budget = budget * PACKED_PAD_FACTOR if packed else budget
    out, start, total = [], 0, 0
    for i, n in enumerate(lengths):  # greedy: a row joins the chunk unless it would exceed a budget
        if i > start and ((i + 1 - start) * lengths[start] > padded_budget or (packed and total + n > budget)):
            out.append(rows[start:i])
            start, total = i, 0
        total += n
    return out + [rows[start:]] if lengths else out


def mix(lp: np.ndarray, w: np.ndarray, top_k: int | None = None) -> np.ndarray:
    """Mixture log-probs (n,) from expert log-probs (K, n) and full routing weights (n, K),
    keeping the top_k weights per token (renormalised)."""
    w = keep_top_k(w, top_k)
    with np.errstate(divide="ignore"):
        return np.logaddexp.reduce(np.log(w) + lp.T, axis=1)


def _as_texts(texts) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("expected a sequence of texts, got one str (wrap it in a list)")
    texts = list(texts)
    for t in texts:
        if not isinstance(t, str):
            raise TypeError(f"texts must be str, got {type(t).__name__}")
    return texts
