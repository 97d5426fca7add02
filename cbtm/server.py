"""`cbtm serve`: an OpenAI-compatible HTTP server over the batched decoding engine.

    app = create_app(Ensemble.load(run, top_k=2), model_name="demo")   # a FastAPI app
    serve(run, host="127.0.0.1", port=8000)                            # load, then run it with uvicorn

One decode loop owns the :class:`~cbtm.engine.Engine` and steps it while any sequence is live:
requests join the running batch at the next step and leave when done. ``cbtm serve`` runs it in a
process of its own (:class:`EngineProcess`: the engine's Python and the HTTP side's never wait for one
GIL); an app made from an ensemble object runs it in a thread (:class:`DecodeLoop`). HTTP handlers
validate a request, hand its sequences to the loop and receive their :class:`~cbtm.engine.Event`
through a per-request asyncio queue; they never block the event loop on decoding. Endpoints: ``POST /v1/completions`` (streamed as server-sent events when asked),
``GET /v1/models``, ``GET /v1/experts`` (each cluster's top tf-idf terms), ``GET /health``,
``GET /metrics`` (Prometheus) and ``GET /`` (a page that streams a continuation coloured by expert).
Errors have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.

FastAPI, uvicorn and prometheus-client are imported when an app is created (``pip install cbtm[serve]``).
(No ``from __future__ import annotations`` here: FastAPI reads the handlers' annotations.)
"""

import asyncio
import contextlib
import copy
import json
import logging
import math
import os
import queue
import signal
import threading
import time
import traceback
import uuid
from pathlib import Path

import numpy as np

from . import defaults

log = logging.getLogger("cbtm.serve")

STATIC = Path(__file__).resolve().parent / "static"
# fields of OpenAI's completions request this server takes as they are, and the C-BTM / vLLM extras
_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "stop", "seed", "stream", "stream_options",
           "logprobs", "n", "best_of", "echo", "suffix", "logit_bias", "presence_penalty", "frequency_penalty",
           "user", "min_tokens", "ignore_eos", "top_k_experts", "experts", "routing", "return_routing"}
_ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error",
                422: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class ApiError(Exception):
    """An error answered in OpenAI's JSON shape (status, message, the request field it names)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _ERROR_TYPES.get(
            self.status, "invalid_request_error" if 400 <= self.status < 500 else "server_error"),
                          "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------------------------------
# request validation


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _bad(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, f"{param}: {message}", param, code)


def parse_request(body, n_experts: int, routing: str | None, max_tokens_limit: int, prefix_router: bool):
    """(prompts, SamplingParams, options) of a completions request body; bad fields raise ApiError 400."""
    from .engine import SamplingParams

    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_json")
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise _bad(unknown[0], "unknown field (this server takes OpenAI's completions fields and "
                   "top_k_experts, experts, routing, return_routing, min_tokens, ignore_eos)", "unknown_field")
    g = body.get
    prompt = g("prompt")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        prompts = [list(prompt)]
    elif (isinstance(prompt, list) and prompt
          and all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in prompt)):
        prompts = [list(p) for p in prompt]
    else:
        raise _bad("prompt", "must be a string, a non-empty list of strings, or token ids (a list of integers "
                   "or of lists of integers)", "invalid_type")
    for name, ok in (("n", 1), ("best_of", 1)):
        v = g(name)
        if v is not None and v != ok or isinstance(v, bool):
            raise _bad(name, f"only {name} = 1 is supported (send the prompt several times, or a list of prompts)",
                       "unsupported")
    if g("echo") not in (None, False):
        raise _bad("echo", "echo is not supported", "unsupported")
    if g("suffix") is not None:
        raise _bad("suffix", "suffix is not supported", "unsupported")
    if g("logit_bias") not in (None, {}):
        raise _bad("logit_bias", "logit_bias is not supported", "unsupported")
    for name in ("presence_penalty", "frequency_penalty"):
        v = g(name)
        if v is not None and (not _is_number(v) or v != 0):
            raise _bad(name, f"{name} other than 0 is not supported", "unsupported")
    if g("user") is not None and not isinstance(g("user"), str):
        raise _bad("user", "must be a string", "invalid_type")
    if g("model") is not None and not isinstance(g("model"), str):
        raise _bad("model", "must be a string", "invalid_type")

    max_tokens = g("max_tokens")
    if max_tokens is None:
        max_tokens = defaults.SERVE_DEFAULT_MAX_TOKENS
    if not _is_int(max_tokens) or not 0 <= max_tokens <= max_tokens_limit:
        raise _bad("max_tokens", f"must be an integer in [0, {max_tokens_limit}], got {max_tokens!r}")
    temperature = 1.0 if g("temperature") is None else g("temperature")
    if not _is_number(temperature) or not 0 <= temperature <= 2:
        raise _bad("temperature", f"must be a number in [0, 2] (0: greedy), got {temperature!r}")
    top_p = 1.0 if g("top_p") is None else g("top_p")
    if not _is_number(top_p) or not 0 < top_p <= 1:
        raise _bad("top_p", f"must be a number in (0, 1], got {top_p!r}")
    stop = g("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if (not isinstance(stop, list) or len(stop) > 16
            or not all(isinstance(s, str) and 0 < len(s) <= 1000 for s in stop)):
        raise _bad("stop", "must be a non-empty string or a list of at most 16 of them")
    seed = g("seed")
    if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**63):
        raise _bad("seed", f"must be an integer in [0, 2^63), got {seed!r}")
    stream = False if g("stream") is None else g("stream")
    if not isinstance(stream, bool):
        raise _bad("stream", "must be a boolean", "invalid_type")
    options = g("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}
                                or not isinstance(options.get("include_usage", False), bool)):
        raise _bad("stream_options", "must be an object with an optional boolean include_usage")
    if options is not None and not stream:
        raise _bad("stream_options", "is only allowed with stream = true")
    logprobs = g("logprobs")
    if logprobs is not None and (not _is_int(logprobs) or not 0 <= logprobs <= defaults.MAX_LOGPROBS):
        raise _bad("logprobs", f"must be an integer in [0, {defaults.MAX_LOGPROBS}], got {logprobs!r}")
    min_tokens = 0 if g("min_tokens") is None else g("min_tokens")
    if not _is_int(min_tokens) or not 0 <= min_tokens <= max_tokens:
        raise _bad("min_tokens", f"must be an integer in [0, max_tokens = {max_tokens}], got {min_tokens!r}")
    ignore_eos = False if g("ignore_eos") is None else g("ignore_eos")
    if not isinstance(ignore_eos, bool):
        raise _bad("ignore_eos", "must be a boolean", "invalid_type")
    top_k = g("top_k_experts")
    if top_k is not None and top_k != "all" and (not _is_int(top_k) or not 1 <= top_k <= n_experts):
        raise _bad("top_k_experts", f"must be an integer in [1, {n_experts}] or \"all\", got {top_k!r}")
    experts = g("experts")
    if experts is not None:
        if not isinstance(experts, list) or not experts or not all(_is_int(e) for e in experts):
            raise _bad("experts", "must be a non-empty list of expert ids (integers)", "invalid_type")
        unknown = [e for e in experts if not 0 <= e < n_experts]
        if unknown:
            raise _bad("experts", f"unknown expert {unknown[0]} (this model has experts 0..{n_experts - 1})",
                       "unknown_expert")
        experts = tuple(sorted(set(experts)))
    route = g("routing")
    if route is not None:
        if route not in ("prefix", "distance"):
            raise _bad("routing", f"must be \"prefix\" or \"distance\", got {route!r}")
        if routing is None:
            raise _bad("routing", "this model has no router (a dense model or a uniform ensemble)", "unsupported")
        if route == "prefix" and not prefix_router:
            raise _bad("routing", "this run has no prefix router (fit one with `cbtm cluster fit-prefix`)",
                       "unsupported")
    want_routing = False if g("return_routing") is None else g("return_routing")
    if not isinstance(want_routing, bool):
        raise _bad("return_routing", "must be a boolean", "invalid_type")

    params = SamplingParams(max_new_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p),
                            seed=seed, stop=tuple(stop), min_tokens=min_tokens, ignore_eos=ignore_eos,
                            logprobs=logprobs, top_k=top_k, experts=experts, routing=route,
                            return_routing=True)  # always: the per-expert token metrics read it
    names = {"max_new_tokens": "max_tokens", "top_k": "top_k_experts"}
    try:
        params = params.checked(n_experts)
    except (ValueError, TypeError) as e:  # a last guard: the engine's own checks
        field = str(e).split()[0]
        raise _bad(names.get(field, field), str(e)) from None
    return prompts, params, {"stream": stream, "include_usage": bool((options or {}).get("include_usage")),
                             "return_routing": want_routing, "model": g("model")}


# ---------------------------------------------------------------------------------------------------
# the decode thread


class Job:
    """One sequence of a request (one prompt): what the decode thread needs and where its events go."""

    def __init__(self, loop: asyncio.AbstractEventLoop, out: asyncio.Queue, index: int, prompt, params):
        self.loop, self.out, self.index = loop, out, index
        self.prompt, self.params = prompt, params
        self.seq_id: int | None = None
        self.finished = False

    def put(self, kind: str, payload) -> None:
        """Deliver (index, kind, payload) to the request's queue from any thread."""
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, (self.index, kind, payload))
        except RuntimeError:  # the event loop is closed: nobody is listening
            pass


def _deliver(items) -> None:
    """In the event loop: each (job, event) into its request's queue."""
    for job, ev in items:
        job.out.put_nowait((job.index, "event", ev))


