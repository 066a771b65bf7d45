"""Packed vs length-bucketed batches vs the peers, on a length-skewed set: target tokens/s and peak memory.

Data: the shipped English→Turkish training pairs (recipes/data/en_tr, 271 rows), every 4th replaced by a long row
that joins 4–8 consecutive pairs (sources and targets alike), so most rows are ~30–90 tokens and a quarter are
~200–500; data.max_length 512. Model and LoRA: the quickstart's (recipes/models/tiny-llama-tr, fp32, LoRA rank 8,
alpha 16, every linear, dropout 0), AdamW lr 3e-3 constant, no warm-up, no clipping, batch 8, seed 0. Every system
trains ONE EPOCH over the same token ids (prompt "English: {source}\\nTurkish: " with BOS, loss on target + EOS),
each trial a fresh subprocess, trials interleaved after one untimed warm-up run of each system:

  mlx-bucketed   trmlx train --backend mlx, the default length-bucketed batches of 8 examples
  mlx-packed     the same with data.packing = true: batches of 8 rows × 512 positions, best-fit packed
  mlx-lm         mlx_lm.tuner.trainer.train (what mlx_lm.lora runs) on the same ids: its own length-sorted
                 batches of 8 (full batches only), prompt masked, mlx-lm's LoRA layers with scale alpha / rank
  cuda-bucketed  trmlx train --backend cuda (torch on this CPU), bucketed
  cuda-packed    the same, packed
  hf             transformers Trainer + peft LoRA on the same ids, padded per batch (DataCollatorForSeq2Seq,
                 labels -100 on the prompt), the Trainer's shuffled order: what notebooks run

Target tokens/s = target tokens trained / training seconds by each tool's own step clock (trmlx's reports, mlx-lm's
iterations_per_second, a Trainer step callback). Peaks: MLX's mx.get_peak_memory for the MLX systems; the
process's peak RSS for the torch systems (no allocator counter on a CPU; it includes ~0.4 GB of Python and
libraries, alike for both).

    python benchmarks/packing.py [--trials 2] [--systems mlx-bucketed,mlx-packed,...] [--out benchmarks/results]
    python benchmarks/packing.py --hidden 512   # the same at another width: a random 2-layer Llama, heads of 64

Prints a table, then one JSON line; writes OUT/packing-<device>.json and .png (packing-h<N>-<device> with
--hidden N). About 3 minutes here idle; 7 with --hidden 512.

What to expect on a CPU: a packed row attends over its whole width (block-diagonal masks are dense T × T), so where
attention dominates the step — a 200K-parameter model with 512-position rows, and MLX's CPU attention kernel in
particular — packing costs more than the padding it saves; at 7B width attention is a few % of a step's FLOPs and
the saved padding is the gain.
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
RECIPE = REPO / "recipes" / "quickstart.toml"
MODEL = REPO / "recipes" / "models" / "tiny-llama-tr"
SYSTEMS = ("mlx-bucketed", "mlx-packed", "mlx-lm", "cuda-bucketed", "cuda-packed", "hf")
MAX_LENGTH, BATCH, LR, RANK, ALPHA = 512, 8, 3e-3, 8, 16


def skewed_rows() -> list[dict[str, str]]:
    """The shipped pairs, every 4th replaced by 4-8 consecutive pairs joined into one long row."""
    pairs = [json.loads(line) for line in (REPO / "recipes/data/en_tr/train.jsonl").read_text("utf-8").splitlines()]
    rows = []
    for i, pair in enumerate(pairs):
        if i % 4 == 3:
            group = [pairs[(i + k) % len(pairs)] for k in range(4 + i % 5)]
            pair = {"source": " ".join(p["source"] for p in group), "target": " ".join(p["target"] for p in group)}
        rows.append({"source": pair["source"], "target": pair["target"]})
    return rows


def overrides(data_file: Path, packing: bool) -> list[str]:
    return [f"data.train={json.dumps(str(data_file))}", f"data.max_length={MAX_LENGTH}", "data.too_long=truncate",
            f"data.packing={str(packing).lower()}", "train.steps=0", "train.epochs=1", f"train.batch_size={BATCH}",
            "train.grad_accum=1", f"train.lr={LR}", "train.schedule=constant", "train.warmup_steps=0",
            "train.weight_decay=0.0", "train.grad_clip=0.0", "train.eval_every=0", "train.save_every=0",
            "train.log_every=1", "train.seed=0", "train.grad_checkpoint=false", 'train.memory_budget=""',
            "peft.method=lora", f"peft.rank={RANK}", f"peft.alpha={ALPHA}", "peft.dropout=0.0",
            "peft.targets=all-linear", "peft.layers=0", f"model.path={json.dumps(str(MODEL))}"]


def examples(data_file: Path, tokenizer: Any) -> list[Any]:
    """trmlx's tokenised training examples of the skewed set: the very ids every system trains."""
    from trmlx.data import prepare_data
    from trmlx.data.examples import tokenize
    from trmlx.recipe import load_recipe

    recipe = load_recipe(RECIPE, overrides(data_file, False), backend="mlx")
    return tokenize(prepare_data(recipe).train, recipe, tokenizer)[0]


