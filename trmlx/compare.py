"""`eval --compare`: several systems' predictions on one test set, side by side, with paired bootstrap intervals.

The first system is the reference: every other row reports its score, the difference to the reference and that
difference's 95% interval and p-value, per task and over all rows — the table users build by hand in notebooks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from trmlx.errors import UserError
from trmlx.metrics import paired_bootstrap
from trmlx.recipe.schema import Recipe

# The score a bootstrap compares for each metric name (ROUGE: ROUGE-L, the usual headline).
HEADLINE = {"rouge": "rougeL"}


def read_predictions(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise UserError(f"{path}: no predictions; run trmlx eval on that run first")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def compare_systems(recipe: Recipe, systems: dict[str, list[dict[str, Any]]], n_resamples: int = 1000,
                    seed: int = 0) -> dict[str, Any]:
    """Score every system per task and overall; bootstrap each against the first system on the same rows."""
    from trmlx.evaluate import task_metrics

    names = list(systems)
    reference_rows = systems[names[0]]
    for name in names[1:]:
        rows = systems[name]
        if [r["reference"] for r in rows] != [r["reference"] for r in reference_rows]:
            raise UserError(f"--compare: {name} was evaluated on other examples than {names[0]} ({len(rows)} vs "
                            f"{len(reference_rows)} rows, or different references); evaluate both on the same "
                            "split with the same --max-samples")
    opts = {"lang": recipe.eval.lang, "tokenize": recipe.eval.bleu_tokenize}
    tasks = sorted({r["task"] for r in reference_rows})
    groups = {"all": list(range(len(reference_rows)))} if tasks == [""] else {
        **{t: [i for i, r in enumerate(reference_rows) if r["task"] == t] for t in tasks},
        "all": list(range(len(reference_rows)))}
    table = []
    for group, indices in groups.items():
        metrics = task_metrics(recipe, group if group != "all" else tasks[0])
        if group == "all" and len(tasks) > 1:  # pooled rows: only metrics every task reports
            metrics = tuple(m for m in metrics if all(m in task_metrics(recipe, t) for t in tasks))
        refs = [reference_rows[i]["reference"] for i in indices]
        base_preds = [reference_rows[i]["prediction"] for i in indices]
        for metric in metrics:
            key = HEADLINE.get(metric, metric)
            for name in names:
                preds = [systems[name][i]["prediction"] for i in indices]
                result = paired_bootstrap(key, base_preds, preds, refs, n_resamples, seed, **opts)
                row = {"task": group, "metric": key, "system": name, "score": result["b"], "n": len(indices)}
                if name != names[0]:
                    row.update(diff=result["diff"], ci_low=result["ci_low"], ci_high=result["ci_high"],
                               p_value=result["p_value"])
                table.append(row)
    return {"systems": names, "reference": names[0], "n_resamples": n_resamples, "seed": seed, "rows": table}


def plot_comparison(result: dict[str, Any], png: Path) -> Path:
    """Grouped bars: one group per (task, metric), one bar per system; differences annotated with their CI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    groups = list(dict.fromkeys((r["task"], r["metric"]) for r in rows))
    systems = result["systems"]
    width = 0.8 / len(systems)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups) * len(systems) / 2 + 3), 4.5), dpi=120)
    for s, system in enumerate(systems):
        values = [next(r["score"] for r in rows if (r["task"], r["metric"]) == g and r["system"] == system)
                  for g in groups]
        bars = ax.bar([i + s * width for i in range(len(groups))], values, width, label=system)
        if s:
            for bar, g in zip(bars, groups):
                r = next(r for r in rows if (r["task"], r["metric"]) == g and r["system"] == system)
                ax.annotate(f"{r['diff']:+.1f}\n[{r['ci_low']:+.1f}, {r['ci_high']:+.1f}]",
                            (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                            fontsize=7)
    ax.set_xticks([i + width * (len(systems) - 1) / 2 for i in range(len(groups))])
    ax.set_xticklabels([f"{m}\n{t}" if t != "all" else m for t, m in groups])
    ax.set_ylabel("score (0–100)")
    ax.set_title(f"vs {result['reference']}: difference and 95% bootstrap interval")
    ax.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    plt.close(fig)
    return png


def system_names(paths: Sequence[str]) -> list[str]:
    """Short unique labels for run directories (their folder names, made unique if they clash)."""
    names: list[str] = []
    for path in paths:
        name = Path(path).name or str(path)
        while name in names:
            name += "'"
        names.append(name)
    return names
