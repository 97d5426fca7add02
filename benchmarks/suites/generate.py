"""``generate`` suite: batched sparse generation against a dense model's transformers ``generate``.

Eight experts of the demo's architecture (the ``tiny`` Llama of ``cbtm demo``; random weights: the
speed does not depend on them, though random text re-routes more often than a trained model's) and a
router fitted on the embedded corpus; prompts of 10 words from its documents; every row decodes
exactly ``new`` tokens greedily (EOS ignored). Compared side by side in one process (timed round robin,
best of ``--repeats`` each, so a slow spell of a shared machine slows every method alike): one dense model
of the same size through transformers ``generate`` on the same batch, the engine (``Ensemble.generate``)
at top-1, top-2 and all 8, ``EnsembleForCausalLM.generate`` at top-1, and the plain per-row path
(``engine.generate_ref``: one row at a time, one forward per routed expert, as cbtm decoded before).
"""
import json
import math
import tempfile
import time
from itertools import islice
from pathlib import Path

from benchmarks.common import markdown_table

K = 8
BATCHES = {False: (1, 16, 64), True: (1, 4)}
GPU_BATCHES = (64, 256)
NEW = {False: 64, True: 8}
REF_PROMPTS = {False: 4, True: 2}  # the per-row path is timed on this many prompts (its speed is per row)


def build(root: Path, size: str = "tiny"):
    """A run with a router (k=8), a BPE tokenizer and K random experts of a named size, and a dense run."""
    import torch

    from cbtm import cluster, models
    from cbtm.corpus import default_corpus_path, read_documents
    from cbtm.rundir import RunDir
    from cbtm.tokens import load_tokenizer, train_tokenizer

    docs = list(islice(read_documents(default_corpus_path()), 0, None, 4))
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": d.id, "text": d.text}) + "\n" for d in docs))
    run, dense = root / "run", root / "dense"
    cluster.fit(str(corpus), run, k=K, n_components=100, progress=False)
    train_tokenizer((d.text for d in docs), run / "tokenizer")
    tok = load_tokenizer(run / "tokenizer")
    entries = []
    for j in range(K):
        models.new_model(size, tok, seed=j).save_pretrained(run / f"experts/expert_{j:03d}")
        entries.append({"id": j, "cluster": j, "path": f"experts/expert_{j:03d}", "status": "done"})
    RunDir(run).update(experts=entries)
    tok.save_pretrained(dense / "tokenizer")
    models.new_model(size, tok, seed=K).save_pretrained(dense / "experts/expert_000")
    RunDir(dense).update(experts=[{"id": 0, "path": "experts/expert_000", "status": "done"}],
                         corpus=RunDir(run).manifest()["corpus"])
    prompts = [" ".join(d.text.split()[:10]) for d in docs[1::53] if len(d.text.split()) >= 10]
    torch.manual_seed(0)
    return run, dense, prompts


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def run(args):
    import torch

    from cbtm.engine import SamplingParams, generate_ref
    from cbtm.ensemble import Ensemble
    from cbtm.hf_model import EnsembleForCausalLM
    from cbtm.models import load_model

    quick, new = args.quick, NEW[args.quick]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        run_dir, dense_dir, prompts = build(Path(tmp))
        dev = args.device
        dense = load_model(dense_dir / "experts/expert_000").eval().to(dev)
        tok = EnsembleForCausalLM.from_run(run_dir, top_k=1).tokenizer
        ensembles = {k: Ensemble.load(run_dir, top_k=k, routing="distance", device=dev) for k in (1, 2, None)}
        wrapper = EnsembleForCausalLM.from_run(run_dir, top_k=1, routing="distance", device=dev)
        sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
        for ens in ensembles.values():
            ens.generate(prompts[:2], max_new_tokens=2)  # load and stack the experts, warm up
        for B in GPU_BATCHES if dev == "cuda" and not quick else BATCHES[quick]:
            batch = (prompts * (B // len(prompts) + 1))[:B]
            enc = tok(batch, return_tensors="pt", padding=True).to(dev)
            params = SamplingParams(max_new_tokens=new, temperature=0, ignore_eos=True)

            def dense_generate():
                with torch.no_grad():
                    return dense.generate(**enc, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                          pad_token_id=tok.pad_token_id)

            def engine(k):
                return lambda: ensembles[k].engine(max_batch=B).generate(batch, [params] * B)

            def hf_wrapper():
                return wrapper.generate(**enc, max_new_tokens=new, min_new_tokens=new, do_sample=False)

            setups = [("dense: transformers generate", dense_generate)]
            setups += [(f"engine top-{k or K} of {K}", engine(k)) for k in (1, 2, None)]
            setups += [(f"EnsembleForCausalLM top-1 of {K}", hf_wrapper)]
            for _, fn in setups:
                fn()  # warm-up at this batch size
            timings = {name: math.inf for name, _ in setups}
            for _ in range(args.repeats):  # round robin: a slow spell of a shared machine hits every method
                for name, fn in setups:
                    timings[name] = min(timings[name], _timed(lambda: (fn(), sync()))[0])
            rows += [{"batch": B, "method": name, "tokens_per_s": B * new / t} for name, t in timings.items()]
            n = min(B, REF_PROMPTS[quick])
            t, _ = _timed(lambda: generate_ref(ensembles[1], batch[:n], [params] * n))
            rows.append({"batch": B, "method": f"per-row path top-1 of {K} (before)", "tokens_per_s": n * new / t})
            base = B * new / timings["dense: transformers generate"]
            ref = rows[-1]["tokens_per_s"]
            for r in rows:
                if r["batch"] == B:
                    r["vs_dense"] = r["tokens_per_s"] / base
                    r["vs_per_row"] = r["tokens_per_s"] / ref
    goals = []
    for B, method, target in [(16, "engine top-1", 0.5), (64, "engine top-1", 0.7), (64, "engine top-2", 0.4)]:
        r = [r for r in rows if r["batch"] == B and r["method"].startswith(method)]
        if r:
            goals.append({"goal": f"{method} of {K} vs dense generate, batch {B} ({args.device})",
                          "target": f"≥ {target}×", "measured": f"{r[0]['vs_dense']:.2f}×",
                          "met": r[0]["vs_dense"] >= target})
    r = [r for r in rows if r["batch"] == 16 and r["method"].startswith("engine top-1")]
    if r:
        goals.append({"goal": f"engine top-1 of {K} vs the per-row path, batch 16", "target": "≥ 6×",
                      "measured": f"{r[0]['vs_per_row']:.1f}×", "met": r[0]["vs_per_row"] >= 6})
    md = (f"## generate suite: {new} new tokens per row, greedy, k = {K} experts of the demo's size ({args.device})\n\n"
          + markdown_table(["batch", "method", "tokens/s", "× dense generate", "× per-row path"],
                           [[r["batch"], r["method"], r["tokens_per_s"], r["vs_dense"], r["vs_per_row"]] for r in rows]))
    return {"rows": rows, "markdown": md, "goals": goals}