class DecodeLoop:
    """The one thread that owns an engine: admits jobs, steps the batch, hands out events.

    ``submit`` / ``cancel`` may be called from any thread. A job that fails to be added gets an
    ("error", (status, message, param)) item; an added one ("added", None), then one ("event", Event)
    per step until its event has a finish_reason. An exception in ``step`` fails the sequences of
    that step (the engine cannot say whose row raised) and the loop goes on serving.

    ``publish(pairs, seconds)`` receives each step's (job, Event) pairs (``seconds``: the step's time;
    None when an abort emptied the batch without a step); by default they go to the jobs' event
    loops and the metrics. The engine process publishes them to its pipe instead.
    """

    def __init__(self, engine, metrics=None, publish=None):
        self.engine, self.metrics = engine, metrics
        self._publish = publish or self._to_event_loops
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._jobs: dict[int, Job] = {}
        self._thread = threading.Thread(target=self._run, name="cbtm-decode", daemon=True)
        self.steps = 0

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        self._inbox.put(("add", job))

    def cancel(self, job: Job) -> None:
        self._inbox.put(("abort", job))

    def close(self, timeout: float | None = None) -> None:
        """Fail what is still live (503) and end the thread."""
        if self._thread.is_alive():
            self._inbox.put(("stop", None))
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        engine = self.engine
        while True:
            msgs = []
            try:
                msgs.append(self._inbox.get(block=not engine.has_work()))
                while True:
                    msgs.append(self._inbox.get_nowait())
            except queue.Empty:
                pass
            aborted = False
            for kind, job in msgs:
                if kind == "stop":
                    self._fail_all(503, "the server is shutting down")
                    return
                if kind == "add":
                    self._add(job)
                elif job.seq_id is not None and self._jobs.pop(job.seq_id, None) is not None:
                    aborted = True
                    try:
                        engine.abort(job.seq_id)
                    except Exception:  # noqa: BLE001 - the loop must outlive any one sequence
                        log.error("aborting a sequence failed:\n%s", traceback.format_exc())
            if engine.has_work():
                self._step()
            elif aborted:  # no step will report that the batch emptied
                self._publish([], None)

    def _add(self, job: Job) -> None:
        try:
            job.seq_id = self.engine.add(job.prompt, job.params)
        except (ValueError, TypeError, OverflowError) as e:
            job.put("error", (400, f"prompt: {e}", "prompt"))
            return
        except Exception as e:  # noqa: BLE001 - one bad request must not stop the loop
            log.error("adding a request failed:\n%s", traceback.format_exc())
            job.put("error", (500, f"internal error: {type(e).__name__}: {e}", None))
            return
        self._jobs[job.seq_id] = job
        job.put("added", None)

    def _fail_all(self, status: int, message: str) -> None:
        for sid, job in list(self._jobs.items()):
            with contextlib.suppress(Exception):
                self.engine.abort(sid)
            job.put("error", (status, message, None))
        self._jobs.clear()

    @property
    def running(self) -> int:
        return len(self.engine.running)

    @property
    def waiting(self) -> int:
        return len(self.engine.waiting)

    def _step(self) -> None:
        t0 = time.perf_counter()
        try:
            events = self.engine.step()
        except Exception as e:  # noqa: BLE001
            log.error("a decode step failed; its sequences fail:\n%s", traceback.format_exc())
            self._fail_all(500, f"internal error while decoding: {type(e).__name__}: {e}")
            return
        self.steps += 1
        self._publish(_pair(self._jobs, events), time.perf_counter() - t0)

    def _to_event_loops(self, pairs, seconds: float | None) -> None:
        if seconds is not None:
            _record_step(self.metrics, [ev for _, ev in pairs], seconds, self.running, self.waiting)
            _deliver_pairs(pairs)


def _record_step(m, events, seconds: float, running: int, waiting: int) -> None:
    """One decode step in the Prometheus metrics (nothing when ``m`` is None)."""
    if m is None:
        return
    m.step_seconds.observe(seconds)
    m.batch_size.observe(len(events))
    m.running.set(running)
    m.queue_depth.set(waiting)
    counts = np.zeros(len(m.expert_tokens), np.int64)
    tokens = 0
    for ev in events:
        if ev.token is not None:
            tokens += 1
            for j, _ in ev.routing or ():
                counts[j] += 1
    m.generation_tokens.inc(tokens)
    for j in np.flatnonzero(counts):
        m.expert_tokens[j].inc(int(counts[j]))


def _pair(jobs: dict, events) -> list:
    """(job, event) of every event whose sequence has a job (``jobs``: seq_id -> job); finished jobs
    leave ``jobs``."""
    pairs = []
    for ev in events:
        job = jobs.get(ev.seq_id)
        if job is None:
            continue
        if ev.finish_reason is not None:
            del jobs[ev.seq_id]
        pairs.append((job, ev))
    return pairs


def _deliver_pairs(pairs) -> None:
    """Each event to its job's event loop: one wake-up per loop and step."""
    deliveries: dict = {}  # event loop -> [(job, event)]
    for job, ev in pairs:
        deliveries.setdefault(job.loop, []).append((job, ev))
    for loop, items in deliveries.items():
        with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody is listening
            loop.call_soon_threadsafe(_deliver, items)


# ---------------------------------------------------------------------------------------------------
# the engine in a process of its own


