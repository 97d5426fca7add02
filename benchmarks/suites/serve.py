"""``serve`` suite: `cbtm serve` under N concurrent clients on loopback.

The runs of the ``generate`` suite (:func:`benchmarks.suites.generate.build`: 8 random experts of the
demo's size with a router, and one dense model of the same size). Each server is a `cbtm serve`
subprocess on 127.0.0.1; N clients (asyncio + httpx, streaming) each send completions of ``NEW``
tokens (greedy, EOS ignored, so every completion has the same length), a bounded number of requests
per client and no new request after a time limit. Per server and N: aggregate generated tokens/s
over the wall time, time to first token, p50 / p99 latency, failed requests (non-200, an error
event or a short completion) and the server's RSS before and after. Servers: top-1 of 8 (continuous
batching, ``--max-batch 64``), the same limited to one request at a time (``--max-batch 1``), and the
dense model served the same way.

Also a command line for the long checks (not part of ``benchmarks/run.py``)::

    python -m benchmarks.suites.serve --hostile 1000     # hostile requests: each 4xx or completed
    python -m benchmarks.suites.serve --soak 300         # 64 clients for 5 minutes: failures, p99, RSS growth
    (--url http://127.0.0.1:8000 targets a running server instead of starting one)
"""
import argparse
import asyncio
import json
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import markdown_table

CLIENTS = {False: (1, 8, 32, 64), True: (1, 4)}
NEW = {False: 64, True: 16}
PER_CLIENT = {False: 16, True: 3}  # at most this many requests per client (and at least 4 at N >= 4) ...
LIMIT_S = {False: 60.0, True: 10.0}  # ... and none started after this many seconds
COMPARE_AT = {False: 32, True: 4}  # the N of the summary ratios
PROMPTS = ["The king said unto", "def main():", "It was a truth universally", "The Congress shall", "Once upon"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    """Resident memory (MB) of a process and its descendants (`cbtm serve`'s engine process), from /proc
    (0 for a process that is gone)."""
    total = 0.0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) / 1024
        for task in Path(f"/proc/{pid}/task").iterdir():
            total += sum(rss_mb(int(c)) for c in (task / "children").read_text().split())
    except OSError:
        pass
    return total


class Server:
    """`cbtm serve` in a subprocess on a free loopback port (a context manager)."""

    def __init__(self, run, *flags, device="cpu", timeout=180):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "cbtm.cli", "serve", "--run", str(run), "--port", str(self.port),
                    "--device", device, *map(str, flags)]
        self.timeout = timeout
        self.log = tempfile.TemporaryFile("w+")

    def __enter__(self):
        import httpx

        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + self.timeout
        while True:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"cbtm serve exited {self.proc.returncode}:\n{self.log.read()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.time() > deadline:
                self.proc.kill()
                raise RuntimeError(f"cbtm serve did not start in {self.timeout} s")
            time.sleep(0.2)

    def __exit__(self, *exc):
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    @property
    def rss_mb(self) -> float:
        return rss_mb(self.proc.pid)


async def _one(http, url: str, body: dict) -> dict:
    """One streamed completion: ok, tokens, ttft and latency (s)."""
    import httpx

    t0 = time.perf_counter()
    first, tokens, ok = None, 0, False
    try:
        async with http.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return {"ok": False, "status": r.status_code, "tokens": 0, "ttft": None,
                        "latency": time.perf_counter() - t0}
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    ok = True
                    break
                msg = json.loads(data)
                if "error" in msg:
                    break
                if first is None and msg.get("choices"):
                    first = time.perf_counter()
                if msg.get("usage"):
                    tokens = msg["usage"]["completion_tokens"]
    except httpx.HTTPError:
        ok = False
    return {"ok": ok and tokens == body["max_tokens"], "status": 200, "tokens": tokens,
            "ttft": None if first is None else first - t0, "latency": time.perf_counter() - t0}


async def load(url: str, clients: int, prompts, new: int, per_client: int, limit_s: float) -> dict:
    """N clients, each sending up to ``per_client`` completions of ``new`` tokens until ``limit_s``."""
    import httpx

    results = []
    start = time.perf_counter()

    async def client(c: int, http) -> None:
        for i in range(per_client):
            if i and time.perf_counter() - start > limit_s:
                return
            body = {"prompt": prompts[(c * per_client + i) % len(prompts)], "max_tokens": new, "temperature": 0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            results.append(await _one(http, url, body))

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=30), limits=limits) as http:
        await asyncio.gather(*(client(c, http) for c in range(clients)))
    wall = time.perf_counter() - start
    return summarise(results, wall)


def _pct(values, q):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def summarise(results, wall: float) -> dict:
    ok = [r for r in results if r["ok"]]
    lat = [r["latency"] for r in ok]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    return {"requests": len(results), "failed": len(results) - len(ok), "wall_s": wall,
            "tokens_per_s": sum(r["tokens"] for r in ok) / wall if wall else 0.0,
            "ttft_p50_ms": None if not ttft else 1000 * _pct(ttft, 50),
            "latency_p50_s": _pct(lat, 50), "latency_p99_s": _pct(lat, 99)}


