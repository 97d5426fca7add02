"""Branch-Train-MiX (Sukhbaatar et al., 2024): a run's experts merged into one Mixtral
mixture-of-experts that plain transformers loads, and its MiX phase (the MoE fine-tuned on the
whole corpus).

Each expert's MLP becomes one expert of every MoE layer; attention, embeddings and norms are the
cluster-size-weighted parameter average; each layer's router starts from the clusters' data
(``gate="hidden"``: the mean MLP input of the averaged model on each cluster's training
documents; ``"embed"``: their mean token embedding; ``"random"``), centred over the experts and
scaled to unit length.

A MoE run (``export_moe``) and a MiX run (``train_moe``) are run directories whose one "expert"
is the Mixtral model, so evaluation and training read them like any one-model run::

    DIR/ cbtm.json                every document in cluster 0, with the source run's split;
                                  section ``moe``: source, experts, weights, gate, parameter counts
         assignments/dense.jsonl
         tokenizer/
         experts/expert_000/      the Mixtral checkpoint (config.json, model.safetensors, tokenizer)
    MIX/ ... as DIR, plus seed/ (a copy of DIR's MoE), tokens/, checkpoints/, logs/; section ``mix``
"""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from . import assignments, defaults, models, tokens
from .branch import average_experts, normalise_weights
from .experts import cluster_sizes, trained_entries
from .rundir import RunDir, check_replaceable, expert_name, holds_lock, replace_dir
from .training import TrainConfig, make_config
from .training.job import job_log, make_spec, same_training
from .training.launch import run_recorded
from .training.mix import DEFAULT_AUX_LOSS_COEF
from .training.plan import clear_job, has_progress

GATES = ("hidden", "embed", "random")
ARCHITECTURES = ("llama", "mistral")  # the MLP (gate/up/down, SiLU) and attention Mixtral has
GATE_DOCS = 32       # training documents per cluster that initialise the routers
GATE_TOKENS = 256    # tokens read from each of them
_NOT_ARCHITECTURE = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures"}


def _inside(run: RunDir, path: Path) -> bool:
    return run.contains(path) or path.resolve() in run.path.resolve().parents


def _shared_config(paths: list[Path]):
    """The experts' config, after checking they share one architecture Mixtral can hold."""
    configs = [models.load_config(p) for p in paths]
    first = configs[0]
    if first.model_type not in ARCHITECTURES:
        raise ValueError(f"{paths[0]} is a {first.model_type!r} model: a Mixtral export needs Llama-style "
                         f"experts ({', '.join(ARCHITECTURES)})")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(first, flag, False):
            raise ValueError(f"{paths[0]}: {flag}=true has no place in a Mixtral model")
    ref = {k: v for k, v in first.to_dict().items() if k not in _NOT_ARCHITECTURE}
    for p, c in zip(paths[1:], configs[1:]):
        other = {k: v for k, v in c.to_dict().items() if k not in _NOT_ARCHITECTURE}
        diff = sorted(k for k in ref.keys() | other.keys() if ref.get(k) != other.get(k))
        if diff:
            raise ValueError(f"the experts do not share an architecture: {p} differs from {paths[0]} in "
                             f"{', '.join(diff)}")
    return first


def mixtral_config(config, n_experts: int, experts_per_token: int):
    """The MixtralConfig holding ``n_experts`` copies of a Llama-style ``config``'s MLP."""
    from transformers import MixtralConfig

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return MixtralConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=head_dim, hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings, initializer_range=config.initializer_range,
        rms_norm_eps=config.rms_norm_eps, rope_parameters=config.rope_parameters,
        sliding_window=getattr(config, "sliding_window", None), attention_dropout=config.attention_dropout,
        tie_word_embeddings=config.tie_word_embeddings, bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, num_local_experts=n_experts,
        num_experts_per_tok=experts_per_token, router_jitter_noise=0.0, output_router_logits=False)


def _unit_rows(means: torch.Tensor) -> torch.Tensor:
    """(L, k, d) per-cluster means -> router rows: centred over the experts, unit length."""
    rows = means - means.mean(1, keepdim=True)
    return rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-8)


