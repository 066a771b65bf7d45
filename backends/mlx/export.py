"""Merge a LoRA/DoRA adapter into its base model and write a plain Hugging Face model folder.

The base is loaded exactly as training saw it (the run's recipe: quantised at load when it asks for it), every
adapted linear is fused with the adapter's own forward math in float32, quantised layers are dequantised, and the
result is cast to one dtype and written under HF's parameter names (config.json without a quantisation entry,
model.safetensors or shards + index, the base's tokenizer and generation_config.json). Both
`transformers.AutoModelForCausalLM.from_pretrained(OUT)` and `mlx_lm.utils.load(OUT)` read the folder.

    LoRA:  W' = W + (alpha / r) * B @ A
    DoRA:  V = W + (alpha / r) * B @ A;   W' = m / ||V||_row * V        (mlx-lm's DoRALinear.fuse, PEFT's merge)

The folder is written as OUT.tmp-<pid> beside OUT and renamed only when complete, so a crash never leaves a
model that looks finished.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from mlx_lm.tuner.dora import DoRALinear
from mlx_lm.tuner.lora import LoRALinear

from trmlx.errors import UserError
from trmlx.export import HF_DTYPES, check_mergeable, check_out_dir, default_dtype, publishing
from trmlx.recipe.schema import Recipe

DTYPES = {"fp16": mx.float16, "bf16": mx.bfloat16, "fp32": mx.float32}
SHARD_BYTES = 5 << 30  # HF's and mlx-lm's default shard size
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Files a tokenizer (or generation) needs, copied from the base folder as they are.
_TOKENIZER_NAMES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "spiece.model",
                    "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json", "generation_config.json")
_TOKENIZER_SUFFIXES = (".tiktoken",)


def dequantized_weight(module: nn.Module) -> mx.array:
    """The full-precision weight of a Linear or QuantizedLinear (the same mx.dequantize mlx-lm's fuse uses)."""
    if isinstance(module, nn.QuantizedLinear):
        return mx.dequantize(module["weight"], scales=module["scales"], biases=module.get("biases"),
                             group_size=module.group_size, bits=module.bits, mode=module.mode)
    return module.weight


def fused_linear(wrapper: LoRALinear | DoRALinear) -> nn.Linear:
    """One adapted linear merged into a plain nn.Linear (lazy; float32 math, cast back by the caller)."""
    base = wrapper.linear
    weight = dequantized_weight(base).astype(mx.float32)
    delta = (wrapper.scale * wrapper.lora_b.T.astype(mx.float32)) @ wrapper.lora_a.T.astype(mx.float32)
    weight = weight + delta
    if isinstance(wrapper, DoRALinear):
        weight = (wrapper.m.astype(mx.float32) / mx.linalg.norm(weight, axis=1))[:, None] * weight
    out_dims, in_dims = weight.shape
    bias = "bias" in base
    linear = nn.Linear(in_dims, out_dims, bias=bias)
    linear.weight = weight
    if bias:
        linear.bias = base.bias
    return linear


def merge_model(model: nn.Module) -> int:
    """Fuse every LoRA/DoRA wrapper of `model` in place and dequantise what is left; return how many were fused.

    The new weights stay lazy: nothing is computed until they are written."""
    from mlx_lm.utils import dequantize_model

    fused = [(path, fused_linear(module)) for path, module in model.named_modules()
             if isinstance(module, (LoRALinear, DoRALinear))]
    if fused:
        model.update_modules(tree_unflatten(fused))
    dequantize_model(model)
    left = [path for path, module in model.named_modules()
            if "scales" in module and not isinstance(module, (LoRALinear, DoRALinear))]
    if left:
        raise UserError(f"export: cannot dequantise {left[0]} ({type(dict(model.named_modules())[left[0]]).__name__})"
                        f"{f' and {len(left) - 1} more' if len(left) > 1 else ''}; this architecture's quantised "
                        "layers are not supported by export")
    return len(fused)


def merged_weights(model: nn.Module, dtype: str) -> dict[str, mx.array]:
    """The merged model's parameters under their names, floating ones cast to `dtype` (still lazy)."""
    target = DTYPES[dtype]
    return {name: value.astype(target) if mx.issubdtype(value.dtype, mx.floating) else value
            for name, value in tree_flatten(model.parameters())}


def checkpoint_keys(path: Path) -> set[str]:
    """Tensor names stored in a model folder's safetensors files (read from the headers, no tensor data)."""
    files = sorted(Path(path).glob("model*.safetensors")) or sorted(Path(path).glob("*.safetensors"))
    keys: set[str] = set()
    for file in files:
        with open(file, "rb") as stream:
            (size,) = struct.unpack("<Q", stream.read(8))
            keys.update(k for k in json.loads(stream.read(size)) if k != "__metadata__")
    return keys


def check_names(names: set[str], base_keys: set[str], config: dict[str, Any], base: str) -> list[str]:
    """Every exported name must be one the base checkpoint uses (mlx-lm and HF name llama/qwen2/mistral... alike);
    return the base's weights the export leaves out (quantisation scales, rotary caches and tied heads are
    expected and not listed)."""
    if not base_keys:
        return []
    foreign = sorted(names - base_keys)
    if foreign:
        raise UserError(f"export: {config.get('model_type', 'this model')!r}: mlx-lm names parameters differently "
                        f"from the checkpoint in {base} (e.g. {foreign[0]!r} is not in it), so the merged weights "
                        "would not load in transformers; export supports architectures whose names agree (llama, "
                        "qwen2, mistral, ...)")
    quantised = "quantization" in config or "quantization_config" in config
    tied = bool(config.get("tie_word_embeddings"))

    def expected(key: str) -> bool:
        return ("rotary_emb.inv_freq" in key or (quantised and key.endswith((".scales", ".biases")))
                or (tied and key == "lm_head.weight"))

    return sorted(k for k in base_keys - names if not expected(k))


def hf_config(config: dict[str, Any], dtype: str) -> dict[str, Any]:
    """The base's config.json for the merged model: no quantisation entry, the exported dtype."""
    config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    config["torch_dtype"] = HF_DTYPES[dtype]
    if "dtype" in config:
        config["dtype"] = HF_DTYPES[dtype]
    return config


def write_weights(weights: dict[str, mx.array], folder: Path, shard_bytes: int = SHARD_BYTES) -> list[str]:
    """model.safetensors, or HF-style shards + index when larger than shard_bytes; returns the files written.

    Each shard is computed, written and released before the next, and the dict is emptied as it goes, so peak
    memory is the base model plus one shard."""
    total = sum(v.nbytes for v in weights.values())
    shards: list[dict[str, mx.array] | None] = []
    size = 0
    for name, value in weights.items():  # a tensor larger than a shard gets one of its own
        if not shards or size + value.nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = value
        size += value.nbytes
    weights.clear()
    count = len(shards)
    weight_map: dict[str, str] = {}
    files = []
    for i in range(count):
        shard, shards[i] = shards[i], None
        name = WEIGHTS_FILE if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
        mx.save_safetensors(str(folder / name), shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        files.append(name)
        del shard
    if count > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2))
        files.append(INDEX_FILE)
    return files


