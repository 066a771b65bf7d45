"""What MLX runs on, and its memory counters; on Linux, which BLAS MLX's CPU kernels use.

MLX's Linux CPU wheel links netlib's reference BLAS (measured here: 5 GFLOP/s for a 1024² fp32 matmul). An optimized
OpenBLAS loaded into the global symbol scope before `mlx.core` is imported takes over its cblas calls (same results
within fp32 rounding, ~15-18× the speed on two cores). So this module chooses once, before importing mlx, and every
MLX import in trmlx goes through it (`backends/mlx/__init__.py` imports it first). macOS (Accelerate) is untouched.

Choice, first that loads: `TRMLX_BLAS` (a library path, or `reference` to keep MLX's own), the OpenBLAS of the
`cmeel-openblas` wheel (the Linux `mlx` extra installs it; it needs the system's libgfortran.so.5; its build
targets AVX-512 CPUs only, so it is skipped, and said why, on others), the system's OpenBLAS (Debian/Ubuntu
`libopenblas0-pthread`, built for every x86 CPU).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import Any

BLAS_ENV = "TRMLX_BLAS"
_SYSTEM_OPENBLAS = ("/usr/lib/x86_64-linux-gnu/libopenblas.so.0", "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
                    "/usr/lib64/libopenblas.so.0")


def _blas_candidates() -> list[tuple[str, str]]:
    """(source, library path) in the order tried."""
    from importlib.metadata import PackageNotFoundError, distribution

    chosen = os.environ.get(BLAS_ENV, "").strip()
    if chosen:
        return [] if chosen == "reference" else [(BLAS_ENV, chosen)]
    try:  # the Linux mlx extra installs it
        wheel = distribution("cmeel-openblas").locate_file("cmeel.prefix/lib/libopenblas.so.0")
        found = [("cmeel-openblas", str(wheel))]
    except PackageNotFoundError:
        found = []
    # Full paths: a bare soname ("libopenblas.so.0") would name whichever OpenBLAS is already loaded.
    system = [p for p in _SYSTEM_OPENBLAS if os.path.isfile(p)] or [ctypes.util.find_library("openblas")]
    return found + [("system", p) for p in dict.fromkeys(system) if p]


# OpenBLAS builds for one CPU target (not DYNAMIC_ARCH) die with SIGILL on a CPU without its instructions: the
# cmeel-openblas 0.3.31 wheel is built for SKYLAKEX (AVX-512), and AMD EPYC Zen 2/3 machines have only AVX2.
_TARGET_FLAGS = {"SKYLAKEX": "avx512f", "COOPERLAKE": "avx512f", "SAPPHIRERAPIDS": "avx512f", "HASWELL": "avx2",
                 "ZEN": "avx2"}


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            return next((set(line.split(":", 1)[1].split()) for line in info if line.startswith("flags")), set())
    except OSError:
        return set()


def _unrunnable(config: str) -> str | None:
    """Why this OpenBLAS build cannot run on this CPU (from its openblas_get_config()), or None."""
    words = config.upper().split()
    if "DYNAMIC_ARCH" in words:
        return None
    flags = _cpu_flags()
    for target, flag in _TARGET_FLAGS.items():
        if target in words and flags and flag not in flags:
            return f"built for {target} only, and this CPU lacks {flag}"
    return None


def _choose_blas() -> dict[str, Any]:
    """Load the first optimized BLAS that loads (Linux only, and only before mlx.core exists in this process)."""
    if not sys.platform.startswith("linux"):
        return {"blas": "platform default"}
    if "mlx.core" in sys.modules:
        return {"blas": "reference (mlx was imported before trmlx could choose)"}
    problems = []
    for source, path in _blas_candidates():
        try:  # locally first: a build this CPU cannot run must not enter the global symbol scope
            library = ctypes.CDLL(path, mode=os.RTLD_LOCAL)
        except OSError as err:
            problems.append(f"{source} {path}: {str(err).replace(path + ': ', '')}")
            continue
        name = "openblas"
        if hasattr(library, "openblas_get_config"):  # "OpenBLAS 0.3.31 DYNAMIC_ARCH ..." -> "OpenBLAS 0.3.31"
            library.openblas_get_config.restype = ctypes.c_char_p
            config = library.openblas_get_config().decode()
            name = " ".join(config.split()[:2])
            if (why := _unrunnable(config)) is not None:
                problems.append(f"{source} {path}: {why}")
                continue
        ctypes.CDLL(path, mode=os.RTLD_GLOBAL)  # the same library, now global: it serves MLX's cblas calls
        return {"blas": f"{name} ({source})", "blas_path": path, **({"blas_problems": "; ".join(problems)}
                                                                   if problems else {})}
    info: dict[str, Any] = {"blas": "reference (netlib)"}
    if problems:
        info["blas_problems"] = "; ".join(problems)
    return info


BLAS = _choose_blas()

import mlx.core as mx  # noqa: E402  (after the BLAS choice, on purpose)

from trmlx.backend import MemoryStats  # noqa: E402


def describe_device() -> dict[str, Any]:
    """Device name and facts that change what fits: kind (gpu/cpu), Metal memory limits where they exist."""
    device = mx.default_device()
    info: dict[str, Any] = {"framework": "mlx", "mlx": mx.__version__, "kind": str(device.type).split(".")[-1], **BLAS}
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
