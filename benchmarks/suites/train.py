"""``train`` suite: training throughput (tokens/s) of the named model sizes on the current device.

The demo's model first: the tiny model of ``cbtm demo`` as it trains now (4096-token vocabulary,
cross-entropy fused with the output layer) against the same model as the demo trained it before
(8192-token vocabulary, full logits), one thread per process as the demo's experts run, batch
16 x 128; issue 9's goal is >= 2x the tokens/s. On CPU, the same two settings in their process
layouts over every core (before: one process of every core's threads, as the dense and seed runs
trained; now: one one-thread process per core, as the demo's single pool trains every run). Then, for ``tiny`` and ``small`` (``--device
cuda`` adds ``base``): one optimizer step of ``cbtm.training.Trainer`` (AdamW, clipping, warmup+cosine, fp32 on CPU, bf16 autocast on GPU) on a
batch of random token ids, vocabulary 8192 — the default batch of ``cbtm train`` on CPU (4 rows of
128 tokens), 16 rows of 512 on GPU — timed over several steps after a warmup step, best of
``--repeats``. On CPU both one thread and every core. The anchor is a plain Hugging Face loop on
the same model and batch (``model(input_ids, labels=x).loss.backward()``, AdamW step): the ratio
shows the overhead of cbtm's step (≈ 1.0 means none).
"""
import os

import numpy as np
import torch

from benchmarks.common import best_of, markdown_table

VOCAB = 8192
CPU_BATCH, GPU_BATCH = (4, 128), (16, 512)  # (rows, tokens per row)


DEMO_BATCH = (16, 128)
DEMO_BEFORE, DEMO_NOW = dict(vocab=8192, fused_loss=False), dict(vocab=4096, fused_loss=True)


class _Tok:
    """The two tokenizer facts a config needs, without training a tokenizer."""

    eos_token_id = bos_token_id = pad_token_id = 0

    def __init__(self, vocab: int = VOCAB):
        self.vocab = vocab

    def __len__(self):
        return self.vocab


def _trainer(size, device, batch, seq_len, vocab=VOCAB, fused_loss=True):
    from cbtm import models, training

    model = models.new_model(size, _Tok(vocab), seed=0)
    cfg = training.TrainConfig(seq_len=seq_len, batch_size=batch, lr=models.default_lr(size), fused_loss=fused_loss)
    return training.Trainer(model, cfg, total_steps=1000, device=device), models.num_params(model)


def _demo_stepper(setting: dict, device: str, rng):
    """(trainer, rows) of the demo's tiny model in ``setting``, after one warmup step on ``rows``."""
    batch, seq_len = DEMO_BATCH
    rows = [rng.integers(0, setting["vocab"], seq_len).astype(np.uint16) for _ in range(batch)]
    trainer, _ = _trainer("tiny", device, batch, seq_len, setting["vocab"], setting["fused_loss"])
    trainer.step(rows)  # warmup
    return trainer, rows


def _demo_model(device, steps, repeats):
    """Tokens/s of the demo's tiny model before and now (one thread on CPU), timed in alternation
    (best of ``repeats`` each) so that both see the same state of a shared machine."""
    batch, seq_len = DEMO_BATCH
    prev = torch.get_num_threads()
    torch.set_num_threads(1 if device == "cpu" else prev)
    try:
        rng = np.random.default_rng(0)
        sync = torch.cuda.synchronize if device == "cuda" else None
        steppers = {}
        for name, setting in (("before", DEMO_BEFORE), ("now", DEMO_NOW)):
            trainer, rows = _demo_stepper(setting, device, rng)
            steppers[name] = lambda trainer=trainer, rows=rows: [trainer.step(rows) for _ in range(steps)]
        best = dict.fromkeys(steppers, float("inf"))
        for _ in range(max(1, repeats)):
            for name, fn in steppers.items():
                best[name] = min(best[name], best_of(fn, 1, sync)[0])
        return {name: steps * batch * seq_len / t for name, t in best.items()}
    finally:
        torch.set_num_threads(prev)


def _layout_worker(setting: dict, threads: int, steps: int, repeats: int, barrier) -> list[float]:
    """One process of a layout: its tokens/s in each of ``repeats`` rounds, every round started
    together with the layout's other processes (``barrier``)."""
    torch.set_num_threads(threads)
    batch, seq_len = DEMO_BATCH
    trainer, rows = _demo_stepper(setting, "cpu", np.random.default_rng(0))
    rates = []
    for _ in range(max(1, repeats)):
        barrier.wait()
        t, _ = best_of(lambda: [trainer.step(rows) for _ in range(steps)], 1)
        rates.append(steps * batch * seq_len / t)
    return rates


