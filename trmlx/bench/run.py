"""`trmlx bench`: training and eval-generation throughput, MFU and peak memory of a recipe's shape on each backend,
next to the tools people use today (mlx_lm.lora on MLX, a transformers Trainer + peft + bitsandbytes script on
CUDA) measured in the same run, and next to `trmlx plan`'s prediction for the same configuration.

Per (backend, seq_len, batch size) one fresh process per side (trmlx.bench.harness): warm-up steps, then --trials
trials of --steps timed steps with the device synchronised before every clock read; the median trial and the
min-max spread are reported. Training tokens/s counts the trained (target) tokens, the second half of each
synthetic row; MFU = 4·N·(all tokens/s) / the device's dense matmul rate, measured here too (N = every base
parameter; all tokens, because the backward pass runs through every position; checkpointing's recompute is not
counted). Ratios trmlx / peer come from the same run on the same machine.

Results: a table on the terminal, and JSON (package versions, git hash, device, recipe hash) plus a PNG chart in
the current folder (or --out), named bench-<recipe>-<device>.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

from trmlx.bench.harness import run_worker, scaled, slug, spread, summarise
from trmlx.bench.report import plot
from trmlx.errors import UserError
from trmlx.plan.base import GB, detect_kind, make_target
from trmlx.plan.causal import ModelShape
from trmlx.plan.config import PRESETS
from trmlx.plan.tasks import load_shape, plan_recipe

BACKEND_NEEDS = {"mlx": ("mlx", "mlx_lm"), "cuda": ("torch", "transformers", "peft")}
GPU_PARAMETERS = 1e9  # a model this big on a CPU would take hours per step: refuse it


def installed(modules: Sequence[str]) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


def run_bench(recipe_path: str, *, backends: Sequence[str] | None = None, steps: int = 5, trials: int = 3,
              warmup: int = 2, seq_lens: Sequence[int] = (), batch_sizes: Sequence[int] = (), grad_accum: int = 1,
              model_shape: str | None = None, peers: bool = True, out: Path | None = None,
              overrides: Sequence[str] = (), max_new_tokens: int | None = None, seed: int = 0,
              log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> dict[str, Any]:
    """Measure every (backend, seq_len, batch size) and write the result files; returns the result record."""
    from trmlx.recipe import load_recipe, recipe_to_toml
    from trmlx.rundir import atomic_write, environment_record

    backends = list(backends or [b for b in BACKEND_NEEDS if installed(BACKEND_NEEDS[b])])
    missing = [b for b in backends if b not in BACKEND_NEEDS or not installed(BACKEND_NEEDS[b])]
    if missing or not backends:
        raise UserError(f"--backends: {', '.join(missing) or 'none'} not installed (pip install 'trmlx[mlx]' or "
                        "'trmlx[cuda]')")
    if min(steps, trials) < 1 or warmup < 0 or grad_accum < 1:
        raise UserError("--steps and --trials must be ≥ 1, --warmup ≥ 0")
    recipes = {b: load_recipe(recipe_path, overrides, backend=b) for b in backends}
    first = recipes[backends[0]]
    task = bench_task(first.task)
    shape = load_shape(first, model_shape)

    kinds = {b: detect_kind(b) for b in backends}
    if shape.parameters() > GPU_PARAMETERS and any(k == "cpu" for k in kinds.values()):
        cpu = [b for b, k in kinds.items() if k == "cpu"]
        raise UserError(f"--model-shape {model_shape or first.model.path}: {shape.parameters() / 1e9:.1f}B "
                        f"parameters need a GPU, and the {'/'.join(cpu)} backend sees none on this machine; on a "
                        f"CPU bench --model-shape tiny (or a model under {GPU_PARAMETERS / 1e9:.0f}B parameters)")
    # A task may say what --seq-len means by default (embedding: the passage length), else data.max_length.
    seq_lens = list(seq_lens) or [getattr(task, "default_seq_len", lambda r: r.data.max_length)(first)]
    if not batch_sizes:
        if first.train.batch_size == "auto":
            raise UserError('train.batch_size is "auto": give --batch-size (bench measures fixed sizes)')
        batch_sizes = [first.train.batch_size]
    if min(seq_lens) < 8:
        raise UserError("--seq-len must be at least 8")

    temp = Path(tempfile.mkdtemp(prefix="trmlx-bench-"))
    try:
        if model_shape:
            if first.task != "causal":
                raise UserError(f"--model-shape builds random causal LMs; bench this {first.task} recipe's own "
                                "model.path (a small config of the same architecture works too)")
            gpu = any(k != "cpu" for k in kinds.values())
            model_dir = temp / "model"
            config = {**_shape_config(model_shape), "torch_dtype": "bfloat16" if gpu else "float32"}
            log(f"building a random {shape.parameters() / 1e6:.1f}M-parameter {shape.model_type} in {model_dir}")
            build_random_model(model_dir, config, seed)
            shape = ModelShape.from_config(config, f"--model-shape {model_shape}")
        else:
            model_dir = model_folder(first)
        configs = []
        peer_runs: dict[str, tuple[str, dict[str, Any]]] = {}  # peer job -> (backend, raw)
        peak_flops: dict[str, float] = {}
        matmul: dict[str, Any] = {}
        work = temp / "work"
        work.mkdir()
        for backend in backends:
            recipe = recipes[backend]
            peer = task.PEERS.get(backend) if peers else None
            if peer and not installed(task.PEER_NEEDS[peer]):
                log(f"peer {peer} not installed: skipped")
                peer = None
            for seq_len in seq_lens:
                for batch in batch_sizes:
                    spec = {**_spec(recipe_path, overrides, backend, recipe, shape, model_dir, seq_len, batch,
                                    grad_accum, warmup, steps, trials, seed, max_new_tokens),
                            **task.spec_fields(recipe, shape, seq_len)}
                    spec["measure_matmul"] = backend not in matmul
                    label = f"{backend}-s{seq_len}-b{batch}"
                    log(f"running trmlx {label}")
                    raw = run_worker(f"{task.__name__}:trmlx", spec, work, f"trmlx-{label}")
                    if raw.get("matmul"):
                        matmul[backend] = raw["matmul"]
                        peak_flops[backend] = raw["matmul"]["peak_flops"]
                    record = {"backend": backend, "seq_len": seq_len, "batch_size": batch, "peer": peer,
                              "trmlx": _summary(raw, spec, shape, peak_flops.get(backend))}
                    if "error" not in raw:
                        record["plan"] = _plan_check(recipe, backend, shape, raw, task.plan_settings(spec))
                    if peer:
                        log(f"running {peer} {label}")
                        module = "trmlx.bench.hf_causal" if (first.task, peer) == ("causal", "hf") else task.__name__
                        # A peer serving two backends (sentence-transformers) runs the same job for both: measure
                        # it once per configuration and say so, rather than start the same process twice.
                        job = json.dumps({"worker": f"{module}:{peer}", **{k: v for k, v in spec.items()
                                          if k not in ("backend", "measure_matmul")}}, sort_keys=True)
                        if job not in peer_runs:
                            peer_runs[job] = (backend, run_worker(f"{module}:{peer}", spec, work, f"{peer}-{label}"))
                        measured_on, peer_raw = peer_runs[job]
                        if measured_on != backend:
                            peer_raw = {**peer_raw, "same_job_as": measured_on}
                        record[peer] = _summary(peer_raw, spec, shape, peak_flops.get(backend))
                        record["ratios"] = _ratios(record["trmlx"], record[peer], raw.get("device_kind"))
                    configs.append(record)
    finally:
        shutil.rmtree(temp, ignore_errors=True)

    _device_mfu(configs, peak_flops)
    devices = {b: _device(b) for b in backends}
    device_name = "+".join(dict.fromkeys(str(d.get("name", "?")) for d in devices.values()))
    device_slug = slug(device_name)
    name = first.name or Path(recipe_path).stem
    result = {
        "benchmark": "trmlx bench", "recipe": str(recipe_path), "recipe_name": name, "task": first.task,
        "recipe_sha256": {b: hashlib.sha256(recipe_to_toml(r).encode()).hexdigest()[:16] for b, r in recipes.items()},
        "overrides": list(overrides), "model": shape.describe(),
        "model_source": f"--model-shape {model_shape} (random weights)" if model_shape else
        first.model.path.removeprefix(str(Path.cwd()) + "/"),
        "settings": {"steps_per_trial": steps, "trials": trials, "warmup_steps": warmup, "grad_accum": grad_accum,
                     "rows": task.ROWS, "seed": seed,
                     "mfu": "4·N·all tokens/s over the device's matmul rate = the best rate measured by any backend "
                            "in this run (mfu_own_rate: over the backend's own rate); recompute not counted",
                     "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "devices": devices, "matmul": matmul, "configs": configs,
        "load_average": {"1min": os.getloadavg()[0], "cpus": os.cpu_count()},
        "environment": environment_record(backend=",".join(backends), device=devices),
    }
    out = Path(out) if out else Path.cwd()
    path = out / f"bench-{slug(name)}-{device_slug}.json"
    atomic_write(path, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    plot(result, path.with_suffix(".png"))
    result["files"] = [str(path), str(path.with_suffix(".png"))]
    return result


# --------------------------------------------------------------------------------------------------- the model

def bench_task(task: str) -> Any:
    """The bench module of a task. Each has:
      ROWS          one line: what the synthetic rows are and which tokens are trained
      WORKERS       name -> worker(spec) -> raw dict (harness.summarise's input; optional "trained_tokens_per_step",
                    "flops_per_step" and "generation" {"tokens" | "texts", "seconds", "peak_memory_gb", ...})
      PEERS         backend -> the peer's worker name (absent: no peer tool exists for that backend)
      PEER_NEEDS    peer name -> the modules it imports
      spec_fields(recipe, shape, seq_len) -> extra spec keys;  plan_settings(spec) -> plan_recipe keywords"""
    from trmlx.bench import causal, embedding, seq2seq

    tasks = {"causal": causal, "seq2seq": seq2seq, "embedding": embedding}
    if task not in tasks:
        raise UserError(f"task: bench measures {', '.join(tasks)} recipes, not {task}")
    return tasks[task]


def _shape_config(model_shape: str) -> dict[str, Any]:
    if model_shape in PRESETS:
        return dict(PRESETS[model_shape])
    path = Path(model_shape)
    return json.loads((path / "config.json" if path.is_dir() else path).read_text())


def model_folder(recipe: Any) -> Path:
    """The recipe's model as a local folder (a hub id only if it is already in the cache; bench never downloads)."""
    path = Path(recipe.model.path)
    if (path / "config.json").is_file():
        return path
    return Path(load_shape(recipe).source).parent  # the cached snapshot; a clear error when not cached