# ------------------------------------------------------------------------------------------------------ children

def child_trmlx(backend: str, packing: bool, data_file: Path, workdir: Path) -> dict[str, Any]:
    if backend == "mlx":
        from trmlx.backends.mlx import device as _blas  # noqa: F401  chooses the BLAS before mlx loads
    from trmlx.run import resolve_run, train

    setup = resolve_run(str(RECIPE), backend, overrides(data_file, packing), output=str(workdir / "run"),
                        resume=None)
    reports: list[Any] = []
    train(setup, backend, on_report=lambda report, total: reports.append(report))
    steps = [r for r in reports if r.kind == "train"]
    return {"steps": len(steps), "target_tokens": steps[-1].trained_tokens, "seconds": steps[-1].elapsed_seconds,
            "peak_gb": max(r.peak_memory_gb for r in steps), "final_loss": steps[-1].loss}


def child_mlx_lm(data_file: Path, workdir: Path) -> dict[str, Any]:
    from trmlx.backends.mlx import device as _blas  # noqa: F401  chooses the BLAS before mlx loads
    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np
    from mlx_lm.tuner import trainer
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.datasets import CacheDataset
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load

    from trmlx.bench.causal import TokenDataset

    np.random.seed(0)
    mx.random.seed(0)
    model, tokenizer = load(str(MODEL))
    model.freeze()
    keys = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
            "mlp.up_proj", "mlp.down_proj"]
    linear_to_lora_layers(model, len(model.layers), {"rank": RANK, "scale": ALPHA / RANK, "dropout": 0.0,
                                                     "keys": keys})
    rows = examples(data_file, tokenizer._tokenizer)
    dataset = CacheDataset(TokenDataset(rows))
    targets: list[int] = []

    def counting_batches(dataset, batch_size, max_seq_length, loop=False, seed=None, comm_group=None):
        """mlx-lm's own batches; each training batch's target tokens counted on trmlx's basis."""
        for batch, lengths in trainer.iterate_batches(dataset, batch_size, max_seq_length, loop=loop, seed=seed,
                                                      comm_group=comm_group):
            lens = np.array(lengths)
            targets.append(int((lens[:, 1] - np.maximum(lens[:, 0], 1)).sum()))
            yield batch, lengths

    class Recorder(TrainingCallback):
        def __init__(self):
            self.reports: list[dict] = []

        def on_train_loss_report(self, info):
            self.reports.append(dict(info))

    recorder = Recorder()
    iters = len(rows) // BATCH  # one epoch of its full batches (it drops the last partial one)
    args = trainer.TrainingArgs(batch_size=BATCH, iters=iters, val_batches=0, steps_per_report=1,
                                steps_per_eval=10**9, steps_per_save=10**9, max_seq_length=MAX_LENGTH + 1,
                                adapter_file=str(workdir / "adapters.safetensors"))
    optimizer = optim.AdamW(learning_rate=LR, weight_decay=0.0, bias_correction=True)
    mx.reset_peak_memory()
    trainer.train(model, optimizer, dataset, None, args=args, training_callback=recorder,
                  iterate_batches=counting_batches)
    return {"steps": iters, "target_tokens": sum(targets[:iters]),
            "seconds": sum(1.0 / r["iterations_per_second"] for r in recorder.reports),
            "peak_gb": max(r["peak_memory"] for r in recorder.reports),
            "final_loss": recorder.reports[-1]["train_loss"]}


