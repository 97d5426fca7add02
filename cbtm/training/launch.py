"""Launching a run's jobs: in process, in worker processes (one per GPU or CPU share), under
torchrun (DDP inside each job; gloo on CPU) or on Ray (one task per expert, retried from its
checkpoint); and the compute-matched dense baseline."""

from __future__ import annotations

import contextlib
import inspect
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

import torch

from .. import assignments, defaults, tokens
from ..rundir import RunDir, atomic_write_json, expert_name, holds_lock
from .config import TrainConfig, make_config
from .distributed import launched_by_torchrun, resolve_device
from .job import run_job
from .plan import plan_jobs, print_summary, record, run_summary


BACKENDS = ("local", "torchrun", "ray")


class TrainingFailed(RuntimeError):
    """One or more jobs failed; the manifest records which and why."""


@holds_lock("train", unless=launched_by_torchrun)  # under torchrun the launching process holds it
def train_experts(run, total_tokens: int, *, model_size: str = "tiny", seed_model: str | Path | None = None,
                  seed_tokens: int = 0, experts: Sequence[int] | None = None, backend: str = "local",
                  parallel: int = 1, nproc_per_node: int = 2, ray_address: str | None = None,
                  num_cpus: float = 1, num_gpus: float = 0, retries: int = 2, vocab_size: int | None = None,
                  device: str | None = None, threads: int | None = None, restart: bool = False,
                  progress: bool = True, callback: Callable[[dict], None] | None = None,
                  config: TrainConfig | None = None, **settings) -> dict:
    """Branch k experts from one seed and train expert i on cluster i for ``total_tokens / k``
    tokens (compute-matched with a dense model of ``total_tokens``).

    The seed is a fresh ``model_size`` model or the local HF model ``seed_model``, optionally
    trained first on all clusters for ``seed_tokens`` (the BTM seed phase). ``experts`` selects ids;
    ``settings`` are :class:`TrainConfig` fields (seq_len=..., batch_size=...). Backends:
    ``local`` (in process, or ``parallel`` worker processes, one per GPU when on GPU), ``torchrun``
    (DDP over ``nproc_per_node`` processes per job; also used when launched by torchrun), ``ray``
    (one task per expert with ``num_cpus``/``num_gpus``, retried ``retries`` times, resuming from
    its checkpoint). Rerunning the same call resumes; finished experts are skipped. Returns the
    manifest's view of the trained experts; raises TrainingFailed when any failed."""
    run = RunDir.of(run)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if int(parallel) != parallel or parallel < 1 or int(nproc_per_node) != nproc_per_node or nproc_per_node < 1:
        raise ValueError("parallel and nproc_per_node must be positive integers")
    if callback is not None and (backend != "local" or parallel > 1):
        raise ValueError("callback needs backend='local' with parallel=1")
    cfg = make_config(config, settings)
    plan = dict(total_tokens=total_tokens, model_size=model_size, seed_model=seed_model, seed_tokens=seed_tokens,
                experts=experts, cfg=cfg, vocab_size=vocab_size, restart=restart, progress=progress)
    if launched_by_torchrun():
        if backend == "ray":
            raise ValueError("backend 'ray' cannot run inside torchrun")
        return _train_distributed(run, plan, device, threads, progress, callback)
    jobs, _ = plan_jobs(run, **plan, write=True)
    names = [j["name"] for j in jobs]
    if backend == "torchrun":
        kwargs = {"run": str(run.path), "total_tokens": total_tokens, "model_size": model_size,
                  "seed_model": None if seed_model is None else str(Path(seed_model).resolve()),
                  "seed_tokens": seed_tokens, "experts": None if experts is None else [int(e) for e in experts],
                  "vocab_size": vocab_size, "device": device,
                  "threads": threads, "progress": progress, "backend": "torchrun", **asdict(cfg)}
        _launch_torchrun(run, kwargs, nproc_per_node, progress)
    elif backend == "ray":
        _dispatch_ray(run, jobs, ray_address, num_cpus, num_gpus, retries, threads, progress)
    else:
        _train_local([(run, jobs)], parallel, device, threads, progress, callback)
    summary = run_summary(run, names)
    _raise_failures([summary])
    if progress:
        print_summary(summary)
    return summary


