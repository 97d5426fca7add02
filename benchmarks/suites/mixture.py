"""``mixture`` suite: mixing k experts' next-token distributions (``cbtm.kernels.mixture``).

``out[b, v] = logsumexp_j(log w[b, j] + logits[j][b, v] - lse_j(b))`` for every v (generation) and
only at ``target[b]`` (scoring / perplexity).  Logits are random N(0, 3²) in bfloat16 (one float32
case), log weights ``log_softmax`` of random scores; "top-2" rows keep the two largest weights per
row and set the others to -inf (the C-BTM default), so only 2 of the k experts are read per row.

Methods:
- ``cbtm C++`` (CPU): ``cbtm.ops.weighted_logsumexp`` on CPU float32 / bfloat16 logits, the per-ISA C++
  kernel (one pass per used expert row for its normaliser, one for the mixture; what the engine runs);
- ``triton``: ``weighted_logsumexp_triton`` / ``weighted_logsumexp_target_triton`` (``--device cuda``;
  on CPU only under TRITON_INTERPRET=1 and at tiny sizes, so not timed there);
- ``torch fallback``: the plain-PyTorch reference in float32 (what cbtm ran on CPU before the C++ kernel);
- ``torch compile``: that reference through ``torch.compile``, for the ``COMPILED`` shapes only
  (B=8192, k=4, V=50272 on CUDA; compilation excluded from the time);
- ``naive`` (anchor): stack the k float32 log-softmaxes, add the log weights, ``torch.logsumexp``
  over experts (what a straightforward ensemble does; reads every expert, dropped or not).

Bytes moved (the kernels' traffic model, see the module docstring): full mixture, V <= 8192: every
active logit read once + the fp32 output written once; larger V: active logits read twice + output
once; target: active logits read once.  GB/s = those bytes / time, compared with the measured
device-to-device copy bandwidth (read + write) of a 1 GiB buffer (``% copy``).
"""
import torch

from benchmarks.common import best_of, markdown_table

# (B, V, k, dtype, routing)
FULL_CUDA = [(8, 50272, 8, torch.bfloat16, "all"), (256, 50272, 8, torch.bfloat16, "all"),
             (256, 50272, 8, torch.bfloat16, "top-2"), (256, 50272, 8, torch.float32, "all"),
             (1024, 8192, 8, torch.bfloat16, "all"), (1024, 32000, 4, torch.bfloat16, "all"),
             (8192, 50272, 4, torch.bfloat16, "all")]
TARGET_CUDA = [(4096, 50272, 8, torch.bfloat16, "all"), (4096, 50272, 8, torch.bfloat16, "top-2"),
               (8192, 32000, 4, torch.bfloat16, "all"), (8192, 50272, 4, torch.bfloat16, "all")]
FULL_CPU = [(32, 50272, 4, torch.bfloat16, "all"), (32, 50272, 8, torch.bfloat16, "top-2"),
            (128, 8192, 8, torch.float32, "all"), (64, 8192, 8, torch.float32, "top-2")]
TARGET_CPU = [(256, 50272, 4, torch.bfloat16, "all"), (256, 50272, 8, torch.bfloat16, "top-2")]
ERR_ROWS = 8  # rows compared with the float64 reference
COMPILED = (50272, 4, torch.bfloat16, "all")  # (V, k, dtype, routing) of the cases also timed under torch.compile


