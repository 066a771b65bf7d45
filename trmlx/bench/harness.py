"""What every bench measurement shares: device clocks and peak-memory probes, the dense matmul rate (MFU's
denominator), synthetic rows, trial timing, the summary of one side, and the worker processes.

`trmlx bench` runs every side (trmlx or a peer tool, per configuration) in a fresh interpreter, so peak counters
never mix: `python -m trmlx.bench.harness MODULE:WORKER SPEC.json RESULT.json` calls WORKERS[WORKER] of a bench
task module (trmlx.bench.causal, .seq2seq, .embedding, .hf_causal). Every worker returns the same raw format, so
one `summarise` serves all sides.

Peak memory, as each counter sees it: MLX mx.get_peak_memory() (reset when the loop starts; weights included);
torch on a GPU torch.cuda.max_memory_allocated(); torch on a CPU, which keeps no allocator statistics, the
profiler's memory events over two more training steps (and one generation) plus the bytes of the tensors alive
when profiling starts — the allocator-level peak, comparable with the GPU counter, unlike the process RSS (also
recorded), which holds ~0.4 GB of Python and libraries no model formula describes.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence


# ------------------------------------------------------------------------------------------- clocks and memory

class Probe:
    """Device synchronisation and peak memory for one backend family (see the module docstring)."""

    def __init__(self, backend: str):
        self.mlx = backend == "mlx"
        if self.mlx:
            from trmlx.backends.mlx import device as _blas  # noqa: F401  chooses the BLAS before mlx loads
            import mlx.core as mx

            self.mx = mx
            self.gpu = mx.metal.is_available() or (getattr(mx, "cuda", None) is not None and mx.cuda.is_available())
        else:
            import torch

            self.torch = torch
            self.gpu = torch.cuda.is_available()
        self.kind = ("metal" if self.mlx and self.mx.metal.is_available() else "gpu") if self.gpu else "cpu"

    def clock(self) -> float:
        if self.mlx:
            self.mx.synchronize()
        elif self.gpu:
            self.torch.cuda.synchronize()
        return time.perf_counter()

    def counter(self) -> str:
        if self.mlx:
            return "mx.get_peak_memory"
        return "torch.cuda.max_memory_allocated" if self.gpu else "torch profiler memory events + live tensors"

    def reset(self) -> None:
        if self.mlx:
            self.mx.reset_peak_memory()
        elif self.gpu:
            self.torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int:
        if self.mlx:
            return self.mx.get_peak_memory()
        return self.torch.cuda.max_memory_allocated()

    def active(self) -> int:
        if self.mlx:
            return self.mx.get_active_memory()
        return self.torch.cuda.memory_allocated() if self.gpu else live_tensor_bytes()

    def peak_of(self, fn: Callable[[], Any]) -> tuple[Any, int]:
        """fn() and the peak memory while it ran (live memory before it included)."""
        if self.mlx or self.gpu:
            self.reset()
            out = fn()
            self.clock()
            return out, self.peak()
        return profiled_peak(fn)


def live_tensor_bytes() -> int:
    """Bytes of every CPU tensor storage reachable from Python (model weights, quantisation states, optimizer)."""
    import torch

    storages: dict[int, int] = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and obj.device.type == "cpu":
            try:
                storage = obj.untyped_storage()
            except (RuntimeError, NotImplementedError):  # tensors without storage (meta, sparse)
                continue
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def profiled_peak(fn: Callable[[], Any]) -> tuple[Any, int]:
    """fn() under torch's profiler: live bytes before + the highest running sum of its CPU allocation events."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    base = live_tensor_bytes()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type().name == "CPU"]
    running = highest = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        running += event.nbytes()
        highest = max(highest, running)
    return out, base + highest


def max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB (macOS: bytes)


def clock():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def memory_now() -> dict[str, float]:
    import torch

    if torch.cuda.is_available():
        return {"allocated_gb": torch.cuda.memory_allocated() / 1e9,
                "peak_allocated_gb": torch.cuda.max_memory_allocated() / 1e9}
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    return {"allocated_gb": rss, "peak_allocated_gb": rss}


def peak_memory() -> dict[str, Any]:
    """Peak since the last reset: torch's allocator counters on a GPU, the process's peak RSS on the CPU."""
    import torch

    if torch.cuda.is_available():
        return {"peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9,
                "peak_reserved_gb": torch.cuda.max_memory_reserved() / 1e9,
                "memory_kind": "torch.cuda.max_memory_allocated from the start of training"}
    import resource

    return {"peak_memory_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
            "memory_kind": "peak resident set of the whole process (ru_maxrss; includes Python, torch and load)"}


