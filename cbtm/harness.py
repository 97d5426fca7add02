"""lm-evaluation-harness adapter: the sparse ensemble of a run as the harness model ``cbtm``.

lm-eval has no plugin discovery for models, so run its CLI through this module, which registers
``cbtm`` first (``pip install -e ".[eval]"``):

    python -m cbtm.harness --model cbtm --model_args run=runs/demo/cbtm-k8,top_k=2 \\
        --tasks cbtm_sources --include_path cbtm/data/tasks --num_fewshot 4

or from Python, ``lm_eval.simple_evaluate(model=cbtm.harness.CbtmLM(run=...), tasks=[...])``.
Every token is routed on the request's text before it (the context, then the continuation so far),
as ``Ensemble.score`` routes; only the experts routed to run.
"""

from __future__ import annotations

import logging
import sys

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from . import defaults
from .hf_model import EnsembleForCausalLM

_HARNESS_ARGS = ("max_batch_size",)  # what lm-eval passes to every model besides batch_size and device


@register_model("cbtm")
class CbtmLM(LM):
    """model_args: ``run`` (a trained run directory), ``top_k`` (an integer or ``all``),
    ``temperature`` (the router's T), ``kind`` (cluster / uniform), ``routing`` (auto / prefix /
    distance), ``device``, ``batch_size``; any other key is an error."""

    def __init__(self, run: str, top_k: int | str = defaults.TOP_K, temperature: float = defaults.TEMPERATURE,
                 kind: str = "cluster", device: str | None = None, batch_size: int | str | None = 8,
                 routing: str = defaults.ROUTING, **_harness):
        super().__init__()
        unknown = sorted(set(_harness) - set(_HARNESS_ARGS))
        if unknown:
            raise ValueError(f"unknown cbtm model_args {unknown}: expected run, top_k, temperature, kind, routing, "
                             "device, batch_size")
        top_k = None if str(top_k).lower() == "all" else int(top_k)
        if device is None or (device.startswith("cuda") and not torch.cuda.is_available()):
            if device is not None:  # lm-eval's CLI asks for cuda:0 unless told otherwise
                logging.getLogger(__name__).warning("%s requested but no CUDA device is available: using cpu", device)
            device = "cpu"
        self.model = EnsembleForCausalLM.from_run(run, top_k=top_k, temperature=float(temperature), kind=kind,
                                                  device=device, routing=routing)
        self.ensemble, self.tokenizer = self.model.ensemble, self.model.tokenizer
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8  # "auto" is not searched for

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _left_padded(self, seqs: list[list[int]]) -> dict:
        """Sequences (each starting with BOS) as a left-padded batch: input_ids, attention_mask (B, L)."""
        L = max(map(len, seqs))
        ids = torch.full((len(seqs), L), self.tokenizer.pad_token_id)
        mask = torch.zeros((len(seqs), L), dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, L - len(s):], mask[b, L - len(s):] = torch.tensor(s), 1
        return {"input_ids": ids, "attention_mask": mask}

    def _fit(self, ids: list[int], keep: int) -> list[int]:
        """BOS + ids, cut on the left to the experts' context (the last ``keep`` tokens must stay)."""
        C = self.ensemble.context
        if keep >= C:
            raise ValueError(f"{keep} tokens to keep, but the experts' context is {C} tokens")
        return [self.ensemble.bos] + ids[-(C - 1):]

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(log p(continuation | context), whether greedy decoding gives the continuation) per request."""
        pairs = []
        for context, continuation in (r.args for r in requests):
            n_spaces = len(context) - len(context.rstrip())  # trailing spaces go with the continuation
            if n_spaces:
                context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
            whole, ctx = self._encode(context + continuation), self._encode(context)
            pairs.append((whole, len(whole) - len(ctx)))
        out = []
        for i in range(0, len(pairs), self.batch_size):
            chunk = pairs[i:i + self.batch_size]
            seqs = [self._fit(whole, n) for whole, n in chunk]
            logp = self.model(**self._left_padded(seqs)).logits  # (B, L, V)
            for b, (seq, (_, n)) in enumerate(zip(seqs, chunk)):
                L = logp.shape[1]
                target = torch.tensor(seq[len(seq) - n:])
                lp = logp[b, L - n - 1:L - 1]  # (n, V): the positions before each continuation token
                out.append((float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all())))
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        """log p(text) of each whole text, windowed over long texts (``Ensemble.score`` summed)."""
        return [float(s.double().sum()) for s in self.ensemble.score([r.args[0] for r in requests])]

    def generate_until(self, requests) -> list[str]:
        """Continue each context with ``model.generate`` until a stop string, EOS or ``max_gen_toks``;
        the text before the first stop string. Empty stop strings are ignored; ``max_gen_toks`` 0
        gives an empty continuation."""
        out = []
        for context, gen_kwargs in (r.args for r in requests):
            kw = dict(gen_kwargs)
            until = kw.pop("until", None) or []
            until = [s for s in ([until] if isinstance(until, str) else list(until)) if s]
            max_new = int(kw.pop("max_gen_toks", 256))
            if max_new < 0:
                raise ValueError(f"max_gen_toks must be >= 0, got {max_new}")
            if max_new == 0:
                out.append("")
                continue
            if not kw.get("do_sample") or kw.get("temperature") == 0:
                kw = {k: v for k, v in kw.items() if k not in ("temperature", "top_p", "top_k")}
                kw["do_sample"] = False
            seq = self._fit(self._encode(context), 1)
            gen = self.model.generate(**self._left_padded([seq]), max_new_tokens=max_new, stop_strings=until or None,
                                      tokenizer=self.tokenizer, **kw)
            text = self.tokenizer.decode(gen[0, len(seq):], skip_special_tokens=True)
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line, with ``--model cbtm`` registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = [sys.argv[0]] + (sys.argv[1:] if argv is None else list(argv))
    cli_evaluate()


if __name__ == "__main__":
    main()
