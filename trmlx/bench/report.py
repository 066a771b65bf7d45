"""What `trmlx bench` shows: the terminal table and the PNG chart of a bench result."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def eval_unit(result: dict[str, Any]) -> str:
    """What the eval-throughput column counts: texts encoded (embedding recipes) or generated tokens."""
    return "texts/s" if result.get("task") == "embedding" else "gen tok/s"


def table(result: dict[str, Any]) -> str:
    head = (f"{'backend':7} {'seq':>5} {'bs':>3} | {'side':7} | {'train tok/s (min-max)':>24} | {'step s':>7} | "
            f"{'MFU':>6} | {'peak MB':>8} | {'plan MB':>8} {'err':>6} | {'RSS MB':>7} | {eval_unit(result):>9} | "
            "ratio vs peer (speed, memory)")
    lines = [head, "-" * len(head)]
    for c in result["configs"]:
        for side in ["trmlx", *([c["peer"]] if c.get("peer") in c else [])]:
            r = c[side]
            where = f"{c['backend']:7} {c['seq_len']:>5} {c['batch_size']:>3} | {side:7} |"
            if "error" in r:
                lines.append(f"{where} failed: {r['error'][:80]}")
                continue
            t = r["trained_tokens_per_second"]
            plan = c.get("plan", {}) if side == "trmlx" else {}
            gen = r.get("generation", {}).get("tokens_per_second", {}).get("median")
            ratio = c.get("ratios", {}) if side == "trmlx" else {}
            lines.append(
                f"{where} {t['median']:>9.1f} ({t['min']:>6.1f}-{t['max']:>6.1f}) | "
                f"{r['step_seconds']['median']:>7.3f} | {100 * r['mfu']['median']:>5.2f}% | "
                + (f"{'(RSS)':>8} | " if r["memory_kind"].startswith("peak resident") else
                   f"{r['peak_memory_gb'] * 1000:>8.2f} | ")
                + (f"{plan['train_predicted_gb'] * 1000:>8.2f} {plan['train_error_pct']:>+5.1f}%" if plan else
                   f"{'':>15}")
                + f" | {(r.get('rss_peak_gb') or 0) * 1000:>7.0f} | "
                + (f"{gen:>9.1f} | " if gen is not None else f"{'-':>9} | ")
                + (f"{ratio['speed']}x, {ratio['memory']}x ({ratio['memory_basis'].removesuffix('_gb')})"
                   if ratio else ""))
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = result["configs"]
    labels = [f"{c['backend']}\nseq {c['seq_len']} bs {c['batch_size']}" for c in configs]
    sides = list(dict.fromkeys(["trmlx", *(c["peer"] for c in configs if c.get("peer"))]))
    palette = ["#2c3e50", "#ff7f0e", "#16a085", "#8e44ad"]
    colours = {"trmlx": "#c0392b", **{s: palette[i % len(palette)] for i, s in enumerate(sides[1:])}}
    fig, axes = plt.subplots(1, 3, figsize=(max(10, 2.2 * len(configs) + 6), 4.4))
    width = 0.38
    for k, side in enumerate(sides):
        xs = [i + (k - 0.5) * width if side == "trmlx" else i + width / 2 for i in range(len(configs))]
        rows = [(x, c[side]) for x, c in zip(xs, configs) if side in c and "error" not in c[side]]
        if not rows:
            continue
        med = [r["trained_tokens_per_second"]["median"] for _, r in rows]
        err = [[m - r["trained_tokens_per_second"]["min"] for m, (_, r) in zip(med, rows)],
               [r["trained_tokens_per_second"]["max"] - m for m, (_, r) in zip(med, rows)]]
        axes[0].bar([x for x, _ in rows], med, width, yerr=err, capsize=3, color=colours[side], label=side)
        counted = [(x, r) for x, r in rows if not r["memory_kind"].startswith("peak resident")]  # RSS: not comparable
        if counted:
            axes[1].bar([x for x, _ in counted], [r["peak_memory_gb"] * 1000 for _, r in counted], width,
                        color=colours[side], label=f"{side} measured")
    plan_rows = [(i, c["plan"]) for i, c in enumerate(configs) if "plan" in c]
    axes[1].scatter([i - width / 2 for i, _ in plan_rows], [p["train_predicted_gb"] * 1000 for _, p in plan_rows],
                    marker="D", color="#f1c40f", edgecolors="black", zorder=3, label="trmlx plan")
    gens = [(i, c["trmlx"]["generation"]["tokens_per_second"]["median"]) for i, c in enumerate(configs)
            if "generation" in c["trmlx"]]
    axes[2].bar([i for i, _ in gens], [g for _, g in gens], 0.5, color=colours["trmlx"])
    titles = ("trained tokens/s (median, min-max)", "training peak memory (MB; allocator counters, no RSS)",
              "trmlx eval encoding texts/s (batched)" if result.get("task") == "embedding"
              else "trmlx eval generation tokens/s (batched)")
    for ax, title in zip(axes, titles):
        ax.set_xticks(range(len(configs)), labels, fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    devices = ", ".join(f"{b}: {d.get('name')}" for b, d in result["devices"].items())
    fig.suptitle(f"trmlx bench {result['recipe_name']} — {result['model_source']} — {devices}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
