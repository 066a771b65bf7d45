"""mlx-lm's adapter format, both ways, with numpy and safetensors only (no mlx or torch).

`mlx_lm.lora` writes `adapters.safetensors` + `adapter_config.json` (`fine_tune_type` lora|dora|full, `num_layers`:
the last N blocks, -1 = all; `lora_parameters`: `rank`, `scale`, `dropout`, `keys`: block-relative module paths, all
linears when absent). Its weights are `model.layers.N.<module>.lora_a` (in, r), `.lora_b` (r, out) and, for DoRA,
`.m` (out,), the magnitude mlx-lm's DoRALinear divides by the row norm of W + scale * (A @ B)^T — PEFT's
`lora_magnitude_vector`, same semantics. The update is `scale * x @ A @ B` with a raw scale, PEFT's is
`alpha / r`, so the conversion keeps the product: lora_alpha = scale * r (scale = alpha / r back).

mlx-lm's module names are Hugging Face's for the Llama family (Llama, Mistral, Qwen2, ...), so one PEFT folder serves
both backends: an mlx-lm adapter is converted once where adapters are read and each backend loads PEFT as always.
"""

from __future__ import annotations

import atexit
import json
import math
import re
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from trmlx.errors import UserError

CONFIG_FILE = "adapter_config.json"
MLXLM_WEIGHTS = "adapters.safetensors"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# The path of a module inside a transformer block: '<...>layers.<N>.<module path inside the block>'.
_BLOCK = re.compile(r"^(?:.+\.)?layers\.(?P<layer>\d+)\.(?P<module>.+)$")
_MLXLM_LEAVES = {"lora_a": "A", "lora_b": "B", "m": "m"}
_PEFT_SUFFIXES = ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_magnitude_vector", "m"))
_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}


def read_config(folder: Path) -> dict[str, Any] | None:
    """adapter_config.json as a dict, None when the folder has none; unreadable JSON is a UserError."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: cannot read the adapter config ({err})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a JSON object")
    return config


def is_mlxlm_adapter(folder: Path) -> bool:
    """An mlx-lm adapter folder: its config has mlx-lm's keys and no PEFT peft_type."""
    config = read_config(folder)
    return config is not None and "peft_type" not in config and (
        "fine_tune_type" in config or "lora_parameters" in config)


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    """A safetensors file as float numpy arrays; bf16 (which numpy lacks) is widened to float32 exactly."""
    try:
        raw = Path(path).read_bytes()
        size = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8:8 + size])
    except (OSError, ValueError, struct.error) as err:
        raise UserError(f"{path}: not a readable safetensors file ({err})") from None
    data, tensors = memoryview(raw)[8 + size:], {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        if info["dtype"] == "BF16":  # bf16 is the top half of a float32
            bits = np.frombuffer(data[start:end], dtype="<u2").astype(np.uint32) << 16
            array = bits.view(np.float32)
        elif info["dtype"] in _DTYPES:
            array = np.frombuffer(data[start:end], dtype=np.dtype(_DTYPES[info["dtype"]]).newbyteorder("<"))
        else:
            raise UserError(f"{path}: tensor {name} has dtype {info['dtype']}; expected float weights")
        tensors[name] = array.reshape(info["shape"]).astype(np.float32)
    return tensors


def _save(tensors: dict[str, np.ndarray], path: Path, fmt: str) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, str(path),
              metadata={"format": fmt})


def _number(config: dict[str, Any], key: str, where: str) -> float:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise UserError(f"{where}: {key} must be a positive number, got {value!r}")
    return float(value)


