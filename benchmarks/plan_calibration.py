"""Fit `trmlx plan`'s measured coefficients (the CALIBRATION of trmlx/plan/<task>.py) to measured peaks.

Tiny random models of several shapes (trmlx.tiny: Llamas, mT5s, BERT / XLM-R encoders, built offline) train a few
steps and then generate or encode, on each installed backend, through trmlx bench's own worker (the real load,
train loop and eval; trmlx.bench.calibration holds the shapes and configurations). The peaks are MLX's
mx.get_peak_memory() and, for torch, the allocator-level peak from the profiler's memory events. What the plan
computes exactly (weights, adapter, optimizer, KV cache, similarity matrix) is subtracted; the rest is fitted per
backend family by non-negative least squares on the relative error to the planner's per-token features, and every
configuration is re-planned with the fit and its error printed.

    python benchmarks/plan_calibration.py --task causal|seq2seq|embedding [--backends mlx,cuda]
                                          [--out benchmarks/results] [--refit RESULT.json]
    python benchmarks/plan_calibration.py --width [--work DIR] [--refit RESULT.json]

Prints the table and the CALIBRATION to paste into trmlx/plan/<task>.py; writes
OUT/plan_calibration[_<task>]-<device>.json (every measurement, the fit and the errors). Here: causal ~20 min
(40 configurations), seq2seq ~2 min (21), embedding ~5 min (14).

--width measures the causal planner at 7B width: 1-2 layer random models with Qwen2.5-7B's and Llama-3-8B's
hidden size, heads, MLP and vocabulary, fp32 (~5.3 GB of weights each; ~35 min here, 10 measurements, one process
each). It refits the chunked loss's coefficients (trmlx.plan.causal.WIDTH_KEYS) on those rows, each row's error
taken relative to the part of its peak the coefficients explain (weights are exact), keeps the rest, and writes
OUT/plan_calibration_width-<device>.json.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def fit(rows: list[dict], keys: tuple[str, ...], all_keys: tuple[str, ...], phase: str,
        variable: bool = False, fixed: dict[str, float] | None = None) -> dict[str, float]:
    """NNLS on relative error: the plan is linear in its coefficients, so one plan per unit coefficient gives the
    feature columns and the all-zero plan the arithmetic part. Where a phase takes the larger of sub-phases
    (seq2seq eval: encoder pass, then decoding) it is not linear: refined from the NNLS start. variable: the error
    relative to what the coefficients must explain (the peak less the arithmetic part, at least a quarter of the
    peak), so rows whose peak is mostly exact weights (7B width: ~5.3 GB of weights) weigh as much as tiny ones.
    fixed: the values of the coefficients not fitted (default zero)."""
    import numpy as np
    from scipy.optimize import least_squares, nnls

    from trmlx.bench.calibration import plan_of

    zero = {**{k: 0.0 for k in all_keys}, **{k: v for k, v in (fixed or {}).items() if k not in keys}}
    columns, target = [], []
    for row in rows:
        base = getattr(plan_of(row, zero), f"{phase}_peak")
        peak = row[f"{phase}_peak"]
        measured = max(peak - base, peak / 4) if variable else peak
        columns.append([(getattr(plan_of(row, {**zero, k: 1.0}), f"{phase}_peak") - base) / measured for k in keys])
        target.append((peak - base) / measured)
    solution, _ = nnls(np.array(columns), np.array(target))
    if any(t.phase.startswith(phase + ":") for t in plan_of(rows[0], zero).terms):
        def errors(values):
            coefficients = {**zero, **dict(zip(keys, values))}
            return [getattr(plan_of(row, coefficients), f"{phase}_peak") / row[f"{phase}_peak"] - 1 for row in rows]

        solution = least_squares(errors, solution + 0.1, bounds=(0, np.inf)).x
    return {k: round(float(v), 3) for k, v in zip(keys, solution)}


def errors_of(rows: list[dict], fitted: dict[str, dict[str, float]]) -> list[dict]:
    """Every measured configuration re-planned with the fitted coefficients of its backend family."""
    from trmlx.bench.calibration import plan_of

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


def report(benchmark: str, rows: list[dict], fitted: dict, in_use: dict, out: Path) -> None:
    """Print every configuration's error and the CALIBRATION to paste; write OUT/<benchmark>-<device>.json."""
    from trmlx.rundir import atomic_write, environment_record

    errors = errors_of([r for r in rows if ("mlx" if r["backend"] == "mlx" else "torch") in fitted], fitted)
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
    parser.add_argument("--task", choices=("causal", "seq2seq", "embedding"), default="causal")
    parser.add_argument("--backends", default="mlx,cuda")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--refit", type=Path, help="fit again from a saved result file (no measuring)")
    parser.add_argument("--width", action="store_true", help="causal at 7B width: 1-2 layer random models of "
                        "Qwen2.5-7B's and Llama-3-8B's width (trmlx.bench.calibration 'causal-width'; ~5.3 GB "
                        "each, one process per configuration)")
    parser.add_argument("--work", type=Path, help="keep the models and worker results here (a cut-short run "
                        "resumes); default: a temporary folder")
    args = parser.parse_args()
    from trmlx.bench.calibration import measure, rerooted
    from trmlx.rundir import atomic_write

    planner = importlib.import_module(f"trmlx.plan.{args.task}")
    benchmark = "plan_calibration" + ("_width" if args.width else "" if args.task == "causal" else f"_{args.task}")
    if args.refit:
        rows = [rerooted(row, REPO) for row in json.loads(args.refit.read_text())["measurements"]]
    else:
        with tempfile.TemporaryDirectory(prefix=f"trmlx-{benchmark}-") as tmp:
            work = args.work or Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            rows = measure("causal-width" if args.width else args.task, args.backends.split(","), work, REPO)
        # Kept before fitting, so a failed fit can be redone with --refit without measuring again.
        atomic_write(Path(tempfile.gettempdir()) / f"{benchmark}-measurements.json", json.dumps({"measurements": rows}))
    keys = planner.TRAIN_KEYS + planner.EVAL_KEYS
    fitted = dict(planner.CALIBRATION)
    if args.width:
        # The committed tiny rows were measured before the chunked loss existed (their logits are unchunked), so
        # they cannot fit its coefficients: width refits only WIDTH_KEYS (the chunked loss's fp32 copies) and the
        # rest stay as the tiny set fitted them (tests/test_plan_accuracy.py re-measures tiny rows live).
        for family, backend in (("mlx", "mlx"), ("torch", "cuda")):
            mine = [r for r in rows if r["backend"] == backend]
            if mine:
                fitted[family] = {**fitted[family], **fit(mine, planner.WIDTH_KEYS, keys, "train", variable=True,
                                                          fixed=fitted[family])}
        report(benchmark, rows, fitted, planner.CALIBRATION, args.out)
        return 0
    for family, backend in (("mlx", "mlx"), ("torch", "cuda")):
        mine = [r for r in rows if r["backend"] == backend]
        if mine:
            fitted[family] = {**fit(mine, planner.TRAIN_KEYS, keys, "train"),
                              **fit(mine, planner.EVAL_KEYS, keys, "eval")}
    report(benchmark, rows, fitted, planner.CALIBRATION, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
