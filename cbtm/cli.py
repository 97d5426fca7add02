"""The `cbtm` command line: one entry point, every subcommand defined here, one per pipeline stage.

Subcommands import their stage only when they run, so ``cbtm cluster ...`` never imports torch.
A run directory that a command reads is named with ``--run`` (``--out`` is accepted too); a user
error (bad flag, missing or malformed file) exits with status 2 and one line naming what is wrong.
"""

from __future__ import annotations

import argparse
import sys

from . import defaults

CORPUS_HELP = ("JSON lines / text files (optionally .gz or .zst), Parquet files, `datasets` save_to_disk "
               "directories, directories or globs (default: the embedded 8-domain corpus)")


def parse_count(text: str) -> int:
    """``"2M"``, ``"500k"``, ``"1.5e6"``, ``"3000"`` -> int (a positive whole number)."""
    t = str(text).strip().lower().replace("_", "")
    scale = {"k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if scale > 1 else t) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a token count: {text!r}") from None
    if value != int(value) or value < 1:
        raise argparse.ArgumentTypeError(f"not a positive whole token count: {text!r}")
    return int(value)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None


def _float_list(text: str) -> list[float]:
    """An argparse type: comma-separated numbers (the error names the flag)."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    return values


def _baselines(text: str) -> tuple[str, ...]:
    """An argparse type: comma-separated demo baselines, or 'none'."""
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    if names == ("none",):
        return ()
    unknown = [n for n in names if n not in defaults.BASELINES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected 'none' or names from {', '.join(defaults.BASELINES)}, "
                                         f"got {text!r}")
    return names


def _size_ratio(text: str) -> float:
    """An argparse type: a finite number >= 1."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 1 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 1 (1 = exactly balanced), got {text!r}")
    return value


