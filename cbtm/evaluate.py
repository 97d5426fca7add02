"""Evaluation: validation perplexity of dense models and ensembles at several top-k, as one table
(markdown + JSON) and one plot (perplexity vs top-k, one line per run)."""

from __future__ import annotations

import hashlib
import math
import string
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from . import defaults
from .assignments import check_held_out, read_records, validation_documents
from .ensemble import Ensemble, mix
from .fewshot import SHOTS, evaluate_fewshot, read_task
from .rundir import RunDir, atomic_write, atomic_write_json, atomic_write_text, read_json

TOP_KS = defaults.TOP_KS
CONTEXT_BUCKETS = (0, 8, 32, 128)  # context lengths (tokens of the document before the scored one)
                                   # at which the report's breakdown starts a column


def _parse_top_ks(top_ks) -> list[str]:
    out = []
    for t in top_ks:
        t = str(t).strip().lower()
        if t != "all" and not (t.isdigit() and int(t) >= 1):
            raise ValueError(f"top-k values must be positive integers or 'all', got {t!r}")
        out.append(t)
    return out


def evaluate_run(run: str | Path, texts: Sequence[str], top_ks=TOP_KS, temperature: float = defaults.TEMPERATURE,
                 device: str = "cpu", batch_size: int = defaults.EVAL_BATCH, routing: str = defaults.ROUTING,
                 ids: Sequence[str] | None = None) -> dict:
    """Perplexity of one run on texts for every top-k (a one-expert run: only "all"); a run routed by
    its prefix router also gets the paper's distance router's perplexities (``distance_router``), and
    every run its perplexities by context length (``by_context``, see :func:`context_breakdown`; the
    texts' document ``ids`` name each one's own cluster).

    Every expert scores every token once; each top-k mixture is then formed from those
    log-probs with the router's weights, which equals what the sparse ensemble computes."""
    run = RunDir.of(run)
    routed = len(run.expert_entries()) > 1 and (run.router / "kmeans.json").is_file()
    ens = Ensemble.load(run, top_k=None, temperature=temperature, kind="cluster" if routed else "uniform",
                        device=device, batch_size=batch_size, routing=routing)
    scored = ens.expert_logprobs(texts)
    result = {"experts": ens.n_experts, "tokens": sum(lp.shape[1] for lp, _ in scored),
              "routing": ens.router.routing if routed else None,
              "perplexity": _perplexities(run, scored, [w for _, w in scored], top_ks)}
    if routed and routing == "auto" and ens.router.routing == "distance" and (run.router / "prefix.json").is_file():
        result["prefix_router"] = "stale"  # fitted on other clusters, or cannot reach an added expert
    if routed and ens.router.routing == "prefix":
        weights = ens.token_weights(texts, ens.router.by_distance())
        result["distance_router"] = _perplexities(run, scored, weights, top_ks)
    own = None
    if routed and ids is not None:
        records = read_records(run)
        expert_of = {int(e.get("cluster", e["id"])): j for j, e in enumerate(run.expert_entries())}
        own = [expert_of.get(records.get(str(i), (-1,))[0]) for i in ids]
    result["by_context"] = context_breakdown(scored, own)
    return result


