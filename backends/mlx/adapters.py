"""LoRA/DoRA on MLX models with PEFT's conventions, saved and loaded in PEFT's file format.

PEFT scales the update by alpha / r (mlx-lm by a raw `scale`); we always pass alpha / r, so an adapter means the
same thing on both backends. PEFT stores lora_A as (r, in) and lora_B as (out, r); mlx-lm keeps the transposes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.dora import DoRALinear
from mlx_lm.tuner.lora import LoRALinear

from trmlx import adapters
from trmlx.adapters import lora_a_init
from trmlx.errors import UserError
from trmlx.recipe.schema import PeftConfig
from trmlx.rundir import atomic_write

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
_LINEAR = (nn.Linear, nn.QuantizedLinear)
_WRAPPERS = (LoRALinear, DoRALinear)
# PEFT weight name suffix -> (MLX parameter, stored transposed): PEFT keeps A as (r, in), B as (out, r).
_PEFT_PARTS = ((".lora_A.weight", "lora_a", True), (".lora_B.weight", "lora_b", True),
               (".lora_magnitude_vector", "m", False))


def layer_indices(model: nn.Module, last_n: int) -> list[int]:
    """Indices of the transformer blocks to adapt: the last `last_n`, or all when 0."""
    return adapters.layer_indices(len(model.layers), last_n)


def target_keys(model: nn.Module, targets: str | list[str]) -> list[str]:
    """Paths inside one block (e.g. 'self_attn.q_proj') of the linear layers the targets name.

    Like PEFT, a target matches a module whose path ends with it; 'all-linear' takes every linear of the block.
    """
    # Once a block is wrapped, its linears live at `q_proj.linear`: count the wrapper, not the wrapped layer.
    modules = dict(model.layers[0].named_modules())
    linears = [name for name, module in modules.items() if isinstance(module, _LINEAR + _WRAPPERS)
               and not isinstance(modules.get(name.rpartition(".")[0]), _WRAPPERS)]
    return adapters.match_targets(linears, targets)


def apply_lora(model: nn.Module, peft: PeftConfig, seed: int = 0) -> list[str]:
    """Freeze the model and wrap the targeted linears in LoRA (or DoRA) layers; return their full paths.

    A is drawn by the core's lora_a_init (same start as the CUDA backend for the same seed), B is zero."""
    if peft.method not in ("lora", "dora"):
        raise UserError(f"peft.method: apply_lora handles lora and dora, not {peft.method!r}")
    model.freeze()
    keys = set(target_keys(model, peft.targets))
    wrapper = DoRALinear if peft.method == "dora" else LoRALinear
    for index in layer_indices(model, peft.layers):
        block = model.layers[index]
        replaced = [(name, wrapper.from_base(module, r=peft.rank, dropout=peft.dropout,
                                             scale=peft.alpha / peft.rank))
                    for name, module in block.named_modules() if name in keys]
        block.update_modules(tree_unflatten(replaced))
    adapted = sorted(path for path, module in model.named_modules() if isinstance(module, _WRAPPERS))
    modules = dict(model.named_modules())
    model.update(tree_unflatten([
        (f"{path}.lora_a", mx.array(lora_a_init(path, modules[path].lora_a.shape[0], peft.rank, seed).T))
        for path in adapted]))
    return adapted


def _numpy(array: mx.array) -> np.ndarray:
    # safetensors.numpy writes the raw buffer: a transposed (strided) view must be made contiguous first.
    return np.ascontiguousarray(np.array(array.astype(mx.float32)))


def peft_state(model: nn.Module) -> dict[str, np.ndarray]:
    """Adapter weights under PEFT's key names and shapes (float32 numpy)."""
    state = {}
    for path, module in model.named_modules():
        if isinstance(module, (LoRALinear, DoRALinear)):
            key = _PEFT_PREFIX + path
            state[f"{key}.lora_A.weight"] = _numpy(module.lora_a.T)
            state[f"{key}.lora_B.weight"] = _numpy(module.lora_b.T)
            if isinstance(module, DoRALinear):
                state[f"{key}.lora_magnitude_vector"] = _numpy(module.m)
    return state


def peft_config(peft: PeftConfig, model: nn.Module, base_model: str, task_type: str = "CAUSAL_LM") -> dict[str, Any]:
    """adapter_config.json as PEFT writes it for a LoraConfig, so PeftModel.from_pretrained accepts it."""
    names = sorted({k.rsplit(".", 1)[-1] for k in target_keys(model, peft.targets)})
    layers = layer_indices(model, peft.layers)
    return {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model,
        "r": peft.rank, "lora_alpha": peft.alpha, "lora_dropout": peft.dropout, "target_modules": names,
        "use_dora": peft.method == "dora", "use_rslora": False, "bias": "none", "fan_in_fan_out": False,
        "layers_to_transform": None if len(layers) == len(model.layers) else layers,
        # T5 keeps its blocks in encoder.block / decoder.block: PEFT needs the pattern to find layer indices.
        "layers_pattern": "block" if task_type == "SEQ_2_SEQ_LM" and len(layers) != len(model.layers) else None,
        "modules_to_save": None, "init_lora_weights": True, "inference_mode": True, "rank_pattern": {},
        "alpha_pattern": {}, "revision": None,
    }