class EngineProcess:
    """The decode loop of :class:`DecodeLoop` in a process of its own (``cbtm serve``'s default): the
    engine and the HTTP handlers never wait for each other's Python (one GIL each), as vLLM's engine
    core runs apart from its API server. Same interface as :class:`DecodeLoop`. The process loads the
    run itself (``options``: :func:`load_ensemble`'s arguments, ``max_batch``, ``seed``, ``threads``);
    requests and each step's events cross one pipe as JSON. The process ignores SIGINT and SIGTERM (the
    server drains first, then sends "stop") and exits when the pipe closes.
    """

    def __init__(self, run, options: dict, metrics=None):
        import multiprocessing

        self.metrics = metrics
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_engine_main, args=(child, str(run), dict(options)), name="cbtm-engine",
                                 daemon=True)
        self._child = child
        self._send_lock = threading.Lock()
        self._jobs: dict[int, Job] = {}  # job key -> job (only the reader thread removes)
        self._keys = iter(range(1 << 62))
        self._reader = threading.Thread(target=self._read, name="cbtm-engine-reader", daemon=True)
        self.steps = self.running = self.waiting = 0

    def start(self, timeout: float = defaults.SERVE_ENGINE_START) -> None:
        """Start the process and wait until it has loaded the run (a RuntimeError naming why it could not)."""
        if self._proc.is_alive() or self._reader.is_alive():
            return
        self._proc.start()
        self._child.close()
        if not self._conn.poll(timeout):
            self._proc.kill()
            raise RuntimeError(f"the engine process did not load the run in {timeout:g} s")
        try:
            msg = json.loads(self._conn.recv_bytes())
        except EOFError:
            raise RuntimeError(f"the engine process exited ({self._proc.exitcode}) while loading the run") from None
        if "failed" in msg:
            self._proc.join(10)
            raise RuntimeError(f"the engine process could not load the run: {msg['failed']}")
        self._reader.start()

    def submit(self, job: "Job") -> None:
        job.seq_id = next(self._keys)
        self._jobs[job.seq_id] = job
        params = {f: getattr(job.params, f) for f in job.params.__dataclass_fields__}
        prompt = job.prompt if isinstance(job.prompt, str) else [int(t) for t in job.prompt]
        if not self._send({"op": "add", "key": job.seq_id, "prompt": prompt, "params": params}):
            self._jobs.pop(job.seq_id, None)
            job.put("error", (503, "the decode loop stopped", None))

    def cancel(self, job: "Job") -> None:
        if job.seq_id is not None:
            self._send({"op": "abort", "key": job.seq_id})

    def close(self, timeout: float | None = None) -> None:
        """Fail what is still live (503), stop the process (killed after ``timeout``) and the reader."""
        if self._proc.pid is None:
            return
        self._send({"op": "stop"})
        self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        self._reader.join(timeout)
        self._conn.close()
        self._fail_all(503, "the server is shutting down")

    @property
    def alive(self) -> bool:
        return self._proc.is_alive() and self._reader.is_alive()

    def _send(self, msg: dict) -> bool:
        try:
            with self._send_lock:
                self._conn.send_bytes(json.dumps(msg).encode())
            return True
        except (OSError, ValueError):  # the process is gone or the pipe closed
            return False

    def _fail_all(self, status: int, message: str) -> None:
        for key in list(self._jobs):
            job = self._jobs.pop(key, None)
            if job is not None:
                job.put("error", (status, message, None))

    def _read(self) -> None:
        from .engine import Event

        while True:
            try:
                msg = json.loads(self._conn.recv_bytes())
            except (EOFError, OSError):
                self._fail_all(500, "the engine process exited")
                return
            if "step" in msg:
                step = msg["step"]
                events = [Event(key, token, text, logprob, None if top is None else {int(t): v for t, v in top},
                                None if routing is None else [tuple(r) for r in routing], finish)
                          for key, token, text, logprob, top, routing, finish in step["events"]]
                self.steps += 1
                self.running, self.waiting = step["running"], step["waiting"]
                _record_step(self.metrics, events, step["seconds"], self.running, self.waiting)
                _deliver_pairs(_pair(self._jobs, events))
            elif "state" in msg:
                self.running, self.waiting = msg["state"]["running"], msg["state"]["waiting"]
                if self.metrics is not None:
                    self.metrics.running.set(self.running)
                    self.metrics.queue_depth.set(self.waiting)
            elif "added" in msg:
                job = self._jobs.get(msg["added"])
                if job is not None:
                    job.put("added", None)
            elif "error" in msg:
                key, status, message, param = msg["error"]
                job = self._jobs.pop(key, None)
                if job is not None:
                    job.put("error", (status, message, param))


class _PipeJob:
    """A request inside the engine process: what the decode loop reports of it goes down the pipe."""

    def __init__(self, send, key: int, prompt, params, jobs: dict):
        self.send, self.key, self.prompt, self.params, self.jobs = send, key, prompt, params, jobs
        self.seq_id: int | None = None

    def put(self, kind: str, payload) -> None:
        if kind == "added":
            self.send({"added": self.key})
        else:  # an error ends the job
            self.jobs.pop(self.key, None)
            self.send({"error": [self.key, *payload]})