def _warm(url: str, prompts) -> None:
    import httpx

    for p in prompts[:2]:
        r = httpx.post(url + "/v1/completions", json={"prompt": p, "max_tokens": 8, "temperature": 0,
                                                      "ignore_eos": True}, timeout=120)
        r.raise_for_status()


def run(args):
    from benchmarks.suites.generate import K, build

    quick = args.quick
    new, per, limit = NEW[quick], PER_CLIENT[quick], LIMIT_S[quick]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        run_dir, dense_dir, prompts = build(Path(tmp))
        servers = [(f"top-1 of {K}", run_dir, ("--top-k", "1", "--max-batch", "64", "--max-queue", "512")),
                   (f"top-1 of {K}, one request at a time", run_dir, ("--top-k", "1", "--max-batch", "1",
                                                                      "--max-queue", "512")),
                   ("dense", dense_dir, ("--max-batch", "64", "--max-queue", "512"))]
        for name, path, flags in servers:
            with Server(path, *flags, device=args.device) as srv:
                _warm(srv.url, prompts)
                for n in CLIENTS[quick]:
                    before = srv.rss_mb
                    r = asyncio.run(load(srv.url, n, prompts, new, max(per if n < 4 else 4, per // n), limit))
                    rows.append({"server": name, "clients": n, "new_tokens": new, **r,
                                 "rss_before_mb": before, "rss_after_mb": srv.rss_mb})
                    print(f"  {name}, {n} clients: {r['tokens_per_s']:.0f} tokens/s, {r['failed']} failed",
                          flush=True)
    at = COMPARE_AT[quick]

    def tps(server):
        return next((r["tokens_per_s"] for r in rows if r["server"] == server and r["clients"] == at), None)

    batched, single, dense = tps(f"top-1 of {K}"), tps(f"top-1 of {K}, one request at a time"), tps("dense")
    summary = {"clients": at, "batched_vs_one_at_a_time": batched / single if single else None,
               "top1_vs_dense": batched / dense if dense else None}
    md = (f"## serve suite: `cbtm serve` on loopback, completions of {new} tokens (greedy, EOS ignored), "
          f"streamed ({args.device})\n\n"
          + markdown_table(["server", "clients", "requests", "failed", "tokens/s", "TTFT p50 (ms)", "latency p50 (s)",
                            "latency p99 (s)", "RSS before → after (MB)"],
                           [[r["server"], r["clients"], r["requests"], r["failed"], r["tokens_per_s"], r["ttft_p50_ms"],
                             r["latency_p50_s"], r["latency_p99_s"],
                             f"{r['rss_before_mb']:.0f} → {r['rss_after_mb']:.0f}"] for r in rows])
          + f"\n\nAt {at} clients: continuous batching {summary['batched_vs_one_at_a_time']:.2f}× the "
          f"one-request-at-a-time server; top-1 of {K} {summary['top1_vs_dense']:.2f}× the dense model served "
          "the same way.")
    return {"rows": rows, "summary": summary, "markdown": md}


# ---------------------------------------------------------------------------------------------------
# the long checks: hostile requests, a soak


def _hostile_request(kind: int, rng: random.Random):
    """(method, body bytes or JSON, streamed and cancelled?) of one hostile request of a kind."""
    big = "word " * rng.randint(20_000, 200_000)
    bodies = {
        0: rng.choice([b"{", b"null", b"\x00\xff\xfe", b'{"prompt":}', b"[" * 100_000, b'{"prompt": "x"',
                       b"\"just a string\"", b"{}" * 1000, b'{"prompt": "\\ud800"}', b'{"prompt": NaN}']),
        1: {"prompt": rng.choice([5, None, {"a": 1}, [], [[]], [1.5], [-1], [[1, "x"]], True])},
        2: {"prompt": "x", rng.choice(["max_tokens", "temperature", "top_p", "seed", "logprobs", "stop", "n",
                                       "min_tokens", "ignore_eos", "stream", "top_k_experts", "return_routing"]):
            rng.choice(["many", -1, 1e400, [1], {"x": 1}, True, None, 2**70, ""])},
        3: {"prompt": "x", "max_tokens": rng.choice([10**6, 2**31, 2**63, 10**30])},
        4: {"prompt": big, "max_tokens": 1},
        5: {"prompt": "x", "experts": rng.choice([[99], [-1], [0, 1000], ["a"], [], [2**64]])},
        6: {"prompt": "x", "routing": rng.choice(["nearest", "", 3]), "top_k_experts": rng.choice([0, 999, "most"])},
        7: {"prompt": "Once", "max_tokens": 2000, "ignore_eos": True, "stream": True},  # cancelled
        8: {"prompt": ["a"] * rng.choice([1000, 5000]), "max_tokens": 1},
        9: {"prompt": "x", "n": rng.choice([2, 100]), "best_of": 3, "echo": True, "bogus_field": 1},
    }
    return bodies[kind]


async def hostile_async(url: str, n: int = 1000, seed: int = 0, concurrency: int = 16) -> dict:
    """Send ``n`` hostile requests (malformed JSON, wrong types, huge max_tokens, huge prompts, unknown
    experts, bad C-BTM fields, too many prompts, cancelled streams); count the answers. Every one must
    be a 4xx or complete; then a normal completion must still succeed."""
    import httpx

    rng = random.Random(seed)
    kinds = [i % 10 for i in range(n)]
    rng.shuffle(kinds)
    outcome: dict[str, int] = {}
    sem = asyncio.Semaphore(concurrency)

    def count(key):
        outcome[key] = outcome.get(key, 0) + 1

    async def one(http, kind):
        body = _hostile_request(kind, rng)
        async with sem:
            try:
                if kind == 7:  # read the first events, then hang up
                    async with http.stream("POST", url + "/v1/completions", json=body) as r:
                        got = 0
                        async for line in r.aiter_lines():
                            got += line.startswith("data: ")
                            if got >= rng.randint(1, 5):
                                break
                    count("cancelled stream" if r.status_code == 200 else f"{r.status_code}")
                    return
                if not isinstance(body, bytes):  # Python's json writes inf as Infinity (not JSON): sent as is
                    body = json.dumps(body).encode()
                r = await http.post(url + "/v1/completions", content=body,
                                    headers={"Content-Type": "application/json"})
                try:
                    ok_shape = r.status_code == 200 or set(r.json()["error"]) == {"message", "type", "param", "code"}
                except (ValueError, KeyError, TypeError):
                    ok_shape = False
                count(str(r.status_code) if ok_shape else f"{r.status_code} (not OpenAI's error shape)")
            except httpx.HTTPError as e:
                count(f"transport error: {type(e).__name__}")

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=120) as http:
        await asyncio.gather(*(one(http, k) for k in kinds))
        r = await http.post(url + "/v1/completions", json={"prompt": "Once", "max_tokens": 8, "ignore_eos": True})
        serving = r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
    fine = {"200", "cancelled stream"} | {str(c) for c in range(400, 500)}
    bad = {k: v for k, v in outcome.items() if k not in fine}
    return {"requests": n, "seconds": time.perf_counter() - t0, "outcomes": dict(sorted(outcome.items())),
            "unexpected": bad, "still_serving": serving, "passed": not bad and serving}


async def soak_async(url: str, seconds: float, clients: int, prompts, new: int, warmup: float, pid=None) -> dict:
    """``clients`` clients sending completions for ``seconds``: failures, latency percentiles, RSS
    after ``warmup`` seconds and at the end."""
    rss = {}

    async def watch():
        await asyncio.sleep(warmup)
        rss["after_warmup_mb"] = rss_mb(pid) if pid else None

    w = asyncio.ensure_future(watch())
    r = await load(url, clients, prompts, new, 10**9, seconds)
    await w
    rss["end_mb"] = rss_mb(pid) if pid else None
    growth = (rss["end_mb"] / rss["after_warmup_mb"] - 1) if pid and rss["after_warmup_mb"] else None
    return {**r, "clients": clients, "seconds": seconds, **rss, "rss_growth": growth}


def main(argv=None):
    p = argparse.ArgumentParser(description="the serve suite's long checks (hostile requests, a soak)")
    p.add_argument("--hostile", type=int, default=0, metavar="N", help="send N hostile requests")
    p.add_argument("--soak", type=float, default=0, metavar="SECONDS", help="64 clients for this long")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--warmup", type=float, default=30.0, help="soak: RSS growth is measured from here")
    p.add_argument("--url", default=None, help="a running server (default: start one on a fresh 8-expert run)")
    p.add_argument("--run", default=None, help="the run to serve (default: build the suite's 8-expert run)")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    if not (a.hostile or a.soak):
        p.error("give --hostile N and/or --soak SECONDS")
    with tempfile.TemporaryDirectory() as tmp:
        from benchmarks.suites.generate import build

        run_dir, prompts = a.run, PROMPTS
        if a.run is None and a.url is None:
            run_dir, _, prompts = build(Path(tmp))
        server = None if a.url else Server(run_dir, "--top-k", "1", "--max-queue", "512", device=a.device)
        with server or _Nothing():
            url = a.url or server.url
            out = {}
            if a.hostile:
                out["hostile"] = asyncio.run(hostile_async(url, a.hostile))
                print(json.dumps(out["hostile"], indent=1), flush=True)
            if a.soak:
                _warm(url, prompts)
                out["soak"] = asyncio.run(soak_async(url, a.soak, a.clients, prompts, NEW[False], a.warmup,
                                                     server.proc.pid if server else None))
                print(json.dumps(out["soak"], indent=1), flush=True)
    ok = out.get("hostile", {}).get("passed", True) and out.get("soak", {}).get("failed", 0) == 0
    return 0 if ok else 1


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    root = Path(__file__).resolve().parents[2]
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    sys.exit(main())
