"""Fit `trmlx plan`'s activation, logits and prefill coefficients (trmlx.plan.CALIBRATION) to measured peaks.

Tiny random Llamas of several shapes (trmlx.tiny, built offline) are trained for a few steps and then generate, on
each installed backend, through trmlx bench's own worker (trmlx.bench.causal.worker_trmlx: the real load, train
loop and batched generation); the peaks are MLX's mx.get_peak_memory() and, for torch, the allocator-level peak
from the profiler's memory events. Everything in the plan that is arithmetic (weights, adapter, optimizer, KV
cache) is subtracted; the remaining bytes are fitted, per backend, by non-negative least squares on the relative
error to the plan's per-token features (hidden size, q/k/v width, MLP width, heads × positions, vocabulary). Every
measured configuration is then re-planned with the fitted coefficients and its error printed.

    python benchmarks/plan_calibration.py [--backends mlx,cuda] [--out benchmarks/results]

Prints the table and the CALIBRATION entries to paste into trmlx/plan.py; writes
benchmarks/results/plan_calibration-<device>.json (every measurement, the fit and the errors).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "quickstart.toml"
TRAIN_KEYS = ("act_h", "act_qkv", "act_mlp", "act_scores", "ckpt_h", "ckpt_layer_h", "ckpt_layer_qkv",
              "ckpt_layer_mlp", "ckpt_layer_scores", "logits_fp32", "quant_logits_fp32")
EVAL_KEYS = ("prefill_h", "prefill_mlp", "prefill_scores")

# trmlx.tiny.build_tiny_llama keyword arguments (defaults: vocab 1024, hidden 64, 2 layers, 4 heads, 2 kv heads,
# MLP 128 — the quickstart model's shape).
SHAPES = {
    "quick": {},
    "v4k": {"vocab_size": 4096},
    "l8": {"num_layers": 8},
    "mlp512": {"intermediate_size": 512},
    "h256": {"hidden_size": 256, "intermediate_size": 512},
    "h256l6": {"hidden_size": 256, "intermediate_size": 512, "num_layers": 6},
    "mixed": {"hidden_size": 128, "intermediate_size": 384, "num_heads": 8, "num_kv_heads": 4, "num_layers": 3,
              "vocab_size": 2048},
    "cq-tiny": {"hidden_size": 128, "intermediate_size": 352, "num_heads": 4, "num_kv_heads": 4},
}
# (shape, batch, seq_len, grad_checkpoint, quantize_bits, rank, peft.layers[, eval batch, default 4])
CONFIGS = [
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
    # short prompts and wide eval batches (bench's default rows: eval.batch_size of the recipe, prompt = seq / 2)
    ("quick", 2, 32, False, 0, 8, 0, 16), ("quick", 2, 16, False, 0, 8, 0, 16), ("quick", 4, 64, False, 0, 8, 0, 16),
    ("mixed", 2, 32, False, 0, 8, 0, 16), ("h256", 2, 32, False, 0, 8, 0, 8), ("l8", 2, 32, False, 0, 8, 0, 16),
    ("cq-tiny", 2, 32, False, 0, 8, 0, 8),
]


def spec_for(backend: str, model_dir: Path, vocab: int, cfg: tuple, n_layers: int) -> dict:
    _, batch, seq, ckpt, bits, rank, layers = cfg[:7]
    eval_batch = cfg[7] if len(cfg) > 7 else 4
    return {"backend": backend, "recipe": str(RECIPE), "model_dir": str(model_dir),
            "overrides": [f"model.quantize_bits={bits}", f"peft.rank={rank}", f"peft.layers={layers}"],
            "seq_len": seq, "batch_size": batch, "grad_accum": 1, "warmup": 1, "steps": 1, "trials": 1,
            "total_steps": 4, "seed": 0, "vocab_size": vocab, "grad_checkpoint": ckpt, "lr_warmup_steps": 0,
            "lora_layers": layers or n_layers, "eval_batch_size": eval_batch, "prompt_len": seq // 2, "max_new_tokens": 8}


def measure(backends: list[str], work: Path) -> list[dict]:
    from trmlx.bench.causal import worker_trmlx
    from trmlx.tiny import build_tiny_llama, shipped_texts

    texts = shipped_texts(REPO / "recipes" / "data" / "en_tr")
    rows = []
    for cfg in CONFIGS:
        model_dir = work / cfg[0]
        if not (model_dir / "config.json").is_file():
            build_tiny_llama(model_dir, texts, **SHAPES[cfg[0]])
        config = json.loads((model_dir / "config.json").read_text())
        for backend in backends:
            spec = spec_for(backend, model_dir, config["vocab_size"], cfg, config["num_hidden_layers"])
            start = time.perf_counter()
            try:
                raw = worker_trmlx(spec)
            except Exception as err:  # e.g. bitsandbytes' CPU kernels reject some shapes: skip, say so
                print(f"{backend:5} {cfg}: failed ({type(err).__name__}: {err})", file=sys.stderr)
                continue
            rows.append({"backend": backend, "config": list(cfg), "spec": spec, "kind": raw["device_kind"],
                         "model_config": config,
                         "train_peak": raw["peak_memory_gb"] * 1e9, "eval_peak": raw["generation"]["peak_memory_gb"]
                         * 1e9, "counter": raw["memory_kind"]})
            print(f"{backend:5} {cfg}: train {rows[-1]['train_peak'] / 1e6:8.3f} MB, eval "
                  f"{rows[-1]['eval_peak'] / 1e6:7.3f} MB ({time.perf_counter() - start:.1f} s)", file=sys.stderr)
    return rows


def plan_of(row: dict, coefficients: dict):
    from trmlx.plan import ModelShape, make_target, plan_memory
    from trmlx.recipe import load_recipe

    spec = row["spec"]  # the model folder is gone by now: its config.json was kept with the row
    recipe = load_recipe(spec["recipe"], spec["overrides"], backend=spec["backend"])
    shape = ModelShape.from_config(row["model_config"], row["config"][0])
    return plan_memory(recipe, spec["backend"], shape, make_target(recipe, spec["backend"], shape, row["kind"]),
                       batch_size=spec["batch_size"], grad_accum=1, grad_checkpoint=spec["grad_checkpoint"],
                       seq_len=spec["seq_len"], eval_batch_size=spec["eval_batch_size"],
                       prompt_len=spec["prompt_len"], max_new_tokens=spec["max_new_tokens"],
                       coefficients=coefficients)


def fit(rows: list[dict], keys: tuple[str, ...], phase: str) -> dict[str, float]:
    """NNLS on relative error: the plan is linear in its coefficients, so one plan per unit coefficient gives the
    feature columns and the all-zero plan the arithmetic part."""
    import numpy as np
    from scipy.optimize import nnls

    zero = {k: 0.0 for k in TRAIN_KEYS + EVAL_KEYS}
    columns, target = [], []
    for row in rows:
        measured = row[f"{phase}_peak"]
        base = getattr(plan_of(row, zero), f"{phase}_peak")
        columns.append([(getattr(plan_of(row, {**zero, k: 1.0}), f"{phase}_peak") - base) / measured for k in keys])
        target.append((measured - base) / measured)
    solution, _ = nnls(np.array(columns), np.array(target))
    return {k: round(float(v), 3) for k, v in zip(keys, solution)}


def errors_of(rows: list[dict], fitted: dict[str, dict[str, float]], plan_of) -> list[dict]:
    """Every measured configuration re-planned with the fitted coefficients of its backend family."""
    out = []
    for row in rows:
        plan = plan_of(row, fitted["mlx" if row["backend"] == "mlx" else "torch"])
        out.append({"backend": row["backend"], "config": row["config"],
                    "train_measured_mb": round(row["train_peak"] / 1e6, 3),
                    "train_planned_mb": round(plan.train_peak / 1e6, 3),
                    "train_error_pct": round(100 * (plan.train_peak / row["train_peak"] - 1), 1),
                    "eval_measured_mb": round(row["eval_peak"] / 1e6, 3),
                    "eval_planned_mb": round(plan.eval_peak / 1e6, 3),
                    "eval_error_pct": round(100 * (plan.eval_peak / row["eval_peak"] - 1), 1)})
    return out


def report(benchmark: str, rows: list[dict], fitted: dict, in_use: dict, plan_of, out: Path) -> None:
    """Print every configuration's error and the CALIBRATION to paste; write OUT/<benchmark>-<device>.json.
    Shared by the seq2seq and embedding calibration scripts."""
    from trmlx.rundir import atomic_write, environment_record

    errors = errors_of([r for r in rows if ("mlx" if r["backend"] == "mlx" else "torch") in fitted], fitted, plan_of)
    print("backend config | train measured / planned MB, error | eval measured / planned MB, error")
    for e in errors:
        print(f"{e['backend']:5} {e['config']} | {e['train_measured_mb']:8.3f} / {e['train_planned_mb']:8.3f} "
              f"{e['train_error_pct']:+6.1f}% | {e['eval_measured_mb']:7.3f} / {e['eval_planned_mb']:7.3f} "
              f"{e['eval_error_pct']:+6.1f}%")
    worst = max(abs(e[k]) for e in errors for k in ("train_error_pct", "eval_error_pct"))
    print(f"largest error {worst:.1f}%")
    print("CALIBRATION = " + json.dumps(fitted, indent=4))
    atomic_write(out / f"{benchmark}-{rows[0]['kind']}.json", json.dumps(
        {"benchmark": benchmark, "fitted": fitted, "in_use": in_use, "errors": errors, "largest_error_pct": worst,
         "measurements": rows, "environment": environment_record()}, indent=2) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="mlx,cuda")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--refit", type=Path, help="fit again from a saved result file (no measuring)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from trmlx.plan import CALIBRATION
    from trmlx.rundir import atomic_write

    if args.refit:
        rows = json.loads(args.refit.read_text())["measurements"]
    else:
        with tempfile.TemporaryDirectory(prefix="trmlx-plan-calibration-") as tmp:
            rows = measure(args.backends.split(","), Path(tmp))
        # Kept before fitting, so a failed fit can be redone with --refit without measuring again.
        atomic_write(Path(tempfile.gettempdir()) / "plan_calibration-measurements.json",
                     json.dumps({"measurements": rows}))
    fitted = {}
    for family, backend in (("mlx", "mlx"), ("torch", "cuda")):
        mine = [r for r in rows if r["backend"] == backend]
        if mine:
            fitted[family] = {**fit(mine, TRAIN_KEYS, "train"), **fit(mine, EVAL_KEYS, "eval")}
    report("plan_calibration", rows, fitted, CALIBRATION, plan_of, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
