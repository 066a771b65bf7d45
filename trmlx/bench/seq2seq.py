"""`trmlx bench` for seq2seq (T5 / mT5) recipes: the task interface bench.py documents (ROWS, WORKERS, PEERS,
PEER_NEEDS, spec_fields, plan_settings) and its workers, run as `python -m trmlx.bench.harness
trmlx.bench.seq2seq:NAME SPEC RESULT`.

  trmlx   causal.worker_trmlx (the real backend.load, backend.train and batched eval generation, the same
          clocks and peak counters) on synthetic rows: source = seq_len tokens, target = target_len tokens
  hf      the CUDA peer: a plain transformers Trainer + peft LoRA (+ bitsandbytes and prepare_model_for_kbit_training
          when model.quantize_bits) on AutoModelForSeq2SeqLM, the same rows, LoRA targets, layers and batch

No MLX peer: mlx-lm (the MLX peer of causal recipes) has no T5 / encoder-decoder trainer, so the mlx rows have
none.

Trained tokens are the target tokens. FLOPs per step (MFU's numerator, frozen base: forward 2·N + backward through
the activations 2·N per token, no weight gradients) = 4 · (encoder parameters × source tokens + decoder parameters
and the head × target tokens), with the decoder's cross-attention k/v counted over source tokens (they project the
encoder output); embeddings lookups, attention scores and checkpointing's recompute are not counted.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from trmlx.bench import causal
from trmlx.bench.harness import memory_now, native_bf16, trial_times

ROWS = "synthetic: source = seq_len tokens, target = data.max_target_length tokens; loss on every target token"


def synthetic_examples(spec: dict[str, Any]) -> list:
    """n rows of seq_len source ids and target_len target ids (never the 4 special ids), the same for both sides."""
    import numpy as np

    from trmlx.data.examples import Example

    n = spec["batch_size"] * spec["grad_accum"] * spec["total_steps"]
    rng = np.random.default_rng(spec["seed"])
    source = rng.integers(4, spec["vocab_size"], size=(n, spec["seq_len"]))
    target = rng.integers(4, spec["vocab_size"], size=(n, spec["target_len"]))
    return [Example(tuple(int(t) for t in s), 0, tuple(int(t) for t in y)) for s, y in zip(source, target)]


def _shape(spec: dict[str, Any]):
    from trmlx.plan.base import padded
    from trmlx.plan.seq2seq import Seq2SeqShape

    config = json.loads((Path(spec["model_dir"]) / "config.json").read_text())
    return Seq2SeqShape.from_config(config, spec["model_dir"]), padded


def step_counts(spec: dict[str, Any]) -> dict[str, Any]:
    """Trained (target) tokens, positions through the forward and FLOPs of one optimizer step (module docstring)."""
    shape, padded = _shape(spec)
    rows = spec["batch_size"] * spec["grad_accum"]
    src, tgt = rows * spec["seq_len"], rows * spec["target_len"]
    cross = shape.cross_kv_parameters()
    head = shape.vocab_size * shape.d_model
    flops = 4 * (shape.stack_parameters("encoder") * src + (shape.stack_parameters("decoder") - cross + head) * tgt
                 + cross * src)
    return {"trained_tokens_per_step": tgt, "flops_per_step": flops,
            "forward_positions_per_step": rows * (padded(spec["seq_len"]) + padded(spec["target_len"]))}


def worker_trmlx(spec: dict[str, Any]) -> dict[str, Any]:
    spec = {**spec, "overrides": [*spec["overrides"], f"data.max_target_length={spec['target_len']}"]}
    raw = causal.worker_trmlx(spec, synthetic_examples(spec))
    return {**raw, **step_counts(spec)}


def worker_hf(spec: dict[str, Any]) -> dict[str, Any]:
    """The CUDA peer (module docstring); benchmarks/cuda_qlora.py's clocks and peak counters (the process RSS on a
    CPU, as its causal peer reports)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForSeq2SeqLM, BitsAndBytesConfig

    from trmlx.bench.hf_causal import trainer_run

    from trmlx.recipe import load_recipe

    recipe = load_recipe(spec["recipe"], spec["overrides"], backend="cuda")
    peft, bits = recipe.peft, recipe.model.quantize_bits
    gpu = torch.cuda.is_available()
    bf16 = gpu and native_bf16()
    dtype = torch.bfloat16 if bf16 else (torch.float16 if gpu else torch.float32)
    ckpt = spec["grad_checkpoint"]
    start = time.perf_counter()
    bnb = (BitsAndBytesConfig(load_in_8bit=True) if bits == 8 else
           BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)) if bits in (4, 8) else None
    model = AutoModelForSeq2SeqLM.from_pretrained(spec["model_dir"], quantization_config=bnb, dtype=dtype,
                                                  device_map={"": 0 if gpu else "cpu"})
    model.config.use_cache = False
    if bnb:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=ckpt)
    elif ckpt:
        from trmlx.backends.cuda.model import enable_checkpointing

        enable_checkpointing(model)
    total = len(model.get_decoder().block)
    layers = list(range(total - spec["lora_layers"], total)) if spec["lora_layers"] < total else None
    model = get_peft_model(model, LoraConfig(
        r=peft.rank, lora_alpha=peft.alpha, lora_dropout=peft.dropout, target_modules=spec["lora_keys"],
        layers_to_transform=layers, layers_pattern="block" if layers else None, use_dora=peft.method == "dora",
        bias="none", task_type="SEQ_2_SEQ_LM"))
    load_s = time.perf_counter() - start
    load_peak = memory_now()

    examples = synthetic_examples(spec)
    dataset = [{"input_ids": torch.tensor(e.input_ids), "attention_mask": torch.ones(len(e.input_ids),
                                                                                       dtype=torch.long),
                "labels": torch.tensor(e.target_ids)} for e in examples]  # T5 shifts the labels right itself

    timer, trainer, optim, peak = trainer_run(model, dataset, recipe, spec, bf16=bf16, grad_checkpoint=ckpt)
    setup = {"dtype": {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32"), "optimizer": optim,
             "grad_checkpoint": ckpt, "grad_accum": spec["grad_accum"],
             "quant": {4: "4-bit nf4 double_quant=True", 8: "8-bit int8"}.get(bits, "none"),
             "prepare_model_for_kbit_training": bool(bnb),
             "lora": {"rank": peft.rank, "alpha": peft.alpha, "dropout": peft.dropout, "targets": spec["lora_keys"],
                      "layers": spec["lora_layers"]},
             "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    return {"step_seconds": timer.step_seconds, "trial_seconds": trial_times(timer.step_seconds, spec),
            "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e], "load_seconds": load_s,
            "load_peak_memory_gb": load_peak["peak_allocated_gb"], "model_memory_gb": timer.before_train,
            "setup": setup, **peak, **step_counts(spec)}


WORKERS = {"trmlx": worker_trmlx, "hf": worker_hf}
PEERS = {"cuda": "hf"}  # no "mlx": mlx-lm has no encoder-decoder trainer
PEER_NEEDS = {"hf": ("transformers", "peft", "accelerate")}


def spec_fields(recipe: Any, shape: Any, seq_len: int) -> dict[str, Any]:
    """Target length from the recipe; eval prompts are whole source rows; LoRA targets by their last name."""
    from trmlx.adapters import peft_target_modules

    paths = [n for stack in ("encoder", "decoder") for n in shape.linears(stack)]
    keys = peft_target_modules(paths, recipe.peft.targets)
    return {"target_len": recipe.data.max_target_length, "prompt_len": seq_len, "lora_keys": keys,
            "lora_layers": recipe.peft.layers or max(shape.encoder_layers, shape.decoder_layers)}


def plan_settings(spec: dict[str, Any]) -> dict[str, Any]:
    """plan_seq2seq.plan_memory's keywords for exactly the configuration a spec measures."""
    return {"batch_size": spec["batch_size"], "grad_accum": spec["grad_accum"],
            "grad_checkpoint": spec["grad_checkpoint"], "seq_len": spec["seq_len"], "target_len": spec["target_len"],
            "eval_batch_size": spec["eval_batch_size"], "prompt_len": spec["prompt_len"],
            "max_new_tokens": spec["max_new_tokens"]}