def _engine_main(conn, run: str, options: dict) -> None:
    """The engine process: load the run, then run a :class:`DecodeLoop` fed from the pipe and publishing
    to it, until "stop" or the pipe closes."""
    import torch

    from .engine import SamplingParams

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    torch.set_num_threads(options.pop("threads"))
    max_batch, seed = options.pop("max_batch"), options.pop("seed")
    try:
        engine = load_ensemble(run, **options).engine(max_batch=max_batch, seed=seed)
    except Exception as e:  # noqa: BLE001 - reported to the server, which exits naming it
        conn.send_bytes(json.dumps({"failed": f"{type(e).__name__}: {e}"}).encode())
        return

    def send(msg: dict) -> None:  # only the decode thread sends, once the loop runs
        with contextlib.suppress(OSError, ValueError):  # the server is gone: the main thread sees EOF
            conn.send_bytes(json.dumps(msg).encode())

    jobs: dict[int, _PipeJob] = {}  # job key -> job, while it lives

    def publish(pairs, seconds: float | None) -> None:
        state = {"running": len(engine.running), "waiting": len(engine.waiting)}
        if seconds is None:
            send({"state": state})
            return
        events = []
        for job, ev in pairs:
            if ev.finish_reason is not None:
                jobs.pop(job.key, None)
            top = None if ev.top_logprobs is None else list(ev.top_logprobs.items())
            events.append([job.key, ev.token, ev.text, ev.logprob, top, ev.routing, ev.finish_reason])
        send({"step": {"seconds": seconds, **state, "events": events}})

    send({"ready": True})
    loop = DecodeLoop(engine, publish=publish)
    loop.start()
    try:
        while True:
            msg = json.loads(conn.recv_bytes())
            if msg["op"] == "stop":
                break
            if msg["op"] == "add":
                job = jobs[msg["key"]] = _PipeJob(send, msg["key"], msg["prompt"], SamplingParams(**msg["params"]),
                                                  jobs)
                loop.submit(job)
            elif msg["key"] in jobs:  # abort
                loop.cancel(jobs.pop(msg["key"]))
    except (EOFError, OSError):  # the server is gone
        pass
    loop.close()


