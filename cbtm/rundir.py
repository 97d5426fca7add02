"""The run directory every stage reads and writes: its layout, its manifest, atomic writes.

```
run/ cbtm.json                  manifest (format cbtm.run/1): config, k, expert list, provenance
     router/                    embedder + centres (safetensors + JSON)            cluster fit
     router/prefix.*            the prefix router (safetensors + JSON)             cluster assign
     assignments/               cluster id and split per document, per shard       cluster assign
     tokenizer/                 the tokenizer every expert shares                  train
     tokens/cluster_XXX.*       token caches per cluster                           train
     seed/                      the model every expert branches from               train
     init/expert_XXX/           an expert initialised as a parameter average       branch
     experts/expert_XXX/        trained experts (save_pretrained directories)      train
     checkpoints/<job>/step_*/  resumable training state                           train
     logs/<job>.json            one log per training job                           train
     reports/                   evaluation JSON, markdown tables, plots            eval, report
```

:class:`RunDir` is the only writer of the manifest. The manifest is checked against a schema when
it is read (types of every known field, expert entries, paths that stay inside the run), so a
damaged or crafted manifest is an error naming the file, never a KeyError deep in a stage. Every
path of the layout must stay inside the run after resolving links. The stages that write a run
hold its lock (:meth:`RunDir.lock`, an advisory ``flock`` on ``run/.cbtm-lock``) while they run, and
:func:`replace_dir` holds one on the directory it replaces, so a second writer is an error naming
the first one's PID, never an interleaving.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import functools
import inspect
import json
import os
import platform
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

MANIFEST = "cbtm.json"
FORMAT = "cbtm.run/1"
STATUSES = ("pending", "running", "done", "failed")
OUTPUT_MARKER = ".cbtm-output"  # written into every directory cbtm replaces atomically
LOCK = ".cbtm-lock"  # the lock file of a run directory (removed when released)


class ManifestError(ValueError):
    """A run directory's manifest is unreadable or does not match the schema."""


class RunLocked(ValueError):
    """Another process is writing the run directory (or output directory)."""


_held: dict[str, list] = {}  # lock file -> [fd, depth]: the locks this process holds (re-entrant)