# A tokenizer for random-weight models: bench trains on synthetic token ids, so its texts only need to cover
# Turkish and English bytes (pangrams), and they ship in the package.
TOKENIZER_TEXTS = ("Pijamalı hasta yağız şoföre çabucak güvendi.", "Fahiş bluz güvencesi yağmurdan ötürü çok.",
                   "The quick brown fox jumps over the lazy dog.", "Sphinx of black quartz, judge my vow.",
                   "İstanbul'da ılık bir sabah: öğrenciler çay içip sınava çalıştı.", "0123456789 %&/()=?!.,;:")


def build_random_model(out: Path, config: dict[str, Any], seed: int = 0) -> None:
    """config.json, random weights (transformers from_config, on the GPU when there is one) and a small tokenizer
    trained on a few pangrams; never downloads."""
    if not installed(("torch", "transformers")):
        raise UserError("--model-shape builds its random model with torch + transformers (pip install "
                        "'trmlx[cuda]'); or bench a model folder you have")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from trmlx.tiny.llama import llama_config

    from trmlx.tiny.tokenizer import save_tokenizer, train_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    if config.get("model_type", "llama") == "llama":  # spelled out like trmlx.tiny.llama (special-token ids included)
        h, heads = config["hidden_size"], config["num_attention_heads"]
        full = {**llama_config(vocab_size=config["vocab_size"], hidden_size=h, num_layers=config["num_hidden_layers"],
                               num_heads=heads, num_kv_heads=config.get("num_key_value_heads") or heads,
                               intermediate_size=config["intermediate_size"],
                               max_position_embeddings=config.get("max_position_embeddings", 2048)), **config}
    else:
        full = dict(config)
    hf_config = AutoConfig.for_model(**{k: v for k, v in full.items() if k != "architectures"})
    dtype = torch.bfloat16 if full.get("torch_dtype") == "bfloat16" else torch.float32
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    model.save_pretrained(out, max_shard_size="2GB")
    del model
    (out / "config.json").write_text(json.dumps({**json.loads((out / "config.json").read_text()), **full},
                                                indent=2) + "\n")
    tokenizer = train_tokenizer(list(TOKENIZER_TEXTS),
                                vocab_size=min(1024, full["vocab_size"]))
    tokenizer.model_max_length = full.get("max_position_embeddings", 2048)
    save_tokenizer(tokenizer, out)


