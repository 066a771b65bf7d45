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
hidden size, heads, MLP and vocabulary, fp32 (~5.3 GB of weights each; ~40 min here, 12 measurements, one process
each). It fits once over those rows and the committed tiny ones (benchmarks/results/plan_calibration-cpu.json,
measured with the chunked loss; remeasure them with --task causal first when the code moved), each row's error taken relative to the part of
its peak the coefficients explain (weights are exact), and writes OUT/plan_calibration_width-<device>.json: the
width rows, their errors and the tiny rows' errors under the same coefficients.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "benchmarks" / "results" / "plan_calibration-cpu.json"  # the causal set --width fits together with


def fit(rows: list[dict], keys: tuple[str, ...], all_keys: tuple[str, ...], phase: str,
        fixed: dict[str, float] | None = None, variable: bool = False,
        weights: list[float] | None = None) -> dict[str, float]:
    """NNLS on relative error: the plan is linear in its coefficients, so one plan per unit coefficient gives the
    feature columns and the all-zero plan the arithmetic part. Where a phase takes the larger of sub-phases
    (seq2seq eval: encoder pass, then decoding) it is not linear: refined from the NNLS start. variable: the error
    relative to what the coefficients must explain (the peak less the arithmetic part, at least a quarter of the
    peak), so rows whose peak is mostly exact weights (7B width: ~5.3 GB of weights) weigh as much as tiny ones.
    weights: one per row (least-squares weights; default 1)."""
    import numpy as np
    from scipy.optimize import least_squares, nnls

    from trmlx.bench.calibration import plan_of

    zero = {**(fixed or {}), **{k: 0.0 for k in all_keys}}  # `fixed`: the planner's coefficients not fitted here
    columns, target, scales = [], [], []  # scales: peak / what the row's error is relative to
    for row, weight in zip(rows, weights or [1.0] * len(rows)):
        base = getattr(plan_of(row, zero), f"{phase}_peak")
        peak = row[f"{phase}_peak"]
        measured = (max(peak - base, peak / 4) if variable else peak) / weight
        columns.append([(getattr(plan_of(row, {**zero, k: 1.0}), f"{phase}_peak") - base) / measured for k in keys])
        target.append((peak - base) / measured)
        scales.append(peak / measured)
    solution, _ = nnls(np.array(columns), np.array(target))
    used = np.abs(np.array(columns)).sum(axis=0) > 0  # a key no row's plan uses (MLX-only terms on torch) stays 0
    if any(t.phase.startswith(phase + ":") for row in rows for t in plan_of(row, zero).terms):
        def errors(values):
            coefficients = {**zero, **dict(zip(np.array(keys)[used], values))}
            return [(getattr(plan_of(row, coefficients), f"{phase}_peak") / row[f"{phase}_peak"] - 1) * scale
                    for row, scale in zip(rows, scales)]

        solution[used] = least_squares(errors, solution[used] + 0.1, bounds=(0, np.inf)).x
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


def report(benchmark: str, rows: list[dict], fitted: dict, in_use: dict, out: Path,
           also_fitted: list[dict] = ()) -> None:
    """Print every configuration's error and the CALIBRATION to paste; write OUT/<benchmark>-<device>.json
    (also_fitted: the rows of another set the fit used; their errors are printed and kept too)."""
    from trmlx.rundir import atomic_write, environment_record

    errors = errors_of([r for r in rows if ("mlx" if r["backend"] == "mlx" else "torch") in fitted], fitted)
    others = errors_of(list(also_fitted), fitted)
    print("backend config | train measured / planned MB, error | eval measured / planned MB, error")
    for e in others + errors:
        print(f"{e['backend']:5} {e['config']} | {e['train_measured_mb']:8.3f} / {e['train_planned_mb']:8.3f} "
              f"{e['train_error_pct']:+6.1f}% | {e['eval_measured_mb']:7.3f} / {e['eval_planned_mb']:7.3f} "
              f"{e['eval_error_pct']:+6.1f}%")
    worst = _worst(errors)
    print(f"largest error {worst:.1f}%" + (f" (the other set's rows: {_worst(others):.1f}%)" if others else ""))
    print("CALIBRATION = " + json.dumps(fitted, indent=4))
    extra = {"also_fitted_on": str(TINY.relative_to(REPO)), "also_fitted_errors": others,
             "also_fitted_largest_error_pct": _worst(others)} if others else {}
    atomic_write(out / f"{benchmark}-{rows[0]['kind']}.json", json.dumps(
        {"benchmark": benchmark, "fitted": fitted, "in_use": in_use, "errors": errors, "largest_error_pct": worst,
         **extra, "measurements": rows, "environment": environment_record()}, indent=2) + "\n")


def _worst(errors: list[dict]) -> float:
    return max((abs(e[k]) for e in errors for k in ("train_error_pct", "eval_error_pct")), default=0.0)


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
        # One fit over the committed tiny rows and the width rows, each row's error relative to what the
        # coefficients explain.
        tiny = [rerooted(r, REPO) for r in json.loads(TINY.read_text())["measurements"]]
        for family, backend in (("mlx", "mlx"), ("torch", "cuda")):
            small, wide = ([r for r in rows_ if r["backend"] == backend] for rows_ in (tiny, rows))
            if wide:  # both sets weigh the same in total: a few width rows against ~40 tiny ones
                weights = [1.0] * len(small) + [len(small) / len(wide)] * len(wide)
                fixed = planner.CALIBRATION[family]
                fitted[family] = {
                    **fixed, **fit(small + wide, planner.TRAIN_KEYS, keys, "train", fixed, True, weights),
                    **fit(small + wide, planner.EVAL_KEYS, keys, "eval", fixed, True, weights)}
        report(benchmark, rows, fitted, planner.CALIBRATION, args.out, tiny)
        return 0
    for family, backend in (("mlx", "mlx"), ("torch", "cuda")):
        mine = [r for r in rows if r["backend"] == backend]
        if mine:
            # coefficients outside the fitted keys (measured elsewhere) are kept as they are
            fixed = planner.CALIBRATION[family]
            fitted[family] = {**fixed, **fit(mine, planner.TRAIN_KEYS, keys, "train", fixed),
                              **fit(mine, planner.EVAL_KEYS, keys, "eval", fixed)}
    report(benchmark, rows, fitted, planner.CALIBRATION, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
