"""Peak memory of loading a model with 4-bit quantisation at load: trmlx's block-by-block loader vs the naive way.

A random-weight HF-format Llama of a few hundred MB in fp32 is written once into a temporary folder (one
safetensors shard per transformer block, so the builder holds one block at a time; config and tokenizer from
trmlx.tiny.llama so mlx-lm loads it like any HF checkpoint). Then each way of loading runs in its own fresh Python
process, so peaks never mix:

  trmlx-q4     trmlx.backends.mlx.model.load(recipe), model.quantize_bits = 4 (group 64), peft.method = "lora":
               lazy load, quantise_blockwise (evaluate block by block), LoRA attached
  naive-q4     mlx_lm.utils.load(path) (every fp32 weight materialised), then nn.quantize(model, 64, 4) + mx.eval
  trmlx-fp32   trmlx's loader with quantize_bits = 0 (reference: the whole model in fp32)
  split-q4     NOT trmlx code, a diagnostic: the same block-by-block quantisation, then the embedding and the
               LM head quantised and evaluated one at a time (trmlx does both in one final eval); records the
               MLX peak after each phase, to show where trmlx-q4's peak comes from

Each child reports mx.get_peak_memory() (MLX's allocator: bytes of live arrays at their highest), the process's
max RSS (getrusage; includes Python, the imported libraries and MLX's buffer cache), max RSS before the load
(imports only) and the resulting model's parameter bytes (sum of nbytes over tree_flatten(model.parameters())).

    python benchmarks/load_memory.py [--hidden 1024 --layers 8 --intermediate 2816 --vocab 32000]

Prints a table, then one JSON line last, and writes benchmarks/results/load_memory-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "quickstart.toml"
MODES = ("trmlx-q4", "naive-q4", "trmlx-fp32", "split-q4")
MB = 1e6


# ----------------------------------------------------------------------------------------------- the model builder

def build_model(out: Path, *, hidden: int, layers: int, intermediate: int, vocab: int, heads: int, kv_heads: int,
                seed: int = 0) -> dict[str, Any]:
    """Write config.json, tokenizer files and one safetensors shard per block (plus embeddings / head shards) with
    an index, generating each tensor just before its shard is written: the builder never holds the whole model.
    Names and scales follow trmlx.tiny.llama.llama_weights (normal(0, 1/sqrt(fan_in)), embeddings normal(0, 1))."""
    import numpy as np
    from safetensors.numpy import save_file

    from trmlx.tiny.llama import llama_config, shipped_texts

    from trmlx.tiny.tokenizer import save_tokenizer, train_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    config = llama_config(vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads,
                          num_kv_heads=kv_heads, intermediate_size=intermediate, max_position_embeddings=2048)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    # A small tokenizer is enough: only loading is measured, and the model's vocab may be larger than it.
    save_tokenizer(train_tokenizer(shipped_texts(REPO / "recipes" / "data" / "en_tr"), vocab_size=1024), out)

    rng = np.random.default_rng(seed)
    hd = config["head_dim"]
    q_out, kv_out = heads * hd, kv_heads * hd

    def normal(rows: int, cols: int, std: float | None = None) -> np.ndarray:
        scale = cols ** -0.5 if std is None else std
        return (rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(scale))

    shards: list[tuple[str, Any]] = [("embed", lambda: {"model.embed_tokens.weight": normal(vocab, hidden, 1.0)})]
    for i in range(layers):
        def block(i=i):
            p = f"model.layers.{i}."
            return {p + "self_attn.q_proj.weight": normal(q_out, hidden),
                    p + "self_attn.k_proj.weight": normal(kv_out, hidden),
                    p + "self_attn.v_proj.weight": normal(kv_out, hidden),
                    p + "self_attn.o_proj.weight": normal(hidden, q_out),
                    p + "mlp.gate_proj.weight": normal(intermediate, hidden),
                    p + "mlp.up_proj.weight": normal(intermediate, hidden),
                    p + "mlp.down_proj.weight": normal(hidden, intermediate),
                    p + "input_layernorm.weight": np.ones(hidden, np.float32),
                    p + "post_attention_layernorm.weight": np.ones(hidden, np.float32)}
        shards.append((f"layer{i}", block))
    shards.append(("head", lambda: {"model.norm.weight": np.ones(hidden, np.float32),
                                    "lm_head.weight": normal(vocab, hidden)}))

    weight_map, total_bytes, params = {}, 0, 0
    for n, (_, make) in enumerate(shards, 1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        tensors = make()
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        for key, value in tensors.items():
            weight_map[key] = name
            total_bytes += value.nbytes
            params += value.size
        del tensors
    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return {"hidden_size": hidden, "num_layers": layers, "intermediate_size": intermediate, "vocab_size": vocab,
            "num_heads": heads, "num_kv_heads": kv_heads, "dtype_on_disk": "float32", "parameters": params,
            "fp32_bytes": total_bytes, "shards": len(shards),
            "largest_tensor_bytes": vocab * hidden * 4,
            "block_fp32_bytes": 4 * (hidden * (2 * q_out + 2 * kv_out) + 3 * hidden * intermediate + 2 * hidden)}


# ------------------------------------------------------------------------------------------------- child process

def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB (macOS: bytes)


def current_rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return -1


def child(mode: str, model_dir: str) -> dict[str, Any]:
    """One way of loading, in this (fresh) process; returns its measurements."""
    from trmlx.backends.mlx import device as _blas  # noqa: F401  chooses the BLAS before mlx loads
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    # Import everything either path needs before the baseline, so the baseline is the same for every mode.
    import mlx_lm.utils  # noqa: F401
    from trmlx.backends.mlx.model import load as trmlx_load
    from trmlx.recipe import load_recipe

    rss_before = max_rss_bytes()
    mx.reset_peak_memory()
    start = time.perf_counter()
    if mode.startswith("trmlx"):
        bits = 4 if mode == "trmlx-q4" else 0
        recipe = load_recipe(RECIPE, [f"model.path={model_dir}", f"model.quantize_bits={bits}",
                                      "model.quant_group_size=64", "peft.method=lora"], backend="mlx")
        model = trmlx_load(recipe).model
    elif mode == "naive-q4":
        model, _ = mlx_lm.utils.load(model_dir)  # lazy=False: every fp32 weight is evaluated here
        nn.quantize(model, group_size=64, bits=4)
        mx.eval(model.parameters())
    elif mode == "split-q4":
        phases = {}
        model, _ = mlx_lm.utils.load_model(Path(model_dir), lazy=True)

        def quantisable(_, module):
            return hasattr(module, "to_quantized") and module.weight.shape[-1] % 64 == 0

        for block in model.layers:
            nn.quantize(block, group_size=64, bits=4, class_predicate=quantisable)
            mx.eval(block.parameters())
        phases["after_blocks"] = mx.get_peak_memory()
        # Names only: holding the old modules would keep their fp32 weights alive after they are replaced.
        rest = [name for name, module in model.named_modules()
                if module is not model and quantisable(name, module) and ".layers." not in f".{name}."
                and not isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding))]
        for name in rest:
            nn.quantize(model, group_size=64, bits=4, class_predicate=lambda p, m, name=name: p == name)
            mx.eval([v for k, v in tree_flatten(model.parameters()) if k.startswith(name + ".")])
            phases[f"after_{name}"] = mx.get_peak_memory()
        mx.eval(model.parameters())
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    seconds = time.perf_counter() - start
    params = tree_flatten(model.parameters())
    lora = sum(v.nbytes for k, v in params if ".lora_" in k)
    extra = {"phase_peaks_bytes": phases} if mode == "split-q4" else {}
    return {
        **extra,
        "mode": mode,
        "load_seconds": round(seconds, 2),
        "mlx_peak_bytes": mx.get_peak_memory(),
        "mlx_active_bytes_after": mx.get_active_memory(),
        "mlx_cache_bytes_after": mx.get_cache_memory(),
        "max_rss_bytes": max_rss_bytes(),
        "max_rss_before_load_bytes": rss_before,
        "rss_after_bytes": current_rss_bytes(),
        "param_bytes": sum(v.nbytes for _, v in params),
        "lora_param_bytes": lora,
        "quantized_layers": sum(1 for _, m in model.named_modules()
                                if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))),
    }


# ----------------------------------------------------------------------------------------------------- the parent

def run_child(mode: str, model_dir: Path) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--child", mode, "--model-dir", str(model_dir)],
                          capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        raise SystemExit(f"{mode} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(row: dict[str, Any], quantised_bytes: int) -> dict[str, Any]:
    rss_delta = row["max_rss_bytes"] - row["max_rss_before_load_bytes"]
    return {**row, "max_rss_delta_bytes": rss_delta,
            "mlx_peak_over_quantised": round(row["mlx_peak_bytes"] / quantised_bytes, 2),
            "rss_delta_over_quantised": round(rss_delta / quantised_bytes, 2),
            "mlx_peak_over_own_params": round(row["mlx_peak_bytes"] / row["param_bytes"], 2)}


def table(rows: list[dict[str, Any]], model: dict[str, Any]) -> str:
    head = (f"model: {model['parameters'] / 1e6:.1f}M params, {model['fp32_bytes'] / MB:.0f} MB fp32 on disk "
            f"({model['shards']} shards); largest tensor {model['largest_tensor_bytes'] / MB:.0f} MB, "
            f"one block {model['block_fp32_bytes'] / MB:.0f} MB (fp32)\n")
    cols = ("mode", "params MB", "MLX peak MB", "peak/q4", "max RSS MB", "RSS before", "RSS delta MB",
            "delta/q4", "load s")
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    for r in rows:
        lines.append(" | ".join([
            r["mode"], f"{r['param_bytes'] / MB:.1f}", f"{r['mlx_peak_bytes'] / MB:.1f}",
            f"{r['mlx_peak_over_quantised']:.2f}", f"{r['max_rss_bytes'] / MB:.0f}",
            f"{r['max_rss_before_load_bytes'] / MB:.0f}", f"{r['max_rss_delta_bytes'] / MB:.0f}",
            f"{r['rss_delta_over_quantised']:.2f}", f"{r['load_seconds']:.1f}"]))
    for r in rows:
        if "phase_peaks_bytes" in r:
            lines.append(f"{r['mode']} MLX peak after each phase: " + ", ".join(
                f"{k} {v / MB:.1f} MB" for k, v in r["phase_peaks_bytes"].items()))
    return head + "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--trials", type=int, default=1, help="fresh processes per mode (peaks are deterministic "
                                                                "up to allocator noise; >1 reports the max)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model_dir)))
        return

    from trmlx.backends.mlx.device import describe_device
    from trmlx.rundir import atomic_write, environment_record

    with tempfile.TemporaryDirectory(prefix="trmlx-load-memory-") as tmp:
        model_dir = Path(tmp) / "model"
        start = time.perf_counter()
        model = build_model(model_dir, hidden=args.hidden, layers=args.layers, intermediate=args.intermediate,
                            vocab=args.vocab, heads=args.heads, kv_heads=args.kv_heads)
        model["build_seconds"] = round(time.perf_counter() - start, 1)
        model["builder_max_rss_bytes"] = max_rss_bytes()
        raw = {mode: [run_child(mode, model_dir) for _ in range(args.trials)] for mode in MODES}
    rows_raw = {mode: max(trials, key=lambda r: r["mlx_peak_bytes"]) for mode, trials in raw.items()}
    quantised = rows_raw["trmlx-q4"]["param_bytes"] - rows_raw["trmlx-q4"]["lora_param_bytes"]
    rows = [summarise(rows_raw[m], quantised) for m in MODES]

    device = describe_device()
    result = {
        "benchmark": "load_memory",
        "model": model,
        "quantisation": {"bits": 4, "group_size": 64, "mode": "affine"},
        "quantised_param_bytes": quantised,
        "modes": {r["mode"]: r for r in rows},
        "naive_over_trmlx_mlx_peak": round(rows_raw["naive-q4"]["mlx_peak_bytes"]
                                           / rows_raw["trmlx-q4"]["mlx_peak_bytes"], 2),
        "naive_over_trmlx_rss_delta": round(rows[1]["max_rss_delta_bytes"] / rows[0]["max_rss_delta_bytes"], 2),
        "trials_per_mode": args.trials,
        "device": device,
    }
    slug = re.sub(r"[^a-z0-9]+", "-", str(device.get("name", "unknown")).lower()).strip("-")
    path = args.out / f"load_memory-{slug}.json"
    record = {**result, "all_trials": raw, "environment": environment_record(backend="mlx", device=device)}
    atomic_write(path, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    print(table(rows, model))
    print(json.dumps(result, ensure_ascii=False))


if __name__ == "__main__":
    main()
