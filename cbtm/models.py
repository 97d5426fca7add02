"""Expert models: named small Llama-style configs trained from scratch, or a local seed checkpoint.

Every model is a ``transformers`` causal LM saved with ``save_pretrained`` (config.json +
model.safetensors). This module is the one place models and configs are read: nothing downloads
(``local_files_only=True``), no code from a model directory ever runs (``trust_remote_code=False``),
and only safetensors weights are accepted (no pickle). Loading is strict: the config must describe
exactly the parameters stored (counted from the safetensors headers before anything is allocated),
and every weight must be used and present.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# name -> (hidden size, layers, heads, MLP size, context, default peak learning rate)
SIZES: dict[str, tuple[int, int, int, int, int, float]] = {
    "tiny": (128, 2, 4, 384, 512, 3e-3),      # ~0.4 M + embeddings: learns on 2 CPU cores in a minute
    "small": (256, 4, 4, 768, 1024, 2e-3),    # ~3.1 M + embeddings
    "base": (512, 8, 8, 1536, 2048, 1e-3),    # ~25 M + embeddings: a GPU size
    "medium": (768, 12, 12, 2048, 2048, 6e-4),  # ~85 M + embeddings
}
SEED_MODEL_LR = 2e-4  # default peak learning rate when continuing a pretrained seed model
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")  # read with the weights


@functools.cache
def cache_keyword() -> str:
    """The name of a causal LM's KV cache, as forward argument and output field: ``cache`` in
    transformers 5, ``past_key_values`` before (5 still takes it, with a deprecation warning)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _check_size(size: str) -> tuple:
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}: choose one of {', '.join(SIZES)}")
    return SIZES[size]


def config_for(size: str, tokenizer):
    """The ``LlamaConfig`` of a named size for ``tokenizer`` (vocabulary, EOS/BOS/PAD ids); no dropout."""
    from transformers import LlamaConfig

    d, layers, heads, mlp, ctx, _ = _check_size(size)
    eos = tokenizer.eos_token_id
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=d, intermediate_size=mlp, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=ctx,
                       tie_word_embeddings=True, attention_dropout=0.0, rms_norm_eps=1e-5,
                       bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos,
                       eos_token_id=eos, pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos)


def new_model(size: str, tokenizer, seed: int = 0):
    """A freshly initialised model of a named size; the same ``seed`` gives the same weights."""
    import torch
    from transformers import AutoModelForCausalLM

    config = config_for(size, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def parse_device(name) -> "torch.device":
    """``name`` ("cpu", "cuda", "cuda:N") as a usable torch device; anything else, or a CUDA device
    that is not there, is a ValueError naming it."""
    import torch

    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {name!r}: use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {name!r}: use cpu, cuda or cuda:N")
    if dev.type == "cuda":
        n = torch.cuda.device_count()
        if n == 0:
            raise ValueError(f"device {name!r} requested but no CUDA device is available")
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"device {name!r} requested but only {n} CUDA devices are visible")
    return dev


def _check_model_dir(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"model directory not found: {path}")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model directory "
                                "(expected save_pretrained output: config.json + model.safetensors)")


def load_config(path: str | Path):
    """The model config of a local directory, without running any code it names."""
    from transformers import AutoConfig

    path = Path(path)
    _check_model_dir(path)
    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # also transformers' validation: ZeroDivisionError for 0 heads, TypeError, ...
        raise ValueError(f"cannot read the model config {path / 'config.json'}: {type(e).__name__}: {e}") from None


def _sha256(files: list[Path], h) -> str:
    for f in files:
        h.update(f"{f.name}\0{f.stat().st_size}\0".encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def _weight_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has no .safetensors weights (pickled weights are never loaded)")
    return files


def model_digest(path: str | Path) -> str:
    """sha256 over what loading a model directory reads (names and bytes): its safetensors weights
    and ``MODEL_FILES`` (tokenizer files saved beside them are not: a run's tokenizer has its own
    fingerprint). Run manifests record it for every expert; :func:`load_model` verifies it."""
    path = Path(path)
    files = [*_weight_files(path), *(path / name for name in MODEL_FILES if (path / name).is_file())]
    return _sha256(sorted(files), hashlib.sha256(b"cbtm.model/2\0"))


PICKLED = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt")  # weight files torch.load would unpickle


def require_safetensors(path: str | Path) -> None:
    """FileNotFoundError unless the model directory holds safetensors weights; for pickled weights
    it says why they are refused and how to convert them."""
    path = Path(path)
    if any(path.glob("*.safetensors")):
        return
    pickled = sorted(f.name for pattern in PICKLED for f in path.glob(pattern))
    if pickled:
        raise FileNotFoundError(
            f"{path} holds its weights as pickles ({', '.join(pickled[:3])}), which cbtm never loads: unpickling a "
            f"file can run code. Convert them once to safetensors with `cbtm convert {path} --to NEW_DIR` (it reads "
            "them with torch.load(weights_only=True)) and use NEW_DIR")
    raise FileNotFoundError(f"{path} has no .safetensors weights")


def weights_digest(path: str | Path) -> str:
    """sha256 over the safetensors weight files only (names and bytes): what manifests recorded
    before :func:`model_digest` covered the config; still accepted, the config then being checked
    against the weights only."""
    h = hashlib.sha256()
    for f in _weight_files(Path(path)):
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def stored_dtype(path: str | Path) -> str:
    """The floating dtype that holds most of the parameters in a directory's safetensors weights
    ("float32", "float16" or "bfloat16"; read from the file headers, no weights loaded)."""
    import math

    from safetensors import safe_open

    names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
    count: dict[str, int] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), framework="np") as fh:
            for key in fh.keys():
                t = fh.get_slice(key)
                if t.get_dtype() in names:
                    name = names[t.get_dtype()]
                    count[name] = count.get(name, 0) + math.prod(t.get_shape())
    if not count:
        raise ValueError(f"{path} has no float32, float16 or bfloat16 weights in safetensors files")
    return max(count, key=count.get)


