"""The processes `trmlx bench` starts, one per (backend or peer, configuration), so peak counters never mix:

  trmlx    the real trmlx path through the Backend protocol: backend.load(recipe) (quantised at load),
           backend.train(...) on synthetic rows of exactly seq_len tokens (loss on the second half), then batched
           eval generation with trmlx.evaluate.generate_batched
  mlx-lm   the MLX peer: mlx_lm's own LoRA trainer (tuner.trainer.train) on the same token ids, LoRA and batch
  hf       the CUDA peer: benchmarks/cuda_qlora.py's Trainer + peft + bitsandbytes worker (run by that script)

The measuring helpers are the benchmark scripts' own (benchmarks/cuda_qlora.py: clocks, matmul rate, the HF
worker, the summary; mlx_vs_mlx_lm.py: the token dataset for mlx-lm; generation_batching.py: timed trials).
Every worker returns cuda_qlora's raw format, so one `summarise` serves all sides.

Peak memory, as each counter sees it: MLX mx.get_peak_memory() (reset when the loop starts; weights included);
torch on a GPU torch.cuda.max_memory_allocated(); torch on a CPU, which keeps no allocator statistics, the
profiler's memory events over two more training steps (and one generation) plus the bytes of the tensors alive
when profiling starts — the allocator-level peak, comparable with the GPU counter, unlike the process RSS (also
recorded), which holds ~0.4 GB of Python and libraries no model formula describes.

    python -m trmlx.bench_workers NAME SPEC.json RESULT.json
"""

from __future__ import annotations

import gc
import importlib
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "benchmarks"