def context_breakdown(scored: list, own: Sequence[int | None] | None = None) -> dict:
    """Where routing gains or loses: perplexity by context length (``CONTEXT_BUCKETS``, plus "all
    tokens") with every expert ("all") and, for several experts, at top-1, of each document's own
    expert (``own``: per text the expert of the cluster its whole document was assigned to -- an oracle
    no causal router has) and the share of tokens whose top-1 expert is that one ("top-1 = own").

    scored: per text (expert log-probs (K, n), full routing weights (n, K)).
    Returns ``{row: {column: value}}`` with columns like "0-7", "128+", "all tokens"."""
    edges = np.asarray(CONTEXT_BUCKETS)
    cols = [f"{a}-{b - 1}" for a, b in zip(edges, edges[1:])] + [f"{edges[-1]}+", "all tokens"]
    several = bool(scored) and scored[0][0].shape[0] > 1
    rows = ["top-1", "all"] if several else ["all"]
    if several and own is not None:
        rows += ["own cluster"]
    nll = {r: np.zeros(len(cols)) for r in rows}
    count, hits = np.zeros(len(cols)), np.zeros(len(cols))
    owned = np.zeros(len(cols))  # tokens of documents with a known own expert
    for t, (lp, w) in enumerate(scored):
        bucket = np.searchsorted(edges, np.arange(lp.shape[1]), side="right") - 1  # (n,)

        def per_column(v=None):  # sums of v (default: token counts) per bucket, then over every token
            b = np.bincount(bucket, weights=v, minlength=len(edges))
            return np.append(b, b.sum())

        per = {"all": mix(lp, w, None)}
        if several:
            per["top-1"] = mix(lp, w, 1)
        j = own[t] if own is not None else None
        if "own cluster" in rows and j is not None:
            per["own cluster"] = lp[j]
            owned += per_column()
            hits += per_column(w.argmax(1) == j)
        count += per_column()
        for r, v in per.items():
            nll[r] -= per_column(v)
    out = {}
    for r in rows:
        tokens = owned if r == "own cluster" else count
        out[r] = {c: math.exp(nll[r][i] / tokens[i]) for i, c in enumerate(cols) if tokens[i] > 0}
    if "own cluster" in rows:
        out["top-1 = own"] = {c: hits[i] / owned[i] for i, c in enumerate(cols) if owned[i] > 0}
    return out


def _perplexities(run: RunDir, scored: list, weights: list, top_ks) -> dict:
    """top-k -> perplexity of the mixtures of per-text expert log-probs (K, n) with weights (n, K)."""
    n_experts = scored[0][0].shape[0] if scored else 1
    n_tok = sum(lp.shape[1] for lp, _ in scored)
    out = {}
    for t in _parse_top_ks(top_ks):
        if n_experts == 1 and t != "all":
            continue
        top_k = None if t == "all" else int(t)
        if top_k is not None and top_k >= n_experts and t != str(n_experts):
            continue  # e.g. top-4 of 2 experts is the same as all
        nll = -sum(float(mix(lp, w, top_k).sum()) for (lp, _), w in zip(scored, weights)) / n_tok
        if not math.isfinite(nll):
            raise ValueError(f"{run.path}: the log-likelihood at top-{t} is {nll}: an expert produced "
                             "non-finite outputs (damaged weights?)")
        out[t] = math.exp(nll)
    return out


def _tokenizer_groups(runs: dict) -> dict:
    """run name -> a letter shared by the runs that tokenize alike (identical ``tokenizer.json``, or
    identical tokenizer files where there is none; the loading settings in tokenizer_config.json aside)."""
    letters: dict[str, str] = {}
    out = {}
    for name, path in runs.items():
        h = hashlib.blake2b(digest_size=16)
        folder = RunDir.of(path).tokenizer
        files = sorted(folder.iterdir()) if folder.is_dir() else []
        if folder / "tokenizer.json" in files:
            files = [folder / "tokenizer.json"]
        for f in files:
            if f.is_file() and f.name not in (".cbtm-output", "tokenizer_config.json"):
                h.update(f.name.encode() + b"\0" + f.read_bytes())
        out[name] = letters.setdefault(h.hexdigest(), string.ascii_uppercase[len(letters) % 26])
    return out


