"""Fit the seq2seq planner's coefficients (trmlx.plan_seq2seq.CALIBRATION) to measured peaks: the seq2seq sibling
of plan_calibration.py, with the same method.

Tiny random mT5s of several shapes (trmlx.tiny_t5, built offline) train a few steps and then generate, on each
installed backend, through trmlx bench's own seq2seq worker (trmlx.bench.seq2seq.worker_trmlx: the real load, train
loop and batched generation; MLX's mx.get_peak_memory(), torch's allocator-level peak from the profiler). The
arithmetic terms are subtracted and the rest is fitted per backend by non-negative least squares on the relative
error (as plan_calibration.py); every configuration is then re-planned and its error printed.

    python benchmarks/plan_calibration_seq2seq.py [--backends mlx,cuda] [--out benchmarks/results] [--refit FILE]

Writes benchmarks/results/plan_calibration_seq2seq-<device>.json; paste the printed CALIBRATION into
trmlx/plan_seq2seq.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "seq2seq_quickstart.toml"

# trmlx.tiny_t5.build_tiny_t5 keywords (defaults: vocab 1024, d_model 64, d_ff 128, 2 layers, 4 heads: the
# quickstart model).
SHAPES = {
    "quick": {}, "v4k": {"vocab_size": 4096}, "l4": {"num_layers": 4}, "ff512": {"d_ff": 512},
    "d128": {"d_model": 128, "d_ff": 256}, "h8": {"d_model": 128, "d_ff": 256, "num_heads": 8, "num_layers": 3,
                                                  "vocab_size": 2048},
}
# (shape, batch, source, target, grad_checkpoint, quantize_bits, peft.layers, eval batch, max_new_tokens)
CONFIGS = [
    ("quick", 4, 64, 16, False, 0, 0, 4, 8), ("quick", 8, 128, 32, False, 0, 0, 4, 8),
    ("quick", 2, 256, 16, False, 0, 0, 8, 16), ("quick", 4, 128, 64, True, 0, 0, 4, 8),
    ("quick", 4, 128, 32, False, 4, 0, 4, 8), ("quick", 2, 32, 48, False, 0, 0, 16, 4),
    ("quick", 8, 192, 48, False, 0, 0, 16, 32), ("quick", 8, 192, 48, True, 0, 0, 16, 32),
    ("v4k", 4, 64, 32, False, 0, 0, 4, 8), ("v4k", 4, 128, 32, True, 0, 0, 8, 8),
    ("l4", 4, 128, 32, False, 0, 0, 4, 8), ("l4", 4, 128, 32, True, 0, 0, 4, 8), ("l4", 4, 128, 32, False, 0, 1, 4, 8),
    ("ff512", 4, 128, 32, False, 0, 0, 4, 8), ("ff512", 2, 64, 64, True, 4, 0, 4, 8),
    ("d128", 4, 128, 32, False, 0, 0, 4, 8), ("d128", 4, 256, 32, True, 0, 0, 8, 16),
    ("d128", 2, 128, 16, False, 4, 0, 4, 8),
    ("h8", 4, 128, 32, False, 0, 0, 4, 8), ("h8", 2, 256, 64, True, 0, 0, 4, 8), ("h8", 8, 64, 16, False, 4, 0, 16, 8),
]


def spec_for(backend: str, model_dir: Path, config: dict, cfg: tuple) -> dict:
    _, batch, src, tgt, ckpt, bits, layers, eval_batch, new = cfg
    return {"backend": backend, "recipe": str(RECIPE), "model_dir": str(model_dir),
            "overrides": [f"model.quantize_bits={bits}", f"peft.layers={layers}"], "seq_len": src,
            "target_len": tgt, "batch_size": batch, "grad_accum": 1, "warmup": 1, "steps": 1, "trials": 1,
            "total_steps": 4, "seed": 0, "vocab_size": config["vocab_size"], "grad_checkpoint": ckpt,
            "lr_warmup_steps": 0, "eval_batch_size": eval_batch, "prompt_len": src, "max_new_tokens": new}


def measure(backends: list[str], work: Path) -> list[dict]:
    from trmlx.bench.seq2seq import worker_trmlx
    from trmlx.tiny_t5 import DEFAULT_DATA, build_tiny_t5, shipped_texts

    texts = shipped_texts([REPO / d for d in DEFAULT_DATA])
    rows = []
    for cfg in CONFIGS:
        model_dir = work / cfg[0]
        if not (model_dir / "config.json").is_file():
            build_tiny_t5(model_dir, texts, **SHAPES[cfg[0]])
        config = json.loads((model_dir / "config.json").read_text())
        for backend in backends:
            spec = spec_for(backend, model_dir, config, cfg)
            start = time.perf_counter()
            try:
                raw = worker_trmlx(spec)
            except Exception as err:  # e.g. bitsandbytes' CPU kernels reject some shapes: skip, say so
                print(f"{backend:5} {cfg}: failed ({type(err).__name__}: {err})", file=sys.stderr)
                continue
            rows.append({"backend": backend, "config": list(cfg), "spec": spec, "kind": raw["device_kind"],
                         "model_config": config, "train_peak": raw["peak_memory_gb"] * 1e9,
                         "eval_peak": raw["generation"]["peak_memory_gb"] * 1e9, "counter": raw["memory_kind"]})
            print(f"{backend:5} {cfg}: train {rows[-1]['train_peak'] / 1e6:8.3f} MB, eval "
                  f"{rows[-1]['eval_peak'] / 1e6:7.3f} MB ({time.perf_counter() - start:.1f} s)", file=sys.stderr)
    return rows


def plan_of(row: dict, coefficients: dict):
    from trmlx.plan import make_target
    from trmlx.plan_seq2seq import Seq2SeqShape, plan_memory
    from trmlx.recipe import load_recipe

    spec = row["spec"]
    recipe = load_recipe(spec["recipe"], spec["overrides"], backend=spec["backend"])
    shape = Seq2SeqShape.from_config(row["model_config"], row["config"][0])
    return plan_memory(recipe, spec["backend"], shape, make_target(recipe, spec["backend"], shape, row["kind"]),
                       batch_size=spec["batch_size"], grad_accum=1, grad_checkpoint=spec["grad_checkpoint"],
                       seq_len=spec["seq_len"], target_len=spec["target_len"],
                       eval_batch_size=spec["eval_batch_size"], prompt_len=spec["prompt_len"],
                       max_new_tokens=spec["max_new_tokens"], coefficients=coefficients)


def fit(rows: list[dict], keys: tuple[str, ...], phase: str) -> dict[str, float]:
    """NNLS on relative error: the plan is linear in its coefficients (one plan per unit coefficient gives the
    feature columns, the all-zero plan the arithmetic part), as plan_calibration.fit does for causal LMs."""
    import numpy as np
    from scipy.optimize import nnls

    from trmlx.plan_seq2seq import EVAL_KEYS, TRAIN_KEYS

    zero = {k: 0.0 for k in TRAIN_KEYS + EVAL_KEYS}
    columns, target = [], []
    for row in rows:
        measured = row[f"{phase}_peak"]
        base = getattr(plan_of(row, zero), f"{phase}_peak")
        columns.append([(getattr(plan_of(row, {**zero, k: 1.0}), f"{phase}_peak") - base) / measured for k in keys])
        target.append((measured - base) / measured)
    solution, _ = nnls(np.array(columns), np.array(target))
    if phase == "eval":  # eval takes the larger of the encoder pass and decoding: not linear, so refine from NNLS
        from scipy.optimize import least_squares

        def errors(values):
            coefficients = {**zero, **dict(zip(keys, values))}
            return [plan_of(row, coefficients).eval_peak / row["eval_peak"] - 1 for row in rows]

        solution = least_squares(errors, solution + 0.1, bounds=(0, np.inf)).x
    return {k: round(float(v), 3) for k, v in zip(keys, solution)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="mlx,cuda")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--refit", type=Path, help="fit again from a saved result file (no measuring)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from trmlx.plan_seq2seq import CALIBRATION, EVAL_KEYS, TRAIN_KEYS
    from plan_calibration import report
    from trmlx.rundir import atomic_write

    if args.refit:
        rows = json.loads(args.refit.read_text())["measurements"]
    else:
        with tempfile.TemporaryDirectory(prefix="trmlx-plan-calibration-s2s-") as tmp:
            rows = measure(args.backends.split(","), Path(tmp))
        atomic_write(Path(tempfile.gettempdir()) / "plan_calibration_seq2seq-measurements.json",
                     json.dumps({"measurements": rows}))
    fitted = {}
    for family, backend in (("mlx", "mlx"), ("torch", "cuda")):
        mine = [r for r in rows if r["backend"] == backend]
        if mine:
            fitted[family] = {**fit(mine, TRAIN_KEYS, "train"), **fit(mine, EVAL_KEYS, "eval")}
    report("plan_calibration_seq2seq", rows, fitted, CALIBRATION, plan_of, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