def benchmark_module(name: str):
    """A script of benchmarks/ as a module (bench reuses their measuring code; they need a source checkout)."""
    from trmlx.errors import UserError

    path = BENCHMARKS / f"{name}.py"
    if not path.is_file():
        raise UserError(f"trmlx bench reuses benchmarks/{name}.py, which this installation lacks; run it from a "
                        "source checkout (pip install -e .)")
    module = sys.modules.get(f"trmlx_benchmarks_{name}")
    if module is None:
        spec = importlib.util.spec_from_file_location(f"trmlx_benchmarks_{name}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return module


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
    return benchmark_module("load_memory").max_rss_bytes()


# -------------------------------------------------------------------------------------------------- matmul rate

def measure_matmul(backend: str) -> dict[str, Any]:
    """The device's dense matmul rate (MFU's denominator): cuda_qlora.measure_matmul for torch; the same
    n×n×n timing with MLX arrays for MLX (bf16 8192² on a GPU, fp32 1024² on a CPU)."""
    if backend != "mlx":
        import torch

        cq = benchmark_module("cuda_qlora")
        dtype = ("bf16" if cq.native_bf16() else "fp16") if torch.cuda.is_available() else "fp32"
        return cq.measure_matmul(dtype)
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


# ------------------------------------------------------------------------------------------------------ workers

def synthetic_examples(spec: dict[str, Any]):
    """cuda_qlora.synthetic_rows as trmlx Examples: loss on the second half of every row."""
    from trmlx.data.examples import Example

    rows = benchmark_module("cuda_qlora").synthetic_rows(spec)
    half = spec["seq_len"] // 2
    return [Example(tuple(int(t) for t in row), prompt_len=half) for row in rows]


def bench_overrides(spec: dict[str, Any]) -> list[str]:
    """What bench pins on top of the recipe (and the user's --set): model, shape of the batch, step count."""
    return [*spec["overrides"], f"model.path={json.dumps(spec['model_dir'])}",
            f"train.batch_size={spec['batch_size']}", f"train.grad_accum={spec['grad_accum']}",
            f"data.max_length={spec['seq_len']}", "train.epochs=0", f"train.steps={spec['total_steps']}",
            f"train.warmup_steps={spec['lr_warmup_steps']}", "train.log_every=1", "train.eval_every=0",
            "train.save_every=0", f"train.grad_checkpoint={str(spec['grad_checkpoint']).lower()}",
            'train.memory_budget=""']


def worker_trmlx(spec: dict[str, Any], examples: list | None = None) -> dict[str, Any]:
    """trmlx's own path (module docstring); the raw format of cuda_qlora's workers plus memory and generation.
    examples: another task's synthetic rows (default: the causal ones)."""
    from trmlx.backend import GenerationSettings, get_backend
    from trmlx.evaluate import generate_batched
    from trmlx.recipe import load_recipe

    backend = get_backend(spec["backend"])
    probe = Probe(spec["backend"])
    recipe = load_recipe(spec["recipe"], bench_overrides(spec), backend=spec["backend"])
    matmul = measure_matmul(spec["backend"]) if spec.get("measure_matmul") else None
    rss_before = max_rss()
    gc.collect()
    # What other work in this process already holds (nothing in bench's fresh workers; earlier tests or
    # calibration configurations when run in one process) is not this configuration's memory.
    baseline = probe.active()
    start = time.perf_counter()
    loaded = backend.load(recipe)
    load_s = time.perf_counter() - start
    model_bytes = probe.active()
    examples = synthetic_examples(spec) if examples is None else examples
    train_steps = spec["warmup"] + spec["steps"] * spec["trials"]
    step_seconds, losses, train_peak = [], [], 0
    with tempfile.TemporaryDirectory() as run_dir:
        reports = backend.train(loaded, recipe, examples, [], Path(run_dir))  # no validation set: train reports
        previous = probe.clock()
        for report in reports:
            now = probe.clock()
            step_seconds.append(now - previous)
            losses.append(report.loss)
            previous = now
            if len(step_seconds) == train_steps:
                break
        if probe.mlx or probe.gpu:
            train_peak = probe.peak()  # both loops reset the counter when they start
        else:  # two more steps under the profiler (the optimizer state exists by now: the steady-state peak)
            for _ in range(2):
                _, peak = profiled_peak(lambda it=reports: next(it))
                train_peak = max(train_peak, peak)
        reports.close()  # stop at the yield: no end-of-run checkpoint inside the timing or the peak
    train_peak -= baseline
    gc.collect()
    rng = __import__("numpy").random.default_rng(spec["seed"] + 1)
    prompts = [[int(t) for t in rng.integers(4, spec["vocab_size"], spec["prompt_len"])]
               for _ in range(spec["eval_batch_size"])]
    settings = GenerationSettings(max_new_tokens=spec["max_new_tokens"])
    generate = lambda: generate_batched(backend, loaded, prompts, settings, spec["eval_batch_size"])  # noqa: E731
    gen_seconds, outputs = benchmark_module("generation_batching").timed_trials(generate, spec["trials"])
    _, gen_peak = probe.peak_of(generate)
    gen_peak -= baseline
    trainable = _trainable_parameters(loaded.model, spec["backend"])
    return {"step_seconds": step_seconds, "trial_seconds": _trial_times(step_seconds, spec), "losses": losses,
            "load_seconds": load_s, "load_peak_memory_gb": None, "model_memory_gb": (model_bytes - baseline) / 1e9,
            "baseline_memory_gb": baseline / 1e9,
            "forward_positions_per_step": spec["batch_size"] * spec["grad_accum"] * _positions(spec["seq_len"]),
            "peak_memory_gb": train_peak / 1e9, "memory_kind": probe.counter(),
            "rss_peak_gb": max_rss() / 1e9, "rss_before_load_gb": rss_before / 1e9,
            "generation": {"tokens": [sum(len(o) for o in outputs)], "seconds": gen_seconds,
                           "peak_memory_gb": gen_peak / 1e9, "batch_size": spec["eval_batch_size"],
                           "prompt_len": spec["prompt_len"], "max_new_tokens": spec["max_new_tokens"]},
            "device_kind": probe.kind, "matmul": matmul,
            "setup": {"dtype": loaded.handle.get("dtype", _mlx_dtype(loaded)), "grad_checkpoint":
                      recipe.train.grad_checkpoint, "grad_accum": recipe.train.grad_accum,
                      "optimizer": recipe.train.optimizer, "quantize_bits": recipe.model.quantize_bits,
                      "lora": {"rank": recipe.peft.rank, "alpha": recipe.peft.alpha, "dropout": recipe.peft.dropout,
                               "targets": recipe.peft.targets, "layers": recipe.peft.layers},
                      "trainable_parameters": trainable}}


def worker_mlx_lm(spec: dict[str, Any]) -> dict[str, Any]:
    """The MLX peer: mlx_lm.tuner.trainer.train with mlx-lm's LoRA layers on the same rows, batch and LoRA; a user's
    pre-quantised model is stood in for by nn.quantize after loading (same g/bits)."""
    from trmlx.backends.mlx import device as _blas  # noqa: F401  chooses the BLAS before mlx loads
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_lm.tuner import trainer
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load

    from trmlx.recipe import load_recipe

    recipe = load_recipe(spec["recipe"], bench_overrides(spec), backend="mlx")
    np.random.seed(spec["seed"])
    mx.random.seed(spec["seed"])
    start = time.perf_counter()
    model, _ = load(spec["model_dir"])
    if recipe.model.quantize_bits:
        mode = "affine" if recipe.model.quant_mode == "auto" else recipe.model.quant_mode
        nn.quantize(model, group_size=recipe.model.quant_group_size, bits=recipe.model.quantize_bits, mode=mode)
    model.freeze()
    peft = recipe.peft
    linear_to_lora_layers(model, peft.layers or len(model.layers),
                          {"rank": peft.rank, "scale": peft.alpha / peft.rank, "dropout": peft.dropout,
                           "keys": spec["lora_keys"]}, use_dora=peft.method == "dora")
    mx.eval(model.parameters())
    load_s = time.perf_counter() - start
    from mlx_lm.tuner.datasets import CacheDataset

    # mlx_lm.lora wraps its datasets in CacheDataset too (length-sorted batching reads the raw token lists).
    dataset = CacheDataset(benchmark_module("mlx_vs_mlx_lm").TokenDataset(synthetic_examples(spec)))
    total = spec["warmup"] + spec["steps"] * spec["trials"]

    class Recorder(TrainingCallback):
        def __init__(self):
            self.reports: list[dict] = []

        def on_train_loss_report(self, info):
            self.reports.append(dict(info))

    recorder = Recorder()
    optimizer = optim.AdamW(learning_rate=recipe.train.lr, weight_decay=recipe.train.weight_decay,
                            bias_correction=True)
    with tempfile.TemporaryDirectory() as tmp:
        # mlx-lm counts micro-batches as iterations: grad_accum of them make one optimizer step.
        args = trainer.TrainingArgs(batch_size=spec["batch_size"], iters=total * spec["grad_accum"], val_batches=0,
                                    steps_per_report=1,
                                    steps_per_eval=10**9, steps_per_save=10**9, max_seq_length=spec["seq_len"] + 1,
                                    adapter_file=str(Path(tmp) / "adapters.safetensors"),
                                    grad_checkpoint=recipe.train.grad_checkpoint,
                                    grad_accumulation_steps=spec["grad_accum"])
        model_bytes = mx.get_active_memory()
        mx.reset_peak_memory()
        trainer.train(model, optimizer, dataset, None, args=args, training_callback=recorder)
    # mlx-lm's own clock per report (steps_per_report = 1): its step time, device synchronised by mx.eval.
    micro = [1.0 / r["iterations_per_second"] for r in recorder.reports]
    accum = spec["grad_accum"]
    step_seconds = [sum(micro[i:i + accum]) for i in range(0, len(micro), accum)]
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    return {"step_seconds": step_seconds, "trial_seconds": _trial_times(step_seconds, spec),
            "losses": [r["train_loss"] for r in recorder.reports], "load_seconds": load_s,
            "load_peak_memory_gb": None, "model_memory_gb": model_bytes / 1e9,
            "forward_positions_per_step": spec["batch_size"] * spec["grad_accum"] * spec["seq_len"],
            "peak_memory_gb": max(r["peak_memory"] for r in recorder.reports),
            "memory_kind": "mx.get_peak_memory (reset before mlx-lm's train)", "rss_peak_gb": max_rss() / 1e9,
            "setup": {"dtype": str(model.layers[0].input_layernorm.weight.dtype).rsplit(".", 1)[-1],
                      "grad_checkpoint": recipe.train.grad_checkpoint, "grad_accum": spec["grad_accum"],
                      "optimizer": "adamw (bias-corrected)", "quantize_bits": recipe.model.quantize_bits,
                      "lora": {"rank": peft.rank, "scale": peft.alpha / peft.rank, "dropout": peft.dropout,
                               "keys": spec["lora_keys"], "layers": peft.layers},
                      "trainable_parameters": trainable}}


def _positions(seq_len: int) -> int:
    from trmlx.plan import padded_positions

    return padded_positions(seq_len)


def _trial_times(step_seconds: list[float], spec: dict[str, Any]) -> list[float]:
    return benchmark_module("cuda_qlora")._trial_times(step_seconds, spec)


def _trainable_parameters(model: Any, backend: str) -> int:
    if backend == "mlx":
        from mlx.utils import tree_flatten

        return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _mlx_dtype(loaded: Any) -> str:
    from mlx.utils import tree_flatten

    for name, value in tree_flatten(loaded.model.parameters()):
        if name.endswith("norm.weight"):
            return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(str(value.dtype).rsplit(".")[-1],
                                                                                 str(value.dtype))
    return "?"


# ------------------------------------------------------------------- the causal task's bench interface (bench.py)

ROWS = "synthetic, exactly seq_len tokens, loss on the second half"
WORKERS = {"trmlx": worker_trmlx, "mlx-lm": worker_mlx_lm}
PEERS = {"mlx": "mlx-lm", "cuda": "hf"}  # hf: benchmarks/cuda_qlora.py's worker, run by that script
PEER_NEEDS = {"mlx-lm": ("mlx_lm",), "hf": ("transformers", "peft", "accelerate")}


def spec_fields(recipe: Any, shape: Any, seq_len: int) -> dict[str, Any]:
    from trmlx.plan import target_names

    return {"lora_layers": recipe.peft.layers or shape.num_layers,
            "lora_keys": target_names(shape, recipe.peft.targets)}


def plan_settings(spec: dict[str, Any]) -> dict[str, Any]:
    """plan_memory's keywords for exactly the configuration a spec measures."""
    return {"batch_size": spec["batch_size"], "grad_accum": spec["grad_accum"],
            "grad_checkpoint": spec["grad_checkpoint"], "seq_len": spec["seq_len"],
            "eval_batch_size": spec["eval_batch_size"], "prompt_len": spec["prompt_len"],
            "max_new_tokens": spec["max_new_tokens"]}


def main(argv: list[str]) -> None:
    """NAME: a worker of this module, or "module:worker" (another task's bench module, bench.BENCH_TASKS)."""
    name, spec_path, result_path = argv
    module, _, worker = name.rpartition(":")
    workers = importlib.import_module(module).WORKERS if module else WORKERS
    result = workers[worker](json.loads(Path(spec_path).read_text()))
    Path(result_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
