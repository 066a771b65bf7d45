"""Load a causal LM with transformers (+ bitsandbytes 4/8-bit, decided here at load) and attach a peft adapter
configured from the same recipe fields as the MLX backend: same targets, layers, alpha/r scaling and A init."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from trmlx.adapters import layer_indices, lora_a_init, peft_target_modules
from trmlx.backend import LoadedModel
from trmlx.distributed import is_main
from trmlx.errors import UserError
from trmlx.loop import require_packable
from trmlx.precision import choose_dtype
from trmlx.recipe.schema import PeftConfig, Recipe

from trmlx.backends.cuda.device import cpu_math, describe_device
from trmlx.backends.cuda.loss import split_head

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_PEFT_PREFIX = "base_model.model."
# peft 0.21 reads and calls transformers' deprecated checkpointing aliases itself; nothing on our side to move.
for _alias in ("is_gradient_checkpointing", "gradient_checkpointing_enable"):
    warnings.filterwarnings("ignore", message=f"`{_alias}` is deprecated", category=FutureWarning)


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant activation checkpointing (it needs no enable_input_require_grads, unlike the reentrant kind):
    transformers 5.24 renamed gradient_checkpointing_enable to activation_checkpointing_enable."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def device() -> torch.device:
    """This process's device: its LOCAL_RANK GPU in a data-parallel launch, else GPU 0, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def load(recipe: Recipe, adapter: Path | None = None, start: Path | None = None) -> LoadedModel:
    """Model + tokenizer on the GPU (or the CPU, with a notice), quantised per recipe, adapter attached; `start`: a
    PEFT LoRA/DoRA folder whose weights the recipe's new adapter takes (continued training, trmlx.continued)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    from trmlx.backends.cuda.distributed import ensure_process_group

    ensure_process_group()
    cfg = recipe.model
    info = describe_device()
    cpu_math()
    if info["kind"] == "cpu" and is_main():
        print("trmlx: no CUDA GPU visible; the cuda backend runs on the CPU (slow, fp32)", file=sys.stderr)
    if info["kind"] == "cpu" and recipe.train.optimizer == "paged_adamw_8bit":
        raise UserError("train.optimizer: paged_adamw_8bit needs a CUDA GPU; none is visible (use adamw)")
    dtype_name, reason = choose_dtype(recipe.task, cfg.dtype, info["bf16"], on_gpu=info["kind"] == "gpu")
    dtype = DTYPES[dtype_name]
    kwargs = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code, "attn_implementation": "sdpa"}
    if cfg.quantize_bits:
        kwargs["quantization_config"] = bnb_config(recipe, dtype)
        kwargs["device_map"] = {"": device()}
    try:
        model_class = AutoModelForSeq2SeqLM if recipe.task == "seq2seq" else AutoModelForCausalLM
        model = model_class.from_pretrained(cfg.path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code)
    except OSError as err:
        raise UserError(f"model.path: cannot load {cfg.path!r} ({str(err).splitlines()[0][:160]})") from None
    if not cfg.quantize_bits:
        model.to(device())
    elif info["kind"] == "cpu":
        keep_generic_cpu_kernels(model)
    if tokenizer.pad_token_id is None:  # batches need a pad id; it is never trained on (masked)
        tokenizer.pad_token = tokenizer.eos_token
    if recipe.train.grad_checkpoint:
        enable_checkpointing(model)
    peft = recipe.peft
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))  # for eval, generate and export
    elif peft.method in ("lora", "dora"):
        model = attach_lora(model, peft, recipe.train.seed)
        if start is not None:
            load_start(model, start)
    elif peft.method in ("prompt", "prefix"):
        model = attach_virtual_tokens(model, peft, cfg.path)
    elif peft.method == "full":
        if cfg.quantize_bits:
            raise UserError("peft.method: full fine-tuning needs unquantised weights")
    handle = {"dtype": dtype_name, "dtype_reason": reason, "device": info, "peft": peft, "base": cfg.path,
              # target rows per chunk of the head + cross-entropy; 0 where the model's head cannot be split off
              "loss_chunk": recipe.train.loss_chunk_size if split_head(model) else 0}
    require_packable(recipe, model.config.to_dict(), split_head(model) is not None)
    if recipe.task == "seq2seq":
        handle["decoder_start_id"] = model.config.decoder_start_token_id
    return LoadedModel(model=model, tokenizer=tokenizer, handle=handle)


def load_start(model: torch.nn.Module, folder: Path) -> None:
    """Overwrite a new peft adapter's weights with a saved PEFT adapter's, after checking that every weight has its
    counterpart of the same shape (peft's own loader would start a missing one from scratch without a word)."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    from trmlx.continued import check_weights, peft_key

    path = Path(folder) / "adapter_model.safetensors"
    weights = {peft_key(k): v for k, v in load_file(str(path)).items()}
    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}
    check_weights(expected, {k: tuple(v.shape) for k, v in weights.items()}, path)
    set_peft_model_state_dict(model, weights)


