"""Adapter initialisation decided once, so the same recipe and seed start both backends from the same weights
(and their training losses can be compared step by step)."""

from __future__ import annotations

import zlib

import numpy as np


def lora_a_init(module_path: str, in_dim: int, rank: int, seed: int) -> np.ndarray:
    """LoRA A in PEFT's (rank, in) layout: uniform(±1/sqrt(in)), drawn from a generator keyed by (seed, module
    path) so the result does not depend on the order in which a backend visits modules. B starts at zero."""
    rng = np.random.default_rng([seed, zlib.crc32(module_path.encode())])
    bound = 1.0 / np.sqrt(in_dim)
    return rng.uniform(-bound, bound, size=(rank, in_dim)).astype(np.float32)