def _demo_layout(steps, repeats):
    """Tokens/s of the whole CPU with the demo's model as its branch phase trained it before (one
    process of every core's threads, 8192-token vocabulary, full logits) and now (one one-thread
    process per core, every compared run's jobs in one pool, 4096 tokens, fused loss): the sum over
    the processes of a round, best round."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    cores = os.cpu_count() or 1
    ctx = mp.get_context("spawn")
    out = {}
    for name, setting, procs, threads in (("before", DEMO_BEFORE, 1, cores), ("now", DEMO_NOW, cores, 1)):
        with ctx.Manager() as manager, ProcessPoolExecutor(procs, mp_context=ctx) as pool:
            barrier = manager.Barrier(procs)
            futures = [pool.submit(_layout_worker, setting, threads, steps, repeats, barrier) for _ in range(procs)]
            rates = np.array([f.result() for f in futures])  # (procs, repeats)
        out[name] = {"processes": procs, "threads": threads, "tokens_per_s": float(rates.sum(0).max())}
    return out


def _plain_step(model, opt, x):
    loss = model(input_ids=x, labels=x, use_cache=False).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _measure(size, device, threads, steps, repeats):
    """(cbtm tokens/s, plain HF tokens/s, params) with ``threads`` torch threads."""
    batch, seq_len = GPU_BATCH if device == "cuda" else CPU_BATCH
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rng = np.random.default_rng(0)
        rows = [rng.integers(0, VOCAB, seq_len).astype(np.uint16) for _ in range(batch)]
        sync = torch.cuda.synchronize if device == "cuda" else None
        trainer, params = _trainer(size, device, batch, seq_len)
        trainer.step(rows)  # warmup
        t, _ = best_of(lambda: [trainer.step(rows) for _ in range(steps)], repeats, sync)
        ours = steps * batch * seq_len / t
        model = trainer.model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
        x = torch.from_numpy(np.stack(rows).astype(np.int64)).to(device)

        def plain():
            for _ in range(steps):
                with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                    _plain_step(model, opt, x)

        plain()  # warmup
        tp, _ = best_of(plain, repeats, sync)
        return ours, steps * batch * seq_len / tp, params
    finally:
        torch.set_num_threads(prev)


def run(args):
    """Tokens/s per size (and thread count on CPU); returns {"rows", "markdown"}."""
    device = args.device
    sizes = ("tiny", "small", "base") if device == "cuda" else ("tiny", "small")
    steps = 2 if args.quick else 10
    cores = os.cpu_count() or 1
    threads = [1] if device == "cuda" else sorted({1, cores})
    demo = _demo_model(device, steps, args.repeats)
    rows = [{"size": "tiny (demo)", "setting": name, **setting, "threads": 1, "tokens_per_s": demo[name],
             "vs_before": demo[name] / demo["before"]} for name, setting in (("before", DEMO_BEFORE), ("now", DEMO_NOW))]
    if device == "cpu":
        layout = _demo_layout(steps, args.repeats)
        for name, setting in (("before", DEMO_BEFORE), ("now", DEMO_NOW)):
            rows.append({"size": "tiny (demo)", "setting": f"{name}, every core", **setting, **layout[name],
                         "vs_before": layout[name]["tokens_per_s"] / layout["before"]["tokens_per_s"]})
    for size in sizes:
        for n in threads:
            ours, plain, params = _measure(size, device, n, steps, args.repeats)
            rows.append({"size": size, "params": params, "threads": n, "tokens_per_s": ours,
                         "plain_hf_tokens_per_s": plain, "vs_plain": ours / plain})
    demo_table = markdown_table(
        ["demo model", "vocabulary", "fused loss", "processes × threads", "tokens/s", "× before"],
        [(r["setting"], r["vocab"], r["fused_loss"], f"{r.get('processes', 1)} × {r['threads']}",
          round(r["tokens_per_s"]), r["vs_before"]) for r in rows if "setting" in r])
    table = markdown_table(
        ["size", "params (M)", "threads", "cbtm tokens/s", "plain HF tokens/s", "× plain"],
        [(r["size"], r["params"] / 1e6, r["threads"], round(r["tokens_per_s"]), round(r["plain_hf_tokens_per_s"]),
          r["vs_plain"]) for r in rows if "setting" not in r])
    batch, seq_len = GPU_BATCH if device == "cuda" else CPU_BATCH
    header = (f"## train suite: {device}, batch {batch} x {seq_len} tokens, vocabulary {VOCAB}, "
              f"{'bf16 autocast' if device == 'cuda' else 'fp32'}, {steps} steps per timing\n\n")
    demo_header = (f"## train suite: the demo's model, {device}, batch {DEMO_BATCH[0]} x {DEMO_BATCH[1]} tokens\n\n")
    return {"rows": rows, "markdown": demo_header + demo_table + "\n\n" + header + table}
