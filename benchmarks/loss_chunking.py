"""The loss layer at a real vocabulary, chunked (train.loss_chunk_size) against unchunked, on both backends.

A random 2-layer, hidden-256 Qwen2 with Qwen2.5's 152,064-word vocabulary (the head is then most of the step),
trained through `trmlx bench` (its own worker: the real load, train loop and peak counters: MLX
mx.get_peak_memory(), torch's allocator-level peak) at 8 rows × 512 tokens = 4,096 positions per step, half of
them targets (bench's rows: loss on the second half), once per chunk size. The loss layer's share is the peak minus
what does not depend on the chunk (weights, adapter, activations: the same run's plan terms).

    python benchmarks/loss_chunking.py [--chunks 0,128,512] [--backends mlx,cuda] [--out benchmarks/results]

Writes OUT/loss_chunking-<device>.json and .png (peak and target tokens/s per chunk size and backend).

`--task seq2seq`: the same for an encoder-decoder with mT5's 250,112-word vocabulary (a random 2-layer, d_model 256
mT5: gated-GELU, untied head), source --seq-len (64) tokens and each of --target-lens (32,128,256) target tokens
per row, batch --batch-size (4), chunked (128) against unchunked; the loss layer's share is the peak minus the
weights, adapter, optimizer and encoder / decoder activations of the same run's plan.

    python benchmarks/loss_chunking.py --task seq2seq [--target-lens 32,128,256] [--chunks 0,128]

Writes OUT/loss_chunking_seq2seq-<device>.json and .png.
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


T5_SHAPE = {"vocab_size": 250112, "d_model": 256, "d_ff": 704, "num_layers": 2, "num_heads": 4}  # mT5's vocabulary
FIXED_TERMS = {"causal": ("weights", "adapter", "gradients", "optimizer", "activations"),
               "seq2seq": ("weights", "adapter", "gradients", "optimizer", "encoder_activations",
                           "decoder_activations")}


def bench(chunk: int, backends: str, work: Path, seq_len: int, batch: int, target_len: int = 0) -> dict:
    """One `trmlx bench` run: the causal quickstart on the random Qwen2 shape, or (target_len) the seq2seq
    quickstart on the random mT5 folder with target_len target tokens per row."""
    out = work / f"chunk{chunk}-target{target_len}"
    if target_len:
        model = ["seq2seq_quickstart.toml", "--set", f"model.path={json.dumps(str(work / 'mt5'))}", "--set",
                 f"data.max_target_length={target_len}"]
    else:
        model = ["quickstart.toml", "--model-shape", str(work / "shape.json")]
    command = [sys.executable, "-m", "trmlx", "bench", str(REPO / "recipes" / model[0]), *model[1:], "--seq-len",
               str(seq_len), "--batch-size", str(batch), "--no-peers", "--steps", "1", "--trials", "1", "--warmup",
               "1", "--max-new-tokens", "4", "--backends", backends, "--set", f"train.loss_chunk_size={chunk}",
               "--out", str(out)]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return json.loads(next(out.glob("bench-*.json")).read_text())


def build_mt5(out: Path) -> None:
    """A random mT5 of T5_SHAPE (trmlx.tiny.t5's config and weights); the tiny tokenizer is enough for synthetic
    rows (bench draws token ids from the model's vocabulary)."""
    import shutil

    from safetensors.numpy import save_file

    from trmlx.tiny.t5 import t5_config, t5_weights

    out.mkdir(parents=True)
    config = t5_config(**T5_SHAPE)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file(t5_weights(config), str(out / "model.safetensors"), metadata={"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(REPO / "recipes" / "models" / "tiny-mt5-tr" / name, out / name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=("causal", "seq2seq"), default="causal")
    parser.add_argument("--chunks", help="default: 0,128,512 (causal), 0,128 (seq2seq)")
    parser.add_argument("--backends", default="mlx,cuda")
    parser.add_argument("--seq-len", type=int, help="tokens per row (seq2seq: source tokens); default 512 / 64")
    parser.add_argument("--batch-size", type=int, help="default 8 (causal), 4 (seq2seq)")
    parser.add_argument("--target-lens", default="32,128,256", help="seq2seq: target tokens per row")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    from trmlx.rundir import atomic_write, environment_record

    seq2seq = args.task == "seq2seq"
    chunks = [int(c) for c in (args.chunks or ("0,128" if seq2seq else "0,128,512")).split(",")]
    seq_len, batch = args.seq_len or (64 if seq2seq else 512), args.batch_size or (4 if seq2seq else 8)
    target_lens = [int(t) for t in args.target_lens.split(",")] if seq2seq else [0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="trmlx-loss-chunking-") as tmp:
        work = Path(tmp)
        (work / "shape.json").write_text(json.dumps(SHAPE))
        if seq2seq:
            build_mt5(work / "mt5")
        for target_len in target_lens:
            for chunk in chunks:
                result = bench(chunk, args.backends, work, seq_len, batch, target_len)
                for config in result["configs"]:
                    rows.append(row_of(config, chunk, result, FIXED_TERMS[args.task]))
                    if seq2seq:
                        rows[-1] = {"target_len": target_len, "target_tokens": batch * target_len, **rows[-1]}
                    print(json.dumps(rows[-1]))
    for row in rows:
        base = next(r for r in rows if r["backend"] == row["backend"] and r["chunk"] == 0
                    and r.get("target_len") == row.get("target_len"))
        row["loss_layer_vs_unchunked"] = round(row["loss_layer_gb"] / base["loss_layer_gb"], 3)
        row["speed_vs_unchunked"] = round(row["target_tokens_per_second"] / base["target_tokens_per_second"], 2)
    kind, name = "cpu", "loss_chunking" + ("_seq2seq" if seq2seq else "")
    record = {"benchmark": name, "shape": {**T5_SHAPE, "model_type": "mt5"} if seq2seq else SHAPE,
              "seq_len": seq_len, "batch_size": batch, "rows": rows, "environment": environment_record()}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / f"{name}-{kind}.json", json.dumps(record, indent=2) + "\n")
    title = (f"mT5 vocabulary 250,112, batch {batch}, source {seq_len} tokens (2-layer d256 mT5, CPU)" if seq2seq
             else "vocabulary 152,064, 4,096 positions per step (2-layer h256 Qwen2, CPU)")
    plot(rows, args.out / f"{name}-{kind}.png", title)
    print(json.dumps({"rows": rows}))
    return 0


def row_of(config: dict, chunk: int, result: dict, fixed_terms: tuple[str, ...]) -> dict:
    """One backend's numbers: peak, the loss layer's share of it (the peak minus the plan's chunk-independent
    terms), the planned peak and target tokens/s."""
    trmlx, terms = config["trmlx"], config["plan"]["terms_gb"]
    fixed = sum(terms[t] for t in fixed_terms)
    return {"backend": config["backend"], "chunk": chunk, "peak_gb": round(trmlx["peak_memory_gb"], 3),
            "loss_layer_gb": round(trmlx["peak_memory_gb"] - fixed, 3),
            "planned_peak_gb": config["plan"]["train_predicted_gb"],
            "planned_loss_layer_gb": round(terms["logits_loss"], 3),
            "step_seconds": round(trmlx["step_seconds"]["median"], 3),
            "target_tokens_per_second": round(trmlx["trained_tokens_per_second"]["median"], 1),
            "device": result["devices"].get(config["backend"], {}).get("name", "")}


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    backends = sorted({r["backend"] for r in rows})
    groups = sorted({(r.get("target_len", 0), r["chunk"]) for r in rows})  # (target length, chunk) per bar group
    width = 0.8 / len(backends)
    for i, backend in enumerate(backends):
        mine = [next(r for r in rows if r["backend"] == backend and (r.get("target_len", 0), r["chunk"]) == g)
                for g in groups]
        xs = [j + i * width for j in range(len(groups))]
        left.bar(xs, [r["loss_layer_gb"] for r in mine], width, label=backend)
        right.bar(xs, [r["target_tokens_per_second"] for r in mine], width, label=backend)
    labels = [("unchunked" if c == 0 else f"chunk {c}") + (f"\ntarget {t}" if t else "") for t, c in groups]
    for ax, name in ((left, "loss layer peak (GB)"), (right, "target tokens/s")):
        ax.set_xticks([j + width * (len(backends) - 1) / 2 for j in range(len(groups))], labels,
                      fontsize=8 if len(groups) > 3 else None)
        ax.set_title(name)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
