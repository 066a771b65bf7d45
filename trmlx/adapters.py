"""Adapter decisions made once, for both backends and the planner: which linear layers `peft.targets` names, which
blocks `peft.layers` selects, and how LoRA's A starts (so the same recipe and seed start both backends from the same
weights, and their training losses can be compared step by step)."""

from __future__ import annotations

import zlib
from typing import Iterable

import numpy as np

from trmlx.errors import UserError


def _names(targets: str | list[str]) -> list[str]:
    # A string is one target, never a collection of characters: "wo" must not also match "o".
    return [targets] if isinstance(targets, str) else list(targets)


def _matches(path: str, target: str) -> bool:
    """PEFT's rule: a target names the module whose path equals it or ends with "." + it."""
    return path == target or path.endswith("." + target)


def is_target(path: str, targets: str | list[str]) -> bool:
    """Whether `targets` names the linear layer at `path` (no check that every target matches something)."""
    return targets == "all-linear" or any(_matches(path, t) for t in _names(targets))


def match_targets(linears: Iterable[str], targets: str | list[str]) -> list[str]:
    """The paths among `linears` (paths of linear layers, e.g. 'self_attn.q_proj') that `targets` names, sorted;
    'all-linear' takes them all. Every named target must match something, or a UserError lists the layers."""
    paths = sorted(set(linears))
    if targets == "all-linear":
        return paths
    wanted = _names(targets)
    missing = [t for t in wanted if not any(_matches(p, t) for p in paths)]
    if missing:
        raise UserError(f"peft.targets: {', '.join(repr(m) for m in missing)} matches no linear layer of this "
                        f"model; its linear layers are {', '.join(sorted({p.rsplit('.', 1)[-1] for p in paths}))}")
    return [p for p in paths if is_target(p, wanted)]


def peft_target_modules(linears: Iterable[str], targets: str | list[str]) -> list[str]:
    """`target_modules` for peft's LoraConfig naming the same layers as match_targets: the targets themselves
    (peft applies the same rule to full module paths), or every linear's last name for 'all-linear'."""
    matched = match_targets(linears, targets)
    if targets == "all-linear":
        return sorted({p.rsplit(".", 1)[-1] for p in matched})
    return sorted(set(_names(targets)))


def layer_indices(total: int, last_n: int) -> list[int]:
    """Indices of the blocks to adapt: the last `last_n` of `total`, or all when 0."""
    if last_n > total:
        raise UserError(f"peft.layers: requested to adapt {last_n} layers but the model only has {total}")
    return list(range(total - last_n, total)) if last_n else list(range(total))


def lora_a_init(module_path: str, in_dim: int, rank: int, seed: int) -> np.ndarray:
    """LoRA A in PEFT's (rank, in) layout: uniform(±1/sqrt(in)), drawn from a generator keyed by (seed, module
    path) so the result does not depend on the order in which a backend visits modules. B starts at zero."""
    rng = np.random.default_rng([seed, zlib.crc32(module_path.encode())])
    bound = 1.0 / np.sqrt(in_dim)
    return rng.uniform(-bound, bound, size=(rank, in_dim)).astype(np.float32)
