"""The `cbtm` command line: one entry point, one subcommand per pipeline stage."""

from __future__ import annotations

import argparse
import sys


def _cluster_fit(a):
    from . import cluster

    cluster.fit(a.corpus or None, a.out, a.k, sample=a.sample, n_components=a.n_components, seed=a.seed,
                balanced=not a.unbalanced, max_iter=a.max_iter, text_field=a.text_field, id_field=a.id_field,
                valid_fraction=a.valid_fraction)


def _cluster_assign(a):
    from . import cluster

    cluster.assign(a.corpus or None, a.out, balanced=not a.nearest, backend=a.backend, workers=a.workers,
                   ray_address=a.ray_address, write_docs=a.write_docs, label_field=a.label_field)
    cluster.report(a.out, label_field=a.label_field)


def _cluster_report(a):
    from . import cluster

    cluster.report(a.out)


def _eval(a):
    from . import evaluate

    runs = evaluate.parse_runs(a.runs)
    evaluate.evaluate(runs, a.out or next(iter(runs.values())), top_ks=a.top_k.split(","), max_docs=a.max_docs,
                      temperature=a.temperature, device=a.device)


def _demo(a):
    from .demo import run_demo

    run_demo(a.out, budget=a.budget, corpus=a.corpus or None)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cbtm", description="Cluster-Branch-Train-Merge: cluster a corpus, "
                                "train one expert LM per cluster, merge them as a sparse ensemble.")
    sub = p.add_subparsers(dest="command", required=True)

    cl = sub.add_parser("cluster", help="cluster a corpus into domains (tf-idf -> SVD -> balanced k-means)")
    csub = cl.add_subparsers(dest="action", required=True)
    corpus_help = "JSONL(.gz) / text files, directories or globs (default: the embedded 8-domain corpus)"

    f = csub.add_parser("fit", help="fit the router on a sample of the training split")
    f.add_argument("corpus", nargs="*", help=corpus_help)
    f.add_argument("--out", required=True, help="run directory")
    f.add_argument("-k", type=int, required=True, help="number of clusters (experts)")
    f.add_argument("--sample", type=int, default=200_000, help="documents sampled to fit (default 200k)")
    f.add_argument("--n-components", type=int, default=100, help="SVD dimensions (default 100)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--max-iter", type=int, default=20, help="k-means iterations")
    f.add_argument("--unbalanced", action="store_true", help="plain k-means instead of balanced")
    f.add_argument("--text-field", default="text")
    f.add_argument("--id-field", default="id")
    f.add_argument("--valid-fraction", type=float, default=0.05, help="documents held out for validation")
    f.set_defaults(fn=_cluster_fit)

    s = csub.add_parser("assign", help="assign every document to a cluster, shard by shard (resumable)")
    s.add_argument("corpus", nargs="*", help="default: the corpus the router was fitted on")
    s.add_argument("--out", required=True, help="run directory")
    s.add_argument("--nearest", action="store_true", help="nearest centre instead of balanced (price) assignment")
    s.add_argument("--backend", choices=("local", "ray"), default="local")
    s.add_argument("--workers", type=int, default=None, help="parallel shards (default: CPU count)")
    s.add_argument("--ray-address", default=None, help="address of an existing Ray cluster")
    s.add_argument("--write-docs", action="store_true", help="also write the documents split per cluster")
    s.add_argument("--label-field", default=None, help="metadata field with gold labels (report purity / NMI)")
    s.set_defaults(fn=_cluster_assign)

    r = csub.add_parser("report", help="print the cluster report of a run")
    r.add_argument("--out", required=True, help="run directory")
    r.set_defaults(fn=_cluster_report)

    e = sub.add_parser("eval", help="validation perplexity of runs (dense and ensembles at several top-k)")
    e.add_argument("runs", nargs="+", help="run directories, optionally named: NAME=DIR")
    e.add_argument("--top-k", default="1,2,4,all", help="comma-separated top-k values (default 1,2,4,all)")
    e.add_argument("--max-docs", type=int, default=None, help="evaluate on the first N validation documents")
    e.add_argument("--temperature", type=float, default=0.1, help="router temperature T (default 0.1)")
    e.add_argument("--device", default="cpu")
    e.add_argument("--out", default=None, help="run directory whose reports/ receives eval.* (default: the first)")
    e.set_defaults(fn=_eval)

    d = sub.add_parser("demo", help="the whole pipeline on the embedded corpus, with the papers' claims checked")
    d.add_argument("--out", default="runs/demo", help="directory of the demo's runs (default runs/demo)")
    d.add_argument("--budget", choices=("tiny", "small", "medium"), default="small",
                   help="small: under 15 minutes on a 2-core CPU; medium: for a GPU (also runs a 4x budget)")
    d.add_argument("--corpus", nargs="*", default=None, help="corpus files (default: the embedded corpus)")
    d.set_defaults(fn=_demo)

    from . import merge, train

    train.add_cli(sub)
    merge.add_cli(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"cbtm: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
