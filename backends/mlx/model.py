"""Load a model for MLX: causal LMs through mlx-lm's model code, T5/mT5 through our own (t5.py), quantised block
by block at load, so peak memory stays near the quantised size plus one block instead of the full-precision
model."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from trmlx.backend import LoadedModel
from trmlx.errors import UserError
from trmlx.loop import require_packable
from trmlx.recipe.schema import Recipe

import trmlx.backends.mlx.t5_prompt as t5_prompt
import trmlx.backends.mlx.virtual_tokens as virtual_tokens
from trmlx.backends.mlx.loss import split_head
from trmlx.backends.mlx.adapters import apply_lora, load_adapter, load_start


def load(recipe: Recipe, adapter: Path | None = None, start: Path | None = None) -> LoadedModel:
    """Model + HF tokenizer; quantised per recipe; a new LoRA/DoRA/prompt/prefix adapter from the recipe or a saved
    PEFT adapter (prompt/prefix tuning return a wrapper model: virtual_tokens.VirtualTokenModel for causal LMs,
    t5_prompt.T5PromptModel for T5). `start`: a PEFT LoRA/DoRA folder whose weights the recipe's new adapter takes
    (continued training; trmlx.continued made the recipe's peft keys the adapter's)."""
    from mlx_lm.utils import _download, load_model, load_tokenizer

    model_cfg = recipe.model
    try:
        path = _download(model_cfg.path)
    except Exception as err:  # hub errors come in many types; all mean "not here and not downloadable"
        raise UserError(f"model.path: cannot find {model_cfg.path!r} locally or on the hub ({type(err).__name__})")
    seq2seq = recipe.task == "seq2seq"
    try:
        if seq2seq:
            from trmlx.backends.mlx.t5 import load_t5

            model, config = load_t5(path, lazy=True)
        else:
            model, config = load_model(path, lazy=True, trust_remote_code=model_cfg.trust_remote_code)
    except ValueError as err:
        raise UserError(f"model.path: {path}: {err}") from None
    if model_cfg.dtype != "auto":  # auto keeps the checkpoint's own dtype (bf16 for most released models)
        model.set_dtype({"bf16": mx.bfloat16, "fp16": mx.float16, "fp32": mx.float32}[model_cfg.dtype])
    already_quantised = "quantization" in config or "quantization_config" in config
    if model_cfg.quantize_bits and not already_quantised:
        quantise_blockwise(model, model_cfg.quantize_bits, model_cfg.quant_group_size,
                           "affine" if model_cfg.quant_mode == "auto" else model_cfg.quant_mode)
    else:
        mx.eval(model.parameters())
    if seq2seq:
        from transformers import AutoTokenizer

        hf_tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=model_cfg.trust_remote_code)
    else:
        hf_tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))._tokenizer
    if hf_tokenizer.pad_token_id is None:  # batches need a pad id; it is never trained on (masked)
        hf_tokenizer.pad_token = hf_tokenizer.eos_token
    peft = recipe.peft
    kind = virtual_tokens.adapter_type(adapter) if adapter is not None else None
    if seq2seq and (kind == "PREFIX_TUNING" or (adapter is None and peft.method == "prefix")):
        raise UserError("peft.method: prefix tuning of T5 models is not available in the MLX backend; use prompt, "
                        "lora or dora (or --backend cuda)")
    mx.random.seed(recipe.train.seed)  # LoRA's A matrices are random: the same seed gives the same start
    if seq2seq and kind == "PROMPT_TUNING":
        model = t5_prompt.load(model, config, adapter)  # T5 prompt tuning: a wrapper around the frozen T5
        peft = model.peft_settings()
    elif kind in virtual_tokens.PEFT_TYPES.values():
        model = virtual_tokens.load(model, config, adapter)  # prompt/prefix: a wrapper around the frozen model
        peft = model.peft_settings()
    elif adapter is not None:
        peft = load_adapter(model, adapter)  # the adapter's own rank/alpha/targets, not the recipe's
    elif peft.method in ("lora", "dora"):
        apply_lora(model, peft, seed=recipe.train.seed)
        if start is not None:
            load_start(model, start)
    elif peft.method in ("prompt", "prefix"):
        attach = t5_prompt.attach if seq2seq else virtual_tokens.attach
        model = attach(model, config, peft, hf_tokenizer)
    elif peft.method == "full":
        model.unfreeze()
    else:
        raise UserError(f"peft.method: {peft.method!r} is not available in the MLX backend yet; use lora, "
                        "dora, prefix, prompt or full")
    handle = {"path": str(path), "config": config, "peft": peft, "base": model_cfg.path,
              "task_type": "SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM",
              # target rows per chunk of the head + cross-entropy; 0 where the model's head cannot be split off
              "loss_chunk": recipe.train.loss_chunk_size if split_head(model) else 0}
    require_packable(recipe, config, split_head(model) is not None)
    if seq2seq:
        handle["decoder_start_id"] = config.get("decoder_start_token_id", hf_tokenizer.pad_token_id)
        handle["checkpoint_block"] = getattr(model, "base", model).encoder.block[0]  # one class, both stacks
    model.eval()  # new LoRA layers start in training mode; the training loop switches modes itself
    return LoadedModel(model=model, tokenizer=hf_tokenizer, handle=handle)


def quantise_blockwise(model: nn.Module, bits: int, group_size: int, mode: str) -> None:
    """Quantise and evaluate one transformer block at a time: each block's full-precision weights are read,
    quantised and released before the next block is touched."""

    def quantisable(_, module: nn.Module) -> bool:
        return hasattr(module, "to_quantized") and module.weight.shape[-1] % group_size == 0

    for block in model.layers:
        nn.quantize(block, group_size=group_size, bits=bits, mode=mode, class_predicate=quantisable)
        mx.eval(block.parameters())
    # Then the rest (embeddings, head) one module at a time: together they can outweigh a block several times
    # (a 32k-vocabulary embedding and head), and evaluating them together would hold both in full precision.
    # Names only: holding the old module objects would keep their full-precision weights alive.
    for target in [path for path, module in model.named_modules() if quantisable(path, module)]:
        nn.quantize(model, group_size=group_size, bits=bits, mode=mode,
                    class_predicate=lambda p, m, target=target: p == target and quantisable(p, m))
        # Evaluate this module only: evaluating the whole model would also read the next one in full precision.
        mx.eval([v for k, v in tree_flatten(model.parameters()) if k.startswith(target + ".")])
    mx.eval(model.parameters())