def save_dtype(name: str, source: str | Path | None = None) -> "torch.dtype":
    """The torch dtype of a ``--save-dtype`` name; "auto": ``source``'s :func:`stored_dtype`
    (float32 without a source: a fresh model)."""
    import torch

    from .defaults import SAVE_DTYPES

    if name not in SAVE_DTYPES:
        raise ValueError(f"save dtype must be one of {', '.join(SAVE_DTYPES)}, got {name!r}")
    if name == "auto":
        name = "float32" if source is None else stored_dtype(source)
    return getattr(torch, name)


def verify_digest(path: str | Path, sha256: str) -> None:
    """Raise ValueError unless ``sha256`` is the directory's :func:`model_digest` (or, recorded by
    an older cbtm, its :func:`weights_digest`)."""
    if model_digest(path) != sha256 and weights_digest(path) != sha256:
        raise ValueError(f"the files in {path} (weights or config.json) do not match the checksum recorded in the "
                         "run's manifest: they are damaged or were edited; retrain the expert (--restart) or restore "
                         "them")


def stored_params(path: str | Path) -> int:
    """Parameters stored in a directory's safetensors files, from their headers (nothing is loaded)."""
    from safetensors import safe_open

    n = 0
    for f in _weight_files(Path(path)):
        try:
            with safe_open(str(f), framework="pt") as fh:
                n += sum(math.prod(fh.get_slice(name).get_shape()) for name in fh.keys())
        except Exception as e:  # safetensors' own error types
            raise ValueError(f"{f} is not a readable safetensors file: {type(e).__name__}: {e}") from None
    return n


def config_params(config, where: str | Path) -> int:
    """Parameters of the model ``config`` describes, counted on the meta device without building it
    whole: models of 1 and 2 layers give the per-layer count, so a config of 10**6 layers costs
    nothing. A config transformers cannot build is a ValueError naming ``where``."""
    import torch
    from transformers import AutoModelForCausalLM

    layers = getattr(config, "num_hidden_layers", None)
    if layers is not None and (not isinstance(layers, int) or isinstance(layers, bool) or layers < 0):
        raise ValueError(f"{where}: num_hidden_layers must be a non-negative integer, got {layers!r}")

    def count(n: int | None) -> int:
        c = copy.deepcopy(config)
        if n is not None:
            c.num_hidden_layers = n
            if isinstance(getattr(c, "layer_types", None), list):
                c.layer_types = (c.layer_types * 2)[:n]
        with torch.device("meta"), quiet():
            return num_params(AutoModelForCausalLM.from_config(c, trust_remote_code=False))

    try:
        if layers is None:
            return count(None)
        one, two = count(1), count(2)
    except Exception as e:  # ZeroDivisionError (0 heads), ValueError, KeyError (unknown model_type), ...
        raise ValueError(f"{where}: transformers cannot build a causal LM from it: {type(e).__name__}: {e}") from None
    return one + (layers - 1) * (two - one)