def _samples(run: RunDir, clusters: list[int], n_docs: int, tokenizer) -> dict[int, list[torch.Tensor]]:
    """Token ids (the first GATE_TOKENS) of the first ``n_docs`` training documents of each cluster."""
    out: dict[int, list[torch.Tensor]] = {c: [] for c in clusters}
    for c, _, text in assignments.iter_documents(run, {(c, "train") for c in clusters}):
        if len(out[c]) < n_docs:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][:GATE_TOKENS]
            if ids:
                out[c].append(torch.tensor(ids, dtype=torch.long))
        if all(len(v) >= n_docs for v in out.values()):
            break
    empty = [c for c, v in out.items() if not v]
    if empty:
        raise ValueError(f"clusters {empty} of {run.path} have no training documents to initialise their routers "
                         "from: use --gate random")
    return out


@torch.no_grad()
def gate_weights(base, gate: str, samples: dict[int, list[torch.Tensor]] | None, clusters: list[int],
                 seed: int = 0) -> torch.Tensor:
    """Router rows of every layer, (L, k, d): from ``base``'s hidden states (MLP inputs) or token
    embeddings on each cluster's ``samples``, or random (seeded)."""
    layers = base.model.layers
    L, d, k = len(layers), base.config.hidden_size, len(clusters)
    if gate == "random":
        return _unit_rows(torch.randn(L, k, d, generator=torch.Generator().manual_seed(seed)))
    means = torch.zeros(L, k, d, dtype=torch.float64)
    if gate == "embed":
        emb = base.get_input_embeddings().weight
        for j, c in enumerate(clusters):
            ids = torch.cat(samples[c])  # (n,)
            means[:, j] = emb[ids].double().mean(0)
        return _unit_rows(means).float()
    seen: list[torch.Tensor] = []
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, args: seen.append(args[0][0])) for layer in layers]
    try:
        base.eval()
        for j, c in enumerate(clusters):
            n = 0
            for ids in samples[c]:
                seen.clear()
                base.model(input_ids=ids[None], use_cache=False)
                means[:, j] += torch.stack(seen).double().sum(1)  # (L, t, d) -> (L, d)
                n += len(ids)
            means[:, j] /= n
    finally:
        for h in hooks:
            h.remove()
    return _unit_rows(means).float()


def build_moe(config, base, paths, gate_rows: torch.Tensor, experts_per_token: int, digests=None):
    """The Mixtral model of experts at ``paths`` sharing the Llama-style ``config``: their MLPs as
    experts, every other parameter from ``base`` (their average), routers ``gate_rows`` (L, k, d)."""
    from transformers import MixtralForCausalLM

    digests = list(digests) if digests is not None else [None] * len(paths)
    state = {n: t for n, t in base.state_dict().items() if ".mlp." not in n}
    mlps = []
    for p, sha in zip(paths, digests):
        sd = models.load_model(p, sha256=sha).state_dict()
        mlps.append({n: t for n, t in sd.items() if ".mlp." in n})
    for i in range(config.num_hidden_layers):
        pre = f"model.layers.{i}.mlp."
        state[pre + "gate.weight"] = gate_rows[i].contiguous()  # (k, d)
        state[pre + "experts.gate_up_proj"] = torch.stack(  # (k, 2I, d): gate rows, then up rows
            [torch.cat([m[pre + "gate_proj.weight"], m[pre + "up_proj.weight"]]) for m in mlps])
        state[pre + "experts.down_proj"] = torch.stack([m[pre + "down_proj.weight"] for m in mlps])  # (k, d, I)
    with torch.random.fork_rng(devices=[]):
        moe = MixtralForCausalLM(mixtral_config(config, len(paths), experts_per_token))
    moe.load_state_dict(state, strict=True)
    return moe.eval()


def active_params(moe) -> int:
    """Parameters one token uses: all but the MLPs of the experts it is not routed to."""
    c = moe.config
    per_expert = 3 * c.hidden_size * c.intermediate_size * c.num_hidden_layers
    return models.num_params(moe) - (c.num_local_experts - c.num_experts_per_tok) * per_expert