def mlxlm_to_peft(folder: Path, out: Path) -> dict[str, Any]:
    """Write the PEFT form (adapter_config.json + adapter_model.safetensors) of an mlx-lm LoRA/DoRA adapter into
    `out`; return the PEFT config."""
    folder = Path(folder)
    config_path = folder / CONFIG_FILE
    config = read_config(folder) or {}
    kind = config.get("fine_tune_type", "lora")  # mlx-lm's own default
    if kind == "full":
        raise UserError(f"{config_path}: fine_tune_type 'full' is an mlx-lm full fine-tune (whole layer weights, "
                        "not an adapter); trmlx reads mlx-lm 'lora' and 'dora' adapters (merge it with mlx_lm.fuse "
                        "and use the fused folder as model.path)")
    if kind not in ("lora", "dora"):
        raise UserError(f"{config_path}: fine_tune_type {kind!r} is not an mlx-lm adapter type; expected 'lora' "
                        "or 'dora'")
    params = config.get("lora_parameters")
    if not isinstance(params, dict):
        raise UserError(f"{config_path}: lora_parameters must be an object with rank, scale and dropout")
    where = f"{config_path}: lora_parameters"
    rank, scale = _number(params, "rank", where), _number(params, "scale", where)
    if rank != int(rank):
        raise UserError(f"{where}: rank must be a whole number, got {params['rank']!r}")
    weights_path = folder / MLXLM_WEIGHTS
    if not weights_path.is_file():
        raise UserError(f"{folder}: no {MLXLM_WEIGHTS} beside the mlx-lm {CONFIG_FILE} (mlx_lm.lora writes it "
                        "at the end of training; a checkpoint NNNNNNN_adapters.safetensors can be renamed to it)")
    modules = _group(read_tensors(weights_path), weights_path, _mlxlm_parts)
    out_tensors: dict[str, np.ndarray] = {}
    for stem, parts in modules.items():
        a, b, m = _check_parts(stem, parts, int(rank), kind == "dora", weights_path, mlxlm_layout=True)
        out_tensors[f"{PEFT_PREFIX}{stem}.lora_A.weight"] = a.T
        out_tensors[f"{PEFT_PREFIX}{stem}.lora_B.weight"] = b.T
        if m is not None:
            out_tensors[f"{PEFT_PREFIX}{stem}.lora_magnitude_vector"] = m
    layers = sorted({int(_BLOCK.match(stem)["layer"]) for stem in modules})
    peft = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": config.get("model"),
        "r": int(rank), "lora_alpha": scale * rank, "lora_dropout": float(params.get("dropout", 0.0)),
        "target_modules": sorted({_BLOCK.match(stem)["module"] for stem in modules}),
        "use_dora": kind == "dora", "use_rslora": False, "bias": "none", "fan_in_fan_out": False,
        "layers_to_transform": layers, "layers_pattern": None, "modules_to_save": None,
        "init_lora_weights": True, "inference_mode": True, "rank_pattern": {}, "alpha_pattern": {},
        "revision": None,
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _save(out_tensors, out / PEFT_WEIGHTS, "pt")
    (out / CONFIG_FILE).write_text(json.dumps(peft, indent=2), encoding="utf-8")
    return peft


