"""Package hygiene: `import cbtm` and the clustering CLI stay free of torch, and no module imports a
later pipeline stage (the layering the README's package map states)."""

import ast
import subprocess
import sys
from pathlib import Path

import cbtm

# the pipeline order of the README's map; a module may import only modules before it
ORDER = ["defaults", "ray_backend", "rundir", "ops", "shards", "corpus", "embed", "kmeans", "assignments", "cluster",
         "tokens", "models", "training", "branch", "experts", "moe", "router", "pool", "stacked", "engine", "ensemble",
         "hf_model", "harness", "fewshot", "evaluate", "demo", "server", "cli"]
SHIMS = {"train", "merge", "__init__"}  # deprecated import paths re-export later stages on purpose
PKG = Path(cbtm.__file__).parent


def _imported(path: Path, package: str) -> set[str]:
    """cbtm modules imported by ``path`` (relative imports resolved to the top-level module name)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
            out |= {n.split(".")[1] for n in names if n.startswith("cbtm.") and len(n.split(".")) > 1}
    return out


def test_no_module_imports_a_later_stage():
    rank = {m: i for i, m in enumerate(ORDER)}
    files = [(p, "cbtm") for p in PKG.glob("*.py")] + [(p, "cbtm.training") for p in (PKG / "training").glob("*.py")]
    seen = set()
    for path, package in files:
        mod = "training" if package == "cbtm.training" else path.stem
        if mod in SHIMS and package == "cbtm":
            continue
        assert mod in rank, f"{path} is not in the README's package map (tests/test_package.py ORDER)"
        seen.add(mod)
        later = sorted(m for m in _imported(path, package) if m in rank and rank[m] > rank[mod])
        assert not later, f"{path.relative_to(PKG.parent)} imports later pipeline stages {later}"
    assert {"corpus", "cluster", "training", "ensemble", "cli"} <= seen


def test_import_and_cluster_cli_do_not_import_torch():
    code = ("import sys, cbtm, cbtm.cli, cbtm.cluster, cbtm.assignments, cbtm.training.config; "
            "cbtm.cli.build_parser(); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, "
            "sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))[:5]")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_lazy_exports_resolve():
    assert cbtm.BalancedKMeans.__name__ == "BalancedKMeans" and cbtm.Ensemble.__name__ == "Ensemble"
    assert {"BalancedKMeans", "Ensemble", "Router", "TfidfEmbedder", "ops"} <= set(dir(cbtm))


def test_the_kernels_folder_does_not_shadow_an_installed_kernels_package_from_a_clone():
    """Run from the source tree (``python -m pytest``, ``python -m cbtm.cli``), the folder
    ``kernels/`` (cbtm.kernels) is on sys.path as a top-level ``kernels``: transformers, which
    imports Hugging Face's ``kernels`` when it is installed, must still get that package."""
    import importlib.util

    import pytest

    tree = PKG.parent
    if not (tree / "kernels" / "__init__.py").is_file():
        pytest.skip("cbtm is not installed from a source tree")
    others = [p for p in sys.path if Path(p or ".").resolve() != tree.resolve()]
    if importlib.machinery.PathFinder.find_spec("kernels", others) is None:
        pytest.skip("no other package named kernels is installed")
    code = ("import kernels, cbtm.kernels, transformers.activations; "
            "print(kernels.__file__); print(cbtm.kernels.weighted_logsumexp.__module__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tree, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    installed, ours = out.stdout.split()
    assert not Path(installed).resolve().is_relative_to(tree.resolve())
    assert ours == "cbtm.kernels.mixture"