@holds_lock("merge export-moe", "to", output=True)
def export_moe(run, to, experts_per_token: int = 2, gate: str = "hidden", weights: str = "sizes",
               gate_docs: int = GATE_DOCS, seed: int = 0, save_dtype: str = defaults.SAVE_DTYPE,
               progress: bool = True) -> Path:
    """Merge the trained experts of ``run`` into a Mixtral model and write the MoE run ``to`` (a new
    or empty directory, or an earlier export, outside ``run``). weights: "sizes" (training
    documents per cluster) or "uniform"; ``save_dtype``: see :func:`cbtm.models.save_dtype`
    ("auto": the experts' dtype). Returns the Mixtral checkpoint's directory."""
    run, to = RunDir.of(run), Path(to)
    if _inside(run, to):
        raise ValueError(f"--to {to} is inside (or contains) the run directory {run.path} that is read: "
                         "write the MoE somewhere else")
    if gate not in GATES:
        raise ValueError(f"--gate must be one of {', '.join(GATES)}, got {gate!r}")
    if weights not in ("sizes", "uniform"):
        raise ValueError(f"weights must be 'sizes' or 'uniform', got {weights!r}")
    if int(gate_docs) != gate_docs or gate_docs < 1:
        raise ValueError(f"gate_docs must be a positive integer, got {gate_docs!r}")
    check_replaceable(to, "moe")  # before minutes of work
    entries = trained_entries(run)
    clusters = [int(e.get("cluster", e["id"])) for e in entries]
    w = normalise_weights(cluster_sizes(run, clusters) if weights == "sizes" else None, len(entries))
    paths = [run.resolve(e["path"]) for e in entries]
    digests = [e.get("sha256") for e in entries]
    config = _shared_config(paths)
    dtype = models.save_dtype(save_dtype, paths[0])
    if not 1 <= experts_per_token <= len(paths):
        raise ValueError(f"--experts-per-token must be between 1 and the {len(paths)} experts, got {experts_per_token}")
    tokenizer = tokens.load_tokenizer(run.tokenizer)
    if progress:
        print(f"averaging {len(paths)} experts (weights {[round(x, 3) for x in w]}), {gate} routers ...", flush=True)
    base = average_experts(paths, w, digests, torch.float32)
    samples = None if gate == "random" else _samples(run, clusters, gate_docs, tokenizer)
    moe = build_moe(config, base, paths, gate_weights(base, gate, samples, clusters, seed), experts_per_token,
                    digests).to(dtype)
    del base
    info = {"source": str(run.path.resolve()), "experts": [e["id"] for e in entries], "clusters": clusters,
            "weights": w, "gate": gate, "gate_documents": None if gate == "random" else int(gate_docs),
            "seed": int(seed), "experts_per_token": int(experts_per_token), "params": models.num_params(moe),
            "active_params": active_params(moe), "source_tokens": run.section("train").get("total_tokens"),
            "seq_len": (run.section("train").get("config") or {}).get("seq_len")}
    s = assignments.corpus_settings(run)

    def save(tmp: str) -> None:
        dst = RunDir(tmp)
        assignments.write_assignments(dst, assignments.dense_records(run), s["paths"], k=1, name="dense",
                                      **assignments.read_options(s), source=f"MoE of {run.path}")
        tokens.copy_tokenizer(run, dst)

        def write_model(out: str) -> None:
            with models.quiet():
                moe.save_pretrained(out)
            tokenizer.save_pretrained(out)

        model_dir = replace_dir(dst.expert_dir(0), write_model, "model")
        dst.update(moe=info)
        dst.set_experts([{"id": 0, "cluster": 0, "path": f"experts/{expert_name(0)}", "status": "done",
                          "params": info["params"], "sha256": models.model_digest(model_dir)}])

    replace_dir(to, save, "moe")
    return RunDir(to).expert_dir(0)


