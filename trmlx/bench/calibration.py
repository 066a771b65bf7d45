"""Measured peaks against `trmlx plan`, for every task kind: the tiny random models and configurations each planner
is calibrated on, the measurement (trmlx bench's own worker: the real load, train loop and eval), the plan of the
same configuration, and the NNLS fit of the planner's coefficients.

Used by `benchmarks/plan_calibration.py --task causal|seq2seq|embedding [--width]` (the fit), by
tests/test_plan_accuracy.py (the ±20% check) and tests/test_plan_width.py (the committed 7B-width rows, ±15%). `repo` is a source checkout: the quickstart recipes and the shipped
texts the tiny tokenizers are trained on live there.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from trmlx.bench.run import bench_task


@dataclass(frozen=True)
class Calibration:
    """One task's calibration set: recipe (under repo/recipes), model shapes by name, configurations, and how a
    configuration becomes a bench worker spec (overrides and spec keys besides the common ones)."""

    recipe: str
    shapes: dict[str, Any]
    configs: list[tuple]
    build: Callable[[Path, Any, Path], Path]  # (model folder, shape, repo) -> the model folder
    spec: Callable[[tuple], dict[str, Any]]  # config -> {"overrides": [...], seq_len, batch_size, ...}


def _build_llama(out: Path, shape: dict, repo: Path) -> Path:
    from trmlx.tiny.llama import build_tiny_llama, shipped_texts

    return build_tiny_llama(out, shipped_texts(repo / "recipes" / "data" / "en_tr"), **shape)


def _build_t5(out: Path, shape: dict, repo: Path) -> Path:
    from trmlx.tiny.t5 import DEFAULT_DATA, build_tiny_t5, shipped_texts

    return build_tiny_t5(out, shipped_texts([repo / d for d in DEFAULT_DATA]), **shape)


def _build_encoder(out: Path, shape: tuple, repo: Path) -> Path:
    from trmlx.tiny.encoder import build_encoder

    return build_encoder(out, *shape)


def _causal_spec(cfg: tuple) -> dict[str, Any]:
    """(shape, batch, seq_len, grad_checkpoint, quantize_bits, rank, peft.layers[, eval batch, default 4])"""
    _, batch, seq, ckpt, bits, rank, layers = cfg[:7]
    return {"overrides": [f"model.quantize_bits={bits}", f"peft.rank={rank}", f"peft.layers={layers}"],
            "seq_len": seq, "batch_size": batch, "grad_checkpoint": ckpt, "eval_batch_size": cfg[7] if len(cfg) > 7
            else 4, "prompt_len": seq // 2, "max_new_tokens": 8, "lora_layers": layers}


def _seq2seq_spec(cfg: tuple) -> dict[str, Any]:
    """(shape, batch, source, target, grad_checkpoint, quantize_bits, peft.layers, eval batch, max_new_tokens)"""
    _, batch, src, tgt, ckpt, bits, layers, eval_batch, new = cfg
    return {"overrides": [f"model.quantize_bits={bits}", f"peft.layers={layers}"], "seq_len": src, "target_len": tgt,
            "batch_size": batch, "grad_checkpoint": ckpt, "eval_batch_size": eval_batch, "prompt_len": src,
            "max_new_tokens": new}


def _embedding_spec(cfg: tuple) -> dict[str, Any]:
    """(shape, batch, query_len, passage_len, negatives, grad_checkpoint, mini_batch_size, peft.method)"""
    _, batch, q_len, p_len, negatives, ckpt, chunk, peft = cfg
    return {"overrides": [f"peft.method={json.dumps(peft)}", "peft.dropout=0.0"], "seq_len": p_len,
            "batch_size": batch, "grad_checkpoint": ckpt, "eval_batch_size": 8, "query_len": q_len,
            "passage_len": p_len, "num_negatives": negatives, "mini_batch_size": chunk}


# build_tiny_llama keywords of the real models' widths (trmlx.plan.config.PRESETS: qwen2.5-7b, llama3-8b); the
# layer count is the calibration shape's own
QWEN25_7B_WIDTH = {"vocab_size": 152064, "hidden_size": 3584, "num_heads": 28, "num_kv_heads": 4,
                   "intermediate_size": 18944, "max_position_embeddings": 2048}
LLAMA3_8B_WIDTH = {"vocab_size": 128256, "hidden_size": 4096, "num_heads": 32, "num_kv_heads": 8,
                   "intermediate_size": 14336, "max_position_embeddings": 2048}
ISOLATED = {"causal-width"}  # sets measured one process per configuration (their models are GBs)

TASKS: dict[str, Calibration] = {
    # trmlx.tiny.llama.build_tiny_llama keywords (defaults: vocab 1024, hidden 64, 2 layers, 4 heads, 2 kv heads,
    # MLP 128: the quickstart model's shape)
    "causal": Calibration("quickstart.toml", {
        "quick": {}, "v4k": {"vocab_size": 4096}, "l8": {"num_layers": 8}, "mlp512": {"intermediate_size": 512},
        "h256": {"hidden_size": 256, "intermediate_size": 512},
        "h256l6": {"hidden_size": 256, "intermediate_size": 512, "num_layers": 6},
        "mixed": {"hidden_size": 128, "intermediate_size": 384, "num_heads": 8, "num_kv_heads": 4, "num_layers": 3,
                  "vocab_size": 2048},
        "cq-tiny": {"hidden_size": 128, "intermediate_size": 352, "num_heads": 4, "num_kv_heads": 4},
    }, [
        ("quick", 8, 128, False, 0, 8, 0), ("quick", 2, 128, False, 0, 8, 0), ("quick", 4, 256, False, 0, 8, 0),
        ("quick", 4, 256, True, 0, 8, 0), ("quick", 4, 256, False, 4, 8, 0), ("quick", 1, 64, False, 0, 32, 0),
        ("v4k", 2, 128, False, 0, 8, 0), ("v4k", 4, 256, True, 0, 8, 0),
        ("l8", 2, 128, False, 0, 8, 0), ("l8", 4, 256, True, 0, 8, 0), ("l8", 1, 512, False, 0, 8, 0),
        ("l8", 4, 256, False, 0, 8, 3),
        ("mlp512", 2, 128, False, 0, 8, 0), ("mlp512", 8, 64, False, 0, 8, 0),
        ("h256", 2, 128, False, 0, 8, 0), ("h256", 4, 256, False, 4, 8, 0), ("h256", 4, 256, True, 0, 8, 0),
        ("h256l6", 2, 128, False, 0, 8, 0), ("h256l6", 4, 256, True, 0, 8, 0), ("h256l6", 1, 512, False, 0, 8, 0),
        ("mixed", 4, 256, False, 0, 8, 0), ("mixed", 2, 128, True, 0, 16, 0), ("mixed", 8, 64, False, 4, 8, 0),
        ("cq-tiny", 2, 256, False, 0, 8, 0), ("cq-tiny", 4, 128, True, 0, 8, 0),
        ("l8", 1, 512, True, 0, 8, 0), ("mixed", 4, 256, True, 0, 8, 0), ("h256l6", 2, 128, True, 0, 8, 0),
        ("mlp512", 4, 128, True, 4, 8, 0), ("mixed", 4, 128, True, 4, 8, 0), ("quick", 2, 64, False, 0, 8, 0),
        ("quick", 8, 64, False, 0, 8, 0), ("h256", 2, 64, True, 4, 8, 0),
        # short prompts and wide eval batches (bench's default rows: the recipe's eval.batch_size, prompt = seq / 2)
        ("quick", 2, 32, False, 0, 8, 0, 16), ("quick", 2, 16, False, 0, 8, 0, 16),
        ("quick", 4, 64, False, 0, 8, 0, 16), ("mixed", 2, 32, False, 0, 8, 0, 16), ("h256", 2, 32, False, 0, 8, 0, 8),
        ("l8", 2, 32, False, 0, 8, 0, 16), ("cq-tiny", 2, 32, False, 0, 8, 0, 8),
    ], _build_llama, _causal_spec),
    # The causal planner at 7B width (issue 14 §3): Qwen2.5-7B's and Llama-3-8B's hidden size, heads, MLP and
    # vocabulary with 1-2 layers, fp32 and unquantised (MLX's quantised CPU matmul is ~0.3 GFLOP/s). ~5.3 GB of
    # weights each, so every measurement runs in its own process (WIDTH_ISOLATED) and the batches stay small.
    "causal-width": Calibration("quickstart.toml", {
        "qwen7b-1l": {**QWEN25_7B_WIDTH, "num_layers": 1}, "qwen7b-2l": {**QWEN25_7B_WIDTH, "num_layers": 2},
        "llama3-8b-1l": {**LLAMA3_8B_WIDTH, "num_layers": 1},
    }, [
        # 2-5 min each on a shared 2-core CPU. Target rows (half of each row) span one chunk of the chunked loss
        # (128) to four, where MLX's lazy graph overlaps chunks
        ("qwen7b-1l", 1, 256, False, 0, 8, 0, 2), ("qwen7b-1l", 2, 256, True, 0, 16, 0, 2),
        ("llama3-8b-1l", 2, 128, False, 0, 8, 0, 4), ("qwen7b-2l", 1, 256, True, 0, 8, 0, 2),
        ("qwen7b-1l", 1, 512, False, 0, 8, 0, 1), ("qwen7b-2l", 2, 512, True, 0, 8, 0, 1),
    ], _build_llama, _causal_spec),
    # trmlx.tiny.t5.build_tiny_t5 keywords (defaults: vocab 1024, d_model 64, d_ff 128, 2 layers, 4 heads: the
    # quickstart model)
    "seq2seq": Calibration("seq2seq_quickstart.toml", {
        "quick": {}, "v4k": {"vocab_size": 4096}, "l4": {"num_layers": 4}, "ff512": {"d_ff": 512},
        "d128": {"d_model": 128, "d_ff": 256},
        "h8": {"d_model": 128, "d_ff": 256, "num_heads": 8, "num_layers": 3, "vocab_size": 2048},
    }, [
        ("quick", 4, 64, 16, False, 0, 0, 4, 8), ("quick", 8, 128, 32, False, 0, 0, 4, 8),
        ("quick", 2, 256, 16, False, 0, 0, 8, 16), ("quick", 4, 128, 64, True, 0, 0, 4, 8),
        ("quick", 4, 128, 32, False, 4, 0, 4, 8), ("quick", 2, 32, 48, False, 0, 0, 16, 4),
        ("quick", 8, 192, 48, False, 0, 0, 16, 32), ("quick", 8, 192, 48, True, 0, 0, 16, 32),
        ("v4k", 4, 64, 32, False, 0, 0, 4, 8), ("v4k", 4, 128, 32, True, 0, 0, 8, 8),
        ("l4", 4, 128, 32, False, 0, 0, 4, 8), ("l4", 4, 128, 32, True, 0, 0, 4, 8),
        ("l4", 4, 128, 32, False, 0, 1, 4, 8),
        ("ff512", 4, 128, 32, False, 0, 0, 4, 8), ("ff512", 2, 64, 64, True, 4, 0, 4, 8),
        ("d128", 4, 128, 32, False, 0, 0, 4, 8), ("d128", 4, 256, 32, True, 0, 0, 8, 16),
        ("d128", 2, 128, 16, False, 4, 0, 4, 8),
        ("h8", 4, 128, 32, False, 0, 0, 4, 8), ("h8", 2, 256, 64, True, 0, 0, 4, 8),
        ("h8", 8, 64, 16, False, 4, 0, 16, 8),
    ], _build_t5, _seq2seq_spec),
    # (model_type, hidden, layers, heads, MLP width); configurations from parameter-bound (small batches) to
    # activation-bound (long passages, many texts) so every coefficient has something to fit
    "embedding": Calibration("qa_embed_quickstart.toml", {
        "b32": ("bert", 32, 2, 4, 64), "b64": ("bert", 64, 4, 4, 256), "b128": ("bert", 128, 2, 4, 512),
        "x64": ("xlm-roberta", 64, 3, 4, 128),
    }, [
        ("b32", 8, 16, 32, 1, False, 0, "full"), ("b32", 16, 16, 32, 1, False, 8, "full"),
        ("b32", 16, 32, 128, 1, False, 0, "full"), ("b64", 8, 16, 32, 1, True, 0, "full"),
        ("b64", 16, 32, 64, 3, False, 0, "full"), ("b64", 16, 32, 64, 3, True, 0, "full"),
        ("b64", 16, 32, 64, 3, False, 8, "full"), ("b64", 8, 32, 128, 1, False, 0, "lora"),
        ("b128", 8, 32, 128, 1, False, 0, "full"), ("b128", 16, 32, 64, 1, True, 0, "full"),
        ("b128", 16, 16, 64, 2, False, 8, "full"), ("b128", 16, 32, 64, 1, False, 0, "lora"),
        ("x64", 16, 32, 64, 1, False, 0, "full"), ("x64", 16, 32, 128, 1, False, 4, "full"),
    ], _build_encoder, _embedding_spec),
}


def skipped(task: str, backend: str, cfg: tuple) -> bool:
    """Configurations a backend refuses by design: MLX encoders do not checkpoint."""
    return task == "embedding" and backend == "mlx" and bool(cfg[5])


def spec_for(task: str, backend: str, model_dir: Path, repo: Path, cfg: tuple) -> dict[str, Any]:
    """The bench worker spec of one configuration: one warm-up and one timed step, then eval."""
    config = json.loads((model_dir / "config.json").read_text())
    spec = {"backend": backend, "recipe": str(repo / "recipes" / TASKS[task].recipe), "model_dir": str(model_dir),
            "grad_accum": 1, "warmup": 1, "steps": 1, "trials": 1, "total_steps": 4, "seed": 0, "lr_warmup_steps": 0,
            "vocab_size": config["vocab_size"], **TASKS[task].spec(cfg)}
    if task_of(task) == "causal" and not spec["lora_layers"]:  # peft.layers = 0: every layer
        spec["lora_layers"] = config["num_hidden_layers"]
    return spec


def task_of(name: str) -> str:
    """The task kind of a calibration set (causal-width is a causal set)."""
    return name.split("-")[0]


def measure_one(task: str, backend: str, model_dir: Path, repo: Path, cfg: tuple) -> dict[str, Any]:
    """Train and evaluate one configuration through bench's worker; the row the fit and the tests read. Sets in
    ISOLATED run the worker in a fresh interpreter (harness.run_worker), so no GBs of a previous model or MLX's
    buffer cache stay in the process."""
    spec = spec_for(task, backend, model_dir, repo, cfg)
    if task in ISOLATED:
        from trmlx.bench.harness import run_worker

        label = f"{cfg[0]}-{backend}-{'-'.join(map(str, cfg[1:]))}"
        done = model_dir.parent / f"{label}.result.json"  # a run cut short resumes: finished ones are kept
        raw = json.loads(done.read_text()) if done.is_file() else \
            run_worker(f"{bench_task(task_of(task)).__name__}:trmlx", spec, model_dir.parent, label)
        if "error" in raw:
            raise RuntimeError(raw["error"])
    else:
        raw = _in_process(task, backend, spec)
    return {"task": task, "backend": backend, "config": list(cfg), "spec": spec, "kind": raw["device_kind"],
            "model_config": json.loads((model_dir / "config.json").read_text()),
            "train_peak": raw["peak_memory_gb"] * 1e9, "eval_peak": raw["generation"]["peak_memory_gb"] * 1e9,
            "counter": raw["memory_kind"], "model_bytes": raw["model_memory_gb"] * 1e9,
            "step_seconds": raw["step_seconds"]}


def _in_process(task: str, backend: str, spec: dict[str, Any]) -> dict[str, Any]:
    threads = None
    if backend == "cuda":  # memory, not speed: one thread keeps a busy 2-core machine from stalling torch's pool
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
    try:
        return bench_task(task_of(task)).WORKERS["trmlx"](spec)
    finally:
        if threads is not None:
            torch.set_num_threads(threads)


def build_model(task: str, shape: str, work: Path, repo: Path) -> Path:
    """The shape's random model under work/ (built once)."""
    model_dir = work / shape
    if not (model_dir / "config.json").is_file():
        TASKS[task].build(model_dir, TASKS[task].shapes[shape], repo)
    return model_dir


