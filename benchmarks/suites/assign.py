"""``assign`` suite: nearest-centre and balanced assignment, and balanced k-means fits.

All methods see the same data in one process: N unit-norm points in D=100 dimensions (a
seeded mixture of Gaussians, L2-normalised) and centres picked from the points by k-means++.

1. plain assignment, K in {8, 32, 128}: ``cbtm.ops.assign`` vs scikit-learn
   ``KMeans.predict`` (anchor), torch addmm + argmin, faiss ``IndexFlatL2`` (k=1).
2. balanced assignment (capacity N/K): ``cbtm.ops.balanced_assign`` cold and warm-started
   vs the official C-BTM auction (anchor). N is cut to a multiple of K (see the baseline).
3. 20-iteration fit at K=32: ``cbtm.BalancedKMeans`` balanced / unbalanced vs scikit-learn
   Lloyd (speed anchor), faiss ``Kmeans`` and the official balanced k-means (balanced anchor).
4. ``--device cuda`` (this section only; sections 1-3 are ``--device cpu``'s): ours on CUDA tensors
   at N = 1M and 10M, K=128: GB/s and TFLOP/s against the GPU's peak and the time against the
   floor (one read of X at peak bandwidth or 2NKD FLOPs at peak FP32, whichever is longer), the
   official auction on the same GPU, CPU/CUDA agreement.
"""
import math

import numpy as np
import torch

from benchmarks.baselines import official_auction
from benchmarks.common import assignment_cost, best_of, kmeanspp_centers, make_data, markdown_table

D = 100
KS = (8, 32, 128)
FIT_K = 32
FIT_ITERS = 20
# the official fit stops after this many seconds (full, --quick); its time is then scaled to 20 iterations
OFFICIAL_BUDGET_S = {False: 30.0, True: 3.0}
CUDA_K = 128
WARM_SHIFT = 0.01  # norm of the centre perturbation used to produce warm-start prices
# name -> (HBM GB/s, dense FP32 non-tensor TFLOP/s); first substring match of the device name wins
GPU_PEAKS = (("H200", (4800, 67.0)), ("H100 NVL", (3900, 60.0)), ("H100 PCIe", (2000, 51.0)),
             ("H100", (3350, 67.0)))
CUDA_SIZES = {False: (1_000_000, 10_000_000), True: (1_000_000,)}
AUCTION_SCALE_MAX_S = 5.0  # the auction runs at the next N only if it took at most this long at the previous one


def run(args):
    """Run all sections; return {"rows": [...], "markdown": str, "goals": [...]}."""
    import cbtm
    import cbtm.ops  # noqa: F401  (fail early if the extension is missing)

    rows, parts = [], []
    if args.device == "cuda":
        parts.append(_cuda(args, rows, "cuda", CUDA_SIZES[args.quick]))
        goals = _cuda_goals(rows)
        header = f"## assign suite, CUDA: D={D}, K={CUDA_K}, unit-norm mixture of Gaussians\n\n"
    else:
        n = 20_000 if args.quick else 200_000
        x = make_data(n, D, seed=0)
        parts.append(_plain(x, args.repeats, rows))
        parts.append(_balanced(x, args.repeats, rows))
        parts.append(_fit(x, cbtm, args.repeats, rows, OFFICIAL_BUDGET_S[args.quick]))
        goals = _goals(rows)
        header = f"## assign suite: N={n:,}, D={D}, unit-norm mixture of Gaussians\n\n"
    parts.append("### Goals (displayed, not asserted)\n\n" + markdown_table(
        ["goal", "target", "measured", "met"],
        [(g["goal"], g["target"], g["measured"], {True: "yes", False: "**no**", None: "n/a"}[g["met"]])
         for g in goals]))
    return {"rows": rows, "markdown": header + "\n\n".join(parts), "goals": goals}


# ---------------------------------------------------------------------------------------- 1
def _sklearn_predictor(centers):
    """A fitted sklearn KMeans whose ``predict`` uses exactly ``centers``."""
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=len(centers), n_init=1, max_iter=1, init=centers).fit(centers)
    km.cluster_centers_ = centers.copy()
    return km


def _torch_assign(x, centers, chunk=65_536):
    """Nearest centre by ``addmm`` (||c||^2 - 2 x.c) + argmin over row chunks."""
    cn = (centers * centers).sum(1)
    labels = torch.empty(len(x), dtype=torch.int64)
    for i in range(0, len(x), chunk):
        torch.argmin(torch.addmm(cn, x[i:i + chunk], centers.T, alpha=-2), 1, out=labels[i:i + chunk])
    return labels