def child_hf(data_file: Path, workdir: Path) -> dict[str, Any]:
    import resource

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                              TrainerCallback, TrainingArguments)

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(MODEL))
    model = AutoModelForCausalLM.from_pretrained(str(MODEL), dtype=torch.float32, attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear",
                                             bias="none", task_type="CAUSAL_LM"))
    rows = examples(data_file, tokenizer)
    dataset = [{"input_ids": list(e.input_ids), "labels": [-100] * e.prompt_len + list(e.input_ids[e.prompt_len:])}
               for e in rows]

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds: list[float] = []
            self.previous = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.previous = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self.previous)

    timer = StepTimer()
    args = TrainingArguments(output_dir=str(workdir / "hf"), per_device_train_batch_size=BATCH, num_train_epochs=1,
                             learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                             max_grad_norm=0.0, optim="adamw_torch", logging_steps=1, save_strategy="no",
                             eval_strategy="no", report_to="none", disable_tqdm=True, seed=0,
                             remove_unused_columns=False, dataloader_num_workers=0, use_cpu=True)
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=[timer])
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {"steps": len(timer.seconds), "target_tokens": sum(len(e.input_ids) - e.prompt_len for e in rows),
            "seconds": sum(timer.seconds), "final_loss": losses[-1],
            "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9}


def child(system: str, data_file: Path, workdir: Path) -> dict[str, Any]:
    if system == "mlx-lm":
        return child_mlx_lm(data_file, workdir)
    if system == "hf":
        return child_hf(data_file, workdir)
    backend, layout = system.split("-")
    return child_trmlx(backend, layout == "packed", data_file, workdir)


# -------------------------------------------------------------------------------------------------------- parent

def run_child(system: str, data_file: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"trmlx-packing-{system}-") as tmp:
        proc = subprocess.run([sys.executable, __file__, "--child", system, "--data-file", str(data_file),
                               "--workdir", tmp, "--model-dir", str(MODEL)], capture_output=True, text=True,
                              cwd=REPO)
    if proc.returncode:
        raise SystemExit(f"{system} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["tokens_per_second"] = result["target_tokens"] / result["seconds"]
    return result


def wide_model(out: Path, hidden: int) -> Path:
    """tiny-llama-tr's architecture (2 layers, grouped KV heads, a tokenizer of 1,024 trained on the shipped pairs)
    at another width, random weights."""
    from trmlx.tiny.llama import build_tiny_llama, shipped_texts

    heads = max(1, hidden // 64)
    return build_tiny_llama(out, shipped_texts(REPO / "recipes" / "data" / "en_tr"), hidden_size=hidden,
                            num_heads=heads, num_kv_heads=max(1, heads // 2), intermediate_size=2 * hidden,
                            max_position_embeddings=MAX_LENGTH)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = list(result["systems"])
    colours = ["#1f77b4" if s.startswith(("mlx", "mlx-lm")) else "#d62728" for s in systems]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.bar(systems, [result["systems"][s]["tokens_per_second"]["median"] for s in systems], color=colours)
    left.set_title("target tokens/s (median of trials)")
    right.bar(systems, [result["systems"][s]["peak_gb"]["median"] for s in systems], color=colours)
    right.set_title("peak GB (MLX: mx peak; torch: process RSS)")
    for axis in (left, right):
        axis.tick_params(axis="x", rotation=30)
    fig.suptitle("one epoch of a length-skewed en→tr set: packed vs bucketed vs peers")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, from {', '.join(SYSTEMS)}")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--hidden", type=int, default=0,
                        help="a random 2-layer Llama of this width (heads of 64) instead of tiny-llama-tr's 64: "
                             "where attention's share of a step shrinks, packing's saved padding shows")
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=SYSTEMS, help=argparse.SUPPRESS)
    parser.add_argument("--data-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    global MODEL
    MODEL = args.model_dir or MODEL
    if args.child:
        print(json.dumps(child(args.child, args.data_file, args.workdir)))
        return
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if set(systems) - set(SYSTEMS):
        raise SystemExit(f"--systems: unknown {sorted(set(systems) - set(SYSTEMS))}; choose from {SYSTEMS}")

    from trmlx.backends.mlx.device import describe_device
    from trmlx.rundir import atomic_write, environment_record

    raw: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
    with tempfile.TemporaryDirectory(prefix="trmlx-packing-data-") as tmp:
        if args.hidden:
            MODEL = wide_model(Path(tmp) / f"llama-h{args.hidden}", args.hidden)
        data_file = Path(tmp) / "skewed.jsonl"
        data_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in skewed_rows()), "utf-8")
        for system in systems:  # untimed: MLX's CPU backend JIT-compiles kernels and caches them on disk
            run_child(system, data_file)
            print(f"warm-up {system} done", file=sys.stderr)
        for trial in range(args.trials):  # interleaved: a shared machine's drift hits every system alike
            for system in systems:
                raw[system].append(run_child(system, data_file))
                print(f"trial {trial + 1} {system}: {raw[system][-1]['tokens_per_second']:.0f} tokens/s",
                      file=sys.stderr)

    def stats(values: list[float]) -> dict[str, Any]:
        return {"median": round(statistics.median(values), 4), "trials": [round(v, 4) for v in values]}

    summary = {s: {"tokens_per_second": stats([r["tokens_per_second"] for r in runs]),
                   "peak_gb": stats([r["peak_gb"] for r in runs]), "steps": runs[0]["steps"],
                   "target_tokens": runs[0]["target_tokens"], "final_loss": stats([r["final_loss"] for r in runs])}
               for s, runs in raw.items()}

    def ratio(a: str, b: str, key: str) -> float | None:
        if a in summary and b in summary:
            return round(summary[a][key]["median"] / summary[b][key]["median"], 3)
        return None

    ratios = {f"{a} / {b}": {"tokens_per_second": ratio(a, b, "tokens_per_second"), "peak": ratio(a, b, "peak_gb")}
              for a, b in (("mlx-packed", "mlx-lm"), ("mlx-bucketed", "mlx-lm"), ("mlx-packed", "mlx-bucketed"),
                           ("cuda-packed", "hf"), ("cuda-bucketed", "hf"), ("cuda-packed", "cuda-bucketed"))
              if a in summary and b in summary}
    device = describe_device()
    model_name = (f"random 2-layer Llama, hidden {args.hidden}, {args.hidden // 64} heads of 64, vocabulary 1024"
                  if args.hidden else str(MODEL.relative_to(REPO)))
    result = {"benchmark": "packing", "data": "recipes/data/en_tr train, every 4th row 4-8 pairs joined; "
              f"max_length {MAX_LENGTH}", "model": model_name, "trials": args.trials,
              "settings": {"batch": BATCH, "lr": LR, "rank": RANK, "alpha": ALPHA, "epochs": 1},
              "systems": summary, "ratios": ratios, "loadavg_1min_at_end": os.getloadavg()[0], "device": device}
    slug = "".join(c if c.isalnum() else "-" for c in str(device.get("name", "unknown")).lower()).strip("-")
    path = args.out / (f"packing-h{args.hidden}-{slug}.json" if args.hidden else f"packing-{slug}.json")
    atomic_write(path, json.dumps({**result, "raw": raw, "environment": environment_record(backend="mlx",
                                                                                          device=device)},
                                  indent=2, ensure_ascii=False) + "\n")
    plot(result, path.with_suffix(".png"))
    for s, row in summary.items():
        print(f"{s:14s} {row['tokens_per_second']['median']:9.0f} target tokens/s  peak "
              f"{row['peak_gb']['median']:.4f} GB  {row['steps']} steps  {row['target_tokens']} target tokens")
    print(json.dumps(result, ensure_ascii=False))


if __name__ == "__main__":
    main()