def train_runs(requests: Sequence[dict], *, parallel: int = 1, device: str | None = None, threads: int | None = None,
               progress: bool = True) -> list[dict]:
    """Several runs' experts in one pool of ``parallel`` worker processes (local backend), longest
    jobs first, so no core idles between runs (the demo's layout: every compared run and the dense
    baseline on 2 CPU cores). Each request holds :func:`train_experts`'s arguments for one run:
    ``run``, ``total_tokens`` and any of ``model_size``, ``seed_model``, ``seed_tokens``,
    ``experts``, ``vocab_size``, ``restart``, ``config`` and TrainConfig fields. Every run is planned
    (and validated) before any job starts; seed phases run in process before the experts. Rerunning
    resumes. Returns each run's summary, in order; raises TrainingFailed when any job failed.
    Holds every run's write lock while it runs."""
    with contextlib.ExitStack() as locks:
        for request in requests:
            if isinstance(request, dict) and "run" in request:
                locks.enter_context(RunDir.of(request["run"]).lock("train"))
        return _train_runs(requests, parallel, device, threads, progress)


def _train_runs(requests: Sequence[dict], parallel: int, device, threads, progress: bool) -> list[dict]:
    if int(parallel) != parallel or parallel < 1:
        raise ValueError("parallel must be a positive integer")
    planned = []
    for request in requests:
        r = dict(request)
        missing = {"run", "total_tokens"} - set(r)
        if missing:
            raise ValueError(f"every request needs run and total_tokens; missing {sorted(missing)}")
        run = RunDir.of(r.pop("run"))
        if any(run.path.resolve() == p.path.resolve() for p, _ in planned):
            raise ValueError(f"{run.path} is requested twice")
        plan = {key: r.pop(key, default) for key, default in _plan_defaults().items()}
        total = r.pop("total_tokens")
        cfg = make_config(r.pop("config", None), r)
        jobs, _ = plan_jobs(run, total_tokens=total, **plan, cfg=cfg, progress=progress, write=True)
        planned.append((run, jobs))
    _train_local(planned, parallel, device, threads, progress, None)
    summaries = [run_summary(run, [j["name"] for j in jobs]) for run, jobs in planned]
    _raise_failures(summaries)
    return summaries


def _plan_defaults() -> dict:
    """train_experts's defaults of the arguments that plan a run (other than the token budget and config)."""
    params = inspect.signature(train_experts).parameters
    return {key: params[key].default for key in ("model_size", "seed_model", "seed_tokens", "experts", "vocab_size",
                                                 "restart")}


def _raise_failures(summaries: Sequence[dict]) -> None:
    """TrainingFailed naming every failed seed phase, else every expert not done, of the summaries' runs."""
    seeds, experts = [], []
    for s in summaries:
        where = f"{s['run']}: " if len(summaries) > 1 else ""
        if (s["seed"] or {}).get("status") == "failed":
            seeds.append(f"{where}{s['seed'].get('error')}")
        experts += [f"{where}{expert_name(e['id'])}: {e.get('error', e['status'])}"
                    for e in s["experts"] if e["status"] != "done"]
    if seeds:
        raise TrainingFailed("the seed phase failed: " + "; ".join(seeds))
    if experts:
        raise TrainingFailed("experts failed: " + "; ".join(experts))


def _train_local(planned: Sequence[tuple[RunDir, list[dict]]], parallel: int, device, threads, progress,
                 callback) -> None:
    """The planned jobs of one or more runs: seed phases first (in process), then the experts in
    process (``parallel`` 1) or in a pool of ``parallel`` worker processes."""
    if parallel > 1:
        _dispatch_pool(planned, parallel, device, threads, progress)
        return
    for run, jobs in planned:
        for spec in jobs:
            run_recorded(run, spec, device=device, threads=threads, progress=progress, callback=callback)


def run_recorded(run: RunDir, spec: dict, **kwargs) -> dict:
    """run_job with the manifest kept up to date (running / done / failed)."""
    record(run, spec, "running")
    try:
        result = run_job(run, spec, **kwargs)
    except Exception as e:
        record(run, spec, "failed", error=f"{type(e).__name__}: {e}")
        raise
    record(run, spec, "done", result)
    return result


def _launch_torchrun(run: RunDir, kwargs: dict, nproc: int, progress: bool) -> None:
    """Run :func:`train_experts` under ``torchrun --standalone --nproc-per-node nproc``."""
    job_file = run.path / "logs" / "torchrun.json"
    atomic_write_json(job_file, kwargs)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "cbtm.training", str(job_file)]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
    proc = subprocess.run(cmd, env=env, text=True, stdout=None if progress else subprocess.PIPE,
                          stderr=None if progress else subprocess.STDOUT)
    if proc.returncode != 0:
        tail = "" if progress else "\n" + (proc.stdout or "")[-4000:]
        raise TrainingFailed(f"torchrun exited with status {proc.returncode}{tail}")


