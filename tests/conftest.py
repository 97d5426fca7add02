"""Shared pytest configuration: the `gpu` marker, the Triton interpreter switch, a seeded `rng`."""
import os
import zlib

import numpy as np
import pytest

try:
    import torch
except ImportError:  # the CPU ops work without torch
    torch = None

_HAS_CUDA = torch is not None and torch.cuda.is_available()
if not _HAS_CUDA:
    # Triton kernels run on the CPU interpreter when there is no GPU. Triton fixes the mode of its own
    # @jit functions when it is first imported, so import it now, before anything else (transformers)
    # imports it while a test has switched the interpreter off.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        import triton  # noqa: F401
    except ImportError:
        pass


def _gpu_usable() -> bool:
    if not _HAS_CUDA:
        return False
    try:
        from cbtm import ops

        return bool(ops.cuda_available())
    except Exception:
        return False


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device and cbtm._cuda (skipped without them)")


def pytest_collection_modifyitems(config, items):
    if _gpu_usable():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device and the cbtm._cuda kernels")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng(request):
    """numpy Generator seeded from the test's node id: reproducible, different for every test."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def worst_on_every_isa():
    """Run a snippet that sets ``worst`` (an error) once per CPU micro-kernel instruction set this machine
    can run, each in its own process (``CBTM_CPU_ISA`` is read once per process): {isa: worst}."""
    import subprocess
    import sys

    def run(code: str, **env) -> dict:
        from cbtm import ops

        best = ops._cpu_module().cpu_isa()
        out = {}
        for isa in {"avx512": ["avx512", "avx2", "generic"], "avx2": ["avx2", "generic"]}.get(best, [best]):
            done = subprocess.run([sys.executable, "-c", code + "\nfrom cbtm._C import cpu_isa\nprint(cpu_isa(), worst)\n"],
                                  env={**os.environ, **env, "CBTM_CPU_ISA": isa}, capture_output=True, text=True,
                                  timeout=120)
            assert done.returncode == 0, done.stderr
            name, worst = done.stdout.split()
            assert name == isa
            out[isa] = float(worst)
        return out

    return run
