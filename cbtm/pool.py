"""Expert models of an ensemble: loaded on demand, placed round-robin on devices, evicted LRU."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import torch

from . import models


class ExpertPool:
    """Expert models placed round-robin on ``devices``, loaded on demand and, when ``max_loaded``
    is set, evicted least-recently-used (for more experts than fit in memory at once)."""

    def __init__(self, paths: Sequence[str | Path], devices: Sequence[str], max_loaded: int | None = None,
                 dtype: torch.dtype | None = None, digests: Sequence[str | None] | None = None):
        if not paths:
            raise ValueError("an ensemble needs at least one expert")
        for p in paths:
            if not (Path(p) / "config.json").is_file():
                raise FileNotFoundError(f"expert {p}: no config.json (expected a save_pretrained directory)")
        if max_loaded is not None and max_loaded < 1:
            raise ValueError(f"max_loaded must be >= 1, got {max_loaded}")
        self.paths = [Path(p) for p in paths]
        self.digests = list(digests) if digests is not None else [None] * len(self.paths)
        self.devices = list(devices)
        self.max_loaded, self.dtype = max_loaded, dtype
        self._loaded: OrderedDict[int, torch.nn.Module] = OrderedDict()
        self.loads = 0  # models read from disk (more than len(paths) means evictions happened)
        self._configs: list | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def device(self, j: int) -> torch.device:
        return torch.device(self.devices[j % len(self.devices)])

    def get(self, j: int) -> torch.nn.Module:
        if j in self._loaded:
            self._loaded.move_to_end(j)
            return self._loaded[j]
        if self.max_loaded is not None:
            while len(self._loaded) >= self.max_loaded:
                self._loaded.popitem(last=False)
        model = models.load_model(self.paths[j], self.dtype, sha256=self.digests[j])
        model.to(self.device(j)).eval()
        self.loads += 1
        self._loaded[j] = model
        return model

    def context_length(self) -> int:
        """The smallest maximum context of the experts (read from their configs)."""
        return min(models.context_length(c) or 1024 for c in self.configs())

    def configs(self) -> list:
        """The experts' model configs (read once, without loading any weights)."""
        if self._configs is None:
            self._configs = [models.load_config(p) for p in self.paths]
        return self._configs

    def vocab_size(self) -> int:
        """The experts' output width (their config's ``vocab_size``; it may exceed the tokenizer's
        length when the vocabulary was padded). Experts of different widths cannot be mixed."""
        sizes = {int(c.vocab_size) for c in self.configs()}
        if len(sizes) != 1:
            raise ValueError(f"the experts' vocabularies differ in size ({sorted(sizes)}): they cannot be mixed")
        return sizes.pop()

    def all_resident(self) -> bool:
        """Every expert can be held in memory at once (no eviction)."""
        return self.max_loaded is None or self.max_loaded >= len(self.paths)