# ---------------------------------------------------------------------------------------------- run and measure

def _spec(recipe_path: str, overrides: Sequence[str], backend: str, recipe: Any, shape: ModelShape, model_dir: Path,
          seq_len: int, batch: int, grad_accum: int, warmup: int, steps: int, trials: int, seed: int,
          max_new_tokens: int | None) -> dict[str, Any]:
    total = warmup + steps * trials + 2  # + 2 steps for the torch-on-CPU profiler pass
    return {"backend": backend, "recipe": str(Path(recipe_path).resolve()), "overrides": list(overrides),
            "model_dir": str(model_dir), "seq_len": seq_len, "batch_size": batch, "grad_accum": grad_accum,
            "warmup": warmup, "steps": steps, "trials": trials, "total_steps": total, "seed": seed,
            "vocab_size": shape.vocab_size, "grad_checkpoint": recipe.train.grad_checkpoint, "task": recipe.task,
            # No LR warm-up: its tiny first updates put fp32 CPU math into denormals (measured: torch steps 100x
            # slower during a warm-up on this CPU), and the speed of a step does not depend on the LR otherwise.
            "lr_warmup_steps": 0,
            "eval_batch_size": recipe.eval.batch_size, "prompt_len": seq_len // 2,
            "max_new_tokens": max_new_tokens or recipe.eval.max_new_tokens}