def load_model(path: str | Path, dtype: "torch.dtype | None" = None, sha256: str | None = None):
    """A local Hugging Face causal LM directory (any architecture transformers itself implements):
    safetensors weights only, no custom code; ``dtype`` default float32; ``sha256``: the expected
    :func:`model_digest` (see :func:`verify_digest`). The config must describe exactly the stored
    parameters (checked before anything is allocated) and every weight must load: missing,
    unexpected or misshapen weights are a ValueError naming the directory."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    _check_model_dir(path)
    if sha256 is not None:
        verify_digest(path, sha256)
    config = load_config(path)
    where = path / "config.json"
    described, stored = config_params(config, where), stored_params(path)
    if described != stored:
        raise ValueError(f"{where} describes a model of {described:,} parameters but its weights hold {stored:,}: "
                         "the config does not belong to these weights")
    kw = {"dtype": torch.float32 if dtype is None else dtype}
    try:
        with quiet():
            model, info = AutoModelForCausalLM.from_pretrained(
                str(path), config=config, local_files_only=True, trust_remote_code=False, use_safetensors=True,
                output_loading_info=True, **kw)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ValueError(f"cannot load a causal LM from {path}: {e}") from None
    wrong = [f"{kind.replace('_', ' ')} {sorted(map(str, info[kind]))[:3]}"
             for kind in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(kind)]
    if wrong:
        raise ValueError(f"the weights in {path} do not fit {where}: {'; '.join(wrong)}")
    return model


def save(model, out: str | Path) -> Path:
    """``model.save_pretrained`` into directory ``out`` (new, empty, or a previous cbtm model),
    replacing it atomically."""
    from .rundir import replace_dir

    with quiet():
        return replace_dir(out, model.save_pretrained, "model")


@contextlib.contextmanager
def quiet():
    """No transformers progress bars (loading / writing weights) inside the block."""
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


def context_length(config) -> int | None:
    """The longest sequence the model's positions support, when the config states one."""
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_compatible(config, seq_len: int, vocab_size: int) -> None:
    """Raise ValueError when ``seq_len`` exceeds the model's context or the tokenizer its embeddings."""
    ctx = context_length(config)
    if ctx is not None and seq_len > ctx:
        raise ValueError(f"seq_len {seq_len} is larger than the model's context of {ctx} tokens: "
                         f"use --seq-len {ctx} or less")
    if vocab_size > config.vocab_size:
        raise ValueError(f"the tokenizer has {vocab_size} tokens but the model embeds only {config.vocab_size}")


def num_params(model) -> int:
    """Parameters, shared (tied) tensors counted once."""
    return sum(p.numel() for p in model.parameters())


def context_of_size(size: str) -> int:
    """The context length of a named size."""
    return _check_size(size)[4]


def default_lr(size: str | None) -> float:
    """Peak learning rate of a named size, or of a pretrained seed model (``size=None``)."""
    return SEED_MODEL_LR if size is None else _check_size(size)[5]


def convert_pickled(src: str | Path, out: str | Path) -> Path:
    """Copy the model directory ``src`` to ``out`` (new or empty) with its pickled weights
    (``pytorch_model.bin``, or shards listed in ``pytorch_model.bin.index.json``) rewritten as
    safetensors in the same dtypes. The one place cbtm reads a pickle, and only when asked to: with
    ``torch.load(weights_only=True)``, which builds tensors and containers and nothing else."""
    import json
    import shutil

    import torch
    from safetensors.torch import save_file

    from .rundir import replace_dir

    src = Path(src)
    _check_model_dir(src)
    if any(src.glob("*.safetensors")):
        raise ValueError(f"{src} already holds safetensors weights: nothing to convert")
    index = src / "pytorch_model.bin.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ValueError(f"{index} is not a weight index (a JSON object with a weight_map)") from None
    elif (src / "pytorch_model.bin").is_file():
        shards = ["pytorch_model.bin"]
    else:
        raise FileNotFoundError(f"{src} has no pytorch_model.bin (or pytorch_model.bin.index.json) to convert")
    names = {s: "model.safetensors" if len(shards) == 1 else
             s.replace("pytorch_model", "model").replace(".bin", ".safetensors") for s in shards}
    skip = {index.name, *shards}

    def save(tmp: str) -> None:
        tmp = Path(tmp)
        tmp.mkdir(parents=True)
        new_map = {}
        for shard in shards:
            if Path(shard).name != shard or not (src / shard).is_file():
                raise FileNotFoundError(f"{index}: shard {shard!r} is not a file of {src}")
            try:
                state = torch.load(src / shard, map_location="cpu", weights_only=True)
            except Exception as e:  # weights_only refuses anything but tensors and plain containers
                raise ValueError(f"cannot read {src / shard} as plain tensors (torch.load weights_only=True): "
                                 f"{e}") from None
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise ValueError(f"{src / shard} is not a state dict of tensors")
            seen, tensors = set(), {}
            for key, t in state.items():  # tied weights share storage: kept once, under their first
                ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))  # name, as
                if ptr not in seen:                                       # save_pretrained writes them
                    tensors[key] = t.contiguous()
                    new_map[key] = names[shard]
                seen.add(ptr)
            save_file(tensors, str(tmp / names[shard]), metadata={"format": "pt"})
        if len(shards) > 1:
            index_json = {"metadata": {}, "weight_map": new_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))
        for f in src.iterdir():
            if f.is_file() and not f.is_symlink() and f.name not in skip and not f.name.startswith("."):
                shutil.copy2(f, tmp / f.name)

    return replace_dir(out, save, "model")
