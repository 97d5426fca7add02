"""Few-shot classification, the papers' downstream evaluation: k-shot prompts, each candidate label
scored by its log-likelihood after the prompt, the best one predicted.

A task is a JSON-lines file of ``{"id", "text", "label"}`` examples; its labels are the distinct
labels of the file. Each example's prompt is ``shots`` demonstrations (other examples of the file,
drawn with a fixed seed, the same for every model) and then the example:

    Passage: <text>\\nSource: <label>\\n\\n ... Passage: <text>\\nSource:      + " <candidate label>"

Routing (``route``): "prompt" routes once per example on its prompt (the official C-BTM setting);
"token" routes every token on the text before it, as ``Ensemble.score`` does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from . import defaults
from .assignments import corpus_paths, corpus_settings, read_options, read_records
from .corpus import read_documents, split_of
from .ensemble import Ensemble, mix
from .rundir import RunDir, atomic_write_text

ROUTES = ("prompt", "token")
SHOTS = 2  # demonstrations per prompt: with 120-character passages a 2-shot prompt fits 128-token training blocks
# the embedded corpus's domains as the label names the shipped task asks for
SOURCE_NAMES = {"bible": "Bible", "python_docs": "Python docs", "shakespeare": "Shakespeare",
                "sotu_speeches": "State of the Union", "austen": "Austen", "dict_jargon": "Jargon File",
                "dict_devil": "Devil's Dictionary", "fortune": "fortune"}
SOURCE_TASK = Path(__file__).parent / "data" / "tasks" / "sources.jsonl"


def build_source_task(run_or_corpus=None, out: str | Path = SOURCE_TASK, per_label: int = 20, chars: int = 120,
                      label_field: str = "domain", seed: int = 0) -> list[dict]:
    """"Which source does this passage come from": ``per_label`` held-out passages per label (the
    first ``chars`` characters of validation documents, cut at a word), written to ``out``.

    ``run_or_corpus``: a run directory (its assignment records' validation split) or corpus paths
    (None: the embedded corpus; its default hash split, which every run on it shares)."""
    if run_or_corpus is not None and RunDir(run_or_corpus).exists():
        settings = corpus_settings(run_or_corpus)
        valid = {i for i, (_, split) in read_records(run_or_corpus).items() if split == "valid"}
        docs = read_documents(settings["paths"], **read_options(settings))
    else:
        docs = read_documents(corpus_paths(run_or_corpus))
        valid = None
    by_label: dict[str, list[dict]] = {}
    for d in docs:
        label = d.meta.get(label_field)
        held_out = (d.id in valid) if valid is not None else \
            split_of(d.id, defaults.VALID_FRACTION, defaults.SPLIT_SEED) == "valid"
        if label is None or not held_out:
            continue
        words = " ".join(d.text.split())
        passage = words[:chars].rsplit(" ", 1)[0] if len(words) > chars else words
        by_label.setdefault(str(label), []).append({"id": d.id, "text": passage,
                                                    "label": SOURCE_NAMES.get(str(label), str(label))})
    if len(by_label) < 2:
        raise ValueError(f"the held-out documents carry {len(by_label)} distinct {label_field!r} labels; "
                         "a classification task needs at least 2")
    rng = np.random.default_rng(seed)
    rows = [by_label[label][i] for label in sorted(by_label) for i in rng.permutation(len(by_label[label]))[:per_label]]
    rows = [rows[i] for i in rng.permutation(len(rows))]  # labels interleaved: any first N examples mix them
    atomic_write_text(Path(out), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return rows


def read_task(path: str | Path) -> tuple[list[dict], list[str]]:
    """The examples of a task file and its sorted labels."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"few-shot task not found: {path}")
    examples = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
            except ValueError:
                raise ValueError(f"{path}:{lineno}: not JSON") from None
            if not isinstance(ex, dict) or not isinstance(ex.get("text"), str) or not isinstance(ex.get("label"), str):
                raise ValueError(f"{path}:{lineno}: an example needs string fields 'text' and 'label'")
            examples.append(ex)
    labels = sorted({ex["label"] for ex in examples})
    if len(labels) < 2:
        raise ValueError(f"{path}: a classification task needs at least 2 labels, found {labels}")
    return examples, labels


def prompts(examples: Sequence[dict], shots: int, seed: int = 0) -> list[str]:
    """The k-shot prompt of every example (ending in "Source:"); demonstrations are other examples."""
    if not 0 <= shots < len(examples):
        raise ValueError(f"shots must be in [0, {len(examples) - 1}] for a task of {len(examples)} examples")
    rng = np.random.default_rng(seed)
    out = []
    for i, ex in enumerate(examples):
        others = [j for j in rng.permutation(len(examples))[:shots + 1].tolist() if j != i][:shots]
        demos = "".join(f"Passage: {examples[j]['text']}\nSource: {examples[j]['label']}\n\n" for j in others)
        out.append(f"{demos}Passage: {ex['text']}\nSource:")
    return out


def evaluate_fewshot(run: str | Path, task: str | Path, shots: int = SHOTS, route: str = "prompt",
                     top_ks: Sequence[str] = defaults.TOP_KS, temperature: float = defaults.TEMPERATURE,
                     device: str = "cpu", limit: int | None = None, routing: str = defaults.ROUTING) -> dict:
    """Accuracy of a run on a task at every top-k (a one-expert run: only "all"):
    ``{"examples", "accuracy": {top_k: acc}, "predictions": {top_k: [label per example]}}``.

    Every expert scores every candidate once; each top-k mixture is then formed from those
    log-probs, which equals what the sparse ensemble computes (as ``evaluate.evaluate_run`` does)."""
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    examples, labels = read_task(task)
    texts = prompts(examples, shots)[:limit]
    examples = examples[:limit]
    run = RunDir.of(run)
    routed = len(run.expert_entries()) > 1 and (run.router / "kmeans.json").is_file()
    ens = Ensemble.load(run, top_k=None, temperature=temperature, kind="cluster" if routed else "uniform",
                        device=device, routing=routing)
    keys = ["all"] if ens.n_experts == 1 else [str(t) for t in top_ks if str(t) == "all" or int(t) <= ens.n_experts]
    predicted: dict[str, list[str]] = {k: [] for k in keys}
    for prompt, ex in zip(texts, examples):
        candidates = [f"{prompt} {label}" for label in labels]
        scored = ens.expert_logprobs(candidates)  # per candidate: (K, n), (n, K)
        n_label = [_tokens_from(ens, text, len(prompt)) for text in candidates]
        if route == "prompt":
            w_prompt = ens.router.token_weights([prompt], [[len(prompt)]])[0][0] if ens.kind == "cluster" \
                else ens.prior  # (K,): every expert's weight; mix() keeps the top-k
        for key in keys:
            top_k = None if key == "all" else int(key)
            ll = [mix(lp[:, -n:], np.tile(w_prompt, (n, 1)) if route == "prompt" else w[-n:], top_k).sum()
                  for (lp, w), n in zip(scored, n_label)]
            predicted[key].append(labels[int(np.argmax(ll))])
    gold = [ex["label"] for ex in examples]
    return {"examples": len(examples), "predictions": predicted,
            "accuracy": {k: float(np.mean([p == g for p, g in zip(v, gold)])) for k, v in predicted.items()}}


def _tokens_from(ens: Ensemble, text: str, start: int) -> int:
    """How many tokens of ``text`` begin at or after character ``start`` (the candidate label's)."""
    enc = ens.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return sum(s >= start for s, _ in enc["offset_mapping"])