@contextlib.contextmanager
def exclusive(lock_file: str | Path, what: str, stage: str) -> Iterator[None]:
    """Hold an advisory ``flock`` on ``lock_file`` (created, and removed on release) for the block;
    re-entrant within a process (and its forked children, which inherit it). Another holder is a
    RunLocked error naming ``what``, the holder's PID and its stage. The kernel releases the lock
    when the holder exits or is killed."""
    key = os.path.abspath(lock_file)
    if key in _held:
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    while True:
        try:
            fd = os.open(key, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise ValueError(f"cannot write {what}: {e.strerror} ({key})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise RunLocked(f"{what} is being written by another cbtm process (pid {holder}): wait for it to "
                            "finish, or use another directory") from None
        try:  # the file we locked may have been removed by the holder we raced with: lock the one there now
            if os.path.samestat(os.fstat(fd), os.stat(key)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}, {stage}\n".encode())
    _held[key] = [fd, 1]
    try:
        yield
    finally:
        del _held[key]
        with contextlib.suppress(OSError):
            os.unlink(key)
        os.close(fd)


def holds_lock(stage: str, param: str = "run", output: bool = False, unless: Callable[[], bool] | None = None):
    """Decorator: the call holds the write lock of the run directory named by its argument
    ``param`` (with ``output``: the lock of that output directory, :func:`output_lock`), unless
    ``unless()`` says a parent process holds it."""
    def decorate(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                bound = signature.bind(*args, **kwargs)
            except TypeError:
                return fn(*args, **kwargs)  # the call's own error
            bound.apply_defaults()
            target = bound.arguments[param]
            if unless is not None and unless():
                return fn(*args, **kwargs)
            lock = output_lock(Path(target), stage) if output else RunDir.of(target).lock(stage)
            with lock:
                return fn(*args, **kwargs)
        return wrapper
    return decorate


def expert_name(i: int) -> str:
    """``expert_XXX``: the directory, job and log name of expert ``i``."""
    return f"expert_{int(i):03d}"


# ------------------------------------------------------------------------------------------------
# atomic writes


def default_mode(directory: str | Path) -> int:
    """The permission bits an ordinary new file gets in ``directory`` (0o666 less the umask), found
    by creating one: reading the umask would mean setting it, a process-wide change."""
    probe = Path(directory) / f".cbtm-mode.{os.getpid()}.probe"
    fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    try:
        return os.fstat(fd).st_mode & 0o777
    finally:
        os.close(fd)
        probe.unlink()


def share_like_open(path: str | Path) -> None:
    """Give ``path`` (a file, or every file under a directory) the mode a plain ``open`` would have
    given it. safetensors >= 0.8 writes every file 0600 whatever the umask, which would leave the
    weights of a run directory shared with a group unreadable to the group."""
    path = Path(path)
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file() and not f.is_symlink()]
    if files:
        mode = default_mode(files[0].parent)
        for f in files:
            os.chmod(f, mode)


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` then rename tmp over ``path``: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        share_like_open(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n")


def atomic_save_safetensors(path: str | Path, tensors: dict, metadata: dict | None = None) -> Path:
    """numpy arrays -> safetensors, atomically."""
    from safetensors.numpy import save_file

    return atomic_write(path, lambda p: save_file(tensors, str(p), metadata=metadata))


def _is_output(path: Path, kind: str) -> bool:
    try:
        return json.loads((path / OUTPUT_MARKER).read_text()).get("kind") == kind
    except (OSError, ValueError, AttributeError):
        return False


def replace_dir(out: str | Path, save: Callable[[str], Any], kind: str) -> Path:
    """``save(tmp_dir)``, then put the result at directory ``out`` (readers never see a partial one).

    ``out`` may be missing, empty, or a previous output of the same ``kind`` (marked by
    ``.cbtm-output``); anything else is refused with FileExistsError: nothing is ever deleted
    that cbtm did not write there."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(out, kind):
        return _replace_dir(out, save, kind)


def output_lock(out: str | Path, stage: str):
    """The lock of output directory ``out`` (a file ``.<name>.cbtm-lock`` beside it), held by
    :func:`replace_dir`; a command that prepares an output at length takes it first."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return exclusive(out.with_name(f".{out.name}{LOCK}"), str(out), stage)


def check_replaceable(out: str | Path, kind: str) -> None:
    """FileExistsError unless :func:`replace_dir` may replace ``out`` (for commands that check
    their output before a long computation)."""
    out = Path(out)
    if out.is_symlink() or out.is_file():
        raise FileExistsError(f"refusing to replace {out}: it is a file or a link, not a cbtm output directory")
    if out.is_dir() and any(out.iterdir()) and not _is_output(out, kind):
        raise FileExistsError(f"refusing to replace {out}: it exists, is not empty and was not written by cbtm "
                              f"as a {kind}; choose a new or empty directory")


def _replace_dir(out: Path, save: Callable[[str], Any], kind: str) -> Path:
    check_replaceable(out, kind)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    if tmp.exists():  # our own leftover from a killed process with this pid
        shutil.rmtree(tmp)
    save(str(tmp))
    share_like_open(tmp)
    (tmp / OUTPUT_MARKER).write_text(json.dumps({"kind": kind}) + "\n")  # no timestamp: hashes stay stable
    old = out.with_name(f".{out.name}.{os.getpid()}.old")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    if old.exists():
        shutil.rmtree(old)
    return out


def read_json(path: str | Path) -> Any:
    """A JSON file; a missing file is FileNotFoundError, an invalid one ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def versions() -> dict:
    """Versions of the libraries a run depends on (recorded in manifests and reports)."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("cbtm", "numpy", "scipy", "scikit-learn", "torch", "transformers", "tokenizers", "safetensors"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------------------
# the manifest schema: section -> field -> accepted types (fields not listed are free)

_INT, _NUM, _STR, _BOOL = (int,), (int, float), (str,), (bool,)
_OPT_STR = (str, type(None))
_SCHEMA: dict[str, dict[str, tuple]] = {
    "cluster": {"k": _INT, "seed": _INT, "valid_fraction": _NUM, "text_field": _STR, "id_field": _STR,
                "balanced": _BOOL, "n_components": _INT},
    "corpus": {"paths": (list,), "fingerprint": _STR},
    "assignments": {"shard_keys": (list,), "k": _INT, "train_sizes": (list,), "valid_sizes": (list,),
                    "text_field": _STR, "id_field": _STR, "documents": _INT, "valid_fraction": _NUM, "seed": _INT},
    "tokenizer": {"path": _STR, "size": _INT, "source": _STR},
    "train": {"total_tokens": _INT, "k": _INT, "per_expert_tokens": (list,), "config": (dict,), "seed_tokens": _INT},
    "seed": {"status": _STR, "tokens": _INT},
}
_EXPERT = {"id": _INT, "path": _STR, "status": _STR, "cluster": _INT, "tokens": _INT, "sha256": _OPT_STR}


def _type_ok(value, types: tuple) -> bool:
    if isinstance(value, bool) and bool not in types:
        return False  # True is not an int here
    return isinstance(value, types)


def validate_manifest(data: Any, where: str | Path) -> dict:
    """Check a manifest against the schema; return it, or raise ManifestError naming ``where``."""
    def bad(msg):
        raise ManifestError(f"{where}: {msg}")

    if not isinstance(data, dict):
        bad(f"the manifest must be a JSON object, got {type(data).__name__}")
    fmt = data.get("format", FORMAT)
    if not isinstance(fmt, str) or not fmt.startswith("cbtm.run/"):
        bad(f"format {fmt!r} is not a cbtm run manifest")
    if fmt != FORMAT:
        bad(f"format {fmt!r} is not {FORMAT!r}: written by another version of cbtm")
    for section, fields in _SCHEMA.items():
        if section not in data:
            continue
        sec = data[section]
        if not isinstance(sec, dict):
            bad(f"section {section!r} must be an object, got {type(sec).__name__}")
        for name, types in fields.items():
            if name in sec and sec[name] is not None and not _type_ok(sec[name], types):
                bad(f"{section}.{name} must be {'/'.join(t.__name__ for t in types)}, got {sec[name]!r}")
    for key in ("paths", "shard_keys"):
        for section in ("corpus", "assignments"):
            values = (data.get(section) or {}).get(key)
            if values is not None and not all(isinstance(v, str) for v in values):
                bad(f"{section}.{key} must be a list of strings")
    experts = data.get("experts", [])
    if not isinstance(experts, list):
        bad(f"'experts' must be a list of objects, got {type(experts).__name__}")
    seen = set()
    for i, e in enumerate(experts):
        if not isinstance(e, dict):
            bad(f"experts[{i}] must be an object, got {type(e).__name__}")
        for name in ("id", "path", "status"):
            if name not in e:
                bad(f"experts[{i}] has no {name!r}")
        for name, types in _EXPERT.items():
            if name in e and not _type_ok(e[name], types):
                bad(f"experts[{i}].{name} must be {'/'.join(t.__name__ for t in types)}, got {e[name]!r}")
        if e["status"] not in STATUSES:
            bad(f"experts[{i}].status must be one of {STATUSES}, got {e['status']!r}")
        if e["id"] < 0 or e["id"] in seen:
            bad(f"experts[{i}].id {e['id']} is negative or repeated")
        seen.add(e["id"])
        _check_inside(e["path"], f"{where}: experts[{i}].path")
    for section, sub in (("train", "config"), ("moe", None)):
        holder = data.get(section) or {}
        holder = holder.get(sub) if sub else holder
        seq_len = holder.get("seq_len") if isinstance(holder, dict) else None
        if seq_len is not None and not (_type_ok(seq_len, _INT) and seq_len > 0):
            bad(f"{section}.{sub + '.' if sub else ''}seq_len must be a positive integer, got {seq_len!r}")
    tok = (data.get("tokenizer") or {}).get("path")
    if tok is not None:
        _check_inside(tok, f"{where}: tokenizer.path")
    return data


def _check_inside(rel: str, what: str) -> None:
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise ManifestError(f"{what} {rel!r} must be a relative path inside the run directory")


class RunDir:
    """A run directory: its layout and its manifest ``cbtm.json``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @classmethod
    def of(cls, run: "str | Path | RunDir") -> "RunDir":
        return run if isinstance(run, RunDir) else cls(run)

    # -- layout -----------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    # every layout path is checked to stay inside the run (links included); the small directories
    # read whole (router, tokenizer) entry by entry
    router = property(lambda self: self.inside(self.path / "router", entries=True))
    assignments = property(lambda self: self.inside(self.path / "assignments"))
    experts = property(lambda self: self.inside(self.path / "experts"))
    tokenizer = property(lambda self: self.inside(self.path / "tokenizer", entries=True))
    tokens = property(lambda self: self.inside(self.path / "tokens"))
    seed = property(lambda self: self.inside(self.path / "seed", entries=True))
    checkpoints = property(lambda self: self.inside(self.path / "checkpoints"))
    logs = property(lambda self: self.inside(self.path / "logs"))
    reports = property(lambda self: self.inside(self.path / "reports"))

    def expert_dir(self, i: int) -> Path:
        return self.inside(self.experts / expert_name(i))

    def init_dir(self, i: int) -> Path:
        return self.inside(self.path / "init" / expert_name(i))

    def token_cache(self, cluster: int) -> Path:
        return self.inside(self.tokens / f"cluster_{int(cluster):03d}.safetensors")

    def log_path(self, job: str) -> Path:
        return self.inside(self.logs / f"{job}.json")

    def inside(self, path: Path, entries: bool = False) -> Path:
        """``path`` (in the run directory), checked not to lead outside it through a link, nor (with
        ``entries``) any entry of the directory it is; a ManifestError otherwise."""
        root = self.path.resolve()
        for p in [path, *(path.iterdir() if entries and path.is_dir() else ())]:
            if p.is_symlink() or p == path:
                full = p.resolve()
                if full != root and root not in full.parents:
                    raise ManifestError(f"{p} is a link leading outside the run directory {self.path} "
                                        f"(to {full}): a run reads nothing outside itself")
        return path

    def resolve(self, rel: str | Path) -> Path:
        """``rel`` inside the run directory; a path that leaves it is a ManifestError."""
        _check_inside(str(rel), f"{self.manifest_path}: path")
        root = self.path.resolve()
        full = (root / rel).resolve()
        if full != root and root not in full.parents:
            raise ManifestError(f"{self.manifest_path}: path {str(rel)!r} leaves the run directory (via a link)")
        return full

    @contextlib.contextmanager
    def lock(self, stage: str) -> Iterator[None]:
        """Hold the run's write lock (``run/.cbtm-lock``, see :func:`exclusive`) for a stage that
        writes it; a run directory this creates is removed again if the stage leaves it empty."""
        created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            with exclusive(self.path / LOCK, f"run directory {self.path}", stage):
                yield
        finally:
            if created:
                with contextlib.suppress(OSError):
                    self.path.rmdir()  # only when empty

    def contains(self, path: str | Path) -> bool:
        """Whether ``path`` is the run directory or inside it (after resolving links)."""
        root, p = self.path.resolve(), Path(path).resolve()
        return p == root or root in p.parents

    # -- manifest ---------------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def manifest(self) -> dict:
        if not self.exists():
            raise FileNotFoundError(
                f"{self.manifest_path} not found: {self.path} is not a cbtm run directory "
                "(create one with `cbtm cluster fit CORPUS --run DIR -k K`)")
        return validate_manifest(read_json(self.manifest_path), self.manifest_path)

    def section(self, name: str) -> dict:
        """One section of the manifest ({} when absent)."""
        return self.manifest().get(name) or {}

    def update(self, **sections: Any) -> dict:
        """Merge top-level sections into the manifest (created if missing) and write it atomically."""
        data = self.manifest() if self.exists() else {"format": FORMAT, "created": now()}
        data.update(sections)
        data["updated"] = now()
        data["versions"] = versions()
        validate_manifest(data, self.manifest_path)
        atomic_write_json(self.manifest_path, data)
        return data

    def drop(self, *sections: str) -> None:
        """Remove top-level sections from the manifest (the files they describe are kept)."""
        data = self.manifest()
        for name in sections:
            data.pop(name, None)
        data["updated"] = now()
        atomic_write_json(self.manifest_path, data)

    def expert_entries(self, done_only: bool = False) -> list[dict]:
        """The manifest's expert entries sorted by id (only the trained ones with ``done_only``)."""
        entries = sorted(self.manifest().get("experts", []), key=lambda e: e["id"])
        return [e for e in entries if e["status"] == "done"] if done_only else entries

    def update_experts(self, updates: dict[int, dict], drop: tuple = ()) -> None:
        """Merge fields into expert entries by id (new ids are added), removing keys ``drop`` of the
        updated entries."""
        entries = {e["id"]: e for e in self.manifest().get("experts", [])}
        for i, fields in updates.items():
            old = {k: v for k, v in entries.get(i, {"id": i}).items() if k not in drop}
            entries[i] = {**old, **fields}
        self.update(experts=[entries[i] for i in sorted(entries)])

    def set_experts(self, entries: list[dict]) -> None:
        self.update(experts=sorted(entries, key=lambda e: e["id"]))
