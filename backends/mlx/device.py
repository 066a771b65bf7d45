"""What MLX runs on, and its memory counters."""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from trmlx.backend import MemoryStats


def describe_device() -> dict[str, Any]:
    """Device name and facts that change what fits: kind (gpu/cpu), Metal memory limits where they exist."""
    device = mx.default_device()
    info: dict[str, Any] = {"framework": "mlx", "mlx": mx.__version__, "kind": str(device.type).split(".")[-1]}
    if mx.metal.is_available():
        metal = mx.metal.device_info()
        info.update(name=metal.get("device_name", "metal"), memory_bytes=metal.get("memory_size"),
                    recommended_working_set_bytes=metal.get("max_recommended_working_set_size"))
    elif mx.cuda.is_available() if hasattr(mx, "cuda") else False:
        info.update(name="cuda")
    else:
        info.update(name="cpu")
    return info


def memory() -> MemoryStats:
    return MemoryStats(active=mx.get_active_memory(), peak=mx.get_peak_memory(), device=describe_device()["name"])
