"""Eval generation throughput on the tiny Llama: batched (one shared left-padded KV cache) vs one example at a time.

Both sides run the code `trmlx eval` runs (trmlx.evaluate.generate_batched over the MLX backend), greedy, over the
shipped test set with a fixed budget. The tiny model's random weights never emit EOS, so every example generates
exactly --max-new-tokens tokens and both sides do the same work. Warm-up first, then several trials; the median
and the spread are reported, and the ratio is measured in the same process on the same machine.

    python benchmarks/generation_batching.py [--batch-size 16] [--max-new-tokens 48] [--trials 5]

Prints one JSON line last and writes benchmarks/results/generation_batching-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path
from typing import Any, Sequence

from trmlx.bench.harness import timed_trials

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "quickstart.toml"


def summary(seconds: Sequence[float], tokens: int, batch_size: int) -> dict[str, Any]:
    median = statistics.median(seconds)
    return {"batch_size": batch_size, "median_s": round(median, 4), "min_s": round(min(seconds), 4),
            "max_s": round(max(seconds), 4), "spread_pct": round(100 * (max(seconds) - min(seconds)) / median, 1),
            "tokens_per_second": round(tokens / median, 1), "trials": [round(s, 4) for s in seconds]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()

    from trmlx.backend import GenerationSettings
    from trmlx.backends.mlx import create_backend
    from trmlx.backends.mlx.device import describe_device
    from trmlx.data import prepare_data
    from trmlx.evaluate import encode_prompts, generate_batched
    from trmlx.recipe import load_recipe
    from trmlx.rundir import atomic_write, environment_record

    recipe = load_recipe(RECIPE, backend="mlx")
    backend = create_backend()
    loaded = backend.load(recipe)
    records = prepare_data(recipe).test
    _, prompts, _ = encode_prompts(records, recipe, loaded.tokenizer)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    tokens = len(prompts) * args.max_new_tokens

    batched_s, batched = timed_trials(lambda: generate_batched(backend, loaded, prompts, settings, args.batch_size),
                                      args.trials)
    single_s, single = timed_trials(lambda: generate_batched(backend, loaded, prompts, settings, 1), args.trials)
    generated = sum(len(o) for o in batched)
    if generated != tokens:
        raise SystemExit(f"expected {tokens} generated tokens, got {generated}: the workload is not fixed")

    device = describe_device()
    result = {
        "benchmark": "generation_batching",
        "model": recipe.model.path.replace(str(REPO) + "/", ""),
        "examples": len(prompts),
        "prompt_tokens": {"min": min(map(len, prompts)), "max": max(map(len, prompts))},
        "max_new_tokens": args.max_new_tokens,
        "generated_tokens": tokens,
        "batched": summary(batched_s, tokens, args.batch_size),
        "sequential": summary(single_s, tokens, 1),
        "speedup": round(statistics.median(single_s) / statistics.median(batched_s), 2),
        "identical_outputs": batched == single,
        "device": device,
    }
    slug = re.sub(r"[^a-z0-9]+", "-", str(device.get("name", "unknown")).lower()).strip("-")
    path = args.out / f"generation_batching-{slug}.json"
    record = {**result, "environment": environment_record(backend="mlx", device=device)}
    atomic_write(path, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(result, ensure_ascii=False))


if __name__ == "__main__":
    main()