@holds_lock("train --moe", "out")
def train_moe(moe_run, out, total_tokens: int, *, router_only: bool = False,
              aux_loss_coef: float = DEFAULT_AUX_LOSS_COEF, device: str | None = None, threads: int | None = None,
              restart: bool = False, progress: bool = True, callback: Callable[[dict], None] | None = None,
              **settings) -> dict:
    """BTX's MiX phase: train the MoE of ``moe_run`` on every training document of its corpus for
    ``total_tokens`` (all parameters, or the routers only) with the load-balancing loss, in the new
    run ``out``. Resumable like expert training; ``settings`` are TrainConfig fields (default
    learning rate: a pretrained model's). Returns the job's log."""
    moe_run, out = RunDir.of(moe_run), RunDir.of(out)
    info = moe_run.section("moe")
    if not info:
        raise ValueError(f"{moe_run.manifest_path} describes no MoE (no 'moe' section): export one with "
                         "`cbtm merge export-moe`")
    if _inside(moe_run, out.path) or _inside(out, moe_run.path):
        raise ValueError(f"--run {out.path} must be a directory of its own, outside --moe {moe_run.path}")
    if int(total_tokens) != total_tokens or total_tokens < 2:
        raise ValueError(f"total_tokens must be an integer >= 2, got {total_tokens!r}")
    if not aux_loss_coef >= 0:
        raise ValueError(f"--aux-loss-coef must be >= 0, got {aux_loss_coef}")
    mix = {"moe_run": str(moe_run.path.resolve()), "router_only": bool(router_only),
           "aux_loss_coef": float(aux_loss_coef)}
    if out.exists() and out.section("mix").get("moe_run") != mix["moe_run"]:
        raise ValueError(f"{out.path} exists and is not a MiX run of {moe_run.path}: choose a new directory")
    entry = trained_entries(moe_run)[0]
    src = moe_run.resolve(entry["path"])
    if models.load_config(src).model_type != "mixtral":
        raise ValueError(f"{src} is not a Mixtral model: export one with `cbtm merge export-moe`")
    if entry.get("sha256") is not None:
        models.verify_digest(src, entry["sha256"])
    digest = models.model_digest(src)
    cfg = make_config(TrainConfig(lr=models.default_lr(None)), settings)
    out.update(mix={"moe_run": mix["moe_run"]})  # the directory is this MiX run's from now on
    s = assignments.corpus_settings(moe_run)
    assignments.write_assignments(out, assignments.dense_records(moe_run), s["paths"], k=1, name="dense",
                                  **assignments.read_options(s), source=f"MiX of {moe_run.path}")
    if not (out.tokenizer / "tokenizer_config.json").is_file():
        tokens.copy_tokenizer(moe_run, out)
    if not (out.seed / "config.json").is_file() or models.model_digest(out.seed) != digest:
        replace_dir(out.seed, lambda tmp: shutil.copytree(src, tmp), "model")
    tok = tokens.load_tokenizer(out.tokenizer)
    models.check_compatible(models.load_config(out.seed), cfg.seq_len, len(tok))
    n = tokens.ensure_token_cache(out, [0], tok, progress)[0]["train"]
    if n < cfg.seq_len:
        raise ValueError(f"{out.path}: {n} training tokens, fewer than one block of seq_len={cfg.seq_len}")
    name = expert_name(0)
    spec = {**make_spec(name, 0, [0], total_tokens, {"path": "seed"}, f"experts/{name}", 0, cfg),
            "moe": {"router_only": mix["router_only"], "aux_loss_coef": mix["aux_loss_coef"]}}
    if restart:
        clear_job(out, spec)
    elif has_progress(out, name) and not same_training((job_log(out, name) or {}).get("spec"), spec):
        raise ValueError(f"{out.path} was trained with other settings; pass --restart to train it from scratch")
    out.update(moe=info, mix=mix, seed={"source": "moe", "path": "seed", "tokens": 0, "status": "done"},
               train={"total_tokens": int(total_tokens), "k": 1, "per_expert_tokens": [int(total_tokens)],
                      "seed_tokens": 0, "config": asdict(cfg)})
    if not out.expert_entries():
        out.set_experts([{"id": 0, "cluster": 0, "path": spec["out"], "status": "pending"}])
    out.update_experts({0: {"init": spec["init"], "tokens": int(total_tokens)}})
    return run_recorded(out, spec, device=device, threads=threads, progress=progress, callback=callback)