def copy_tokenizer(base: Path, folder: Path, config: dict[str, Any], tokenizer: Any) -> list[str]:
    """Copy the base folder's tokenizer (and generation_config.json, and remote code when config has auto_map);
    save the loaded tokenizer when the base folder has no tokenizer file of its own."""
    copied = []
    for file in sorted(Path(base).iterdir()):
        wanted = (file.name in _TOKENIZER_NAMES or file.name.endswith(_TOKENIZER_SUFFIXES)
                  or (file.suffix == ".py" and "auto_map" in config))
        if file.is_file() and wanted:
            shutil.copy2(file, folder / file.name)
            copied.append(file.name)
    if not any(name != "generation_config.json" for name in copied) and tokenizer is not None:
        before = set(os.listdir(folder))
        tokenizer.save_pretrained(str(folder))
        copied += sorted(set(os.listdir(folder)) - before)
    return copied


def export_model(recipe: Recipe, adapter: Path | None, out_dir: Path, dtype: str | None = None,
                 shard_bytes: int = SHARD_BYTES) -> dict[str, Any]:
    """Load the base per `recipe`, attach `adapter`, merge, and write an HF model folder at `out_dir`."""
    from trmlx.backends.mlx.model import load

    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    if adapter is not None:
        check_mergeable(Path(adapter))
    loaded = load(recipe, adapter)
    if loaded.handle["peft"].method not in ("lora", "dora"):
        raise UserError(f"export merges LoRA/DoRA adapters, not {loaded.handle['peft'].method!r}")
    model, base = loaded.model, Path(loaded.handle["path"])
    try:
        raw_config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"{base / 'config.json'}: cannot read the base model's config ({err})") from None
    dtype = dtype or default_dtype(raw_config)
    quantised = any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())
    merged = merge_model(model)
    weights = merged_weights(model, dtype)
    dropped = check_names(set(weights), checkpoint_keys(base), raw_config, str(base))
    parameters = sum(v.size for v in weights.values())
    size = sum(v.nbytes for v in weights.values())
    # The lazy weights now hold the only references to the base arrays: each is freed once its shard is written.
    model.update(tree_map(lambda _: mx.array([]), model.parameters()))

    with publishing(out_dir) as tmp:
        files = write_weights(weights, tmp, shard_bytes)
        (tmp / "config.json").write_text(json.dumps(hf_config(raw_config, dtype), indent=2, ensure_ascii=False))
        files += ["config.json"] + copy_tokenizer(base, tmp, raw_config, loaded.tokenizer)
    peft = loaded.handle["peft"]
    return {"out": str(out_dir), "base": str(loaded.handle["base"]), "adapter": str(adapter) if adapter else None,
            "method": peft.method, "rank": peft.rank, "alpha": peft.alpha, "merged_layers": merged,
            "dequantized": quantised, "dtype": dtype, "parameters": parameters, "bytes": size,
            "files": sorted(files), "dropped": dropped}