def _summary(raw: dict[str, Any], spec: dict[str, Any], shape: ModelShape, peak_flops: float | None) -> dict:
    if "error" in raw:
        return raw
    out = summarise(raw, spec, shape.parameters(), peak_flops or float("nan"))
    if "same_job_as" in raw:  # this peer measurement was taken once, in the named backend's configuration
        out["same_job_as"] = raw["same_job_as"]
    if "trained_tokens_per_step" in raw:  # tasks other than causal count their own trained tokens and FLOPs
        out["trained_tokens_per_step"] = raw["trained_tokens_per_step"]
        out["trained_tokens_per_second"] = spread([raw["trained_tokens_per_step"] * spec["steps"] / s
                                                      for s in raw["trial_seconds"]])
    if "flops_per_step" in raw:
        flops = spread([raw["flops_per_step"] * spec["steps"] / s for s in raw["trial_seconds"]])
        out["mfu"] = out["hfu"] = scaled(flops, 1 / (peak_flops or float("nan")))
    # The HF peer has only the process RSS on a CPU, and reports it as its peak there
    cpu_rss = str(raw.get("memory_kind", "")).startswith("peak resident")
    out["rss_peak_gb"] = raw.get("rss_peak_gb") or (raw["peak_memory_gb"] if cpu_rss else None)
    gen = raw.get("generation")
    if gen:
        # "tokens_per_second" of eval generation, or texts encoded per second for embedding recipes
        count = gen["tokens"][0] if "tokens" in gen else gen["texts"][0]
        out["generation"] = {**gen, "tokens_per_second": spread([count / s for s in gen["seconds"]])}
    return out


def _plan_check(recipe: Any, backend: str, shape: Any, raw: dict[str, Any], settings: dict[str, Any]) -> dict:
    """trmlx plan's prediction for exactly this configuration (settings: the task's plan_settings(spec)) against
    the measured peaks."""
    target = make_target(recipe, backend, shape, raw["device_kind"])
    plan = plan_recipe(recipe, backend, shape, target, **settings)
    train, gen = raw["peak_memory_gb"] * GB, raw["generation"]["peak_memory_gb"] * GB
    return {"train_predicted_gb": round(plan.train_peak / GB, 5), "train_measured_gb": round(train / GB, 5),
            "train_error_pct": round(100 * (plan.train_peak - train) / train, 1),
            "eval_predicted_gb": round(plan.eval_peak / GB, 5), "eval_measured_gb": round(gen / GB, 5),
            "eval_error_pct": round(100 * (plan.eval_peak - gen) / gen, 1), "counter": raw["memory_kind"],
            "terms_gb": {t.name: round(t.bytes / GB, 5) for t in plan.terms}}


def _ratios(ours: dict, peer: dict, kind: str | None) -> dict[str, Any]:
    if "error" in ours or "error" in peer:
        return {}
    speed = ours["trained_tokens_per_second"]["median"] / peer["trained_tokens_per_second"]["median"]
    # Torch on a CPU: the peer's only counter is the process RSS, so compare RSS with RSS there.
    key = "rss_peak_gb" if kind == "cpu" and ours["memory_kind"].startswith("torch profiler") else "peak_memory_gb"
    memory = ours[key] / peer[key] if ours.get(key) and peer.get(key) else None
    return {"speed": round(speed, 3), "memory": None if memory is None else round(memory, 3), "memory_basis": key}


def _device_mfu(configs: list[dict[str, Any]], peak_flops: dict[str, float]) -> None:
    """MFU over the device's rate (the best any backend reached on it: MLX's CPU build multiplies with a slower
    BLAS than torch here), keeping each backend's own-rate MFU beside it."""
    if not peak_flops:
        return
    device_rate = max(peak_flops.values())
    for c in configs:
        own = peak_flops.get(c["backend"])
        for side in ("trmlx", c.get("peer")):
            r = c.get(side)
            if r and "mfu" in r and own:
                r["mfu_own_rate"] = r["mfu"]
                r["mfu"] = scaled(r["mfu"], own / device_rate)
                r["hfu"] = scaled(r["hfu"], own / device_rate)


def _device(backend: str) -> dict[str, Any]:
    module = "trmlx.backends.mlx.device" if backend == "mlx" else "trmlx.backends.cuda.device"
    return __import__(module, fromlist=["describe_device"]).describe_device()
