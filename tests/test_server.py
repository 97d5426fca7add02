"""`cbtm serve` through the official openai client and raw HTTP: completions equal Ensemble.generate
under concurrency, streaming, the C-BTM fields, errors in OpenAI's shape, a full queue, a client that
disconnects, a failing request, hostile input, SIGTERM, and the page in a headless browser."""

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from cbtm.ensemble import Ensemble  # noqa: E402
from cbtm.server import create_app, load_ensemble  # noqa: E402
from test_engine import llama_run  # noqa: E402,F401  (fixtures)
from test_ensemble import run, torch_mixture  # noqa: E402,F401

PROMPTS = ["And the king said", "Once", "The function returns the", "", "In the beginning God created",
           "We the people", "def main():", "It was a dark and stormy night"]
MODEL = "test-run"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadServer:
    """A uvicorn server of an app in a thread, on a free loopback port."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def server(llama_run):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")  # the mixture's PyTorch path (the interpreter is slow)
        ens = load_ensemble(llama_run, top_k=2)
        with ThreadServer(create_app(ens, MODEL, max_batch=16, max_queue=64, max_prompt_tokens=300)) as s:
            yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=30)


def _wait_idle(server, timeout=10.0):
    """Wait until the server holds no live sequence; its /health."""
    deadline = time.time() + timeout
    while True:
        h = httpx.get(server.url + "/health").json()
        if h["live"] == 0 and h["running"] == 0 and h["waiting"] == 0:
            return h
        assert time.time() < deadline, f"the server still holds sequences: {h}"
        time.sleep(0.05)


def test_concurrent_greedy_equals_generate(server, client, llama_run):
    want = Ensemble.load(llama_run, top_k=2).generate(PROMPTS, max_new_tokens=12, temperature=0)

    def one(i):
        if i % 2:  # a batch-mate that samples, routes differently and runs longer
            client.completions.create(model=MODEL, prompt=PROMPTS[i], max_tokens=30, temperature=1.3, seed=i,
                                      extra_body={"top_k_experts": 1, "ignore_eos": True})
        return client.completions.create(model=MODEL, prompt=PROMPTS[i], max_tokens=12, temperature=0)

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        got = list(pool.map(one, range(len(PROMPTS))))
    assert [r.choices[0].text for r in got] == want
    assert all(r.object == "text_completion" and r.model == MODEL for r in got)
    assert all(r.usage.completion_tokens <= 12 for r in got)
    # a list of prompts: one choice each, in order
    r = client.completions.create(model=MODEL, prompt=PROMPTS[:3], max_tokens=12, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == want[:3]
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_max_loaded_serves_the_same_text(server, client, llama_run):
    """--max-loaded 1: experts load on demand and are evicted (the engine's generic path); the text is
    the stacked path's."""
    want = [client.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0).choices[0].text
            for p in PROMPTS[:3]]
    ens = load_ensemble(llama_run, top_k=2, max_loaded=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")
        with ThreadServer(create_app(ens, MODEL)) as other:
            c = openai.OpenAI(base_url=other.url + "/v1", api_key="x", max_retries=0, timeout=30)
            with ThreadPoolExecutor(3) as pool:
                got = list(pool.map(lambda p: c.completions.create(model=MODEL, prompt=p, max_tokens=8,
                                                                   temperature=0).choices[0].text, PROMPTS[:3]))
    assert got == want and ens.stacked() is None


def test_streaming(client):
    kw = dict(model=MODEL, prompt="And the king said", max_tokens=20, temperature=0,
              extra_body={"min_tokens": 20, "ignore_eos": True})
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len(texts) > 5 and "".join(texts) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 20 and whole.usage.completion_tokens == 20
    # two prompts in one stream: chunks of both indexes, each text complete
    many = list(client.completions.create(model=MODEL, prompt=["Once", "We the people"], max_tokens=8,
                                          temperature=0, stream=True))
    text = {0: "", 1: ""}
    for c in many:
        for ch in c.choices:
            text[ch.index] += ch.text
    r = client.completions.create(model=MODEL, prompt=["Once", "We the people"], max_tokens=8, temperature=0)
    assert text == {0: r.choices[0].text, 1: r.choices[1].text}


def test_a_slow_client_gets_waiting_tokens_merged_into_one_chunk():
    from cbtm.server import _merge_choice

    merged = {}
    for k, fin in enumerate([None, None, "length"]):
        _merge_choice(merged, {"index": 0, "text": f"t{k}", "finish_reason": fin,
                               "logprobs": {"tokens": [f"t{k}"], "token_logprobs": [-k], "top_logprobs": [{}],
                                            "text_offset": [2 * k]},
                               "routing": [{"experts": [k], "weights": [1.0]}]})
    _merge_choice(merged, {"index": 1, "text": "u", "finish_reason": None, "logprobs": None})
    zero = merged[0]
    assert zero["text"] == "t0t1t2" and zero["finish_reason"] == "length"
    assert zero["logprobs"]["token_logprobs"] == [0, -1, -2] and zero["logprobs"]["text_offset"] == [0, 2, 4]
    assert [r["experts"] for r in zero["routing"]] == [[0], [1], [2]] and merged[1]["text"] == "u"


def test_cbtm_fields_and_logprobs(client):
    base = dict(model=MODEL, prompt="In the beginning God created", max_tokens=10, temperature=0)
    r = client.completions.create(**base, extra_body={"return_routing": True, "ignore_eos": True})
    routes = r.choices[0].model_extra["routing"]
    assert len(routes) == 10 and all(len(x["experts"]) == 2 for x in routes)
    assert all(abs(sum(x["weights"]) - 1) < 1e-4 for x in routes)
    one = client.completions.create(**base, extra_body={"return_routing": True, "top_k_experts": 1,
                                                        "experts": [1, 2], "routing": "distance"})
    assert all(x["experts"] in ([1], [2]) and x["weights"] == [1.0] for x in one.choices[0].model_extra["routing"])
    assert "routing" not in client.completions.create(**base).choices[0].model_extra
    lp = client.completions.create(**base, logprobs=3, extra_body={"ignore_eos": True}).choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 10
    assert all(x <= 0 for x in lp.token_logprobs) and all(0 < len(t) <= 3 for t in lp.top_logprobs)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert all(max(t.values()) >= v - 1e-5 for t, v in zip(lp.top_logprobs, lp.token_logprobs)), (lp.tokens, lp.token_logprobs, lp.top_logprobs)
    # a stop string ends the text before it
    full = client.completions.create(**base).choices[0].text
    cut = full[3:6]
    if cut:
        s = client.completions.create(**base, stop=[cut]).choices[0]
        assert s.text == full[:full.find(cut)] and s.finish_reason == "stop"


@pytest.mark.parametrize("kw, param", [
    ({"n": 2}, "n"),
    ({"extra_body": {"experts": [0, 9]}}, "experts"),
    ({"max_tokens": 10**7}, "max_tokens"),
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"logprobs": 99}, "logprobs"),
    ({"extra_body": {"top_k_experts": 0}}, "top_k_experts"),
    ({"extra_body": {"routing": "nearest"}}, "routing"),
    ({"extra_body": {"min_tokens": 50}, "max_tokens": 5}, "min_tokens"),
    ({"extra_body": {"ignore_eos": ""}}, "ignore_eos"),
    ({"stop": [""]}, "stop"),
    ({"extra_body": {"bogus": 1}}, "bogus"),
    ({"prompt": "word " * 1000}, "prompt"),
    ({"prompt": [10**9]}, "prompt"),
    ({"echo": True}, "echo"),
])
def test_bad_parameters_name_the_field(client, kw, param):
    kw = {"model": MODEL, "prompt": "Once", "max_tokens": 4, **kw}
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**kw)
    err = e.value.body
    assert e.value.status_code == 400 and err["param"] == param and err["type"] == "invalid_request_error"
    assert set(err) == {"message", "type", "param", "code"}


