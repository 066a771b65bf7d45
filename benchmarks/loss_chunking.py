"""The loss layer at a real vocabulary, chunked (train.loss_chunk_size) against unchunked, on both backends.

A random 2-layer, hidden-256 Qwen2 with Qwen2.5's 152,064-word vocabulary (the head is then most of the step),
trained through `trmlx bench` (its own worker: the real load, train loop and peak counters: MLX
mx.get_peak_memory(), torch's allocator-level peak) at 8 rows × 512 tokens = 4,096 positions per step, half of
them targets (bench's rows: loss on the second half), once per chunk size. The loss layer's share is the peak minus
what does not depend on the chunk (weights, adapter, activations: the same run's plan terms).

    python benchmarks/loss_chunking.py [--chunks 0,128,512] [--backends mlx,cuda] [--out benchmarks/results]

Writes OUT/loss_chunking-<device>.json and .png (peak and target tokens/s per chunk size and backend).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHAPE = {"model_type": "qwen2", "vocab_size": 152064, "hidden_size": 256, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 704,
         "max_position_embeddings": 4096, "tie_word_embeddings": False, "torch_dtype": "float32"}


def bench(chunk: int, backends: str, work: Path, seq_len: int, batch: int) -> dict:
    out = work / f"chunk{chunk}"
    command = [sys.executable, "-m", "trmlx", "bench", str(REPO / "recipes" / "quickstart.toml"), "--model-shape",
               str(work / "shape.json"), "--seq-len", str(seq_len), "--batch-size", str(batch), "--no-peers",
               "--steps", "1", "--trials", "1", "--warmup", "1", "--max-new-tokens", "4", "--backends", backends,
               "--set", f"train.loss_chunk_size={chunk}", "--out", str(out)]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return json.loads(next(out.glob("bench-*.json")).read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", default="0,128,512")
    parser.add_argument("--backends", default="mlx,cuda")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    from trmlx.rundir import atomic_write, environment_record

    rows = []
    with tempfile.TemporaryDirectory(prefix="trmlx-loss-chunking-") as tmp:
        work = Path(tmp)
        (work / "shape.json").write_text(json.dumps(SHAPE))
        for chunk in [int(c) for c in args.chunks.split(",")]:
            result = bench(chunk, args.backends, work, args.seq_len, args.batch_size)
            for config in result["configs"]:
                trmlx, terms = config["trmlx"], config["plan"]["terms_gb"]
                fixed = terms["weights"] + terms["adapter"] + terms["gradients"] + terms["optimizer"] \
                    + terms["activations"]
                rows.append({"backend": config["backend"], "chunk": chunk, "peak_gb": round(trmlx["peak_memory_gb"], 3),
                             "loss_layer_gb": round(trmlx["peak_memory_gb"] - fixed, 3),
                             "planned_peak_gb": config["plan"]["train_predicted_gb"],
                             "target_tokens_per_second": round(trmlx["trained_tokens_per_second"]["median"], 1),
                             "device": result["devices"].get(config["backend"], {}).get("name", "")})
                print(json.dumps(rows[-1]))
    for row in rows:
        base = next(r for r in rows if r["backend"] == row["backend"] and r["chunk"] == 0)
        row["loss_layer_vs_unchunked"] = round(row["loss_layer_gb"] / base["loss_layer_gb"], 3)
        row["speed_vs_unchunked"] = round(row["target_tokens_per_second"] / base["target_tokens_per_second"], 2)
    kind = "cpu"
    record = {"benchmark": "loss_chunking", "shape": SHAPE, "seq_len": args.seq_len, "batch_size": args.batch_size,
              "rows": rows, "environment": environment_record()}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / f"loss_chunking-{kind}.json", json.dumps(record, indent=2) + "\n")
    plot(rows, args.out / f"loss_chunking-{kind}.png")
    print(json.dumps({"rows": rows}))
    return 0


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    backends = sorted({r["backend"] for r in rows})
    chunks = sorted({r["chunk"] for r in rows})
    width = 0.8 / len(backends)
    for i, backend in enumerate(backends):
        mine = [next(r for r in rows if r["backend"] == backend and r["chunk"] == c) for c in chunks]
        xs = [j + i * width for j in range(len(chunks))]
        left.bar(xs, [r["loss_layer_gb"] for r in mine], width, label=backend)
        right.bar(xs, [r["target_tokens_per_second"] for r in mine], width, label=backend)
    for ax, title in ((left, "loss layer peak (GB)"), (right, "target tokens/s")):
        ax.set_xticks([j + width * (len(backends) - 1) / 2 for j in range(len(chunks))],
                      ["unchunked" if c == 0 else f"chunk {c}" for c in chunks])
        ax.set_title(title)
        ax.legend()
    fig.suptitle("vocabulary 152,064, 4,096 positions per step (2-layer h256 Qwen2, CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
