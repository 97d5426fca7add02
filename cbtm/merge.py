"""Deprecated import path (until cbtm 0.3): parameter averaging lives in :mod:`cbtm.branch`, expert
administration (average, add, remove, export) in :mod:`cbtm.experts`."""

import warnings

from .branch import average_experts, average_state_dicts, normalise_weights  # noqa: F401
from .experts import add_expert, average, export, remove_expert  # noqa: F401

warnings.warn("cbtm.merge is deprecated: import from cbtm.branch and cbtm.experts", DeprecationWarning, stacklevel=2)
