"""Triton kernels of cbtm (installed as cbtm.kernels).

Importing this package never imports triton: the kernels are built on first use, and every kernel
has a plain-PyTorch reference that is the CPU fallback.
"""

def _installed_namesake():
    """The installed top-level package ``kernels`` other than this folder, or None.

    This folder is ``cbtm.kernels``; it is found as a top-level ``kernels`` only when the cbtm source
    tree is on sys.path (``python -m ...`` run from a clone). Hugging Face's ``kernels``, which
    transformers imports, must not be shadowed by it."""
    import os
    import sys
    from importlib.machinery import PathFinder

    tree = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    others = [p for p in sys.path if os.path.abspath(p or os.curdir) != tree]
    return PathFinder.find_spec("kernels", others)


if __name__ == "kernels" and (_spec := _installed_namesake()) is not None:
    import importlib.util as _util
    import sys as _sys

    _module = _util.module_from_spec(_spec)
    _sys.modules[__name__] = _module  # what `import kernels` returns: the installed package
    _spec.loader.exec_module(_module)
else:
    from .mixture import (
        FUSED_MAX_V,
        MAX_EXPERTS,
        mixture_backend,
        weighted_logsumexp,
        weighted_logsumexp_ref,
        weighted_logsumexp_target,
        weighted_logsumexp_target_ref,
        weighted_logsumexp_target_triton,
        weighted_logsumexp_triton,
    )

    __all__ = [
        "FUSED_MAX_V",
        "MAX_EXPERTS",
        "mixture_backend",
        "weighted_logsumexp",
        "weighted_logsumexp_ref",
        "weighted_logsumexp_target",
        "weighted_logsumexp_target_ref",
        "weighted_logsumexp_target_triton",
        "weighted_logsumexp_triton",
    ]