def as_peft_adapter(folder: Path) -> Path:
    """The folder itself when it is a PEFT adapter; for an mlx-lm adapter, its PEFT form in a temporary folder
    that lives as long as this process (backends read adapters once, at load)."""
    if not is_mlxlm_adapter(folder):
        return Path(folder)
    tmp = Path(tempfile.mkdtemp(prefix="trmlx-mlxlm-"))
    atexit.register(shutil.rmtree, tmp, True)
    try:
        mlxlm_to_peft(folder, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def peft_to_mlxlm(folder: Path, out: Path, base_model: str, total_layers: int | None) -> dict[str, Any]:
    """Write a PEFT LoRA/DoRA adapter in mlx-lm's format (adapters.safetensors + adapter_config.json) into `out`,
    so `mlx_lm.generate --adapter-path OUT` and `mlx_lm.server` use it; return the mlx-lm config.

    total_layers (the base's block count) is needed only when the adapter covers some of the blocks: mlx-lm adapts
    the last num_layers, so they must be the final ones."""
    folder = Path(folder)
    config_path = folder / CONFIG_FILE
    config = read_config(folder)
    if config is None:
        raise UserError(f"{folder}: no {CONFIG_FILE}; expected a PEFT adapter folder")
    if config.get("peft_type") != "LORA":
        raise UserError(f"{config_path}: a {config.get('peft_type')} adapter has no mlx-lm counterpart; mlx-lm "
                        "reads LoRA and DoRA adapters")
    if config.get("task_type") == "SEQ_2_SEQ_LM":
        raise UserError(f"{config_path}: mlx-lm adapts causal language models; this adapter is for a seq2seq "
                        "model (use the merged export)")
    for key in ("rank_pattern", "alpha_pattern", "modules_to_save"):
        if config.get(key):
            raise UserError(f"{config_path}: {key} is set; mlx-lm's format has one rank and scale for all "
                            "modules and no fully trained modules")
    rank, alpha = _number(config, "r", str(config_path)), _number(config, "lora_alpha", str(config_path))
    # rsLoRA scales by alpha / sqrt(r): mlx-lm's raw scale expresses it just as well.
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    dora = bool(config.get("use_dora"))
    weights_path = folder / PEFT_WEIGHTS
    if not weights_path.is_file():
        raise UserError(f"{folder}: no {PEFT_WEIGHTS} beside {CONFIG_FILE}")
    modules = _group(read_tensors(weights_path), weights_path, _peft_parts)
    tensors: dict[str, np.ndarray] = {}
    for stem, parts in modules.items():
        a, b, m = _check_parts(stem, parts, int(rank), dora, weights_path, mlxlm_layout=False)
        tensors[f"{stem}.lora_a"], tensors[f"{stem}.lora_b"] = a.T, b.T
        if m is not None:
            tensors[f"{stem}.m"] = m
    layers = sorted({int(_BLOCK.match(stem)["layer"]) for stem in modules})
    num_layers = _num_layers(layers, total_layers, config.get("layers_to_transform"), config_path)
    mlxlm = {
        "fine_tune_type": "dora" if dora else "lora", "num_layers": num_layers, "model": base_model,
        "lora_parameters": {"rank": int(rank), "scale": scale, "dropout": float(config.get("lora_dropout") or 0.0),
                            "keys": sorted({_BLOCK.match(stem)["module"] for stem in modules})},
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _save(tensors, out / MLXLM_WEIGHTS, "mlx")
    (out / CONFIG_FILE).write_text(json.dumps(mlxlm, indent=2), encoding="utf-8")
    return mlxlm


def _num_layers(layers: list[int], total: int | None, declared: Any, config_path: Path) -> int:
    """mlx-lm's num_layers for adapted blocks `layers`: -1 for all, else N for the last N."""
    if declared is None:  # PEFT: every block
        return -1
    if layers != list(range(layers[0], layers[0] + len(layers))):
        raise UserError(f"{config_path}: the adapter covers blocks {layers}; mlx-lm adapts a run of final blocks")
    if total is None:
        raise UserError(f"{config_path}: the adapter covers blocks {layers} and the base model's block count is "
                        "unknown (no config.json with num_hidden_layers at model.path)")
    if layers[-1] != total - 1:
        raise UserError(f"{config_path}: the adapter covers blocks {layers} of {total}; mlx-lm adapts the last "
                        "num_layers blocks, so they must end with the final block")
    return -1 if len(layers) == total else len(layers)


def _mlxlm_parts(key: str) -> tuple[str, str] | None:
    stem, _, leaf = key.rpartition(".")
    return (stem, _MLXLM_LEAVES[leaf]) if leaf in _MLXLM_LEAVES else None


def _peft_parts(key: str) -> tuple[str, str] | None:
    # peft writes lora_A.weight; some versions and tools keep the adapter name (lora_A.default.weight).
    stem = key.removeprefix(PEFT_PREFIX).replace(".default.", ".").removesuffix(".default")
    for suffix, part in _PEFT_SUFFIXES:
        if stem.endswith(suffix):
            return stem[: -len(suffix)], part
    return None


def _group(tensors: dict[str, np.ndarray], path: Path, parts) -> dict[str, dict[str, np.ndarray]]:
    """{module stem: {"A"|"B"|"m": array}}; every key must be a LoRA weight of a block's module."""
    modules: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        split = parts(key)
        if split is None or not _BLOCK.match(split[0]):
            raise UserError(f"{path}: weight {key} is not a LoRA/DoRA weight of a transformer block's linear layer "
                            "(expected model.layers.N.<module>.lora_a, lora_b or m, or PEFT's names)")
        modules.setdefault(split[0], {})[split[1]] = value
    if not modules:
        raise UserError(f"{path}: holds no adapter weights")
    return dict(sorted(modules.items()))


def _check_parts(stem: str, parts: dict[str, np.ndarray], rank: int, dora: bool, path: Path,
                 mlxlm_layout: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A and B in mlx-lm's layout ((in, r), (r, out)) or PEFT's ((r, in), (out, r)), and DoRA's magnitude (out,)."""
    names = ("lora_a", "lora_b", "m") if mlxlm_layout else ("lora_A", "lora_B", "lora_magnitude_vector")
    for part, name in zip("AB", names):
        if part not in parts:
            raise UserError(f"{path}: {stem} has no {name}")
    a, b = parts["A"], parts["B"]
    a_rank, b_rank = (a.shape[-1], b.shape[0]) if mlxlm_layout else (a.shape[0], b.shape[-1])
    if a.ndim != 2 or b.ndim != 2 or a_rank != rank or b_rank != rank:
        raise UserError(f"{path}: {stem}: {names[0]} {tuple(a.shape)} and {names[1]} {tuple(b.shape)} are not a "
                        f"rank-{rank} LoRA pair of a linear layer")
    out_dims = b.shape[1] if mlxlm_layout else b.shape[0]
    m = parts.get("m")
    if dora and (m is None or m.shape != (out_dims,)):
        raise UserError(f"{path}: {stem}: a DoRA adapter needs a magnitude {names[2]} of shape ({out_dims},)")
    if not dora and m is not None:
        raise UserError(f"{path}: {stem} has a DoRA magnitude {names[2]} but the config says LoRA")
    return a, b, m