def native_bf16() -> bool:
    """bf16 tensor-core matmuls (Ampere and newer). torch.cuda.is_bf16_supported() also says True where bf16 is
    only emulated (T4, P100), which is not 'as the GPU allows'."""
    import torch

    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


def time_training(reports: Any, probe: Probe, steps: int) -> tuple[list[float], list[float], int]:
    """(seconds per step, losses, training peak bytes) of the first `steps` reports of a training loop's iterator,
    which is then closed at its yield (no end-of-run checkpoint inside the timing or the peak). torch on a CPU
    has no peak counter: two more steps run under the profiler, when the optimizer state exists (steady state)."""
    step_seconds, losses, train_peak = [], [], 0
    previous = probe.clock()
    for report in reports:
        now = probe.clock()
        step_seconds.append(now - previous)
        losses.append(report.loss)
        previous = now
        if len(step_seconds) == steps:
            break
    if probe.mlx or probe.gpu:
        train_peak = probe.peak()  # every loop resets the counter when it starts
    else:
        for _ in range(2):
            _, peak = profiled_peak(lambda it=reports: next(it))
            train_peak = max(train_peak, peak)
    reports.close()
    return step_seconds, losses, train_peak


# -------------------------------------------------------------------------------------------------- matmul rate

def measure_matmul(backend: str) -> dict[str, Any]:
    """The device's dense matmul rate (MFU's denominator): torch_matmul_rate for torch; the same
    n×n×n timing with MLX arrays for MLX (bf16 8192² on a GPU, fp32 1024² on a CPU)."""
    if backend != "mlx":
        import torch

        dtype = ("bf16" if native_bf16() else "fp16") if torch.cuda.is_available() else "fp32"
        return torch_matmul_rate(dtype)
    from trmlx.backends.mlx import device as _blas  # noqa: F401  chooses the BLAS before mlx loads
    import mlx.core as mx

    gpu = mx.metal.is_available() or (getattr(mx, "cuda", None) is not None and mx.cuda.is_available())
    n, reps, dtype = (8192, 20, mx.bfloat16) if gpu else (1024, 8, mx.float32)
    key = mx.random.key(0)
    a = mx.random.normal((n, n), key=key).astype(dtype)
    b = mx.random.normal((n, n), key=mx.random.split(key)[0]).astype(dtype)
    mx.eval(a, b)
    for _ in range(3):
        mx.eval(a @ b)
    rates = []
    for _ in range(5):
        mx.synchronize()
        start = time.perf_counter()
        for _ in range(reps):
            c = a @ b
            mx.eval(c)
        mx.synchronize()
        rates.append(2 * n**3 * reps / (time.perf_counter() - start))
    return {"n": n, "dtype": "bf16" if gpu else "fp32", "reps_per_trial": reps, "peak_flops": max(rates),
            "median_flops": statistics.median(rates), "trial_flops": rates}


def torch_matmul_rate(dtype_name: str, trials: int = 5) -> dict[str, Any]:
    """The device's dense matmul rate: n×n×n products (8192 on a GPU, 1024 fp32 on the CPU), several timed
    trials after warm-up; the best trial is the peak used for MFU."""
    import torch

    gpu = torch.cuda.is_available()
    n, reps = (8192, 20) if gpu else (1024, 8)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    dev = "cuda" if gpu else "cpu"
    gen = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn(n, n, device=dev, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=dev, dtype=dtype, generator=gen)
    for _ in range(3):
        c = a @ b
    rates = []
    for _ in range(trials):
        start = clock()
        for _ in range(reps):
            c = a @ b
        rates.append(2 * n**3 * reps / (clock() - start))
    del a, b, c
    if gpu:
        torch.cuda.empty_cache()
    return {"n": n, "dtype": dtype_name, "reps_per_trial": reps, "peak_flops": max(rates),
            "median_flops": statistics.median(rates), "trial_flops": rates}


# ------------------------------------------------------------------------------------------- rows, trials, summary

def synthetic_rows(spec: dict) -> "Any":
    """n × seq_len token ids (never the 4 special ids), the same for both sides."""
    import numpy as np

    n = spec["batch_size"] * spec["grad_accum"] * spec["total_steps"]
    rng = np.random.default_rng(spec["seed"])
    return rng.integers(4, spec["vocab_size"], size=(n, spec["seq_len"]), dtype=np.int64)


def trial_times(step_seconds: list[float], spec: dict) -> list[float]:
    timed = step_seconds[spec["warmup"]:]
    return [sum(timed[i * spec["steps"]:(i + 1) * spec["steps"]]) for i in range(spec["trials"])]