# ---------------------------------------------------------------------------------------------------
# metrics, cluster terms


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (no process-wide state)."""

    def __init__(self, n_experts: int):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        latency = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
        self.requests = Counter("cbtm_requests", "completion requests answered, by HTTP status", ["status"],
                                registry=r)
        self.prompt_tokens = Counter("cbtm_prompt_tokens", "prompt tokens accepted", registry=r)
        self.generation_tokens = Counter("cbtm_generation_tokens", "tokens generated", registry=r)
        tokens = Counter("cbtm_expert_tokens", "generated tokens each expert had a weight in", ["expert"],
                         registry=r)
        self.expert_tokens = [tokens.labels(expert=str(j)) for j in range(n_experts)]
        self.aborted = Counter("cbtm_aborted_sequences", "sequences ended early by a client disconnect",
                               registry=r)
        self.queue_depth = Gauge("cbtm_queue_depth", "sequences waiting for a batch slot", registry=r)
        self.running = Gauge("cbtm_running_sequences", "sequences in the running batch", registry=r)
        self.batch_size = Histogram("cbtm_batch_size", "sequences advanced per decode step", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.step_seconds = Histogram("cbtm_step_seconds", "seconds per decode step", registry=r,
                                      buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        self.latency = Histogram("cbtm_request_latency_seconds", "seconds from a request to its last token",
                                 registry=r, buckets=latency)
        self.ttft = Histogram("cbtm_time_to_first_token_seconds", "seconds from a request to its first token",
                              registry=r, buckets=latency)


def cluster_terms(ensemble, n: int = defaults.SERVE_TOP_TERMS) -> list[list[str]]:
    """Each expert's cluster centre projected back to tf-idf terms: its ``n`` heaviest terms
    (empty lists for an ensemble without a router)."""
    router = ensemble.router
    if router is None:
        return [[] for _ in range(ensemble.n_experts)]
    emb = router.embedder
    weights = np.asarray(router.centers, np.float64) @ np.asarray(emb.components, np.float64)  # (K, V)
    out = []
    for row in weights:
        top = np.argsort(-row)[: n * 4]
        terms = [emb.vocabulary[i] for i in top if row[i] > 0 and not emb.vocabulary[i].startswith("#")]
        out.append(terms[:n])
    return out


# ---------------------------------------------------------------------------------------------------
# the app


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


class _State:
    """What the handlers share (all touched from the event loop's thread only, except ``decode``)."""

    def __init__(self, ensemble, decode, model_name, max_batch, max_queue, max_prompt_tokens, max_tokens_limit):
        self.ens, self.model = ensemble, model_name
        self.capacity = max_batch + max_queue
        self.max_prompt_tokens, self.max_tokens_limit = max_prompt_tokens, max_tokens_limit
        self.live = 0  # sequences accepted and not yet finished
        self.metrics = Metrics(ensemble.n_experts)
        self.decode = decode
        decode.metrics = self.metrics
        router = ensemble.router if ensemble.kind == "cluster" else None
        self.routing = router.routing if router is not None else None
        self.prefix_router = router is not None and router.routing == "prefix"
        self.terms = cluster_terms(ensemble) if router is not None else [[] for _ in range(ensemble.n_experts)]
        self.tokenizer = copy.deepcopy(ensemble.tokenizer)  # the handlers' own (counting prompt tokens)
        self.tok_pool = None
        self.closing = False


def create_app(ensemble, model_name: str = "cbtm", max_batch: int = defaults.MAX_BATCH,
               max_queue: int = defaults.SERVE_MAX_QUEUE, max_prompt_tokens: int = defaults.SERVE_MAX_PROMPT_TOKENS,
               max_tokens_limit: int = defaults.SERVE_MAX_TOKENS, seed: int = 0, engine: "EngineProcess | None" = None):
    """A FastAPI app serving an :class:`~cbtm.ensemble.Ensemble` (its decode thread runs while the app's
    lifespan does). ``max_batch`` sequences decode together; ``max_queue`` more may wait (beyond: 429).
    ``engine``: decode in that :class:`EngineProcess` (which loads the same run) instead of a thread of
    this process; the ensemble then only answers questions about the model (its experts never load here)."""
    from concurrent.futures import ThreadPoolExecutor

    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    for name, v, low in (("max_batch", max_batch, 1), ("max_queue", max_queue, 0),
                         ("max_prompt_tokens", max_prompt_tokens, 1), ("max_tokens_limit", max_tokens_limit, 1)):
        if not _is_int(v) or v < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
    decode = engine if engine is not None else DecodeLoop(ensemble.engine(max_batch=max_batch, seed=seed))
    st = _State(ensemble, decode, model_name, max_batch, max_queue, max_prompt_tokens, max_tokens_limit)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        st.tok_pool = ThreadPoolExecutor(1, thread_name_prefix="cbtm-tokenize")
        st.decode.start()
        try:
            yield
        finally:
            st.closing = True
            await asyncio.get_running_loop().run_in_executor(None, st.decode.close, 10.0)
            st.tok_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="cbtm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.cbtm = st

    def error(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return error(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        return error(ApiError(e.status_code, str(e.detail), None, None, getattr(e, "headers", None)))

    @app.exception_handler(Exception)
    async def _internal(request, e):
        log.error("unhandled error:\n%s", traceback.format_exc())
        return error(ApiError(500, f"internal error: {type(e).__name__}", None, "internal_error"))

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/health")
    async def health():
        if st.closing or not st.decode.alive:
            return error(ApiError(503, "the server is shutting down" if st.closing else "the decode loop stopped"))
        return {"status": "ok", "running": st.decode.running, "waiting": st.decode.waiting, "live": st.live}

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(st.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def model_card() -> dict:
        return {"id": st.model, "object": "model", "created": 0, "owned_by": "cbtm",
                "experts": ensemble.n_experts, "top_k": ensemble.top_k or ensemble.n_experts,
                "routing": st.routing, "context": ensemble.context}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name}")
    async def model(name: str):
        if name != st.model:
            raise ApiError(404, f"the model {name!r} does not exist (this server serves {st.model!r})", "model",
                           "model_not_found")
        return model_card()

    @app.get("/v1/experts")
    async def experts():
        return {"model": st.model, "routing": st.routing, "top_k": ensemble.top_k or ensemble.n_experts,
                "experts": [{"id": j, "terms": t} for j, t in enumerate(st.terms)]}

    async def read_body(request: Request) -> dict:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > defaults.SERVE_MAX_BODY:
            raise ApiError(413, f"the request body is larger than {defaults.SERVE_MAX_BODY} bytes", None,
                           "body_too_large")
        chunks, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > defaults.SERVE_MAX_BODY:
                raise ApiError(413, f"the request body is larger than {defaults.SERVE_MAX_BODY} bytes", None,
                               "body_too_large")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, RecursionError) as e:  # RecursionError: nesting too deep
            raise ApiError(400, f"the request body is not valid JSON: {e}", None, "invalid_json") from None

    def count_tokens(prompts) -> list[int]:
        return [len(st.tokenizer.encode(p, add_special_tokens=False)) if isinstance(p, str) else len(p)
                for p in prompts]

    @app.post("/v1/completions")
    async def completions(request: Request):
        t0 = time.perf_counter()
        try:
            response = await _completions(request, t0)
        except ApiError as e:
            st.metrics.requests.labels(status=str(e.status)).inc()
            raise
        return response

    async def _completions(request: Request, t0: float):
        body = await read_body(request)
        prompts, params, opt = parse_request(body, ensemble.n_experts, st.routing, st.max_tokens_limit,
                                             st.prefix_router)
        if opt["model"] is not None and opt["model"] != st.model:
            raise ApiError(404, f"the model {opt['model']!r} does not exist (this server serves {st.model!r})",
                           "model", "model_not_found")
        n = len(prompts)
        if n > st.capacity:
            raise _bad("prompt", f"{n} prompts: this server takes at most {st.capacity} at once")
        if st.closing:
            raise ApiError(503, "the server is shutting down", None, "shutting_down")
        if st.live + n > st.capacity:
            raise ApiError(429, f"the server is busy ({st.live} sequences live, at most {st.capacity}): retry later",
                           None, "queue_full", {"Retry-After": "1"})
        loop = asyncio.get_running_loop()
        st.live += n  # reserved now; every path below releases it once
        jobs: list[Job] = []
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            st.live -= n
            for job in jobs:
                if not job.finished:
                    job.finished = True
                    st.decode.cancel(job)
                    st.metrics.aborted.inc()

        try:
            try:
                counts = await loop.run_in_executor(st.tok_pool, count_tokens, prompts)
            except (ValueError, TypeError, OverflowError) as e:  # e.g. a lone surrogate
                raise _bad("prompt", f"cannot be tokenized: {type(e).__name__}: {e}") from None
            for i, c in enumerate(counts):
                if c > st.max_prompt_tokens:
                    raise _bad("prompt", f"prompt {i} has {c} tokens; this server takes at most "
                               f"{st.max_prompt_tokens}", "prompt_too_long")
            out: asyncio.Queue = asyncio.Queue()
            jobs = [Job(loop, out, i, p, params) for i, p in enumerate(prompts)]
            for job in jobs:
                st.decode.submit(job)
            pending = set(range(n))
            early = []  # events that arrive before every job is acknowledged
            while pending:
                i, kind, payload = await out.get()
                if kind == "error":
                    jobs[i].finished = True
                    status, message, param = payload
                    raise ApiError(status, message, param)
                if kind == "added":
                    pending.discard(i)
                else:
                    early.append((i, kind, payload))
        except BaseException:
            release()
            raise
        st.metrics.prompt_tokens.inc(sum(counts))
        while not out.empty():  # keep each job's events in order: early ones first
            early.append(out.get_nowait())
        for item in early:
            out.put_nowait(item)
        rid = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        decoded = Decoded(st.tokenizer, n, opt["return_routing"], params.logprobs is not None)

        def finish(status: int) -> None:
            st.metrics.requests.labels(status=str(status)).inc()
            if decoded.first is not None:
                st.metrics.ttft.observe(decoded.first - t0)
            st.metrics.latency.observe(time.perf_counter() - t0)

        def usage() -> dict:
            c = sum(decoded.tokens)
            return {"prompt_tokens": sum(counts), "completion_tokens": c, "total_tokens": sum(counts) + c}

        if opt["stream"]:
            async def chunks():
                status, left = 200, n
                try:
                    while left:
                        items = [await out.get()]
                        while not out.empty():  # a client slower than the decode loop gets the
                            items.append(out.get_nowait())  # tokens waiting for it in one chunk
                        merged: dict[int, dict] = {}
                        error = None
                        for i, kind, payload in items:
                            if kind == "error":
                                status, error = payload[0], payload
                                jobs[i].finished = True
                                break
                            choice = decoded.add(i, payload)
                            if payload.finish_reason is not None:
                                jobs[i].finished = True
                                left -= 1
                            if choice is not None:
                                _merge_choice(merged, choice)
                        for choice in merged.values():
                            yield _sse({"id": rid, "object": "text_completion", "created": created, "model": st.model,
                                        "choices": [choice]})
                        if error is not None:
                            yield _sse(ApiError(*error).body())
                            break
                    if opt["include_usage"] and status == 200:
                        yield _sse({"id": rid, "object": "text_completion", "created": created, "model": st.model,
                                    "choices": [], "usage": usage()})
                    yield "data: [DONE]\n\n"
                finally:
                    finish(status if left == 0 or status != 200 else 499)
                    release()

            return _Stream(chunks(), release, media_type="text/event-stream",
                           headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        try:
            left = n
            while left:
                try:
                    i, kind, payload = await asyncio.wait_for(out.get(), 1.0)
                except (TimeoutError, asyncio.TimeoutError):
                    if await request.is_disconnected():
                        finish(499)
                        return Response(status_code=499)
                    continue
                if kind == "error":
                    jobs[i].finished = True
                    raise ApiError(*payload)
                decoded.add(i, payload)
                if payload.finish_reason is not None:
                    jobs[i].finished = True
                    left -= 1
        finally:
            release()
        finish(200)
        return {"id": rid, "object": "text_completion", "created": created, "model": st.model,
                "choices": decoded.choices(), "usage": usage()}

    class _Stream(StreamingResponse):
        """A streamed response that releases its sequences however it ends (done, client gone, cancelled)."""

        def __init__(self, content, cleanup, **kw):
            super().__init__(content, **kw)
            self._cleanup = cleanup

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                self._cleanup()

    return app


def _merge_choice(merged: dict[int, dict], choice: dict) -> None:
    """Fold a streamed choice into the pending one of its index (text, logprobs and routing appended)."""
    prev = merged.get(choice["index"])
    if prev is None:
        merged[choice["index"]] = choice
        return
    prev["text"] += choice["text"]
    prev["finish_reason"] = choice["finish_reason"]
    if prev.get("logprobs") is not None:
        for key, value in choice["logprobs"].items():
            prev["logprobs"][key] += value
    if "routing" in prev:
        prev["routing"] += choice["routing"]


def _byte_of() -> dict[str, int]:
    """Byte-level BPE's printable character of every byte, inverted (GPT-2's bytes_to_unicode)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_OF = _byte_of()


class Decoded:
    """The choices of one request, built from engine events (OpenAI's completions format)."""

    def __init__(self, tokenizer, n: int, routing: bool, logprobs: bool):
        self.tok, self.routing, self.logprobs = tokenizer, routing, logprobs
        self.text = [""] * n
        self.finish: list[str | None] = [None] * n
        self.tokens = [0] * n
        self.offsets = [0] * n
        self.lp = [{"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []} for _ in range(n)]
        self.routes: list[list] = [[] for _ in range(n)]
        self.first: float | None = None

    def _piece(self, token: int) -> str:
        """A token's text; OpenAI's "bytes:\\xNN" for a piece of a character (or of no text)."""
        text = self.tok.decode([token], skip_special_tokens=False) if token < len(self.tok) else ""
        if text and "\ufffd" not in text:
            return text
        raw = self.tok.convert_ids_to_tokens(token) if token < len(self.tok) else None
        if raw and all(c in _BYTE_OF for c in raw):  # a byte-level BPE token
            return "bytes:" + "".join(f"\\x{_BYTE_OF[c]:02x}" for c in raw)
        return text or f"token:{token}"

    def add(self, i: int, ev) -> dict | None:
        """Record one event of choice i; its streaming choice (None when it carries nothing)."""
        lp = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        route = []
        if ev.token is not None:
            if self.first is None:
                self.first = time.perf_counter()
            self.tokens[i] += 1
            if self.logprobs:
                piece = self._piece(ev.token)
                lp["tokens"].append(piece)
                lp["token_logprobs"].append(ev.logprob)
                lp["top_logprobs"].append({self._piece(t): v for t, v in (ev.top_logprobs or {}).items()})
                lp["text_offset"].append(self.offsets[i])
                self.offsets[i] += len(piece)
            if self.routing:
                route.append({"experts": [j for j, _ in ev.routing or ()],
                              "weights": [round(w, 6) for _, w in ev.routing or ()]})
        self.text[i] += ev.text
        self.finish[i] = ev.finish_reason
        for k, v in lp.items():
            self.lp[i][k] += v
        self.routes[i] += route
        if not (ev.text or ev.finish_reason or lp["tokens"] or route):
            return None
        choice = {"index": i, "text": ev.text, "logprobs": lp if self.logprobs else None,
                  "finish_reason": ev.finish_reason}
        if self.routing:
            choice["routing"] = route
        return choice

    def choices(self) -> list[dict]:
        out = []
        for i in range(len(self.text)):
            c = {"index": i, "text": self.text[i], "logprobs": self.lp[i] if self.logprobs else None,
                 "finish_reason": self.finish[i]}
            if self.routing:
                c["routing"] = self.routes[i]
            out.append(c)
        return out


# ---------------------------------------------------------------------------------------------------
# loading and running


def load_ensemble(run, top_k: int | None = defaults.TOP_K, device: str = "cpu", max_loaded: int | None = None,
                  routing: str = defaults.ROUTING):
    """The ensemble a server serves: the run's router over its experts, or a uniform mixture when the run
    has one expert or no router (a dense model)."""
    from .ensemble import Ensemble
    from .rundir import RunDir

    rd = RunDir.of(run)
    routed = len(rd.expert_entries()) > 1 and (rd.router / "kmeans.json").is_file()
    return Ensemble.load(rd.path, top_k=top_k if routed else None, kind="cluster" if routed else "uniform",
                         device=device, max_loaded=max_loaded, routing=routing)


def serve(run, host: str = defaults.SERVE_HOST, port: int = defaults.SERVE_PORT, top_k: int | None = defaults.TOP_K,
          device: str = "cpu", max_batch: int = defaults.MAX_BATCH, max_queue: int = defaults.SERVE_MAX_QUEUE,
          max_loaded: int | None = None, max_prompt_tokens: int = defaults.SERVE_MAX_PROMPT_TOKENS,
          max_tokens_limit: int = defaults.SERVE_MAX_TOKENS, grace: float = defaults.SERVE_GRACE,
          model_name: str | None = None, routing: str = defaults.ROUTING, log_level: str = "info",
          threads: int | None = None) -> None:
    """Load a run and serve it with uvicorn until SIGTERM / SIGINT: then stop accepting, give in-flight
    requests ``grace`` seconds to finish, and return (the process exits 0). The engine decodes in an
    :class:`EngineProcess`; ``threads``: torch's CPU threads there (default: one core fewer than the
    machine has, at least 1, leaving one to the HTTP side)."""
    import uvicorn

    ens = load_ensemble(run, top_k, device, max_loaded, routing)  # the model's description; no expert loads here
    name = model_name or Path(run).resolve().name
    engine = EngineProcess(run, {"top_k": top_k, "device": device, "max_loaded": max_loaded, "routing": routing,
                                 "max_batch": max_batch, "seed": 0,
                                 "threads": threads or max(1, (os.cpu_count() or 2) - 1)})
    engine.start()
    app = create_app(ens, name, max_batch=max_batch, max_queue=max_queue, max_prompt_tokens=max_prompt_tokens,
                     max_tokens_limit=max_tokens_limit, engine=engine)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=grace,
                            access_log=False)
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal that stopped it once it has shut down gracefully; with a handler that
    # does nothing there, a graceful SIGTERM ends in a normal return (exit status 0)
    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)} if main else {}
    try:
        print(f"cbtm serve: {name} ({ens.n_experts} experts, {ens.kind}) on http://{host}:{port}", flush=True)
        server.run()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
