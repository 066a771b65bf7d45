"""Which process this is in a data-parallel launch (torchrun / accelerate launch set RANK and WORLD_SIZE).

Read from the environment so the core can decide who writes files without importing torch: only rank 0 writes
the run directory, logs, checkpoints, adapter and plots.
"""

from __future__ import annotations

import os


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0
