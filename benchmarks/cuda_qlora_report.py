"""The report half of benchmarks/cuda_qlora.py: the markdown table and the PNG of both sides' configurations
(split off to keep the script under ~450 lines)."""

from __future__ import annotations

from pathlib import Path


def table(configs: list[dict], cpu: bool) -> str:
    unit = "GB RSS" if cpu else "GB"
    head = (f"{'seq':>5} {'bs':>3} | {'side':5} {'dtype':5} | {'trained tok/s (min-max)':>27} | {'all tok/s':>10} | "
            f"{'MFU':>6} | {'peak ' + unit:>11} | {'step s':>8}")
    lines = [head, "-" * len(head)]
    for c in configs:
        for side in ("trmlx", "hf"):
            r = c[side]
            if "error" in r:
                lines.append(f"{c['seq_len']:>5} {c['batch_size']:>3} | {side:5} {'':5} | failed: {r['error'][:70]}")
                continue
            t = r["trained_tokens_per_second"]
            lines.append(f"{c['seq_len']:>5} {c['batch_size']:>3} | {side:5} {r['setup']['dtype']:5} | "
                         f"{t['median']:>9.1f} ({t['min']:>7.1f}-{t['max']:>7.1f}) | "
                         f"{r['all_tokens_per_second']['median']:>10.1f} | {100 * r['mfu']['median']:>5.1f}% | "
                         f"{r['peak_memory_gb']:>11.3f} | {r['step_seconds']['median']:>8.4f}")
        speed, mem = c["speed_ratio"], c["memory_ratio"]
        lines.append(f"{'':>9} | trmlx/hf: speed {speed if speed is not None else '-'}x, "
                     f"peak memory {mem if mem is not None else '-'}x")
        if c.get("dtype_mismatch"):
            lines.append(f"{'':>9} | WARNING: the sides computed in different dtypes: {c['dtype_mismatch']}")
    return "\n".join(lines)


def plot(configs: list[dict], path: Path, title: str, cpu: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"seq {c['seq_len']}\nbs {c['batch_size']}" for c in configs]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(configs) + 4), 4.5))
    width = 0.38
    for offset, side, color in ((-width / 2, "trmlx", "#1f77b4"), (width / 2, "hf", "#ff7f0e")):
        xs = [i + offset for i in range(len(configs))]
        tps = [c[side]["trained_tokens_per_second"] if "error" not in c[side] else None for c in configs]
        med = [t["median"] if t else 0 for t in tps]
        err = [[(t["median"] - t["min"]) if t else 0 for t in tps], [(t["max"] - t["median"]) if t else 0 for t in tps]]
        name = "trmlx (cuda backend)" if side == "trmlx" else "HF Trainer + peft + bnb"
        axes[0].bar(xs, med, width, yerr=err, capsize=3, label=name, color=color)
        mem = [c[side]["peak_memory_gb"] if "error" not in c[side] else 0 for c in configs]
        axes[1].bar(xs, mem, width, label=name, color=color)
    axes[0].set_ylabel("trained (target) tokens/s, median of trials")
    axes[1].set_ylabel("peak RSS of the process (GB)" if cpu else "peak torch.cuda allocated (GB)")
    for ax in axes:
        ax.set_xticks(range(len(configs)), labels)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
