"""The causal task's bench workers, one process per side and configuration (trmlx.bench.harness runs them):

  trmlx    the real trmlx path through the Backend protocol: backend.load(recipe) (quantised at load),
           backend.train(...) on synthetic rows of exactly seq_len tokens (loss on the second half), then batched
           eval generation with trmlx.evaluate.generate_batched
  mlx-lm   the MLX peer: mlx_lm's own LoRA trainer (tuner.trainer.train) on the same token ids, LoRA and batch
  hf       the CUDA peer: trmlx.bench.hf_causal (Trainer + peft + bitsandbytes)

The seq2seq and embedding workers reuse `worker_trmlx` with their own rows.
"""

from __future__ import annotations

import gc
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from trmlx.bench.harness import (Probe, max_rss, measure_matmul, synthetic_rows, time_training, timed_trials,
                                 trial_times)

# ------------------------------------------------------------------------------------------------------ workers

def synthetic_examples(spec: dict[str, Any]):
    """harness.synthetic_rows as trmlx Examples: loss on the second half of every row."""
    from trmlx.data.examples import Example

    rows = synthetic_rows(spec)
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
    """trmlx's own path (module docstring); the raw format every worker returns, plus memory and generation.
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
    with tempfile.TemporaryDirectory() as run_dir:
        reports = backend.train(loaded, recipe, examples, [], Path(run_dir))  # no validation set: train reports
        step_seconds, losses, train_peak = time_training(reports, probe, train_steps)
    train_peak -= baseline
    gc.collect()
    rng = __import__("numpy").random.default_rng(spec["seed"] + 1)
    prompts = [[int(t) for t in rng.integers(4, spec["vocab_size"], spec["prompt_len"])]
               for _ in range(spec["eval_batch_size"])]
    settings = GenerationSettings(max_new_tokens=spec["max_new_tokens"])
    generate = lambda: generate_batched(backend, loaded, prompts, settings, spec["eval_batch_size"])  # noqa: E731
    gen_seconds, outputs = timed_trials(generate, spec["trials"])
    # MLX's peak varies by a few % run to run (async evaluation overlaps steps by timing): the highest of three.
    # torch on a CPU counts allocation events, which repeat exactly: one run.
    gen_peak = max(probe.peak_of(generate)[1] for _ in range(3 if probe.mlx else 1))
    gen_peak -= baseline
    trainable = _trainable_parameters(loaded.model, spec["backend"])
    return {"step_seconds": step_seconds, "trial_seconds": trial_times(step_seconds, spec), "losses": losses,
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
                      "trainable_parameters": trainable, "loss": loss_layer(loaded, spec["backend"])}}


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
    dataset = CacheDataset(TokenDataset(synthetic_examples(spec)))
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
    return {"step_seconds": step_seconds, "trial_seconds": trial_times(step_seconds, spec),
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


class TokenIds(list):
    """Token ids that carry their loss offset (the prompt length: mlx-lm's first target position)."""

    offset = 0


class TokenDataset:
    """trmlx's examples as an mlx-lm dataset: raw item = the token ids (so CacheDataset sorts by length),
    process() = (ids, offset)."""

    def __init__(self, examples: Sequence[Any]):
        self._items = []
        for e in examples:
            ids = TokenIds(e.input_ids)
            ids.offset = e.prompt_len
            self._items.append(ids)

    def __getitem__(self, idx: int) -> TokenIds:
        return self._items[idx]

    def process(self, ids: TokenIds) -> tuple[list[int], int]:
        return list(ids), ids.offset

    def __len__(self) -> int:
        return len(self._items)


def _positions(seq_len: int) -> int:
    from trmlx.plan.causal import padded_positions

    return padded_positions(seq_len)


def loss_layer(loaded: Any, backend: str) -> str:
    """Which loss layer the timed steps ran, for the record: liger-kernel's fused linear cross-entropy (CUDA, where
    installed), trmlx's chunked one, or the full logits."""
    chunk = loaded.handle.get("loss_chunk", 0)
    if not chunk:
        return "unchunked logits"
    if backend == "cuda":
        import torch

        from trmlx.backends.cuda.loss import liger_loss
        from trmlx.backends.cuda.model import device

        if liger_loss(torch.empty(0, device=device())) is not None:
            return "liger-kernel fused linear cross-entropy"
    return f"chunked, {chunk} target rows at a time"


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
PEERS = {"mlx": "mlx-lm", "cuda": "hf"}  # hf: a worker of trmlx.bench.hf_causal
PEER_NEEDS = {"mlx-lm": ("mlx_lm",), "hf": ("transformers", "peft", "accelerate")}


def spec_fields(recipe: Any, shape: Any, seq_len: int) -> dict[str, Any]:
    from trmlx.plan.causal import target_names

    return {"lora_layers": recipe.peft.layers or shape.num_layers,
            "lora_keys": target_names(shape, recipe.peft.targets)}


def plan_settings(spec: dict[str, Any]) -> dict[str, Any]:
    """plan_memory's keywords for exactly the configuration a spec measures."""
    return {"batch_size": spec["batch_size"], "grad_accum": spec["grad_accum"],
            "grad_checkpoint": spec["grad_checkpoint"], "seq_len": spec["seq_len"],
            "eval_batch_size": spec["eval_batch_size"], "prompt_len": spec["prompt_len"],
            "max_new_tokens": spec["max_new_tokens"],
            "target_tokens": spec["batch_size"] * (spec["seq_len"] - spec["seq_len"] // 2)}  # synthetic_examples
