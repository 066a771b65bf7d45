"""MLX on a Linux CPU with its own reference BLAS vs the optimized BLAS backends/mlx/device.py chooses.

Each side runs in its own processes (the BLAS is chosen once, before mlx loads), `TRMLX_BLAS=reference` for the
reference side and the default choice for the other:
- a 1024×1024 fp32 matmul: GFLOP/s (median of trials after a warm-up) and the max abs error against float64 numpy
  on N(0,1) inputs;
- the quickstart (`recipes/quickstart.toml`, LoRA on the tiny Llama): MLX training tokens/s (median over the logged
  steps after the first, which carries compilation) and the wall time of `trmlx train`;
- the embedding quickstart (`recipes/qa_embed_quickstart.toml`, MiniLM full fine-tuning, batch 16 with hard
  negatives): seconds per training step over --embed-steps steps, and the projected time of its 2,000-pair epoch.

    python benchmarks/mlx_blas.py [--embed-steps 4] [--quickstart-steps 40]

Prints one JSON line last and writes benchmarks/results/mlx_blas-<device>.json and a PNG beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
MATMUL = r"""
import json, statistics, sys, time
import numpy as np
from trmlx.backends.mlx.device import BLAS, mx
n, trials = 1024, 7
a, b = mx.random.normal((n, n), key=mx.random.key(0)), mx.random.normal((n, n), key=mx.random.key(1))
mx.eval(a @ b)
seconds = []
for _ in range(trials):
    start = time.perf_counter(); mx.eval(a @ b); seconds.append(time.perf_counter() - start)
exact = np.array(a).astype(np.float64) @ np.array(b).astype(np.float64)
print(json.dumps({**BLAS, "gflops": 2 * n ** 3 / statistics.median(seconds) / 1e9,
                  "max_abs_error": float(np.abs(np.array(a @ b) - exact).max())}))
"""


def environment(blas: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TRMLX_BLAS", None)
    if blas == "reference":
        env["TRMLX_BLAS"] = "reference"
    return env


def train(recipe: Path, blas: str, overrides: list[str]) -> tuple[list[dict[str, Any]], float]:
    """The train log of a `trmlx train --backend mlx` run and its wall time."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "trmlx", "train", str(recipe), "--backend", "mlx", "--output",
                   f"{tmp}/run", "--json", *[a for o in overrides for a in ("--set", o)]]
        start = time.perf_counter()
        subprocess.run(command, env=environment(blas), check=True, capture_output=True, text=True)
        wall = time.perf_counter() - start
        rows = [json.loads(line) for line in Path(f"{tmp}/run/metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "train"], wall


def measure(blas: str, embed_steps: int, quickstart_steps: int) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", MATMUL], env=environment(blas), check=True, capture_output=True,
                         text=True)
    result: dict[str, Any] = {"matmul": json.loads(out.stdout.strip().splitlines()[-1])}
    rows, wall = train(REPO / "recipes" / "quickstart.toml", blas,
                       [f"train.steps={quickstart_steps}", "train.eval_every=0", "train.save_every=0",
                        "train.log_every=1", "eval.max_samples=0"])
    result["quickstart"] = {"steps": quickstart_steps, "train_wall_seconds": round(wall, 1),
                            "tokens_per_second": statistics.median(r["tokens_per_second"] for r in rows[1:])}
    rows, wall = train(REPO / "recipes" / "qa_embed_quickstart.toml", blas,
                       [f"train.steps={embed_steps}", "train.epochs=0", "train.eval_every=0", "train.log_every=1"])
    per_step = statistics.median(b["elapsed_seconds"] - a["elapsed_seconds"] for a, b in zip(rows, rows[1:]))
    result["embedding_quickstart"] = {"steps": embed_steps, "train_wall_seconds": round(wall, 1),
                                      "seconds_per_step": round(per_step, 2),
                                      "projected_2000_pairs_minutes": round(per_step * 2000 / 16 / 60, 1)}
    return result


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sides = list(report["sides"])
    panels = [("matmul GFLOP/s", lambda s: s["matmul"]["gflops"]),
              ("quickstart tokens/s", lambda s: s["quickstart"]["tokens_per_second"]),
              ("embedding s/step", lambda s: s["embedding_quickstart"]["seconds_per_step"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(11, 3.2))
    for ax, (title, value) in zip(axes, panels):
        values = [value(report["sides"][s]) for s in sides]
        ax.bar(sides, values, color=["#999999", "#2a7ab9"])
        ax.set_title(title)
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.3g}", ha="center", va="bottom")
    fig.suptitle(f"MLX on a Linux CPU: reference BLAS vs {report['sides'][sides[-1]]['matmul']['blas']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--embed-steps", type=int, default=4)
    parser.add_argument("--quickstart-steps", type=int, default=40)
    args = parser.parse_args()
    sides = {"reference": measure("reference", args.embed_steps, args.quickstart_steps)}
    chosen = measure("default", args.embed_steps, args.quickstart_steps)
    sides[chosen["matmul"]["blas"].split(" (")[0]] = chosen
    ref, opt = sides["reference"], chosen
    from trmlx.rundir import environment_record

    report = {"benchmark": "mlx_blas", "sides": sides, "environment": environment_record(),
              "speedup": {"matmul": round(opt["matmul"]["gflops"] / ref["matmul"]["gflops"], 2),
                          "quickstart_tokens_per_second": round(opt["quickstart"]["tokens_per_second"]
                                                                / ref["quickstart"]["tokens_per_second"], 2),
                          "embedding_step": round(ref["embedding_quickstart"]["seconds_per_step"]
                                                  / opt["embedding_quickstart"]["seconds_per_step"], 2)}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "mlx_blas-cpu.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, path.with_suffix(".png"))
    print(json.dumps({"speedup": report["speedup"], "results": str(path)}))


if __name__ == "__main__":
    main()