def _train_distributed(run: RunDir, plan: dict, device, threads, progress, callback) -> dict:
    """Inside torchrun: process 0 prepares the run, then every job trains with DDP."""
    import torch.distributed as dist

    local_rank = int(os.environ["LOCAL_RANK"])
    dev = resolve_device(device, local_rank)
    created = not dist.is_initialized()
    if created:
        from datetime import timedelta

        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(minutes=60))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    rank = dist.get_rank()
    threads = threads or max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    try:
        ok = torch.ones(1)
        if rank == 0:
            try:
                plan_jobs(run, **plan, write=True)
            except Exception:
                ok.zero_()
                dist.broadcast(ok, 0)
                raise
        dist.broadcast(ok, 0)
        if not ok.item():
            raise TrainingFailed("process 0 failed to prepare the run")
        jobs, _ = plan_jobs(run, **plan, write=False)
        for spec in jobs:
            if rank == 0:
                run_recorded(run, spec, device=str(dev), threads=threads, progress=progress, callback=callback)
            else:
                run_job(run, spec, device=str(dev), threads=threads, progress=False)
        return run_summary(run, [j["name"] for j in jobs])
    finally:
        if created:
            dist.destroy_process_group()


def _pool_job(run_path: str, spec: dict, device: str | None, threads: int | None, progress: bool, slots) -> dict:
    """One job in a worker process, holding one slot (a GPU index, or a progress-bar row) while it runs."""
    slot = slots.get()
    try:
        dev = f"cuda:{slot}" if resolve_device(device).type == "cuda" else "cpu"
        return run_job(run_path, spec, device=dev, threads=threads, progress=progress, position=slot)
    finally:
        slots.put(slot)


def _dispatch_pool(planned: Sequence[tuple[RunDir, list[dict]]], parallel: int, device, threads, progress) -> None:
    """``parallel`` worker processes, each pinned to one GPU (or to cores/parallel CPU threads), running
    the experts of every planned run, the largest token budgets first; seed phases run before, in process."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    if resolve_device(device).type == "cuda" and parallel > torch.cuda.device_count():
        raise ValueError(f"parallel={parallel} but only {torch.cuda.device_count()} GPUs are visible")
    threads = threads or max(1, (os.cpu_count() or 1) // parallel)
    ctx = mp.get_context("spawn")
    for run, jobs in planned:
        for spec in jobs:
            if spec["expert"] is None:
                run_recorded(run, spec, device=device, threads=None, progress=progress)
    experts = [(run, spec) for run, jobs in planned for spec in jobs if spec["expert"] is not None]
    experts.sort(key=lambda job: -job[1]["tokens"])  # longest first: the last jobs to finish are short
    with ctx.Manager() as manager, ProcessPoolExecutor(parallel, mp_context=ctx) as pool:
        slots = manager.Queue()
        for i in range(parallel):
            slots.put(i)
        futures = {}
        for run, spec in experts:
            record(run, spec, "running")
            futures[pool.submit(_pool_job, str(run.path), spec, device, threads, progress, slots)] = (run, spec)
        for fut in as_completed(futures):
            run, spec = futures[fut]
            try:
                record(run, spec, "done", fut.result())
            except Exception as e:
                record(run, spec, "failed", error=f"{type(e).__name__}: {e}")


def _ray_job(run_path: str, spec: dict, threads: int, use_gpu: bool) -> dict:
    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    return run_job(run_path, spec, device=device, threads=threads, progress=False)


def _dispatch_ray(run: RunDir, jobs: list[dict], address, num_cpus, num_gpus, retries, threads, progress) -> None:
    """Submit the seed job, then every expert as one Ray task; record results as they finish."""
    from tqdm.auto import tqdm

    from ..ray_backend import ray_session

    if num_cpus <= 0 or num_gpus < 0 or int(retries) != retries or retries < 0:
        raise ValueError("num_cpus must be > 0, num_gpus >= 0 and retries a non-negative integer")
    threads = threads or max(1, int(num_cpus))
    with ray_session(address, os.cpu_count()) as ray:
        task = ray.remote(_ray_job).options(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=int(retries),
                                            retry_exceptions=True)
        for stage in ([j for j in jobs if j["expert"] is None], [j for j in jobs if j["expert"] is not None]):
            refs = {}
            for spec in stage:
                record(run, spec, "running")
                refs[task.remote(str(run.path), spec, threads, num_gpus > 0)] = spec
            bar = tqdm(total=len(refs), desc="ray tasks", unit="job", disable=not progress or not refs)
            pending = list(refs)
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                spec = refs[ready[0]]
                try:
                    record(run, spec, "done", ray.get(ready[0]))
                except Exception as e:
                    record(run, spec, "failed", error=f"{type(e).__name__}: {e}"[:2000])
                bar.update()
            bar.close()
            if run.manifest().get("seed", {}).get("status") == "failed":
                return


@holds_lock("train --dense", "out")
def prepare_dense(out, *, like=None, corpus=None, valid_fraction: float = defaults.VALID_FRACTION,
                  split_seed: int = defaults.SPLIT_SEED, seed_model: str | Path | None = None,
                  vocab_size: int | None = None, progress: bool = True) -> RunDir:
    """The run directory of a dense baseline (k=1, every training document): with ``like`` (a
    clustered run) that run's corpus, train/valid split and tokenizer, so its losses compare with
    the experts'; otherwise ``corpus`` (default: the embedded one) split by ``split_of``."""
    out = RunDir.of(out)
    if like is not None:
        like = RunDir.of(like)
        if like.path.resolve() == out.path.resolve():
            raise ValueError("the dense run needs its own directory, not the clustered run's")
        s = assignments.corpus_settings(like)
        assignments.write_assignments(out, assignments.dense_records(like), s["paths"], k=1, name="dense",
                                      **assignments.read_options(s), source=f"dense, like {like.path}")
        if not (out.tokenizer / "tokenizer_config.json").is_file():
            if not (like.tokenizer / "tokenizer_config.json").is_file():
                tokens.ensure_tokenizer(like, seed_model, vocab_size, progress)
            tokens.copy_tokenizer(like, out)
    else:
        records = assignments.dense_records(None, corpus, valid_fraction, split_seed)
        assignments.write_assignments(out, records, corpus, k=1, name="dense", source="dense")
    return out


