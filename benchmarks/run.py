"""The benchmark entry point of cbtm.

    python benchmarks/run.py [--suite NAME ...] [--all] [--quick] [--out DIR] [--device cpu|cuda]

A suite is any module in ``benchmarks/suites/`` that defines ``run(args) -> dict``; the dict
holds ``rows`` (a list of result dicts) and ``markdown`` (the tables to print), plus anything
else worth keeping. Adding a suite means adding a file there: nothing here needs to change.
Each suite's result goes to ``<out>/<suite>-<device>.json`` with the environment it ran in; every
row records the CPU's vector instruction set and the one the CPU kernels used (``CBTM_CPU_ISA=avx2``
forces the AVX2 kernels on an AVX-512 machine).
"""
import argparse
import importlib
import json
import pkgutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import environment, vector_isa  # noqa: E402

SUITES_DIR = ROOT / "benchmarks" / "suites"


def available_suites():
    """Names of the modules in benchmarks/suites/."""
    return sorted(m.name for m in pkgutil.iter_modules([str(SUITES_DIR)]) if not m.name.startswith("_"))


def parse_args(argv=None):
    suites = available_suites()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--suite", action="extend", nargs="+", choices=suites, metavar="NAME",
                   help=f"suites to run: {', '.join(suites)}")
    p.add_argument("--all", action="store_true", help="run every suite (the default when no --suite)")
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke test in seconds")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="result directory")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--repeats", type=int, help="timings are the best of this many runs (3; --quick: 2)")
    args = p.parse_args(argv)
    args.repeats = args.repeats or (2 if args.quick else 3)
    args.suites = suites if args.all or not args.suite else list(dict.fromkeys(args.suite))
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            sys.exit("--device cuda: torch.cuda.is_available() is False")
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.suites:
        suite = importlib.import_module(f"benchmarks.suites.{name}")
        t0 = time.perf_counter()
        result = suite.run(args)
        elapsed = time.perf_counter() - t0
        isa = vector_isa()
        for row in result["rows"]:
            row.update(isa)
        print(result["markdown"], f"\n\n_{name}: {elapsed:.1f} s; CPU {isa['cpu_vector_isa']}, cbtm kernels "
              f"{isa['kernel_isa']}_\n", flush=True)
        record = {"suite": name, "quick": args.quick, "repeats": args.repeats, "elapsed_s": elapsed,
                  "env": environment(args.device), **result}
        path = args.out / f"{name}-{args.device}.json"
        path.write_text(json.dumps(record, indent=1, default=float) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