def _faiss_assign(x, centers):
    import faiss

    index = faiss.IndexFlatL2(centers.shape[1])
    index.add(centers)
    return index.search(x, 1)[1][:, 0]


def _plain(x, repeats, rows):
    import cbtm.ops

    table = []
    xt = torch.from_numpy(x)
    for k in KS:
        c = kmeanspp_centers(x, k, seed=k)
        ct = torch.from_numpy(c)
        km = _sklearn_predictor(c)
        methods = {
            "cbtm.ops.assign": lambda: cbtm.ops.assign(x, c)[0],
            "sklearn KMeans.predict": lambda: km.predict(x),
            "torch addmm+argmin": lambda: _torch_assign(xt, ct).numpy(),
            "faiss IndexFlatL2": lambda: _faiss_assign(x, c),
        }
        times, labels = {}, {}
        for name, fn in methods.items():
            times[name], labels[name] = best_of(fn, repeats)
        ours = labels["cbtm.ops.assign"]
        for name in methods:
            row = {"section": "assign", "K": k, "method": name, "seconds": times[name],
                   "mpts_per_s": len(x) / times[name] / 1e6,
                   "vs_sklearn": times["sklearn KMeans.predict"] / times[name],
                   "agree_with_ours": float(np.mean(labels[name] == ours)),
                   "cost": assignment_cost(x, c, labels[name])}
            rows.append(row)
            table.append((k, name, 1e3 * row["seconds"], row["mpts_per_s"], row["vs_sklearn"],
                          f"{100 * row['agree_with_ours']:.3f}%", row["cost"]))
    return "### 1. Nearest-centre assignment (anchor: sklearn predict)\n\n" + markdown_table(
        ["K", "method", "ms", "M points/s", "× sklearn", "labels = ours", "cost Σd²"], table)