def timed_trials(run, trials: int) -> tuple[list[float], list[list[int]]]:
    """Wall-clock seconds per trial after one untimed warm-up; generate_batched returns Python lists, so the
    device has finished when the clock is read."""
    outputs = run()
    seconds = []
    for _ in range(trials):
        start = time.perf_counter()
        outputs = run()
        seconds.append(time.perf_counter() - start)
    return seconds, outputs


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def spread(values: Sequence[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "trials": list(values)}


def scaled(stats: dict[str, Any], factor: float) -> dict[str, Any]:
    return {k: ([v * factor for v in x] if isinstance(x, list) else x * factor) for k, x in stats.items()}


def summarise(raw: dict, spec: dict, params: int, peak_flops: float) -> dict:
    """Tokens/s (trained = target tokens, all = positions through the forward), MFU and memory of one side."""
    if "error" in raw:
        return raw
    trained = spec["batch_size"] * spec["grad_accum"] * (spec["seq_len"] - spec["seq_len"] // 2)
    positions = raw["forward_positions_per_step"]
    trials = raw["trial_seconds"]
    trained_tps = [trained * spec["steps"] / s for s in trials]
    all_tps = [positions * spec["steps"] / s for s in trials]
    recompute = 2 if raw["setup"]["grad_checkpoint"] else 0
    timed = raw["step_seconds"][spec["warmup"]:]
    return {
        "trained_tokens_per_step": trained, "all_tokens_per_step": positions,
        "step_seconds": {"median": statistics.median(timed), "min": min(timed), "max": max(timed)},
        "trained_tokens_per_second": spread(trained_tps),
        "all_tokens_per_second": spread(all_tps),
        "mfu": scaled(spread(all_tps), 4 * params / peak_flops),
        "hfu": scaled(spread(all_tps), (4 + recompute) * params / peak_flops),
        "peak_memory_gb": raw["peak_memory_gb"], **({"peak_reserved_gb": raw["peak_reserved_gb"]}
                                                    if "peak_reserved_gb" in raw else {}),
        "memory_kind": raw["memory_kind"], "model_memory_gb": raw["model_memory_gb"],
        "load_peak_memory_gb": raw["load_peak_memory_gb"], "load_seconds": raw["load_seconds"],
        "process_seconds": raw.get("process_seconds"),
        "loss": {"first": raw["losses"][0] if raw["losses"] else None,
                 "last": raw["losses"][-1] if raw["losses"] else None},
        "warmup_step_seconds": raw["step_seconds"][:spec["warmup"]],
        "setup": raw["setup"],
    }


def ratio(a: dict, b: dict, key: str) -> float | None:
    if "error" in a or "error" in b:
        return None
    va = a[key]["median"] if isinstance(a[key], dict) else a[key]
    vb = b[key]["median"] if isinstance(b[key], dict) else b[key]
    return round(va / vb, 4) if vb else None


# ------------------------------------------------------------------------------------------------ worker processes

def run_worker(name: str, spec: dict[str, Any], work: Path, label: str) -> dict[str, Any]:
    """MODULE:WORKER in a fresh interpreter; its output goes to WORK/LABEL.log, whose tail is shown if it fails."""
    spec_path, result_path, log_path = (work / f"{label}.{s}" for s in ("spec.json", "result.json", "log"))
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    # One GPU for every side: on a 2-GPU machine (Kaggle's 2×T4) Trainer would otherwise wrap the model in
    # DataParallel while trmlx (no torchrun here) uses one device.
    env.setdefault("CUDA_VISIBLE_DEVICES", "0")
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, "-m", "trmlx.bench.harness", name, str(spec_path), str(result_path)],
                              stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode == 0 and result_path.is_file():
        return {**json.loads(result_path.read_text()), "process_seconds": round(time.perf_counter() - start, 2)}
    lines = log_path.read_text(errors="replace").strip().splitlines()
    print(f"  {label}: failed (exit {proc.returncode}):\n    " + "\n    ".join(lines[-12:]), file=sys.stderr)
    return {"error": (lines[-1] if lines else f"exit code {proc.returncode}")[:300]}


def main(argv: list[str]) -> None:
    """MODULE:WORKER SPEC.json RESULT.json — one worker of a bench task module, its result as JSON."""
    name, spec_path, result_path = argv
    module, _, worker = name.rpartition(":")
    result = importlib.import_module(module).WORKERS[worker](json.loads(Path(spec_path).read_text()))
    Path(result_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
