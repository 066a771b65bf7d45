"""QLoRA training speed and memory on CUDA: trmlx's CUDA backend vs a plain transformers Trainer + peft + bnb.

Both sides train the same random-weight Llama (built here, never downloaded) from the same model folder, on the
same synthetic examples of exactly --seq-len tokens (loss on the second half only), with the same LoRA (rank,
alpha, dropout, targets and layers of recipes/translate_7b.toml), the same batch size, gradient accumulation,
gradient checkpointing, optimizer and compute dtype:

  trmlx  the real trmlx path: trmlx.backends.cuda.model.load on the recipe (--set model.path=<folder>, batch size,
         max length, steps) and trmlx.backends.cuda.train.train_loop.
  hf     what today's notebooks do: BitsAndBytesConfig(nf4, double quant) + prepare_model_for_kbit_training +
         get_peft_model + transformers.Trainer (fp16/bf16 as the GPU allows), step times from a TrainerCallback.

Every (seq_len, batch_size, side) runs in a fresh subprocess, so peak-memory counters never mix. Inside it: warm-up
steps, then --trials trials of --steps steps, the device synchronised before each clock read; the median trial
and the min/max are reported, and ratios trmlx/hf are taken in the same invocation on the same machine.

MFU = 4·N·(all tokens/s) / (the device's dense matmul rate, measured here: 8192² bf16 — fp16 without bf16 — on a
GPU, 1024² fp32 on the CPU). N counts every parameter of the base model. All tokens, not only the target half,
because the backward pass runs through every position (the targets attend to the prompt). Gradient checkpointing's
recompute (≈2N more) is not counted as useful work; `hfu` counts it. Attention's seq² FLOPs are left out.

The model folder: the Llama config is built with transformers' from_config directly on the GPU (seeded random
init, seconds for 7B) and saved once as bf16 safetensors shards (fp16 where the GPU has no bf16) with a tokenizer
trained on the shipped en_tr text; each side then quantises it to NF4 while loading, exactly as `trmlx train`
does with a hub checkpoint. That is faster than writing random weights from numpy (13 GB through the CPU), and a
pre-quantised folder would skip the load-time quantisation that the trmlx path really does. Pass --model-dir to
keep the folder and reuse it across invocations (7B: ~13.5 GB of disk).

    # an NVIDIA GPU (pip install -e ".[cuda]": bitsandbytes, peft, transformers, accelerate)
    python benchmarks/cuda_qlora.py --shape 7b --seq-len 512 1024 --batch-size 1 2 4 8 --model-dir /tmp/llama2-7b
    # the same sweep in two commands (e.g. under a 10-minute limit per command), the second merging into the file
    python benchmarks/cuda_qlora.py --shape 7b --seq-len 512 --model-dir /tmp/llama2-7b
    python benchmarks/cuda_qlora.py --shape 7b --seq-len 1024 --model-dir /tmp/llama2-7b --merge
    # this CPU: only the tiny shape (a check of the pipeline, not a GPU result)
    python benchmarks/cuda_qlora.py --shape tiny --seq-len 64 128 --batch-size 2 4

Cost of a 7B sweep: the model folder once (GPU init + writing 13.5 GB, about a minute), then per configuration and
side a fresh process that loads and quantises the folder (tens of seconds) and runs warmup + steps × trials steps
(defaults 2 + 5 × 3). Only one GPU is used (CUDA_VISIBLE_DEVICES defaults to 0 for the workers).

Prints a table and one JSON line last; writes <out>/cuda_qlora-<device>.json and a PNG chart beside it
(--merge keeps the configurations of an earlier result file for the same device and shape that this run did not
measure, so a long sweep can be split across several invocations).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

# The measuring pieces and side B (the HF notebook recipe) ship in the package, where `trmlx bench` uses them too.
from trmlx.bench.harness import (clock, memory_now, native_bf16, peak_memory, ratio, slug, summarise, synthetic_rows,
                                 torch_matmul_rate, trial_times)
from trmlx.bench.hf_causal import worker_hf

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling report module, as a script or a worker
from cuda_qlora_report import plot, table  # noqa: E402
RECIPE = REPO / "recipes" / "translate_7b.toml"
DATA = REPO / "recipes" / "data" / "en_tr"
MARKER = "trmlx-bench-model.json"

# trmlx.tiny.llama.llama_config arguments. 7b is Llama-2-7B's architecture (6,738,415,616 parameters).
SHAPES: dict[str, dict[str, int]] = {
    "7b": dict(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
               intermediate_size=11008, max_position_embeddings=4096),
    "tiny": dict(vocab_size=1024, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=4,
                 intermediate_size=352, max_position_embeddings=2048),
}
SIDES = ("trmlx", "hf")
CPU_NOTE = ("CPU run with the tiny shape: it checks that the benchmark pipeline works end to end. It is NOT a GPU "
            "result; 4-bit bitsandbytes on a CPU says nothing about CUDA speed.")


# ----------------------------------------------------------------------------------------------- workers
# Each runs in its own interpreter: `python cuda_qlora.py --worker NAME SPEC.json RESULT.json`.

def llama_parameters(spec: dict[str, int]) -> int:
    """Parameters of the untied Llama of a SHAPES entry: embeddings + blocks + final norm + head."""
    h, inter, vocab = spec["hidden_size"], spec["intermediate_size"], spec["vocab_size"]
    head_dim = h // spec["num_heads"]
    q, kv = spec["num_heads"] * head_dim, spec["num_kv_heads"] * head_dim
    block = h * q + 2 * h * kv + q * h + 3 * h * inter + 2 * h
    return 2 * vocab * h + spec["num_layers"] * block + h


def build_model(model_dir: Path, shape: str, seed: int) -> dict[str, Any]:
    """Random-weight Llama of the shape, made by transformers from its config on the GPU (CPU without one) and
    saved as bf16 (fp16 without bf16) safetensors shards plus a tokenizer; reused if the marker matches."""
    marker = model_dir / MARKER
    if marker.is_file():
        info = json.loads(marker.read_text())
        if info.get("shape") == shape and info.get("seed") == seed:
            return {**info, "reused": True}
        raise SystemExit(f"--model-dir {model_dir}: holds a {info.get('shape')} model (seed {info.get('seed')}), "
                         f"not {shape} (seed {seed}); remove it or pick another folder")
    if model_dir.exists() and any(model_dir.iterdir()):
        raise SystemExit(f"--model-dir {model_dir}: exists and is not a model folder this script wrote; remove it "
                         "or pick another folder")
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from trmlx.tiny.llama import llama_config, shipped_texts

    from trmlx.tiny.tokenizer import save_tokenizer, train_tokenizer

    gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if (not gpu or native_bf16()) else torch.float16
    spec = SHAPES[shape]
    config = LlamaConfig(**llama_config(**spec))
    # Initialise on the GPU (seconds for 7B) when the 16-bit weights fit with room to spare (a 16 GB T4 does
    # not); else on the CPU (a minute or two).
    init_device = "cuda" if gpu and 2.3 * llama_parameters(spec) < torch.cuda.mem_get_info()[0] else "cpu"
    start = time.perf_counter()
    torch.manual_seed(seed)
    with torch.device(init_device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    params = sum(p.numel() for p in model.parameters())
    if params != llama_parameters(spec):
        raise RuntimeError(f"built {params} parameters, the config says {llama_parameters(spec)}")
    init_s = time.perf_counter() - start
    partial = model_dir.parent / f".{model_dir.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, max_shard_size="2GB")
    del model
    tokenizer = train_tokenizer(shipped_texts(DATA), vocab_size=min(1024, spec["vocab_size"]))
    tokenizer.model_max_length = spec["max_position_embeddings"]
    save_tokenizer(tokenizer, partial)
    info = {"shape": shape, "seed": seed, "config": spec, "parameters": params,
            "storage_dtype": str(dtype).removeprefix("torch."), "init_seconds": round(init_s, 2),
            "build_seconds": round(time.perf_counter() - start, 2),
            "size_gb": round(sum(f.stat().st_size for f in partial.iterdir()) / 1e9, 3),
            "initialised_on": torch.cuda.get_device_name() if init_device == "cuda" else "cpu"}
    (partial / MARKER).write_text(json.dumps(info, indent=2) + "\n")
    if model_dir.exists():
        model_dir.rmdir()
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    partial.rename(model_dir)
    if gpu:
        torch.cuda.empty_cache()
    return {**info, "reused": False}


def worker_prepare(spec: dict) -> dict:
    """Device facts, its matmul rate, and the model folder. Refuses a big shape without a GPU before any work."""
    from trmlx.backends.cuda.device import describe_device
    info = describe_device()
    if info["kind"] == "cpu" and spec["shape"] != "tiny":
        return {"error": f"--shape {spec['shape']} needs an NVIDIA GPU and none is visible; on the CPU only "
                         "--shape tiny runs", "exit": 2}
    gpu = info["kind"] == "gpu"
    dtype = ("bf16" if native_bf16() else "fp16") if gpu else "fp32"
    reason = ("GPU with native bf16 (compute capability >= 8)" if dtype == "bf16" else
              "GPU without native bf16 (e.g. T4, P100): fp16" if gpu else "CPU: fp32, as trmlx uses there")
    matmul = torch_matmul_rate(dtype)
    model = build_model(Path(spec["model_dir"]), spec["shape"], spec["seed"])
    return {"device": info, "compute_dtype": dtype, "dtype_reason": reason, "matmul": matmul, "model": model}


def worker_trmlx(spec: dict) -> dict:
    """Side A: trmlx's own load() and train_loop() on the recipe, per-step wall time from the loop's reports."""
    import torch

    from trmlx.backends.cuda.model import load
    from trmlx.backends.cuda.train import train_loop
    from trmlx.data.examples import Example
    from trmlx.recipe import load_recipe

    total = spec["total_steps"]
    overrides = [f"model.path={json.dumps(spec['model_dir'])}", f"train.batch_size={spec['batch_size']}",
                 f"data.max_length={spec['seq_len']}", "train.epochs=0", f"train.steps={total}",
                 f"train.warmup_steps={spec['lr_warmup_steps']}",
                 f"train.grad_accum={spec['grad_accum']}", f"peft.layers={spec['lora_layers']}",
                 "train.log_every=1", "train.eval_every=0", "train.save_every=0"]
    if not torch.cuda.is_available():
        overrides.append("train.optimizer='adamw'")  # paged_adamw_8bit is CUDA-only (the recipe's CUDA choice)
    recipe = load_recipe(RECIPE, overrides, backend="cuda")
    import bitsandbytes  # noqa: F401  (imported before the load clock starts, as on side B)
    import peft  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    start = time.perf_counter()
    loaded = load(recipe)
    load_s = time.perf_counter() - start
    load_peak = memory_now()
    rows = synthetic_rows(spec)
    half = spec["seq_len"] // 2
    examples = [Example(tuple(int(t) for t in row), prompt_len=half) for row in rows]
    model = loaded.model
    setup = {"dtype": loaded.handle["dtype"], "optimizer": recipe.train.optimizer,
             "grad_checkpoint": recipe.train.grad_checkpoint, "grad_accum": recipe.train.grad_accum,
             "quant": f"{recipe.model.quantize_bits}-bit {recipe.model.quant_mode} double_quant="
                      f"{recipe.model.double_quant}",
             "lora": {"rank": recipe.peft.rank, "alpha": recipe.peft.alpha, "dropout": recipe.peft.dropout,
                      "targets": recipe.peft.targets, "layers": recipe.peft.layers},
             "attn_implementation": getattr(model.config, "_attn_implementation", None),
             "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
             # trmlx's collate shifts inside the example: the forward sees seq_len - 1 positions
             "forward_positions_per_row": spec["seq_len"] - 1}
    step_seconds, losses = [], []
    with tempfile.TemporaryDirectory() as run_dir:
        reports = train_loop(loaded, recipe, examples, [], Path(run_dir))
        before_train = memory_now()["allocated_gb"]
        previous = clock()
        for report in reports:
            if report.kind != "train":
                continue
            now = clock()
            step_seconds.append(now - previous)
            previous = now
            losses.append(report.loss)
            if len(step_seconds) == total:
                break
        peak = peak_memory()
        reports.close()  # stop at the yield: no end-of-run checkpoint inside the timing or the memory peak
    return {"step_seconds": step_seconds, "trial_seconds": trial_times(step_seconds, spec), "losses": losses,
            "load_seconds": load_s, "load_peak_memory_gb": load_peak["peak_allocated_gb"],
            "model_memory_gb": before_train, "forward_positions_per_step":
            spec["batch_size"] * spec["grad_accum"] * (spec["seq_len"] - 1), "setup": setup, **peak}


WORKERS = {"prepare": worker_prepare, "trmlx": worker_trmlx, "hf": worker_hf}


def worker_main(name: str, spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    sys.path.insert(0, str(REPO))
    result = WORKERS[name](spec)
    Path(result_path).write_text(json.dumps(result))
    if "exit" in result:
        sys.exit(result["exit"])


# ----------------------------------------------------------------------------------------------- orchestration

def run_worker(name: str, spec: dict, work: Path, label: str) -> dict:
    """One fresh interpreter; its output goes to a log, whose tail is shown if it fails."""
    spec_path, result_path, log_path = work / f"{label}.spec.json", work / f"{label}.result.json", work / f"{label}.log"
    spec_path.write_text(json.dumps(spec))
    result_path.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    # One GPU for both sides: on a 2-GPU machine (Kaggle's 2×T4) Trainer would otherwise wrap the model in
    # DataParallel while trmlx (no torchrun here) uses one device.
    env.setdefault("CUDA_VISIBLE_DEVICES", "0")
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", name, str(spec_path),
                               str(result_path)], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    wall = time.perf_counter() - start
    if result_path.is_file():
        result = json.loads(result_path.read_text())
        if "error" not in result and proc.returncode == 0:
            return {**result, "process_seconds": round(wall, 2)}
        if "error" in result:
            return result
    lines = log_path.read_text(errors="replace").strip().splitlines()
    reason = next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln), lines[-1] if lines else "")
    print(f"  {label}: failed (exit {proc.returncode}); last lines of {log_path}:", file=sys.stderr)
    print("    " + "\n    ".join(lines[-15:]), file=sys.stderr)
    return {"error": reason.strip()[:300] or f"exit code {proc.returncode}"}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--seq-len", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per trial")
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first (≥1 advised: the first "
                                                              "step holds one-off setup)")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--grad-accum", type=int, default=1,
                        help="micro-batches per optimizer step on both sides (the recipe's 4 is a memory setting)")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="keep the random model here and reuse it next time (default: a temp folder)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results",
                        help="folder for cuda_qlora-<device>.json and .png")
    parser.add_argument("--merge", action="store_true",
                        help="keep configurations of an existing result file (same device and shape) not re-run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-work", action="store_true", help="keep the temp folder with the worker logs")
    args = parser.parse_args(argv)
    if min(args.seq_len) < 4 or min(args.batch_size) < 1 or min(args.steps, args.trials) < 1 or args.warmup < 0:
        parser.error("--seq-len must be ≥ 4; --batch-size, --steps and --trials ≥ 1; --warmup ≥ 0")
    shape = SHAPES[args.shape]
    if max(args.seq_len) > shape["max_position_embeddings"]:
        parser.error(f"--seq-len: the {args.shape} shape has {shape['max_position_embeddings']} positions")

    import torch  # only asks whether a GPU is there; no CUDA context is made in this process

    if args.shape != "tiny" and not torch.cuda.is_available():
        print(f"benchmarks/cuda_qlora.py: --shape {args.shape} needs an NVIDIA GPU and none is visible; on the CPU "
              "only --shape tiny runs", file=sys.stderr)
        return 2
    load_before = os.getloadavg()
    temp = Path(tempfile.mkdtemp(prefix="trmlx-cuda-qlora-"))
    try:
        model_dir = (args.model_dir or temp / "model").resolve()
        work = temp / "work"
        work.mkdir()
        print(f"preparing: device, matmul rate, {args.shape} model in {model_dir}", file=sys.stderr)
        prep_spec = {"shape": args.shape, "model_dir": str(model_dir), "seed": args.seed}
        # On a GPU in a subprocess, so this process never holds a CUDA context (and its memory) while the sides
        # run; on the CPU there is nothing to keep apart, and this saves an interpreter start.
        prep = (run_worker("prepare", prep_spec, work, "prepare") if torch.cuda.is_available()
                else worker_prepare(prep_spec))
        if "error" in prep:
            print(f"benchmarks/cuda_qlora.py: {prep['error']}", file=sys.stderr)
            return 2
        device, model = prep["device"], prep["model"]
        cpu = device["kind"] == "cpu"
        params, peak = model["parameters"], prep["matmul"]["peak_flops"]
        recipe_train, recipe_layers = recipe_facts()
        lora_layers = min(recipe_layers or shape["num_layers"], shape["num_layers"])
        print(f"  {device['name']}: {prep['matmul']['dtype']} matmul peak {peak / 1e12:.3f} TFLOP/s; model "
              f"{params / 1e6:.1f}M parameters ({'reused' if model['reused'] else 'built'} in "
              f"{model['build_seconds']}s)", file=sys.stderr)
        total_steps = args.warmup + args.steps * args.trials
        configs = []
        for seq_len in args.seq_len:
            for batch_size in args.batch_size:
                spec = {"model_dir": str(model_dir), "seq_len": seq_len, "batch_size": batch_size,
                        "grad_accum": args.grad_accum, "warmup": args.warmup, "steps": args.steps,
                        "trials": args.trials, "total_steps": total_steps, "seed": args.seed,
                        "vocab_size": shape["vocab_size"], "lora_layers": lora_layers,
                        "lr_warmup_steps": min(recipe_train.warmup_steps, total_steps - 1),
                        "recipe": str(RECIPE), "overrides": []}
                record: dict[str, Any] = {"seq_len": seq_len, "batch_size": batch_size}
                # Alternate which side goes first, so a drift of the machine (clocks, heat) favours neither.
                for side in SIDES if len(configs) % 2 == 0 else SIDES[::-1]:
                    label = f"{side}-s{seq_len}-b{batch_size}"
                    print(f"running {label} ({total_steps} steps)", file=sys.stderr)
                    record[side] = summarise(run_worker(side, spec, work, label), spec, params, peak)
                record["speed_ratio"] = ratio(record["trmlx"], record["hf"], "trained_tokens_per_second")
                record["memory_ratio"] = ratio(record["trmlx"], record["hf"], "peak_memory_gb")
                record["matmul_peak_flops"] = peak
                dtypes = {s: record[s]["setup"]["dtype"] for s in SIDES if "error" not in record[s]}
                if len(set(dtypes.values())) > 1:
                    record["dtype_mismatch"] = dtypes  # e.g. trmlx choosing emulated bf16 on a T4
                configs.append(record)
    finally:
        if args.keep_work:
            print(f"kept {temp} (worker logs under work/)", file=sys.stderr)
        else:
            shutil.rmtree(temp, ignore_errors=True)

    name = slug(str(device.get("name", "unknown")))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"cuda_qlora-{name}.json"
    if args.merge and path.is_file():
        old = json.loads(path.read_text())
        if old.get("shape") == args.shape:
            done = {(c["seq_len"], c["batch_size"]) for c in configs}
            configs += [c for c in old.get("configs", []) if (c["seq_len"], c["batch_size"]) not in done]
            configs.sort(key=lambda c: (c["seq_len"], c["batch_size"]))
    from trmlx.rundir import atomic_write, environment_record

    model_public = {k: v for k, v in model.items() if k != "reused"}
    record = {
        "benchmark": "cuda_qlora",
        "note": CPU_NOTE if cpu else "GPU run.",
        "device": device, "shape": args.shape, "model": model_public,
        "settings": {"recipe": str(RECIPE.relative_to(REPO)),
                     "seq_lens": sorted({c["seq_len"] for c in configs}),
                     "batch_sizes": sorted({c["batch_size"] for c in configs}), "grad_accum": args.grad_accum, "warmup_steps": args.warmup,
                     "steps_per_trial": args.steps, "trials": args.trials, "lora_layers": lora_layers,
                     "lr_warmup_steps": min(recipe_train.warmup_steps, total_steps - 1),
                     "optimizer": recipe_train.optimizer if not cpu else "adamw (CPU: paged_adamw_8bit is CUDA-only)",
                     "grad_checkpoint": recipe_train.grad_checkpoint,
                     "compute_dtype": prep["compute_dtype"], "dtype_reason": prep["dtype_reason"],
                     "loss_mask": "second half of each sequence (completion-only)",
                     "mfu": "4·N·all tokens/s over the measured matmul peak; hfu adds 2N for checkpointing "
                            "recompute; attention seq² FLOPs not counted",
                     "speed_ratio": "trmlx / hf trained tokens/s (median trials; >1 = trmlx faster)",
                     "memory_ratio": "trmlx / hf peak memory (<1 = trmlx smaller)"},
        "matmul": prep["matmul"],
        # a shared machine is noisy: the 1-minute load average before and after the sweep, next to its cores
        "load_average": {"before": load_before[0], "after": os.getloadavg()[0], "cpus": os.cpu_count()},
        "configs": configs,
        "environment": environment_record(backend="cuda", device=device),
    }
    atomic_write(path, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    title = (f"QLoRA {args.shape} on {device['name']}: trmlx vs HF Trainer (peft + bitsandbytes nf4)"
             + ("\nCPU, tiny shape: a pipeline check, not a GPU result" if cpu else ""))
    plot(configs, path.with_suffix(".png"), title, cpu)
    print(table(configs, cpu))
    if cpu:
        print(CPU_NOTE)
    print(f"wrote {path} and {path.with_suffix('.png').name}")
    print(json.dumps({"benchmark": "cuda_qlora", "device": device["name"], "shape": args.shape,
                      "path": str(path), "configs": [
                          {"seq_len": c["seq_len"], "batch_size": c["batch_size"], "speed_ratio": c["speed_ratio"],
                           "memory_ratio": c["memory_ratio"],
                           **{f"{s}_trained_tokens_per_second": (c[s]["trained_tokens_per_second"]["median"]
                                                                 if "error" not in c[s] else None) for s in SIDES},
                           **{f"{s}_mfu": (c[s]["mfu"]["median"] if "error" not in c[s] else None)
                              for s in SIDES}} for c in configs]}))
    return 0


def recipe_facts():
    """The recipe's train section and peft.layers (LoRA on the last N blocks; 0 = all): both sides adapt the same
    blocks and follow the same learning-rate warm-up (cut to fit a short benchmark run)."""
    from trmlx.recipe import load_recipe

    recipe = load_recipe(RECIPE, backend="cuda")
    return recipe.train, recipe.peft.layers


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        worker_main(*sys.argv[2:])
    else:
        sys.path.insert(0, str(REPO))
        sys.exit(main())
