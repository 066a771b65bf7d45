"""The report half of benchmarks/mlx_vs_mlx_lm.py: per-trial metrics from a child's timing windows, median and
spread across trials, the PNG and the markdown table (split off to keep the script under ~450 lines)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Sequence


def trial_metrics(raw: dict[str, Any], steady_from: int, log_every: int) -> dict[str, Any]:
    windows = raw["windows"]
    seconds = sum(w["seconds"] for w in windows)
    tokens = sum(w["tokens"] for w in windows)
    steady = [w for w in windows if w["step"] - log_every >= steady_from]
    steady_s = sum(w["seconds"] for w in steady)
    out = {"train_seconds": seconds, "target_tokens": tokens, "tokens_per_second": tokens / seconds,
           "steady_tokens_per_second": sum(w["tokens"] for w in steady) / steady_s,
           "steady_seconds_per_step": steady_s / (steady[-1]["step"] - steady[0]["step"] + log_every),
           "first_window_seconds": windows[0]["seconds"], "peak_gb": raw["reported_peak_gb"],
           "final_train_loss": raw["reported_final_train_loss"], "final_valid_loss": raw["reported_final_valid_loss"],
           "common_loss": raw["common_loss"], "process_seconds": raw["process_seconds"],
           "max_rss_mb": raw["max_rss_mb"],
           "positions_per_target": raw["batches"]["positions"] / raw["batches"]["targets"],
           "positions_per_second": raw["batches"]["positions"] / seconds,
           "batches": raw["batches"]}
    if raw["batches"]["targets"] != tokens:
        raise SystemExit(f"replayed batches hold {raw['batches']['targets']} target tokens, the run trained "
                         f"{tokens}")
    if "mlx_lm_tokens" in windows[0]:
        own = sum(w["mlx_lm_tokens"] for w in windows)
        out.update(mlx_lm_counted_tokens=own, mlx_lm_reported_tokens_per_second=own / seconds,
                   batch_widths=raw["batch_widths"])
    return out


def stats(values: Sequence[float], digits: int = 4) -> dict[str, Any]:
    median = statistics.median(values)
    return {"median": round(median, digits), "min": round(min(values), digits), "max": round(max(values), digits),
            "spread_pct": round(100 * (max(values) - min(values)) / median, 1) if median else 0.0,
            "trials": [round(v, digits) for v in values]}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = list(result["systems"])
    panels = [("tokens_per_second", "target tokens/s, all steps", 1),
              ("steady_tokens_per_second", f"target tokens/s, steps {result['steady_from'] + 1}-{result['steps']}",
               1),
              ("positions_per_second", "computed positions/s (incl. prompt, padding)", 1),
              ("train_seconds", f"training seconds, {result['steps']} steps", 1),
              ("peak_gb", "MLX peak memory (MB)", 1000)]
    colours = {"trmlx": "#c0392b", "mlx-lm": "#2c3e50", "mlx-lm-chat": "#7f8c8d", "mlx-lm-keepcache": "#2980b9"}
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 4.0))
    for ax, (key, title, unit) in zip(axes, panels):
        med = [result["systems"][s][key]["median"] * unit for s in systems]
        lo = [m - result["systems"][s][key]["min"] * unit for m, s in zip(med, systems)]
        hi = [result["systems"][s][key]["max"] * unit - m for m, s in zip(med, systems)]
        ax.bar(range(len(systems)), med, yerr=[lo, hi], capsize=4, color=[colours.get(s, "#999") for s in systems])
        pick = min if key in ("train_seconds", "peak_gb") else max  # the trial least slowed by other work
        best = [pick(result["systems"][s][key]["trials"]) * unit for s in systems]
        ax.scatter(range(len(systems)), best, marker="D", s=18, color="#f1c40f", edgecolors="black", zorder=3,
                   label="best trial")
        for i, m in enumerate(med):
            ax.annotate(f"{m:.0f}" if m >= 100 else f"{m:.1f}", (i, m), ha="center", va="bottom", fontsize=8,
                        xytext=(-12, 2), textcoords="offset points")
        ax.set_xticks(range(len(systems)), systems, rotation=25, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=7, loc="lower right")
    device = result["device"].get("name", "?")
    fig.suptitle(f"LoRA on tiny-llama-tr, batch {result['hyperparameters']['batch_size']}, {result['steps']} steps, "
                 f"{result['trials']} trials (bars: median, whiskers: min–max), "
                 f"MLX {result['device'].get('mlx', '')} {device}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(result: dict[str, Any]) -> str:
    cols = ("system", "tok/s all", "tok/s steady", "positions/s", "train s", "s/step steady", "positions/target",
            "peak GB",
            "RSS MB",
            "final train loss (own)", "valid loss (own)", "train/valid loss (common)")
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    for name, s in result["systems"].items():
        lines.append(" | ".join([
            name, f"{s['tokens_per_second']['median']:.0f} ±{s['tokens_per_second']['spread_pct']:.0f}%",
            f"{s['steady_tokens_per_second']['median']:.0f} ±{s['steady_tokens_per_second']['spread_pct']:.0f}%",
            f"{s['positions_per_second']['median']:.0f}",
            f"{s['train_seconds']['median']:.2f}", f"{s['steady_seconds_per_step']['median'] * 1000:.1f} ms",
            f"{s['positions_per_target']:.2f}", f"{s['peak_gb']['median']:.4f}", f"{s['max_rss_mb']['median']:.0f}",
            f"{s['final_train_loss']['median']:.3f}", f"{s['final_valid_loss']['median']:.3f}",
            f"{s['common_train_loss']['median']:.3f} / {s['common_valid_loss']['median']:.3f}"]))
    lines.append("ratios trmlx / mlx-lm, medians: " + ", ".join(f"{k} {v}" for k, v in result["ratios"].items()))
    lines.append("ratios trmlx / mlx-lm, best trial of each: " + ", ".join(
        f"{k} {v}" for k, v in result["ratios_best_trial"].items()))
    return "\n".join(lines)
