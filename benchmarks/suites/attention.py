"""``attention`` suite: causal attention of packed variable-length segments (``cbtm.ops.varlen_attention``).

What the stacked experts run at every layer when they score or prefill: P segments of different
lengths packed without padding, qkv as one fused projection writes it ((N, (Hq + 2 Hk) D)). Cases:
the dense model's scoring windows (all 256 long), the segments top-1 routing gives (random lengths,
longest first), many short prompts, and a grouped-query shape (8 query heads per 2 KV heads, D = 128).

Methods, side by side in one process, round robin (best of ``--repeats``):
- ``cbtm varlen``: ``ops.varlen_attention`` (on CPU the per-ISA OpenMP kernel; on CUDA it pads and
  calls SDPA, so the two rows coincide there);
- ``sdpa padded`` (anchor): the segments padded to the longest and one causal
  ``F.scaled_dot_product_attention`` call, packed back (how cbtm ran before the kernel);
- ``sdpa per segment`` (anchor): one causal SDPA call per segment (no padding, P calls).

GFLOP/s counts the causal work only: 4 Hq D n (n + 1) / 2 per segment of n rows. ``max err``: the largest
difference from the float64 reference (``ops.varlen_attention_ref``) on the case's first segments.
"""
import math

import torch
import torch.nn.functional as F

from benchmarks.common import best_of, markdown_table

def _cases(quick: bool):
    """(name, segment lengths, Hq, Hk, D) of each case."""
    g = torch.Generator().manual_seed(0)
    mixed = sorted(torch.randint(1, 257, (48,), generator=g).tolist(), reverse=True)
    cases = [("dense windows", [256] * 32, 4, 4, 64), ("top-1 segments", mixed, 4, 4, 64),
             ("short prompts", [40] * 200, 4, 4, 64), ("GQA 8/2, D 128", mixed, 8, 2, 128)]
    if quick:
        cases = [(name, lengths[:6], hq, hk, d) for name, lengths, hq, hk, d in cases]
    return cases


def _per_segment(qkv, lengths, hq, hk, scale):
    D = qkv.shape[1] // (hq + 2 * hk)
    out, a = [], 0
    for n in lengths.tolist():
        h = qkv[a:a + n].view(n, hq + 2 * hk, D).transpose(0, 1)[None]  # (1, H, n, D)
        a += n
        o = F.scaled_dot_product_attention(h[:, :hq], h[:, hq:hq + hk], h[:, hq + hk:], is_causal=True, scale=scale,
                                           enable_gqa=hk != hq)
        out.append(o[0].transpose(0, 1).reshape(n, hq * D))
    return torch.cat(out)


def run(args):
    from cbtm import ops

    device = args.device
    sync = torch.cuda.synchronize if device == "cuda" else None
    rows = []
    for name, lengths, hq, hk, D in _cases(args.quick):
        g = torch.Generator().manual_seed(len(lengths))
        n = torch.tensor(lengths)
        qkv = torch.randn(int(n.sum()), (hq + 2 * hk) * D, generator=g).to(device)
        scale = D ** -0.5
        first = n[:4]
        want = ops.varlen_attention_ref(qkv[:int(first.sum())].cpu().double(), first, hq, hk, scale)
        methods = {"cbtm varlen": lambda: ops.varlen_attention(qkv, n, hq, hk, scale),
                   "sdpa padded": lambda: ops._varlen_attention_torch(qkv, n, hq, hk, scale),
                   "sdpa per segment": lambda: _per_segment(qkv, n, hq, hk, scale)}
        best = {m: math.inf for m in methods}
        err = {}
        for m, fn in methods.items():  # warm up, and the error of each method
            out = fn()
            err[m] = float((out[:len(want)].cpu().double() - want).abs().max())
        for _ in range(args.repeats):
            for m, fn in methods.items():
                best[m] = min(best[m], best_of(fn, 1, sync)[0])
        flops = 4 * hq * D * sum(x * (x + 1) / 2 for x in lengths)
        base = best["sdpa padded"]
        for m in methods:
            rows.append({"case": name, "method": m, "segments": len(lengths), "rows_total": int(n.sum()),
                         "padded_rows": len(lengths) * max(lengths), "heads": hq, "kv_heads": hk, "head_dim": D,
                         "ms": best[m] * 1e3, "gflop_per_s": flops / best[m] / 1e9, "vs_sdpa_padded": base / best[m],
                         "max_err": err[m]})
    md = (f"## attention suite: causal attention of packed variable-length segments ({device})\n\n"
          + markdown_table(["case", "method", "segments", "rows (padded)", "ms", "GFLOP/s", "× sdpa padded", "max err"],
                           [[r["case"], r["method"], r["segments"], f"{r['rows_total']} ({r['padded_rows']})", r["ms"],
                             r["gflop_per_s"], r["vs_sdpa_padded"], f"{r['max_err']:.1e}"] for r in rows]))
    return {"rows": rows, "markdown": md}
