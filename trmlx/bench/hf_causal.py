"""The CUDA peer of causal recipes: what Kaggle notebooks run today — bitsandbytes 4-bit NF4 +
prepare_model_for_kbit_training + peft LoRA + transformers' Trainer, on the same synthetic rows, LoRA numbers,
optimizer and schedule as trmlx's side, timed step by step with a Trainer callback."""

from __future__ import annotations

import tempfile
import time
from typing import Any

from trmlx.bench.harness import clock, memory_now, native_bf16, peak_memory, synthetic_rows, trial_times


def worker_hf(spec: dict[str, Any]) -> dict[str, Any]:
    """Side B: the notebook recipe — bnb 4-bit NF4 + prepare_model_for_kbit_training + peft LoRA + Trainer."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from trmlx.recipe import load_recipe

    # The same LoRA / optimizer / schedule numbers as side A (trmlx bench passes its own recipe and --set).
    recipe = load_recipe(spec["recipe"], spec.get("overrides", []), backend="cuda")
    quantised = recipe.model.quantize_bits in (4, 8)
    gpu = torch.cuda.is_available()
    bf16 = gpu and native_bf16()  # not is_bf16_supported(): that is True on a T4 too (emulated bf16)
    dtype = torch.bfloat16 if bf16 else (torch.float16 if gpu else torch.float32)
    grad_checkpoint = recipe.train.grad_checkpoint
    start = time.perf_counter()
    bnb = (BitsAndBytesConfig(load_in_8bit=True) if recipe.model.quantize_bits == 8 else
           BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)) if quantised else None
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], quantization_config=bnb, dtype=dtype,
                                                 device_map={"": 0 if gpu else "cpu"})
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model.config.use_cache = False
    if quantised:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=grad_checkpoint)
    elif grad_checkpoint:
        from trmlx.backends.cuda.model import enable_checkpointing

        enable_checkpointing(model)
    blocks = model.model.layers
    linear_names = sorted({name.rsplit(".", 1)[-1] for name, m in blocks[0].named_modules()
                           if isinstance(m, torch.nn.Linear)})  # bnb's Linear4bit subclasses nn.Linear
    layers = list(range(len(blocks) - spec["lora_layers"], len(blocks)))
    lora = LoraConfig(r=recipe.peft.rank, lora_alpha=recipe.peft.alpha, lora_dropout=recipe.peft.dropout,
                      target_modules=linear_names, layers_to_transform=layers, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    load_s = time.perf_counter() - start
    load_peak = memory_now()

    rows = torch.from_numpy(synthetic_rows(spec))
    half = spec["seq_len"] // 2
    labels = rows.clone()
    labels[:, :half] = -100  # HF shifts inside the loss: targets are tokens half..seq_len-1, as on side A
    dataset = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": y} for r, y in zip(rows, labels)]

    timer, trainer, optim, peak = trainer_run(model, dataset, recipe, spec, bf16=bf16,
                                              grad_checkpoint=grad_checkpoint)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    setup = {"dtype": {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32"), "optimizer": optim,
             "grad_checkpoint": grad_checkpoint, "grad_accum": spec["grad_accum"],
             "quant": {4: "4-bit nf4 double_quant=True", 8: "8-bit int8"}.get(recipe.model.quantize_bits, "none"),
             "prepare_model_for_kbit_training": quantised,
             "lora": {"rank": recipe.peft.rank, "alpha": recipe.peft.alpha, "dropout": recipe.peft.dropout,
                      "targets": linear_names, "layers": spec["lora_layers"]},
             "attn_implementation": getattr(model.config, "_attn_implementation", None),
             "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
             "forward_positions_per_row": spec["seq_len"], "pad_token_id": tokenizer.pad_token_id}
    return {"step_seconds": timer.step_seconds, "trial_seconds": trial_times(timer.step_seconds, spec),
            "losses": losses, "load_seconds": load_s, "load_peak_memory_gb": load_peak["peak_allocated_gb"],
            "model_memory_gb": timer.before_train,
            "forward_positions_per_step": spec["batch_size"] * spec["grad_accum"] * spec["seq_len"],
            "setup": setup, **peak}


def trainer_run(model: Any, dataset: list, recipe: Any, spec: dict[str, Any], *, bf16: bool,
                grad_checkpoint: bool) -> tuple[Any, Any, str, dict[str, Any]]:
    """transformers' Trainer over the rows with the recipe's optimizer, schedule and clipping (the HF peers of
    causal and seq2seq recipes): (step timer, trainer, optimizer name, peak memory)."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    gpu = torch.cuda.is_available()

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.step_seconds: list[float] = []
            self.previous = 0.0
            self.before_train = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            if gpu:
                torch.cuda.reset_peak_memory_stats()
            self.before_train = memory_now()["allocated_gb"]
            self.previous = clock()

        def on_step_end(self, args, state, control, **kwargs):
            now = clock()
            self.step_seconds.append(now - self.previous)
            self.previous = now

    timer = StepTimer()
    # paged_adamw_8bit on a GPU, as on side A; HF's name for plain AdamW is adamw_torch
    optim = {"adamw": "adamw_torch"}.get(recipe.train.optimizer, recipe.train.optimizer) if gpu else "adamw_torch"
    with tempfile.TemporaryDirectory() as out_dir:
        args = TrainingArguments(
            output_dir=out_dir, per_device_train_batch_size=spec["batch_size"],
            gradient_accumulation_steps=spec["grad_accum"], max_steps=spec["total_steps"],
            learning_rate=recipe.train.lr, lr_scheduler_type=recipe.train.schedule,
            warmup_steps=spec["lr_warmup_steps"], weight_decay=recipe.train.weight_decay,
            max_grad_norm=recipe.train.grad_clip, optim=optim, bf16=bf16, fp16=gpu and not bf16,
            gradient_checkpointing=grad_checkpoint, logging_steps=1, save_strategy="no", eval_strategy="no",
            report_to="none", disable_tqdm=True, seed=recipe.train.seed, remove_unused_columns=False,
            dataloader_num_workers=0, use_cpu=not gpu)
        trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=default_data_collator,
                          callbacks=[timer])
        trainer.train()
        peak = peak_memory()
    return timer, trainer, optim, peak


WORKERS = {"hf": worker_hf}