def test_other_errors(server, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="Once", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    for body in (b"{not json", b"", b"[1, 2]", "{\"prompt\": \"\xff\"}".encode("latin-1")):
        r = httpx.post(server.url + "/v1/completions", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code in (400, 422) and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(server.url + "/v1/completions", content=b"x" * (2 << 20))
    assert r.status_code == 413
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(server.url + "/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"


def test_models_health_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    info = httpx.get(server.url + "/v1/experts").json()
    assert len(info["experts"]) == 3 and all(e["terms"] for e in info["experts"])

    def counts():
        text = httpx.get(server.url + "/metrics").text
        served = sum(float(x.split()[-1]) for x in text.splitlines() if x.startswith("cbtm_expert_tokens_total{"))
        generated = next(float(x.split()[-1]) for x in text.splitlines() if x.startswith("cbtm_generation_tokens_total "))
        return text, served, generated

    _, served, generated = counts()
    client.completions.create(model=MODEL, prompt="Once", max_tokens=3, temperature=0,
                              extra_body={"ignore_eos": True})
    text, served2, generated2 = counts()
    for name in ("cbtm_requests_total{status=\"200\"}", "cbtm_generation_tokens_total", "cbtm_queue_depth",
                 "cbtm_batch_size_bucket", "cbtm_expert_tokens_total{expert=\"0\"}", "cbtm_prompt_tokens_total",
                 "cbtm_request_latency_seconds_bucket", "cbtm_time_to_first_token_seconds_count"):
        assert name in text, name
    assert (generated2 - generated, served2 - served) == (3, 6)  # top-2 of 3: two experts behind every token


def test_disconnect_frees_the_slot(server):
    st = server.app.state.cbtm
    aborted = st.metrics.aborted._value.get()
    body = {"model": MODEL, "prompt": "Once", "max_tokens": 4000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(x.startswith("data: {") for x in got)
        assert httpx.get(server.url + "/health").json()["running"] == 1
    _wait_idle(server)
    assert st.metrics.aborted._value.get() == aborted + 1
    assert st.decode.steps > 0


def test_a_failing_request_fails_alone(server, client, monkeypatch):
    engine = server.app.state.cbtm.decode.engine
    add, step = engine.add, engine.step

    def bad_add(prompt, params):
        if prompt == "BOOM":
            raise RuntimeError("a bad request")
        return add(prompt, params)

    monkeypatch.setattr(engine, "add", bad_add)
    with ThreadPoolExecutor(3) as pool:
        ok = [pool.submit(client.completions.create, model=MODEL, prompt=p, max_tokens=8, temperature=0)
              for p in ("Once", "We the people")]
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model=MODEL, prompt="BOOM", max_tokens=8)
        assert "a bad request" in e.value.body["message"]
        assert all(f.result().choices[0].finish_reason in ("stop", "length") for f in ok)
    # a step that raises fails the requests of that step; the next ones are served
    calls = []

    def bad_step():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("a bad step")
        return step()

    monkeypatch.setattr(engine, "step", bad_step)
    with pytest.raises(openai.InternalServerError):
        client.completions.create(model=MODEL, prompt="Once", max_tokens=8, extra_body={"ignore_eos": True})
    r = client.completions.create(model=MODEL, prompt="Once", max_tokens=8, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 8
    _wait_idle(server)


def _hostile(http, url: str, i: int, rng: random.Random) -> int:
    """One hostile request (of several kinds); its HTTP status (0 for a stream cancelled on purpose)."""
    kind = i % 10
    post = f"{url}/v1/completions"
    if kind == 0:
        return http.post(post, content=rng.choice([b"{", b"null", b"\x00\xff", b"{\"prompt\":}", b"[" * 50000,
                                                   b'{"prompt": "\\ud800", "max_tokens": 2}'])).status_code
    bodies = [None, {"prompt": 5}, {"prompt": "x", "max_tokens": "many"}, {"prompt": "x", "max_tokens": 10**12},
              {"prompt": "go " * 5000}, {"prompt": "x", "experts": [-1]}, {"prompt": "x", "temperature": [1]},
              {"prompt": [[1, 2], "a"]}, None, {"prompt": "x", "max_tokens": 3, "stop": [""]}]
    body = bodies[kind]
    if kind == 8:  # a stream cancelled after its first chunk
        with http.stream("POST", post, json={"prompt": "Once", "max_tokens": 500, "ignore_eos": True,
                                             "stream": True}) as r:
            for _ in r.iter_lines():
                break
        return 0
    return http.post(post, json=body).status_code


def test_hostile_requests_then_still_serving(server, client):
    rng = random.Random(0)
    t0 = time.time()
    with httpx.Client(timeout=30) as http, ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda i: _hostile(http, server.url, i, rng), range(200)))
    assert time.time() - t0 < 20
    assert all(c == 0 or 400 <= c < 500 for c in codes), sorted(set(codes))
    assert codes.count(0) == 20 and sum(400 <= c < 500 for c in codes) == 180
    _wait_idle(server)
    r = client.completions.create(model=MODEL, prompt="Once", max_tokens=5, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 5


def test_engine_process_serves_the_same_and_fails_cleanly(llama_run, tmp_path):
    """cbtm serve's engine in a process of its own: concurrent greedy requests get Ensemble.generate's
    text, streamed log-probs and routing cross the pipe, a disconnect frees the slot, the experts never
    load in the server's process; a run the process cannot load is a RuntimeError naming why; a killed
    engine process fails the request in flight (500) and /health turns 503."""
    from cbtm.server import EngineProcess

    want = Ensemble.load(llama_run, top_k=2).generate(PROMPTS[:4], max_new_tokens=10, temperature=0)
    options = {"top_k": 2, "device": "cpu", "max_loaded": None, "routing": "auto", "max_batch": 8, "seed": 0,
               "threads": 1}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")
        engine = EngineProcess(llama_run, options)
        engine.start()
        ens = load_ensemble(llama_run, top_k=2)
        with ThreadServer(create_app(ens, MODEL, max_batch=8, engine=engine)) as srv:
            c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
            with ThreadPoolExecutor(4) as pool:
                got = list(pool.map(lambda q: c.completions.create(model=MODEL, prompt=q, max_tokens=10,
                                                                   temperature=0).choices[0].text, PROMPTS[:4]))
            assert got == want
            assert ens.pool.loads == 0  # the experts live in the engine process only
            r = c.completions.create(model=MODEL, prompt="Once", max_tokens=4, temperature=0, logprobs=2,
                                     extra_body={"return_routing": True, "ignore_eos": True})
            lp = r.choices[0].logprobs
            assert len(lp.token_logprobs) == 4 and all(len(t) == 2 for t in lp.top_logprobs)
            assert all(x <= 0 for x in lp.token_logprobs)
            body = {"model": MODEL, "prompt": "Once", "max_tokens": 4000, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=30) as s:
                lines = s.iter_lines()
                assert any(next(lines).startswith("data: {") for _ in range(4))
            _wait_idle(srv)
            assert engine.steps > 0 and engine.alive
            body["stream"] = False
            with ThreadPoolExecutor(1) as pool:
                inflight = pool.submit(httpx.post, srv.url + "/v1/completions", json=body, timeout=60)
                while httpx.get(srv.url + "/health").json()["running"] < 1:
                    time.sleep(0.01)
                engine._proc.kill()
                assert inflight.result().status_code == 500
            assert httpx.get(srv.url + "/health").status_code == 503
    (tmp_path / "run").mkdir()
    with pytest.raises(RuntimeError, match="could not load the run: .*"):
        EngineProcess(tmp_path / "run", options).start()


def test_queue_full_then_sigterm_finishes_in_flight(llama_run):
    """A server of one slot and one queue place (a subprocess): a third request gets 429 with
    Retry-After; SIGTERM lets the in-flight requests finish and the process exits 0."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "cbtm.cli", "serve", "--run", str(llama_run), "--port", str(port),
                             "--max-batch", "1", "--max-queue", "1", "--grace", "30"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline
            time.sleep(0.1)
        body = {"prompt": "Once", "max_tokens": 120, "ignore_eos": True}
        with ThreadPoolExecutor(2) as pool:
            first = [pool.submit(httpx.post, url + "/v1/completions", json=body, timeout=60) for _ in range(2)]
            while httpx.get(url + "/health").json()["live"] < 2:
                time.sleep(0.01)
            r = httpx.post(url + "/v1/completions", json=body)
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "rate_limit_error"
            proc.send_signal(signal.SIGTERM)
            done = [f.result() for f in first]
        assert [d.status_code for d in done] == [200, 200]
        assert [d.json()["usage"]["completion_tokens"] for d in done] == [120, 120]
        assert proc.wait(30) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_import_is_cheap_and_serve_extra_is_lazy():
    code = "import sys, cbtm, cbtm.cli, cbtm.server; print(sorted(m for m in ('fastapi', 'uvicorn', 'prometheus_client') " \
           "if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


class HeadlessBrowser:
    """Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe: JSON messages
    ending in NUL on fds 3 and 4), so no websocket client or browser-driver package is needed."""

    def __init__(self, exe: str, profile):
        cmd_r, cmd_w = os.pipe()
        res_r, res_w = os.pipe()

        def child():  # the browser reads commands on fd 3 and writes results on fd 4
            a, b = os.dup(cmd_r), os.dup(res_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                                      "--hide-scrollbars", f"--user-data-dir={profile}", "--remote-debugging-pipe",
                                      "about:blank"], close_fds=False, preexec_fn=child,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(cmd_r)
        os.close(res_w)
        self.w, self.r = os.fdopen(cmd_w, "wb", 0), os.fdopen(res_r, "rb", 0)
        self.buf, self.n, self.session = b"", 0, None

    def send(self, method: str, **params):
        self.n += 1
        msg = {"id": self.n, "method": method, "params": params}
        if self.session and not method.startswith(("Target.", "Browser.")):
            msg["sessionId"] = self.session
        self.w.write(json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in self.buf:
                chunk = self.r.read(1 << 16)
                if not chunk:
                    raise RuntimeError("the browser closed its pipe")
                self.buf += chunk
            raw, self.buf = self.buf.split(b"\0", 1)
            m = json.loads(raw)
            if m.get("id") == self.n:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m["result"]

    def open(self, url: str, width: int = 900, height: int = 560) -> None:
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        self.send("Page.navigate", url=url)

    def eval(self, expression: str):
        r = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        return r["result"].get("value")

    def wait(self, expression: str, timeout: float = 30) -> None:
        deadline = time.time() + timeout
        while not self.eval(expression):
            assert time.time() < deadline, f"timed out waiting for {expression}"
            time.sleep(0.05)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.send("Browser.close")
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def page_url(base: str, prompt: str, **kw) -> str:
    from urllib.parse import urlencode

    return f"{base}/?{urlencode({'prompt': prompt, 'autorun': 1, **kw})}"


@pytest.mark.skipif(chromium() is None, reason="no headless browser (chromium) installed")
def test_page_in_a_headless_browser(server, client, tmp_path):
    want = client.completions.create(model=MODEL, prompt="The king said", max_tokens=12, temperature=0,
                                     extra_body={"return_routing": True}).choices[0]
    browser = HeadlessBrowser(chromium(), tmp_path)
    try:
        browser.open(page_url(server.url, "The king said", max_tokens=12, temperature=0, top_k=2))
        browser.wait("document.body && document.body.dataset.state === 'done'")
        spans = browser.eval("[...document.querySelectorAll('#out .tok')].map(s => [s.textContent, "
                             "s.dataset.expert, s.title, s.style.background])")
        legend = browser.eval("document.getElementById('legend').textContent")
        status = browser.eval("document.getElementById('status').textContent")
    finally:
        browser.close()
    assert spans and "".join(t for t, *_ in spans) == want.text
    top = [str(max(zip(r["weights"], r["experts"]))[1]) for r in want.model_extra["routing"]]
    assert all(e in top and title.startswith("expert ") and bg for _, e, title, bg in spans)
    assert "expert 2" in legend and "12 tokens" in status