def _inputs(B, V, k, dtype, routing, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    xs = [(3 * torch.randn(B, V, generator=gen, device=device)).to(dtype) for _ in range(k)]
    lw = torch.log_softmax(2 * torch.randn(B, k, generator=gen, device=device), dim=1)
    if routing == "top-2":
        keep = lw.topk(2, dim=1).indices
        lw = torch.full_like(lw, float("-inf")).scatter(1, keep, lw.gather(1, keep))
        lw = lw - torch.logsumexp(lw, dim=1, keepdim=True)
    target = torch.randint(V, (B,), generator=gen, device=device)
    return xs, lw, target


def _naive(xs, lw):
    return torch.logsumexp(torch.stack([torch.log_softmax(x.float(), -1) for x in xs]) + lw.T[:, :, None], 0)


def _naive_target(xs, lw, target):
    return _naive(xs, lw).gather(1, target[:, None])[:, 0]


def _copy_gbs(device, repeats, sync):
    n = 1 << 30 if device == "cuda" else 1 << 28
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t, _ = best_of(lambda: dst.copy_(src), max(3, repeats), sync)
    return 2 * n / t / 1e9


def _bytes(B, V, k_active, elem, full):
    if not full:
        return k_active * B * V * elem
    from cbtm.kernels.mixture import FUSED_MAX_V

    reads = 1 if V <= FUSED_MAX_V else 2
    return reads * k_active * B * V * elem + 4 * B * V


def _section(cases, full, device, args, copy_gbs, rows, use_triton):
    from cbtm import ops
    from cbtm.kernels import mixture as mx

    sync = torch.cuda.synchronize if device == "cuda" else None
    table = []
    for B, V, k, dtype, routing in cases:
        if args.quick:
            B = max(4, B // 8)
        xs, lw, target = _inputs(B, V, k, dtype, routing, device)
        k_active = float((lw > float("-inf")).sum(1).float().mean())
        nbytes = _bytes(B, V, k_active, xs[0].element_size(), full)
        if full:
            fallback = lambda xs, lw: mx.weighted_logsumexp_ref(xs, lw, upcast=torch.float32)  # noqa: E731
            methods = {"torch fallback": lambda: fallback(xs, lw), "naive": lambda: _naive(xs, lw)}
            if use_triton:
                methods = {"triton": lambda: mx.weighted_logsumexp_triton(xs, lw), **methods}
            elif ops._mixture_in_cpp(xs):
                methods = {"cbtm C++": lambda: ops.weighted_logsumexp(xs, lw), **methods}
            exact = mx.weighted_logsumexp_ref([x[:ERR_ROWS] for x in xs], lw[:ERR_ROWS])
        else:
            fallback = lambda xs, lw: mx.weighted_logsumexp_target_ref(xs, lw, target, upcast=torch.float32)  # noqa: E731
            methods = {"torch fallback": lambda: fallback(xs, lw), "naive": lambda: _naive_target(xs, lw, target)}
            if use_triton:
                methods = {"triton": lambda: mx.weighted_logsumexp_target_triton(xs, lw, target), **methods}
            exact = mx.weighted_logsumexp_target_ref([x[:ERR_ROWS] for x in xs], lw[:ERR_ROWS], target[:ERR_ROWS])
        if (V, k, dtype, routing) == COMPILED:
            compiled = torch.compile(fallback, dynamic=False)
            compiled(xs, lw)  # compile outside the timing
            methods["torch compile"] = lambda: compiled(xs, lw)
        timed = {m: best_of(fn, args.repeats, sync) for m, fn in methods.items()}
        t_naive = timed["naive"][0]
        for method, (t, out) in timed.items():
            err = (out[:ERR_ROWS].double() - exact).abs().nan_to_num(0.0, 0.0, 0.0).max().item()
            gbs = nbytes / t / 1e9
            row = {"section": "full" if full else "target", "B": B, "V": V, "k": k, "dtype": str(dtype).split(".")[1],
                   "routing": routing, "k_active": k_active, "method": method, "seconds": t, "bytes": nbytes,
                   "gb_per_s": gbs, "pct_copy_bw": 100 * gbs / copy_gbs, "vs_naive": t_naive / t,
                   "max_abs_err": err}
            rows.append(row)
            table.append((B, V, k, row["dtype"], routing, method, 1e3 * t, gbs, row["pct_copy_bw"], row["vs_naive"], err))
        del xs, timed
        if device == "cuda":
            torch.cuda.empty_cache()
    title = ("### 1. Full mixture (B x V float32 output)" if full
             else "### 2. Target only (scoring: float32 [B], no B x V output)")
    return title + "\n\n" + markdown_table(
        ["B", "V", "k", "dtype", "routing", "method", "ms", "GB/s (model)", "% copy BW", "× naive",
         "max |err| vs fp64"], table)


def run(args):
    """Return {"rows", "markdown", "goals"}; Triton rows need ``--device cuda``."""
    import cbtm.kernels.mixture as mx

    device = args.device
    sync = torch.cuda.synchronize if device == "cuda" else None
    use_triton = device == "cuda" and mx.mixture_backend(torch.empty(1, device=device)) == "triton"
    copy_gbs = _copy_gbs(device, args.repeats, sync)
    rows, parts = [], []
    full_cases, target_cases = (FULL_CUDA, TARGET_CUDA) if device == "cuda" else (FULL_CPU, TARGET_CPU)
    parts.append(_section(full_cases, True, device, args, copy_gbs, rows, use_triton))
    parts.append(_section(target_cases, False, device, args, copy_gbs, rows, use_triton))
    goals = _goals(rows, use_triton)
    parts.append("### Goals (displayed, not asserted)\n\n" + markdown_table(
        ["goal", "target", "measured", "met"],
        [(g["goal"], g["target"], g["measured"], {True: "yes", False: "**no**", None: "n/a"}[g["met"]])
         for g in goals]))
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    header = (f"## mixture suite on {name}: copy bandwidth {copy_gbs:.0f} GB/s (read + write)"
              + ("" if use_triton else "; Triton rows need --device cuda") + "\n\n")
    return {"rows": rows, "markdown": header + "\n\n".join(parts), "goals": goals, "copy_gb_per_s": copy_gbs}


def _goals(rows, use_triton):
    if not use_triton:
        return [{"goal": "Triton mixture at >= 70% of copy bandwidth", "target": "≥ 70%",
                 "measured": "n/a (no CUDA)", "met": None}]
    tri = [r for r in rows if r["method"] == "triton"]
    big = [r for r in tri if r["B"] >= 256] or tri  # --quick shrinks B
    worst_bw = min(r["pct_copy_bw"] for r in big)
    worst_speed = min(r["vs_naive"] for r in tri)
    worst_err = max(r["max_abs_err"] for r in tri)
    shape = (COMPILED[0], COMPILED[1], str(COMPILED[2]).split(".")[1], COMPILED[3])
    at = {(r["section"], r["method"]): r for r in rows if (r["V"], r["k"], r["dtype"], r["routing"]) == shape}
    vs_compile = [{"goal": f"Triton vs torch.compile, {section}, B={at[section, 'triton']['B']}, k={shape[1]}, "
                           f"V={shape[0]}", "target": "≥ 1×",
                   "measured": f"{at[section, 'torch compile']['seconds'] / at[section, 'triton']['seconds']:.2f}×",
                   "met": at[section, "torch compile"]["seconds"] >= at[section, "triton"]["seconds"]}
                  for section in ("full", "target")]
    return vs_compile + [
        {"goal": "Triton bytes-model bandwidth, B >= 256 (worst case)", "target": "≥ 70% of copy",
         "measured": f"{worst_bw:.0f}%", "met": worst_bw >= 70},
        {"goal": "Triton speed vs naive stacked torch (worst case)", "target": "≥ 2×",
         "measured": f"{worst_speed:.1f}×", "met": worst_speed >= 2},
        {"goal": "Triton max |error| vs float64", "target": "≤ 1e-4",
         "measured": f"{worst_err:.2e}", "met": worst_err <= 1e-4},
    ]