def _average_weights(text: str):
    if text in ("uniform", "sizes"):
        return text
    try:
        return _float_list(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected uniform, sizes or comma-separated numbers, got {text!r}") from None


def _run_arg(p, help_text: str) -> None:
    p.add_argument("--run", "--out", dest="run", required=True, help=help_text)


# ------------------------------------------------------------------------------------------------
# cluster


def _routing_arg(p) -> None:
    p.add_argument("--routing", choices=defaults.ROUTINGS, default=defaults.ROUTING,
                   help="router weights: the run's prefix router, the paper's distance softmax(-d^2 / T), or auto "
                   "(prefix when the run has one; the default)")


def _cluster_fit(a):
    from . import cluster

    cluster.fit(a.corpus or None, a.run, a.k, sample=a.sample, n_components=a.n_components, seed=a.seed,
                balanced=not a.unbalanced, max_size_ratio=a.max_size_ratio, max_iter=a.max_iter,
                text_field=a.text_field, id_field=a.id_field, text_mode=a.text_mode, valid_fraction=a.valid_fraction,
                force=a.force)


def _cluster_assign(a):
    from . import cluster
    from .rundir import RunDir
    from .router import fit_prefix_router

    with RunDir(a.run).lock("cluster assign"):  # the three steps as one writer
        cluster.assign(a.corpus or None, a.run, balanced=not a.nearest, backend=a.backend, workers=a.workers,
                       ray_address=a.ray_address, write_docs=a.write_docs, label_field=a.label_field, force=a.force)
        cluster.report(a.run, label_field=a.label_field)
        fit_prefix_router(a.run, progress=True)


def _cluster_fit_prefix(a):
    from .router import fit_prefix_router

    fit_prefix_router(a.run, max_documents=a.max_documents, cuts=a.cuts, seed=a.seed, progress=True)


def _cluster_report(a):
    from . import cluster

    cluster.report(a.run)


def _add_cluster(sub) -> None:
    cl = sub.add_parser("cluster", help="cluster a corpus into domains (tf-idf -> SVD -> balanced k-means)")
    csub = cl.add_subparsers(dest="action", required=True)

    f = csub.add_parser("fit", help="fit the router on a sample of the training split")
    f.add_argument("corpus", nargs="*", help=CORPUS_HELP)
    _run_arg(f, "run directory to create")
    f.add_argument("-k", type=positive_int, required=True, help="number of clusters (experts)")
    f.add_argument("--sample", type=positive_int, default=defaults.SAMPLE,
                   help=f"documents sampled to fit (default {defaults.SAMPLE:,})")
    f.add_argument("--n-components", type=positive_int, default=defaults.N_COMPONENTS,
                   help=f"SVD dimensions (default {defaults.N_COMPONENTS})")
    f.add_argument("--seed", type=int, default=defaults.SPLIT_SEED)
    f.add_argument("--max-iter", type=positive_int, default=defaults.MAX_ITER, help="k-means iterations")
    f.add_argument("--unbalanced", action="store_true", help="plain k-means instead of balanced")
    f.add_argument("--max-size-ratio", type=_size_ratio, default=defaults.MAX_SIZE_RATIO,
                   help=f"a cluster holds at most this x N/k documents: 1 = exactly balanced as in C-BTM "
                        f"(default {defaults.MAX_SIZE_RATIO}: clusters follow domains of unequal size)")
    f.add_argument("--text-field", default="text")
    f.add_argument("--id-field", default="id")
    f.add_argument("--text-mode", choices=("file", "blocks"), default="file",
                   help="plain-text files (.txt): each file one document, or each blank-line-separated block "
                        "(every later stage reads the corpus the same way)")
    f.add_argument("--valid-fraction", type=float, default=defaults.VALID_FRACTION,
                   help="documents held out for validation")
    f.add_argument("--force", action="store_true",
                   help="refit a run that has assignments or experts (drops them from its manifest)")
    f.set_defaults(fn=_cluster_fit)

    s = csub.add_parser("assign", help="assign every document to a cluster, shard by shard (resumable)")
    s.add_argument("corpus", nargs="*", help="default: the corpus the router was fitted on")
    _run_arg(s, "run directory with a fitted router")
    s.add_argument("--nearest", action="store_true", help="nearest centre instead of balanced (price) assignment")
    s.add_argument("--backend", choices=("local", "ray"), default="local")
    s.add_argument("--workers", type=positive_int, default=None, help="parallel shards (default: CPU count)")
    s.add_argument("--ray-address", default=None, help="address of an existing Ray cluster")
    s.add_argument("--write-docs", action="store_true", help="also write the documents split per cluster")
    s.add_argument("--label-field", default=None, help="metadata field with gold labels (report purity / NMI)")
    s.add_argument("--force", action="store_true",
                   help="reassign a run that has trained experts (drops them from its manifest)")
    s.set_defaults(fn=_cluster_assign)

    p = csub.add_parser("fit-prefix", help="fit the run's prefix router on its assignments (`assign` does this "
                        "too; for assignments written otherwise)")
    _run_arg(p, "run directory with assignments")
    p.add_argument("--max-documents", type=positive_int, default=defaults.PREFIX_DOCUMENTS,
                   help=f"training documents sampled (default {defaults.PREFIX_DOCUMENTS:,})")
    p.add_argument("--cuts", type=positive_int, default=defaults.PREFIX_CUTS,
                   help=f"prefixes of log-uniform length per document (default {defaults.PREFIX_CUTS})")
    p.add_argument("--seed", type=int, default=defaults.SPLIT_SEED)
    p.set_defaults(fn=_cluster_fit_prefix)

    r = csub.add_parser("report", help="print the cluster report of a run")
    _run_arg(r, "run directory")
    r.set_defaults(fn=_cluster_report)


# ------------------------------------------------------------------------------------------------
# train and branch


def _save_dtype_arg(p, what: str, default=None) -> None:
    p.add_argument("--save-dtype", choices=defaults.SAVE_DTYPES, default=default,
                   help=f"dtype {what} (default auto: the dtype of the weights they come from, so a float16 or "
                   "bfloat16 seed gives float16 or bfloat16 experts; training itself runs in float32)")


def _add_train_options(p) -> None:
    from .training.config import TrainConfig

    d = TrainConfig()
    g = p.add_argument_group("optimisation")
    g.add_argument("--seq-len", type=int, default=None, help=f"tokens per training sequence (default {d.seq_len})")
    g.add_argument("--batch-size", type=int, default=None, help=f"sequences per forward pass and process ({d.batch_size})")
    g.add_argument("--grad-accum", type=int, default=None, help=f"forward passes per step ({d.grad_accum})")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the model size's)")
    g.add_argument("--warmup", type=float, default=None, help=f"warmup fraction of the steps ({d.warmup})")
    g.add_argument("--min-lr-ratio", type=float, default=None, help=f"final/peak learning rate ({d.min_lr_ratio})")
    g.add_argument("--weight-decay", type=float, default=None, help=f"AdamW weight decay ({d.weight_decay})")
    g.add_argument("--clip", type=float, default=None, help=f"gradient-norm clip, 0: off ({d.clip})")
    g.add_argument("--eval-every", type=int, default=None, help=f"steps between validation losses ({d.eval_every})")
    g.add_argument("--eval-tokens", type=parse_count, default=None, help=f"validation tokens ({d.eval_tokens})")
    g.add_argument("--ckpt-every", type=int, default=None, help=f"steps between checkpoints, 0: none ({d.ckpt_every})")
    g.add_argument("--keep-checkpoints", type=int, default=None, help=f"checkpoints kept per job ({d.keep_checkpoints})")
    g.add_argument("--seed", type=int, default=None, help=f"random seed ({d.seed})")
    g.add_argument("--no-bf16", dest="bf16", action="store_const", const=False, default=None,
                   help="no bf16 autocast on GPU")
    _save_dtype_arg(g, "the trained models are saved in")
    e = p.add_argument_group("execution")
    e.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    e.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    e.add_argument("--restart", action="store_true", help="discard checkpoints and outputs of the selected jobs")
    e.add_argument("--quiet", action="store_true", help="no progress bars")


def _settings(a) -> dict:
    names = ("seq_len", "batch_size", "grad_accum", "lr", "warmup", "min_lr_ratio", "weight_decay", "clip",
             "eval_every", "eval_tokens", "ckpt_every", "keep_checkpoints", "seed", "bf16", "save_dtype")
    return {n: getattr(a, n) for n in names if getattr(a, n) is not None}


def _train(a) -> None:
    from .training import NonFiniteLoss, TrainingFailed, train_dense, train_experts

    seed = dict(model_size=a.model_size, seed_model=a.seed_model, seed_tokens=a.seed_tokens)  # None: not given
    kwargs = dict(experts=_int_list(a.experts) if a.experts else None, backend=a.backend, parallel=a.parallel,
                  nproc_per_node=a.nproc_per_node, ray_address=a.ray_address, num_cpus=a.num_cpus,
                  num_gpus=a.num_gpus, retries=a.retries, vocab_size=a.vocab_size, device=a.device,
                  threads=a.threads, restart=a.restart, progress=not a.quiet, **_settings(a))
    if a.router_only and not a.moe:
        raise ValueError("--router-only needs --moe")
    try:
        if a.moe:
            from .moe import train_moe
            from .rundir import RunDir, expert_name
            from .training.plan import print_summary, run_summary

            if a.dense or a.like or a.corpus or a.experts or a.backend != "local" or a.seed_model:
                raise ValueError("--moe trains the exported MoE on its own corpus: drop --dense, --like, corpus "
                                 "paths, --experts, --seed-model and --backend")
            train_moe(a.moe, a.run, a.total_tokens, router_only=a.router_only, aux_loss_coef=a.aux_loss_coef,
                      device=a.device, threads=a.threads, restart=a.restart, progress=not a.quiet, **_settings(a))
            if not a.quiet:
                print_summary(run_summary(RunDir(a.run), [expert_name(0)]))
        elif a.dense:
            train_dense(a.run, a.total_tokens, like=a.like, corpus=a.corpus or None, **seed, **kwargs)
        else:
            if a.like or a.corpus:
                raise ValueError("--like and corpus paths are for --dense; clustered runs use their own corpus")
            train_experts(a.run, a.total_tokens, **{key: v for key, v in seed.items() if v is not None}, **kwargs)
    except (TrainingFailed, NonFiniteLoss) as e:
        raise SystemExit(f"cbtm: error: {e}") from None


def _branch(a) -> None:
    from .branch import branch_from_mixture, default_sources
    from .router import mixture_weights
    from .training import NonFiniteLoss, TrainingFailed

    expert = a.cluster if a.expert is None else a.expert
    sources = default_sources(a.run, expert) if a.from_mixture == "all" else _int_list(a.from_mixture)
    if a.weights:
        weights, method = a.weights, "given"
    else:
        weights, method = mixture_weights(a.run, a.cluster, sources, a.temperature), "router"
    try:
        entry = branch_from_mixture(a.run, a.cluster, weights, sources=sources, method=method,
                                    temperature=a.temperature if method == "router" else None, expert=expert,
                                    tokens=a.tokens, train=not a.no_train, device=a.device, threads=a.threads,
                                    restart=a.restart, progress=not a.quiet, **_settings(a))
    except (TrainingFailed, NonFiniteLoss) as e:
        raise SystemExit(f"cbtm: error: {e}") from None
    if not a.quiet:
        mix = ", ".join(f"{s}:{w:.3f}" for s, w in zip(entry["mixture"]["sources"], entry["mixture"]["weights"]))
        print(f"expert {entry['id']} <- mixture ({entry['mixture']['method']}) {mix}; status {entry['status']}")


def _add_train(sub) -> None:
    from .models import SIZES

    t = sub.add_parser("train", help="branch and train one expert per cluster (or a dense baseline), compute-matched",
                       description="Train k experts of total_tokens/k each, or with --dense one model of "
                       "total_tokens. Rerunning the same command resumes from checkpoints.")
    t.add_argument("corpus", nargs="*", help="--dense without --like: corpus files (default: the embedded corpus)")
    _run_arg(t, "run directory (clustered by `cbtm cluster`, or new with --dense)")
    t.add_argument("--total-tokens", type=parse_count, required=True,
                   help="token budget T, e.g. 2M: each of k experts trains on T/k, a dense model on T")
    t.add_argument("--dense", action="store_true", help="train the dense baseline (k=1) in --run")
    t.add_argument("--moe", default=None, metavar="RUN_MOE",
                   help="BTX's MiX phase: train the MoE exported to RUN_MOE (`cbtm merge export-moe`) on the whole "
                   "corpus, in the new run --run")
    t.add_argument("--router-only", action="store_true", help="--moe: train only the routers")
    t.add_argument("--aux-loss-coef", type=float, default=0.01,
                   help="--moe: weight of the routers' load-balancing loss (default 0.01)")
    t.add_argument("--like", default=None, help="--dense: the trained clustered run to compare with: its corpus, "
                   "split, tokenizer, seed (model, seed phase) and training settings (flags that differ are errors)")
    t.add_argument("--model-size", default=None, choices=tuple(SIZES),
                   help=f"named config (default {defaults.MODEL_SIZE})")
    t.add_argument("--seed-model", default=None, help="local Hugging Face causal LM directory to branch from "
                   "(safetensors weights; `cbtm convert` converts pickled ones)")
    t.add_argument("--seed-tokens", type=lambda v: 0 if v.strip() == "0" else parse_count(v), default=None,
                   help="first train a dense seed on all clusters for this many tokens (BTM seed phase; default 0)")
    t.add_argument("--experts", default=None, help="comma-separated expert ids to train (default: all)")
    t.add_argument("--vocab-size", type=positive_int, default=None,
                   help=f"vocabulary of the BPE trained when the run has no tokenizer yet ({defaults.VOCAB_SIZE})")
    t.add_argument("--backend", choices=("local", "torchrun", "ray"), default="local")
    t.add_argument("--parallel", type=positive_int, default=1,
                   help="local: experts at once, one process (and GPU) each")
    t.add_argument("--nproc-per-node", type=positive_int, default=2, help="torchrun: DDP processes per job")
    t.add_argument("--ray-address", default=None, help="ray: address of an existing cluster (default: local Ray)")
    t.add_argument("--num-cpus", type=float, default=1, help="ray: CPUs per expert task (and its torch threads)")
    t.add_argument("--num-gpus", type=float, default=0, help="ray: GPUs per expert task")
    t.add_argument("--retries", type=int, default=2, help="ray: retries of a failed task (resumes its checkpoint)")
    _add_train_options(t)
    t.set_defaults(fn=_train)

    b = sub.add_parser("branch", help="initialise a new expert as a weighted average of experts, then train it (BTM)")
    _run_arg(b, "run directory with trained experts")
    b.add_argument("--from-mixture", nargs="?", const="all", default="all",
                   help="source expert ids, comma-separated (default: all trained experts)")
    b.add_argument("--cluster", type=int, required=True, help="cluster id of the new expert's training documents")
    b.add_argument("--weights", type=_float_list, default=None,
                   help="mixture weights, comma-separated (default: router weights)")
    b.add_argument("--temperature", type=float, default=defaults.TEMPERATURE,
                   help=f"router temperature for the weights ({defaults.TEMPERATURE})")
    b.add_argument("--expert", type=int, default=None, help="id of the new expert (default: the cluster id)")
    b.add_argument("--tokens", type=parse_count, default=None, help="its token budget (default: the run's T/k)")
    b.add_argument("--no-train", action="store_true", help="only write the initialisation (init/expert_XXX)")
    _add_train_options(b)
    b.set_defaults(fn=_branch)


# ------------------------------------------------------------------------------------------------
# merge (expert administration), eval, demo


def _merge_average(a):
    from .experts import average

    print(f"parameter average of {a.run}'s experts ({a.weights if isinstance(a.weights, str) else 'given weights'}) "
          f"-> {average(a.run, a.to, a.weights, a.save_dtype)}")


def _merge_add(a):
    from .corpus import read_documents
    from .experts import add_expert

    print(f"added expert {add_expert(a.run, a.expert, [d.text for d in read_documents(a.docs)])}")


def _merge_remove(a):
    from .experts import remove_expert

    remove_expert(a.run, a.expert)
    print(f"expert {a.expert} removed from the ensemble of {a.run} (its directory and router centre are kept)")


def _merge_export(a):
    from .experts import export
    from .router import Router

    print(export(a.run, a.to, a.top_k, a.temperature, router=Router.load(a.run).routing))


def _merge_export_moe(a):
    from .moe import export_moe

    print(export_moe(a.run, a.to, a.experts_per_token, a.gate, a.weights, a.gate_docs, a.seed, a.save_dtype))


def _add_merge(sub) -> None:
    m = sub.add_parser("merge", help="BTM operations: average experts, add or remove one, export the ensemble")
    msub = m.add_subparsers(dest="action", required=True)
    a = msub.add_parser("average", help="parameter average of the experts as one model")
    _run_arg(a, "run directory")
    a.add_argument("--to", required=True, help="new (or empty) directory of the averaged model, outside the run")
    a.add_argument("--weights", type=_average_weights, default="uniform",
                   help="uniform, sizes, or comma-separated numbers")
    _save_dtype_arg(a, "the average is saved in", defaults.SAVE_DTYPE)
    a.set_defaults(fn=_merge_average)
    d = msub.add_parser("add", help="add a trained expert with a centre from documents of its domain")
    _run_arg(d, "run directory")
    d.add_argument("--expert", required=True, help="the expert's save_pretrained directory (copied into the run)")
    d.add_argument("--docs", nargs="+", required=True, help="corpus files of the expert's domain (its centre)")
    d.set_defaults(fn=_merge_add)
    r = msub.add_parser("remove", help="drop an expert from the ensemble")
    _run_arg(r, "run directory")
    r.add_argument("--expert", type=int, required=True)
    r.set_defaults(fn=_merge_remove)
    e = msub.add_parser("export", help="write the ensemble's manifest (JSON)")
    _run_arg(e, "run directory")
    e.add_argument("--to", required=True, help="JSON file to write")
    e.add_argument("--top-k", type=positive_int, default=defaults.TOP_K)
    e.add_argument("--temperature", type=float, default=defaults.TEMPERATURE)
    e.set_defaults(fn=_merge_export)
    x = msub.add_parser("export-moe", help="merge the experts into one Mixtral MoE model (Branch-Train-MiX)")
    _run_arg(x, "run directory with trained experts")
    x.add_argument("--to", required=True, help="new (or empty) MoE run directory, outside the run; the Mixtral "
                   "checkpoint is TO/experts/expert_000")
    x.add_argument("--experts-per-token", type=positive_int, default=2, help="experts routed per token (default 2)")
    x.add_argument("--gate", choices=("hidden", "embed", "random"), default="hidden",
                   help="router initialisation: each cluster's mean hidden state (default), mean token embedding, "
                   "or random")
    x.add_argument("--weights", choices=("sizes", "uniform"), default="sizes",
                   help="averaging weights of the shared parameters (default: cluster sizes)")
    x.add_argument("--gate-docs", type=positive_int, default=32,
                   help="training documents per cluster that initialise the routers (default 32)")
    x.add_argument("--seed", type=int, default=0, help="seed of --gate random")
    _save_dtype_arg(x, "the MoE is saved in", defaults.SAVE_DTYPE)
    x.set_defaults(fn=_merge_export_moe)


def _convert(a):
    from .models import convert_pickled

    print(f"{a.model}: pickled weights read with torch.load(weights_only=True), written as safetensors "
          f"-> {convert_pickled(a.model, a.to)}")


def _add_convert(sub) -> None:
    c = sub.add_parser("convert", help="rewrite a checkpoint's pickled weights (pytorch_model.bin) as safetensors",
                       description="Copy a Hugging Face model directory whose weights are pickles (pytorch_model.bin, "
                       "or shards with pytorch_model.bin.index.json) to a new directory with the same weights as "
                       "safetensors, the only format cbtm loads. The pickles are read with "
                       "torch.load(weights_only=True), which builds tensors and nothing else; no other cbtm command "
                       "ever reads a pickle.")
    c.add_argument("model", help="the model directory with pickled weights")
    c.add_argument("--to", required=True, help="new (or empty) directory of the converted model")
    c.set_defaults(fn=_convert)


def _eval(a):
    from . import evaluate

    runs = evaluate.parse_runs(a.runs)
    evaluate.evaluate(runs, a.out or next(iter(runs.values())), top_ks=a.top_k.split(","), max_docs=a.max_docs,
                      temperature=a.temperature, device=a.device, fewshot=a.fewshot, shots=a.shots, route=a.route,
                      fewshot_limit=a.fewshot_limit, routing=a.routing)


def _demo(a):
    from .demo import run_demo

    run_demo(a.out, budget=a.budget, corpus=a.corpus or None, baselines=a.baselines)


def _add_eval_demo(sub) -> None:
    e = sub.add_parser("eval", help="validation perplexity of runs (dense and ensembles at several top-k)")
    e.add_argument("runs", nargs="+", help="run directories, optionally named: NAME=DIR")
    e.add_argument("--top-k", default=",".join(defaults.TOP_KS),
                   help=f"comma-separated top-k values (default {','.join(defaults.TOP_KS)})")
    e.add_argument("--max-docs", type=positive_int, default=None, help="evaluate on the first N validation documents")
    e.add_argument("--temperature", type=float, default=defaults.TEMPERATURE,
                   help=f"router temperature T (default {defaults.TEMPERATURE})")
    _routing_arg(e)
    e.add_argument("--device", default="cpu")
    e.add_argument("--out", default=None, help="run directory whose reports/ receives eval.* (default: the first)")
    f = e.add_argument_group("few-shot classification")
    f.add_argument("--fewshot", default=None, metavar="TASK.jsonl",
                   help="also report accuracy on a task of {id, text, label} lines (cbtm/data/tasks/sources.jsonl)")
    f.add_argument("--shots", type=int, default=2, help="demonstrations per prompt (default 2)")
    f.add_argument("--route", choices=("prompt", "token"), default="prompt",
                   help="route once per example on its prompt (the official C-BTM setting) or per token")
    f.add_argument("--fewshot-limit", type=positive_int, default=None, help="evaluate the first N examples only")
    e.set_defaults(fn=_eval)

    d = sub.add_parser("demo", help="the whole pipeline on the embedded corpus, with the papers' claims checked")
    d.add_argument("--out", default="runs/demo", help="directory of the demo's runs (default runs/demo)")
    d.add_argument("--budget", choices=("tiny", "small", "scaling", "medium"), default="small",
                   help="small (the default): under 15 minutes on a 2-core CPU; tiny: every run and baseline on "
                   "24k tokens, a smoke test of a few minutes; scaling: k in 1,2,4,8 at budgets T, 2T, 4T "
                   "(under 45 minutes on 2 CPU cores); medium: for a GPU (also runs a 4x budget)")
    d.add_argument("--corpus", nargs="*", default=None, help="corpus files (default: the embedded corpus)")
    d.add_argument("--baselines", type=_baselines, default=None, metavar="NAMES",
                   help="comma-separated baselines to train beside C-BTM, from random (equal split, k=4), "
                   "unbalanced (k-means, k=4), gold (one expert per `domain` label); 'none' for none "
                   "(default: the budget's; small: random)")
    d.set_defaults(fn=_demo)


def _serve(a):
    from .server import serve

    serve(a.run, host=a.host, port=a.port, top_k=None if a.top_k == "all" else int(a.top_k), device=a.device,
          max_batch=a.max_batch, max_queue=a.max_queue, max_loaded=a.max_loaded,
          max_prompt_tokens=a.max_prompt_tokens, grace=a.grace, model_name=a.model_name, routing=a.routing,
          threads=a.threads)


def _add_serve(sub) -> None:
    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server for a run (continuous batching; "
                       "needs `pip install cbtm[serve]`)")
    s.add_argument("--run", "--out", dest="run", required=True, help="the run directory to serve")
    s.add_argument("--host", default=defaults.SERVE_HOST, help=f"interface to bind (default {defaults.SERVE_HOST})")
    s.add_argument("--port", type=int, default=defaults.SERVE_PORT, help=f"default {defaults.SERVE_PORT}")
    s.add_argument("--top-k", default=str(defaults.TOP_K), type=lambda t: t if t == "all" else str(positive_int(t)),
                   metavar="K", help=f"experts per token (default {defaults.TOP_K}; 'all')")
    _routing_arg(s)
    s.add_argument("--device", default="cpu")
    s.add_argument("--max-batch", type=positive_int, default=defaults.MAX_BATCH,
                   help=f"sequences decoded together (default {defaults.MAX_BATCH})")
    s.add_argument("--max-queue", type=int, default=defaults.SERVE_MAX_QUEUE,
                   help=f"sequences that may wait for a slot; more get 429 (default {defaults.SERVE_MAX_QUEUE})")
    s.add_argument("--max-loaded", type=positive_int, default=None, help="experts held in memory at once")
    s.add_argument("--max-prompt-tokens", type=positive_int, default=defaults.SERVE_MAX_PROMPT_TOKENS,
                   help=f"longest prompt accepted (default {defaults.SERVE_MAX_PROMPT_TOKENS})")
    s.add_argument("--grace", type=float, default=defaults.SERVE_GRACE,
                   help=f"seconds in-flight requests get after SIGTERM (default {defaults.SERVE_GRACE:g})")
    s.add_argument("--model-name", default=None, help="the model id clients name (default: the run's folder name)")
    s.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads of the engine process (default: one core fewer than the machine has, at "
                        "least 1: the HTTP side keeps a core; spinning math threads on every core slow it down)")
    s.set_defaults(fn=_serve)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cbtm", description="Cluster-Branch-Train-Merge: cluster a corpus, "
                                "train one expert LM per cluster, merge them as a sparse ensemble.")
    sub = p.add_subparsers(dest="command", required=True)
    _add_cluster(sub)
    _add_train(sub)
    _add_merge(sub)
    _add_convert(sub)
    _add_eval_demo(sub)
    _add_serve(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except (FileNotFoundError, FileExistsError, NotADirectoryError, ValueError, ImportError) as e:
        print(f"cbtm: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