def keep_generic_cpu_kernels(model: torch.nn.Module) -> None:
    """bitsandbytes' CPU inference repacks 4-bit weights on first use assuming the input width is a multiple of the
    block size (64); other widths (e.g. a 352-wide MLP) fail with a reshape error in generation. Those layers keep
    the generic dequantising path, which is correct for every width."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is not None and hasattr(module, "support_avx512bf16_for_cpu") \
                and module.in_features % state.blocksize:
            module.support_avx512bf16_for_cpu = False


def bnb_config(recipe: Recipe, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    cfg = recipe.model
    if cfg.quantize_bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    quant_type = "fp4" if cfg.quant_mode == "fp4" else "nf4"
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                              bnb_4bit_use_double_quant=cfg.double_quant, bnb_4bit_compute_dtype=compute_dtype)


def target_names(model: torch.nn.Module, targets: str | list[str]) -> list[str]:
    """Linear layers of the first block, named like the MLX backend names them (so 'all-linear' is the same
    set on both backends); named targets must each match something."""
    import bitsandbytes as bnb

    linear_types = (torch.nn.Linear, bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    blocks = transformer_blocks(model)
    return peft_target_modules((name for name, m in blocks[0].named_modules() if isinstance(m, linear_types)),
                               targets)


def transformer_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder's blocks (a causal LM's only stack; T5's decoder block holds every linear name T5 uses)."""
    decoder = model.get_decoder()
    return decoder.layers if hasattr(decoder, "layers") else decoder.block


def attach_lora(model: torch.nn.Module, peft_cfg: PeftConfig, seed: int) -> torch.nn.Module:
    """peft LoRA/DoRA with PEFT scaling alpha/r on a causal LM or T5; A from the core's seeded init, B zero."""
    seq2seq = model.config.is_encoder_decoder
    layers = layer_indices(len(transformer_blocks(model)), peft_cfg.layers) if peft_cfg.layers else None
    return wrap_lora(model, peft_cfg, seed, target_modules=target_names(model, peft_cfg.targets),
                     layers_to_transform=layers, task_type="SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM",
                     layers_pattern="block" if seq2seq and layers else None)


def wrap_lora(model: torch.nn.Module, peft_cfg: PeftConfig, seed: int, **where: Any) -> torch.nn.Module:
    """get_peft_model with the recipe's LoRA/DoRA settings (`where`: target_modules and friends), then every A
    from trmlx.adapters.lora_a_init, keyed by the module's path, so both backends start from the same adapter.
    The one LoRA attach of the CUDA backend: causal, seq2seq and embedding models."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=peft_cfg.rank, lora_alpha=peft_cfg.alpha, lora_dropout=peft_cfg.dropout, bias="none",
                        use_dora=peft_cfg.method == "dora", **where)
    model = get_peft_model(model, config)
    with torch.no_grad():
        for name, module in model.named_modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                weight = module.lora_A["default"].weight
                init = lora_a_init(name.removeprefix(_PEFT_PREFIX), weight.shape[1], peft_cfg.rank, seed)
                weight.copy_(torch.from_numpy(init).to(weight.dtype))
    return model


def attach_virtual_tokens(model: torch.nn.Module, peft_cfg: PeftConfig, tokenizer_path: str) -> torch.nn.Module:
    """peft prompt tuning (soft prompt; from text, else from sampled vocabulary embeddings like the MLX backend)
    or prefix tuning (per-layer key/value prefixes, optionally through peft's projection MLP)."""
    from peft import PrefixTuningConfig, PromptTuningConfig, PromptTuningInit, get_peft_model

    task_type = "SEQ_2_SEQ_LM" if model.config.is_encoder_decoder else "CAUSAL_LM"

    if peft_cfg.method == "prompt":
        init = PromptTuningInit.TEXT if peft_cfg.prompt_init_text else PromptTuningInit.SAMPLE_VOCAB
        config = PromptTuningConfig(task_type=task_type, num_virtual_tokens=peft_cfg.num_virtual_tokens,
                                    prompt_tuning_init=init, tokenizer_name_or_path=tokenizer_path,
                                    prompt_tuning_init_text=peft_cfg.prompt_init_text or None)
    else:
        config = PrefixTuningConfig(task_type=task_type, num_virtual_tokens=peft_cfg.num_virtual_tokens,
                                    prefix_projection=peft_cfg.prefix_projection)
    return get_peft_model(model, config)