# ---------------------------------------------------------------------------------------- 2
def _balanced(x, repeats, rows):
    import cbtm.ops

    table = []
    gen = np.random.default_rng(1)
    for k in KS:
        xb = np.ascontiguousarray(x[:k * (len(x) // k)])
        cap = len(xb) // k
        c = kmeanspp_centers(x, k, seed=k)
        shifted = c + (WARM_SHIFT / math.sqrt(D)) * gen.standard_normal(c.shape, dtype=np.float32)
        prices = cbtm.ops.balanced_assign(xb, shifted)[1]
        xt, ct = torch.from_numpy(xb), torch.from_numpy(c)
        t_auc, (lab_auc, rounds) = best_of(lambda: official_auction.balanced_assign(xt, ct), 1)
        t_cold, (lab_cold, _) = best_of(lambda: cbtm.ops.balanced_assign(xb, c), repeats)
        t_warm, (lab_warm, _) = best_of(lambda: cbtm.ops.balanced_assign(xb, c, prices=prices), repeats)
        cost_auc = assignment_cost(xb, c, lab_auc.numpy())
        warm_note = f"prices from centres moved {WARM_SHIFT}"
        for name, t, lab, extra in (("official auction", t_auc, lab_auc.numpy(), f"{rounds} rounds"),
                                    ("cbtm cold", t_cold, lab_cold, ""),
                                    ("cbtm warm", t_warm, lab_warm, warm_note)):
            cost = assignment_cost(xb, c, lab)
            worse = cost > cost_auc * (1 + 1e-9)
            row = {"section": "balanced", "K": k, "N": len(xb), "method": name, "seconds": t,
                   "cost": cost, "cost_vs_auction": cost / cost_auc, "vs_auction": t_auc / t,
                   "max_size_over_cap": int(np.bincount(lab, minlength=k).max()) / cap,
                   "cost_worse_than_auction": bool(worse), "note": extra}
            rows.append(row)
            flag = "**cost > auction**" if worse and name != "official auction" else ""
            table.append((k, name, row["seconds"], row["vs_auction"], cost, row["cost_vs_auction"],
                          row["max_size_over_cap"], " ".join(s for s in (extra, flag) if s)))
    return "### 2. Balanced assignment, capacity N/K (anchor: official auction)\n\n" + markdown_table(
        ["K", "method", "s", "× auction", "cost Σd²", "cost / auction", "max size / cap", "note"], table)


# ---------------------------------------------------------------------------------------- 3
def _fit(x, cbtm, repeats, rows, official_budget):
    import faiss
    from sklearn.cluster import KMeans

    k = FIT_K
    x = np.ascontiguousarray(x[:k * (len(x) // k)])
    xt = torch.from_numpy(x)

    def ours(balanced):
        return cbtm.BalancedKMeans(n_clusters=k, balanced=balanced, max_iter=FIT_ITERS, tol=0, seed=0).fit(x)

    def skl():
        return KMeans(n_clusters=k, n_init=1, max_iter=FIT_ITERS, tol=0, init="k-means++",
                      algorithm="lloyd", random_state=0).fit(x)

    def fai():
        km = faiss.Kmeans(D, k, niter=FIT_ITERS, seed=0, max_points_per_centroid=len(x) // k + 1)
        km.train(x)
        return km

    def official():
        return official_auction.fit(xt, k, FIT_ITERS, tol=0, max_seconds=official_budget)

    reps = min(repeats, 2)
    runs = {  # name -> (balanced, fit fn, repeats, (centres, iterations) from the fit result)
        "cbtm balanced": (True, lambda: ours(True), reps, lambda m: (m.cluster_centers_, m.n_iter_)),
        "cbtm unbalanced": (False, lambda: ours(False), reps, lambda m: (m.cluster_centers_, m.n_iter_)),
        "sklearn Lloyd": (False, skl, reps, lambda m: (m.cluster_centers_, m.n_iter_)),
        "faiss Kmeans": (False, fai, reps, lambda m: (m.centroids, FIT_ITERS)),
        "official balanced": (True, official, 1, lambda m: (m[0].numpy(), m[2])),
    }
    table = []
    for name, (balanced, fn, n_rep, unpack) in runs.items():
        t, model = best_of(fn, n_rep)
        centers, iters = unpack(model)
        centers = np.ascontiguousarray(centers, dtype=np.float32)
        if balanced:
            labels = np.asarray(cbtm.ops.balanced_assign(x, centers)[0])
        else:
            labels = np.asarray(cbtm.ops.assign(x, centers)[0])
        rows.append({"section": "fit", "K": k, "N": len(x), "method": name, "balanced": balanced,
                     "seconds": t, "iterations": int(iters), "s_per_iter": t / int(iters),
                     # the official fit stopped by its time budget: time scaled to FIT_ITERS
                     "extrapolated": name == "official balanced" and iters < FIT_ITERS,
                     "inertia": assignment_cost(x, centers, labels),
                     "max_size_over_cap": int(np.bincount(labels, minlength=k).max()) / (len(x) / k)})
    fits = {r["method"]: r for r in rows if r["section"] == "fit"}
    for name, r in fits.items():
        r["vs_sklearn"] = fits["sklearn Lloyd"]["s_per_iter"] / r["s_per_iter"]
        r["vs_official"] = fits["official balanced"]["s_per_iter"] / r["s_per_iter"]
        seconds = r["s_per_iter"] * FIT_ITERS if r["extrapolated"] else r["seconds"]
        iters = f"{FIT_ITERS} (est. from {r['iterations']})" if r["extrapolated"] else r["iterations"]
        table.append((name, "yes" if r["balanced"] else "no", seconds, iters, r["s_per_iter"],
                      r["inertia"], r["max_size_over_cap"], r["vs_sklearn"], r["vs_official"]))
    return (f"### 3. {FIT_ITERS}-iteration fit, K={k} (anchors: sklearn Lloyd for speed, "
            "official balanced for balanced cost)\n\n" + markdown_table(
                ["method", "balanced", "s", "iters", "s/iter", "inertia", "max size / (N/K)",
                 "× sklearn /iter", "× official /iter"], table)
            + "\n\ninertia: Σd² of the final centres, with each point re-assigned to them "
              "(exact balanced assignment for balanced methods, nearest centre otherwise). "
              "Speed ratios compare seconds per iteration (methods may stop early once converged).")


# ---------------------------------------------------------------------------------------- 4
def _gpu_data(n, gen, device, modes=64):
    """``n`` unit-norm float32 points on ``device`` (same recipe as ``make_data``)."""
    means = torch.randn(modes, D, generator=gen, device=device)
    x = torch.randn(n, D, generator=gen, device=device)
    x += means[torch.randint(modes, (n,), generator=gen, device=device)]
    return x / x.norm(dim=1, keepdim=True)


def _cuda(args, rows, device, sizes):
    """Section 4 at each N of ``sizes``; ``device="cpu"`` runs the same code on CPU tensors (a dry run)."""
    import cbtm.ops

    cuda = device == "cuda"
    name = torch.cuda.get_device_name() if cuda else "CPU (dry run)"
    peak_gbs, peak_tflops = next((p for key, p in GPU_PEAKS if key in name), (None, None))
    sync = torch.cuda.synchronize if cuda else None
    gen = torch.Generator(device=device).manual_seed(0)
    k, table, checks, auction_ok = CUDA_K, [], [], True
    for n in sizes:
        x = _gpu_data(n, gen, device)
        xh = x.cpu().numpy()
        ch = kmeanspp_centers(xh, k, seed=k)
        c = torch.from_numpy(ch).to(device)
        xb = x[:k * (n // k)]
        shifted = c + (WARM_SHIFT / math.sqrt(D)) * torch.randn(c.shape, generator=gen, device=device)
        prices = cbtm.ops.balanced_assign(xb, shifted)[1]
        timed = {
            "cbtm.ops.assign": best_of(lambda: cbtm.ops.assign(x, c), args.repeats, sync),
            "cbtm balanced cold": best_of(lambda: cbtm.ops.balanced_assign(xb, c), args.repeats, sync),
            "cbtm balanced warm": best_of(lambda: cbtm.ops.balanced_assign(xb, c, prices=prices),
                                          args.repeats, sync),
        }
        # the auction holds about six N x K float32 matrices at once
        free = torch.cuda.mem_get_info()[0] if cuda else float("inf")
        if auction_ok and 7 * len(xb) * k * 4 < free:
            timed["official auction"] = best_of(lambda: official_auction.balanced_assign(xb, c), 1, sync)
            auction_ok = timed["official auction"][0] <= AUCTION_SCALE_MAX_S
        costs = {m: assignment_cost(xh[:len(xb)], ch, out[0].cpu().numpy())
                 for m, (_, out) in timed.items() if m != "cbtm.ops.assign"}
        t_auc, cost_auc = timed.get("official auction", (None,))[0], costs.get("official auction")
        for method, (t, _) in timed.items():
            rows_n = len(x) if method == "cbtm.ops.assign" else len(xb)
            row = {"section": "cuda", "device_name": name, "N": rows_n, "K": k, "method": method,
                   "seconds": t, "gb_per_s": rows_n * D * 4 / t / 1e9,
                   "tflop_per_s": 2 * rows_n * k * D / t / 1e12, "cost": costs.get(method),
                   "vs_auction": t_auc / t if t_auc else None,
                   "cost_vs_auction": costs[method] / cost_auc if cost_auc and method in costs else None}
            row["pct_peak_bw"] = 100 * row["gb_per_s"] / peak_gbs if peak_gbs else None
            row["pct_peak_fp32"] = 100 * row["tflop_per_s"] / peak_tflops if peak_tflops else None
            floor = (max(rows_n * D * 4 / (peak_gbs * 1e9), 2 * rows_n * k * D / (peak_tflops * 1e12))
                     if peak_gbs else None)
            row["floor_s"], row["vs_floor"] = floor, t / floor if floor else None
            rows.append(row)
            table.append((rows_n, method, 1e3 * t, row["gb_per_s"], row["pct_peak_bw"], row["tflop_per_s"],
                          row["pct_peak_fp32"], row["vs_floor"], row["vs_auction"], row["cost"],
                          row["cost_vs_auction"]))
        if n == sizes[0]:
            checks += _cuda_vs_cpu(xh, ch, len(xb), timed)
        del x, xb, timed, prices
        if cuda:
            torch.cuda.empty_cache()
    peak = f"peak {peak_gbs} GB/s, {peak_tflops} FP32 TFLOP/s" if peak_gbs else "peak unknown for this device"
    return (f"### 4. CUDA: {name} ({peak}), D={D}, K={k}\n\n" + markdown_table(
        ["N", "method", "ms", "GB/s", "% peak BW", "TFLOP/s", "% peak FP32", "× floor", "× auction", "cost Σd²",
         "cost / auction"], table)
        + f"\n\nCUDA vs CPU kernels (N={sizes[0]:,}): " + "; ".join(checks))


def _cuda_vs_cpu(xh, ch, n_balanced, timed):
    """Compare the CUDA results at the first N with the CPU kernels on the same (host) inputs."""
    import cbtm.ops

    out = []
    for what, xs, cpu_fn, key in (
            ("assign", xh, cbtm.ops.assign, "cbtm.ops.assign"),
            ("balanced", xh[:n_balanced], cbtm.ops.balanced_assign, "cbtm balanced cold")):
        lab_cpu = np.asarray(cpu_fn(xs, ch)[0])
        lab_gpu = timed[key][1][0].cpu().numpy()
        cost_cpu, cost_gpu = assignment_cost(xs, ch, lab_cpu), assignment_cost(xs, ch, lab_gpu)
        out.append(f"{what}: labels agree {100 * np.mean(lab_cpu == lab_gpu):.4f}%, "
                   f"cost rel. diff {abs(cost_gpu - cost_cpu) / cost_cpu:.2e}")
    return out


# ---------------------------------------------------------------------------------------- goals
def _goals(rows):
    """The performance goals of the project, evaluated on this run's rows (met: True/False/None)."""
    plain = [r["vs_sklearn"] for r in rows if r["section"] == "assign" and r["method"] == "cbtm.ops.assign"]
    seconds = {(r["K"], r["method"]): r["seconds"] for r in rows if r["section"] == "assign"}
    vs_faiss = [seconds[k, "faiss IndexFlatL2"] / t for (k, m), t in seconds.items() if m == "cbtm.ops.assign"]
    costs = [r["cost_vs_auction"] for r in rows
             if r["section"] == "balanced" and r["method"].startswith("cbtm")]
    fit = {r["method"]: r for r in rows if r["section"] == "fit"}
    bal, official = fit["cbtm balanced"], fit["official balanced"]
    inertia = None if official["extrapolated"] else bal["inertia"] / official["inertia"]
    return [
        {"goal": "plain assign speed vs sklearn predict (worst K)", "target": "≥ 1.0×",
         "measured": f"{min(plain):.2f}×", "met": min(plain) >= 1.0},
        {"goal": "plain assign speed vs faiss IndexFlatL2 (worst K)", "target": "≥ 1.0×",
         "measured": f"{min(vs_faiss):.2f}×", "met": min(vs_faiss) >= 1.0},
        {"goal": "balanced fit speed vs sklearn unbalanced Lloyd", "target": "≥ 0.5×",
         "measured": f"{bal['vs_sklearn']:.2f}×", "met": bal["vs_sklearn"] >= 0.5},
        {"goal": "balanced fit speed vs official auction fit", "target": "≥ 20×",
         "measured": f"{bal['vs_official']:.1f}×", "met": bal["vs_official"] >= 20},
        {"goal": "balanced fit inertia vs official", "target": "≤ 1.0×",
         "measured": "n/a (official fit cut short)" if inertia is None else f"{inertia:.4f}×",
         "met": None if inertia is None else inertia <= 1.0},
        {"goal": "balanced assign cost vs auction (worst K, cold/warm)", "target": "≤ 1.0×",
         "measured": f"{max(costs):.6f}×", "met": max(costs) <= 1 + 1e-9},
    ]


def _cuda_goals(rows):
    """The GPU goals on section 4's rows, at the largest N measured."""
    cuda = [r for r in rows if r["section"] == "cuda"]
    top = max(r["N"] for r in cuda if r["method"] == "cbtm balanced cold")
    at = {r["method"]: r for r in cuda if r["N"] == top}
    cold, auction = at["cbtm balanced cold"], at.get("official auction")
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec) + "×"  # noqa: E731
    return [
        {"goal": f"CUDA balanced assign (cold), N={top:,}, time vs the memory/FLOP floor", "target": "≤ 3×",
         "measured": fmt(cold["vs_floor"], ".2f"), "met": None if cold["vs_floor"] is None else cold["vs_floor"] <= 3},
        {"goal": f"CUDA balanced assign (cold), N={top:,}, speed vs the official auction in torch",
         "target": "≥ 1×", "measured": fmt(cold["vs_auction"], ".1f"),
         "met": None if auction is None else cold["vs_auction"] >= 1},
        {"goal": f"CUDA balanced assign cost vs the auction's, N={top:,} (cold/warm)", "target": "≤ 1.0×",
         "measured": "n/a" if auction is None else
         f"{max(at[m]['cost_vs_auction'] for m in ('cbtm balanced cold', 'cbtm balanced warm')):.6f}×",
         "met": None if auction is None else
         max(at[m]["cost_vs_auction"] for m in ("cbtm balanced cold", "cbtm balanced warm")) <= 1 + 1e-9},
    ]
