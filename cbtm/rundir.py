"""The run directory every stage reads and writes, and atomic file writes.

```
run/ cbtm.json            manifest: config, k, expert list, provenance, versions
     router/              embedder + centres (safetensors + JSON)
     assignments/         cluster id per document, per input shard
     experts/expert_XXX/  Hugging Face save_pretrained directories
     tokenizer/           the tokenizer every expert shares
     reports/             evaluation JSON, markdown tables, plots
```
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from pathlib import Path
from typing import Any, Callable

MANIFEST = "cbtm.json"


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` then rename tmp over ``path``: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
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


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    return json.loads(path.read_text(encoding="utf-8"))


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


class RunDir:
    """A run directory and its manifest ``cbtm.json``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    router = property(lambda self: self.path / "router")
    assignments = property(lambda self: self.path / "assignments")
    experts = property(lambda self: self.path / "experts")
    tokenizer = property(lambda self: self.path / "tokenizer")
    reports = property(lambda self: self.path / "reports")

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def manifest(self) -> dict:
        if not self.exists():
            raise FileNotFoundError(
                f"{self.manifest_path} not found: {self.path} is not a cbtm run directory "
                "(create one with `cbtm cluster fit CORPUS --out DIR -k K`)")
        return read_json(self.manifest_path)

    def update(self, **sections: Any) -> dict:
        """Merge top-level sections into the manifest (created if missing) and write it atomically."""
        data = read_json(self.manifest_path) if self.exists() else {"format": "cbtm.run/1", "created": now()}
        data.update(sections)
        data["updated"] = now()
        data["versions"] = versions()
        atomic_write_json(self.manifest_path, data)
        return data