def measure(task: str, backends: list[str], work: Path, repo: Path) -> list[dict[str, Any]]:
    """Every configuration of the task on every backend; a configuration a backend's kernels reject is skipped
    and said (bitsandbytes' CPU kernels reject some shapes)."""
    rows = []
    for cfg in TASKS[task].configs:
        model_dir = build_model(task, cfg[0], work, repo)
        for backend in backends:
            if skipped(task, backend, cfg):
                continue
            start = time.perf_counter()
            try:
                rows.append(measure_one(task, backend, model_dir, repo, cfg))
            except Exception as err:
                print(f"{backend:5} {cfg}: failed ({type(err).__name__}: {err})", file=sys.stderr)
                continue
            print(f"{backend:5} {cfg}: train {rows[-1]['train_peak'] / 1e6:8.3f} MB, eval "
                  f"{rows[-1]['eval_peak'] / 1e6:7.3f} MB ({time.perf_counter() - start:.1f} s)", file=sys.stderr)
    return rows


def rerooted(row: dict[str, Any], repo: Path) -> dict[str, Any]:
    """A committed row with its recipe found in this checkout (rows name the measuring checkout's path)."""
    return {**row, "spec": {**row["spec"], "recipe": str(repo / "recipes" / Path(row["spec"]["recipe"]).name)}}


def plan_of(row: dict[str, Any], coefficients: dict[str, float] | None = None) -> Any:
    """trmlx plan's prediction for exactly the measured configuration (the model's config.json kept with the row,
    its folder being gone by now); `coefficients` replace the planner's CALIBRATION."""
    from trmlx.plan.base import make_target
    from trmlx.plan.tasks import plan_recipe, shape_from_config
    from trmlx.recipe import load_recipe

    spec = row["spec"]
    recipe = load_recipe(spec["recipe"], spec["overrides"], backend=spec["backend"])
    shape = shape_from_config(recipe.task, row["model_config"], row["config"][0])
    target = make_target(recipe, spec["backend"], shape, row["kind"])
    return plan_recipe(recipe, spec["backend"], shape, target, **bench_task(recipe.task).plan_settings(spec),
                       coefficients=coefficients)
