"""Ray sessions for the stages that scale out on Ray (cluster assignment, expert training)."""

from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def _env(name: str, value: str):
    """``os.environ[name] = value`` inside the block only (when not already set by the user)."""
    if name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None):
    """Yield the ``ray`` module, connected: to the cluster at ``address``, or to a local instance of
    ``num_cpus`` started (and shut down) around the block; an already initialised Ray is reused.
    A local instance started here runs without token authentication (it listens on this machine
    only); a remote cluster is joined with whatever authentication it requires."""
    try:
        import ray
    except ImportError as e:
        raise ImportError("the Ray backend needs Ray: pip install 'cbtm[ray]'") from e
    started = not ray.is_initialized()
    if started:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            with _env("RAY_AUTH_MODE", "disabled"):
                ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()