def evaluate(runs: dict, out: str | Path, top_ks=TOP_KS, max_docs: int | None = None,
             temperature: float = defaults.TEMPERATURE, device: str = "cpu", progress: bool = True,
             fewshot: str | Path | None = None, shots: int = SHOTS, route: str = "prompt",
             fewshot_limit: int | None = None, routing: str = defaults.ROUTING) -> dict:
    """Evaluate named runs (name -> run directory) on the validation documents of the first run's
    assignment records (checked to be validation documents of every run too); with ``fewshot`` (a
    task file, see ``cbtm.fewshot``) also their few-shot accuracy; write ``out/reports/eval.{json,md,png}``
    and return the JSON dict."""
    if not runs:
        raise ValueError("no runs to evaluate")
    t0 = time.perf_counter()
    first = next(iter(runs.values()))
    docs = validation_documents(first, limit=max_docs)
    if not docs:
        raise ValueError(f"{first}: the validation split is empty")
    for path in runs.values():
        check_held_out(path, [i for i, _ in docs])
    texts = [t for _, t in docs]
    if fewshot is not None:
        task_ids = [str(ex["id"]) for ex in read_task(fewshot)[0] if "id" in ex]
        for path in runs.values():
            check_held_out(path, task_ids)
    results = {}
    for name, path in tqdm(list(runs.items()), desc="evaluating", unit="run", disable=not progress):
        results[name] = evaluate_run(path, texts, top_ks, temperature, device, routing=routing,
                                     ids=[i for i, _ in docs])
    report = {"documents": len(texts), "tokens": next(iter(results.values()))["tokens"], "temperature": temperature,
              "tokenizers": _tokenizer_groups(runs),
              "top_k": _parse_top_ks(top_ks), "runs": {n: {"path": str(p), **results[n]} for n, p in runs.items()},
              "perplexity": {n: r["perplexity"] for n, r in results.items()},
              "seconds": round(time.perf_counter() - t0, 1)}
    if fewshot is not None:
        acc = {n: evaluate_fewshot(p, fewshot, shots, route, report["top_k"], temperature, device, fewshot_limit,
                                   routing)
               for n, p in tqdm(list(runs.items()), desc="few-shot", unit="run", disable=not progress)}
        report["fewshot"] = {"task": str(fewshot), "shots": shots, "route": route,
                             "examples": next(iter(acc.values()))["examples"],
                             "accuracy": {n: a["accuracy"] for n, a in acc.items()}}
        report["seconds"] = round(time.perf_counter() - t0, 1)
    md = eval_markdown(report)
    if progress:
        print(md, flush=True)  # before writing: a report that cannot be written loses no result
    reports = RunDir(out).reports
    try:
        atomic_write_json(reports / "eval.json", report)
        atomic_write_text(reports / "eval.md", md)
        plot(report["perplexity"], reports / "eval.png", report["top_k"])
    except OSError as e:
        kept = "printed above" if progress else "in this error's .report"
        raise ReportNotWritten(f"cannot write the evaluation report to {e.filename or reports}: {e.strerror or e} "
                               f"(the results are {kept}); pass --out DIR to write them to a writable directory",
                               report) from None
    return report