def save_adapter(model: nn.Module, path: Path, config: dict[str, Any]) -> None:
    """Write adapter_config.json + adapter_model.safetensors atomically."""
    from safetensors.numpy import save

    path.mkdir(parents=True, exist_ok=True)
    atomic_write(path / WEIGHTS_FILE, save(peft_state(model), metadata={"format": "pt"}))
    atomic_write(path / CONFIG_FILE, json.dumps(config, indent=2))


def load_adapter(model: nn.Module, path: Path) -> PeftConfig:
    """Attach a PEFT LoRA/DoRA adapter (trained with trmlx on either backend, or with peft) to an MLX model."""
    from safetensors.numpy import load_file

    config_path = Path(path) / CONFIG_FILE
    if not config_path.is_file():
        raise UserError(f"{path}: no {CONFIG_FILE}; expected a PEFT adapter folder")
    config = json.loads(config_path.read_text())
    if config.get("peft_type") != "LORA":
        raise UserError(f"{config_path}: peft_type {config.get('peft_type')!r} is not supported by the MLX "
                        "backend's adapter loader (LORA, with or without DoRA)")
    if config.get("use_rslora"):
        raise UserError(f"{config_path}: rsLoRA adapters are not supported (scale alpha/sqrt(r))")
    layers = config.get("layers_to_transform")
    total = len(model.layers)
    if isinstance(layers, int):
        layers = [layers]
    if layers and list(layers) != list(range(total - len(layers), total)):
        raise UserError(f"{config_path}: layers_to_transform {layers} is not a run of final layers, which is "
                        "what the MLX backend adapts")
    peft = PeftConfig(method="dora" if config.get("use_dora") else "lora", rank=int(config["r"]),
                      alpha=float(config["lora_alpha"]), dropout=0.0, targets=list(config["target_modules"]),
                      layers=len(layers) if layers else 0)
    apply_lora(model, peft)
    weights = load_file(str(Path(path) / WEIGHTS_FILE))
    params: list[tuple[str, mx.array]] = []
    modules = dict(model.named_modules())
    for key, value in weights.items():
        stem = key.removeprefix(_PEFT_PREFIX)
        stem = stem.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
        for suffix, name, transpose in _PEFT_PARTS:
            if stem.endswith(suffix):
                module_path = stem[: -len(suffix)]
                if module_path not in modules:
                    raise UserError(f"{path}: weight {key} belongs to no adapted module of this model")
                params.append((f"{module_path}.{name}", mx.array(value.T if transpose else value)))
                break
        else:
            raise UserError(f"{path}: unexpected weight {key} (expected lora_A, lora_B or lora_magnitude_vector)")
    model.update(tree_unflatten(params))
    mx.eval(model.trainable_parameters())
    return peft


def load_start(model: nn.Module, path: Path) -> None:
    """Overwrite the new adapter's weights (apply_lora) with a saved PEFT adapter's, for continued training: every
    weight must have its counterpart of the same shape; each keeps the dtype the new adapter gave it."""
    from safetensors.numpy import load_file

    from trmlx.continued import check_weights, peft_key

    weights_path = Path(path) / WEIGHTS_FILE
    weights = {peft_key(k).removeprefix(_PEFT_PREFIX): v for k, v in load_file(str(weights_path)).items()}
    current = dict(tree_flatten(model.trainable_parameters()))
    expected, params = {}, []
    for stem, value in weights.items():
        for suffix, name, transpose in _PEFT_PARTS:
            if stem.endswith(suffix) and f"{stem[: -len(suffix)]}.{name}" in current:
                target = f"{stem[: -len(suffix)]}.{name}"
                params.append((target, mx.array(value.T if transpose else value).astype(current[target].dtype)))
                break
    for target, value in current.items():  # what the new adapter holds, under PEFT's names and shapes
        module, _, name = target.rpartition(".")
        suffix, transpose = next((s, t) for s, n, t in _PEFT_PARTS if n == name)
        expected[f"{_PEFT_PREFIX}{module}{suffix}"] = tuple(reversed(value.shape)) if transpose else value.shape
    check_weights(expected, {_PEFT_PREFIX + k: v.shape for k, v in weights.items()}, weights_path)
    model.update(tree_unflatten(params))
    mx.eval(model.trainable_parameters())


def trainable_count(model: nn.Module) -> int:
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
