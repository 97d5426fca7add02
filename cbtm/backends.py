"""Scale-out helpers shared by the stages that run on Ray (cluster assignment, expert training)."""

from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None):
    """Yield the ``ray`` module, connected: to the cluster at ``address``, or to a local instance of
    ``num_cpus`` started (and shut down) around the block; an already initialised Ray is reused."""
    try:
        import ray
    except ImportError as e:
        raise ImportError("the Ray backend needs Ray: pip install 'cbtm[ray]'") from e
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    started = not ray.is_initialized()
    if started:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()