class ReportNotWritten(ValueError):
    """An evaluation finished but its report could not be written; ``report`` holds the results."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


def eval_markdown(report: dict) -> str:
    lines = [f"Validation perplexity ({report['documents']} documents, {report['tokens']:,} tokens; "
             f"router temperature {report['temperature']})", ""]
    lines += _table(report, {n: r["perplexity"] for n, r in report["runs"].items()}, "{:.2f}", router=True)
    if any(c not in r["perplexity"] for r in report["runs"].values() if r["experts"] > 1 for c in report["top_k"]):
        lines += ["", "A blank top-k of a run with several experts asks for at least its number of experts: "
                  "the same as all."]
    groups = report.get("tokenizers", {})
    if len(set(groups.values())) > 1:
        lines += ["", "**These runs tokenize differently** (tokenizers: " +
                  ", ".join(f"{n} {g}" for n, g in groups.items()) + "): perplexities per token are comparable "
                  "only between runs that share a tokenizer."]
    paper = {n: r["distance_router"] for n, r in report["runs"].items() if "distance_router" in r}
    if paper:
        lines += ["", "Routed runs use their prefix router; the paper's distance router (softmax(-d^2 / T)) on the "
                  "same experts:", ""]
        lines += _table(report, paper, "{:.2f}")
    lines += context_markdown({n: r["by_context"] for n, r in report["runs"].items() if "by_context" in r})
    if "fewshot" in report:
        fs = report["fewshot"]
        routing = "routed once on the prompt" if fs["route"] == "prompt" else "routed per token"
        lines += ["", f"Few-shot accuracy on {Path(fs['task']).name} ({fs['examples']} examples, {fs['shots']} "
                  f"shots, {routing})", ""]
        lines += _table(report, fs["accuracy"], "{:.3f}")
    return "\n".join(lines) + "\n"


def context_markdown(breakdowns: dict) -> list[str]:
    """The by-context-length tables of runs (name -> :func:`context_breakdown`) as markdown lines."""
    if not breakdowns:
        return []
    cols = list(dict.fromkeys(c for b in breakdowns.values() for row in b.values() for c in row))
    lines = ["", "Perplexity by context length (tokens of the document before the scored one). *own cluster*: "
             "each document scored by the expert of the cluster its whole document was assigned to, an oracle "
             "no causal router has; *top-1 = own*: how often the router's top expert is that one.", "",
             "| run | " + " | ".join(cols) + " |", "| --- |" + " ---: |" * len(cols)]
    for name, b in breakdowns.items():
        for row, values in b.items():
            fmt = "{:.0%}" if row == "top-1 = own" else "{:.2f}"
            label = name if len(b) == 1 else f"{name} {row}"
            lines.append(f"| {label} | " + " | ".join(fmt.format(values[c]) if c in values else "" for c in cols)
                         + " |")
    return lines


def _table(report: dict, values: dict, fmt: str, router: bool = False) -> list[str]:
    """Markdown rows: one per run, one column per top-k of the report (``values``: run -> top-k -> number);
    ``router``: a column saying how each run was routed."""
    cols = report["top_k"]
    lines = ["| run | experts | " + ("router | " if router else "") +
             " | ".join(f"top-{c}" if c != "all" else "all" for c in cols) + " |",
             "| --- | ---: |" + (" --- |" if router else "") + " ---: |" * len(cols)]
    for name, r in report["runs"].items():
        if name not in values:
            continue
        how = (r.get("routing") or "") + (" (its prefix router is stale)" if r.get("prefix_router") else "")
        cells = ([how] if router else []) + [fmt.format(values[name][c]) if c in values[name] else "" for c in cols]
        lines.append(f"| {name} | {r['experts']} | " + " | ".join(cells) + " |")
    return lines


def new_figure(size=(6, 4)):
    """A matplotlib figure and axes drawn off-screen (the Agg canvas, no global backend switch)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def save_figure(fig, ax, path: Path, xlabel: str, ylabel: str) -> None:
    """Label, legend and grid the axes, then write the figure as a PNG atomically."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=120, format="png"))


def plot(perplexity: dict, path: Path, top_ks: Sequence[str] = TOP_KS) -> None:
    """Perplexity vs top-k (categorical axis), one line per run; one-expert runs as dashed lines."""
    cols = [c for c in top_ks if any(c in p for p in perplexity.values())]
    fig, ax = new_figure()
    for name, p in perplexity.items():
        pts = [(i, p[c]) for i, c in enumerate(cols) if c in p]
        if list(p) == ["all"]:
            ax.axhline(p["all"], linestyle="--", color="gray", label=f"{name}")
        else:
            ax.plot([x for x, _ in pts], [v for _, v in pts], marker="o", label=name)
    ax.set_xticks(range(len(cols)), [f"top-{c}" if c != "all" else "all" for c in cols])
    save_figure(fig, ax, path, "experts used per token", "validation perplexity")


def learning_curves(runs: dict) -> dict:
    """Validation loss vs training tokens of every job of named runs, from their logs:
    ``{run: {job: [[tokens, valid_loss], ...]}}`` (the seed phase and each expert are jobs)."""
    out = {}
    for name, path in runs.items():
        run = RunDir.of(path)
        jobs = {}
        for log in sorted(run.logs.glob("*.json")) if run.logs.is_dir() else []:
            try:
                points = [[v["tokens"], v["valid_loss"]] for v in read_json(log).get("valid", [])
                          if v.get("valid_loss") is not None]
            except (ValueError, AttributeError, KeyError, TypeError):
                continue  # not a job log
            if points:
                jobs[log.stem] = points
        out[name] = jobs
    return out


def plot_curves(curves: dict, path: Path) -> None:
    """One panel: validation loss vs tokens, a line per job (experts of a run share its colour)."""
    fig, ax = new_figure((7, 4.5))
    for i, (name, jobs) in enumerate(curves.items()):
        for j, (job, pts) in enumerate(sorted(jobs.items())):
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=f"C{i % 10}", lw=1, marker="o", ms=2,
                    label=name if j == 0 else None, alpha=0.9 if len(jobs) == 1 else 0.6)
    save_figure(fig, ax, path, "training tokens of the job", "validation loss (own split)")


def parse_runs(values: Sequence[str]) -> dict:
    """["NAME=DIR", "DIR", ...] -> {name: dir} (a bare DIR is named after its folder)."""
    runs = {}
    for v in values:
        name, _, path = v.partition("=") if "=" in v else (Path(v).name, "", v)
        if not RunDir(path).exists():
            raise FileNotFoundError(f"{path} is not a cbtm run directory (no cbtm.json)")
        runs[name] = path
    return runs