def like_settings(like, given: dict) -> dict:
    """What makes a dense baseline compute-matched with the trained run ``like``: its seed (model
    size or seed model, and seed phase), tokenizer, and every TrainConfig field that shapes the
    weights (sequence length, batch, schedule, ...). ``given``: the caller's explicit values (None:
    not given), each checked against the run's: one that differs is a ValueError naming both.
    Returns :func:`train_experts` keywords (``given`` alone while ``like`` is not trained yet)."""
    like = RunDir.of(like)
    train = like.section("train")
    if not train:
        return {key: v for key, v in given.items() if v is not None}
    ref = {"model_size": train.get("model_size"), "seed_model": train.get("seed_model"),
           "seed_tokens": train.get("seed_tokens") or 0, **TrainConfig(**train["config"]).trained_fields()}
    tok = like.section("tokenizer")
    for key, value in given.items():
        if value is None:
            continue
        have = tok.get("vocab_size") if key == "vocab_size" else ref[key]
        if key == "seed_model":
            value = str(Path(value).resolve())
        elif key == "betas":
            value, have = tuple(float(b) for b in value), tuple(have)
        if value != have:
            if key == "model_size" and have is None:
                have = f"none (it branched from --seed-model {ref['seed_model']})"
            elif key == "vocab_size" and tok.get("source") != "bpe":
                have = f"none (its tokenizer is the seed model's, {tok.get('size')} tokens)"
            raise ValueError(f"--{key.replace('_', '-')} {value} differs from the run --like {like.path} was trained "
                             f"with: {have}. --like takes the seed, tokenizer, model and schedule from that run, so "
                             "that the comparison is compute-matched: drop the flag")
    return {**ref, "model_size": ref["model_size"] or defaults.MODEL_SIZE, "vocab_size": given.get("vocab_size")}


@holds_lock("train --dense", "out")
def train_dense(out, total_tokens: int, *, like=None, corpus=None, valid_fraction: float = defaults.VALID_FRACTION,
                split_seed: int = defaults.SPLIT_SEED, model_size: str | None = None,
                seed_model: str | Path | None = None, seed_tokens: int | None = None,
                vocab_size: int | None = None, **kwargs) -> dict:
    """The compute-matched dense baseline: one model trained on every training document for
    ``total_tokens``, in its own run directory ``out`` (k=1; see :func:`prepare_dense` for ``like``,
    ``corpus`` and the split). After a trained ``like`` run, everything else that makes the
    comparison compute-matched is that run's (:func:`like_settings`; a seed phase is repeated on
    the dense run's data), and an explicit value that differs is an error. None: the run's or
    :func:`train_experts`'s default; other arguments as :func:`train_experts`."""
    if like is not None and kwargs.get("config") is not None:
        raise ValueError("with like, the training settings are the run's: pass overrides as keywords, not config")
    shaping = set(TrainConfig().trained_fields())
    given = {"model_size": model_size, "seed_model": seed_model, "seed_tokens": seed_tokens, "vocab_size": vocab_size,
             **{key: kwargs.pop(key) for key in shaping & set(kwargs)}}
    settings = like_settings(like, given) if like is not None else {k: v for k, v in given.items() if v is not None}
    out = prepare_dense(out, like=like, corpus=corpus, valid_fraction=valid_fraction, split_seed=split_seed,
                        seed_model=settings.get("seed_model"), vocab_size=settings.get("vocab_size"),
                        progress=kwargs.get("progress", True))
    return train_experts(out, total_tokens, **settings, **kwargs)
