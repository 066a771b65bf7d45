"""Export decisions shared by both backends: where the merged model may be written, which adapters merge, the
default dtype, making a finished folder durable before it is published by rename, and the adapter in mlx-lm's
format (no backend needed: the adapter's tensors are rearranged, not computed)."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from trmlx.errors import UserError

if TYPE_CHECKING:
    from trmlx.recipe import Recipe

HF_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def check_out_dir(out_dir: Path) -> None:
    """Refuse to write over anything: OUT_DIR must not exist or be an empty folder."""
    out_dir = Path(out_dir)
    if out_dir.is_dir():
        if any(out_dir.iterdir()):
            raise UserError(f"{out_dir}: output folder is not empty; choose a new folder or remove it first")
    elif out_dir.exists():
        raise UserError(f"{out_dir}: exists and is not a folder; choose a new output folder")


def check_mergeable(adapter: Path) -> None:
    """Only LoRA/DoRA change the base weights; prompt/prefix tuning adds virtual tokens that cannot be merged."""
    try:
        peft_type = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8")).get("peft_type")
    except (OSError, ValueError) as err:
        raise UserError(f"{adapter}: cannot read adapter_config.json ({err})") from None
    if peft_type != "LORA":
        raise UserError(f"{adapter}: a {peft_type} adapter has no weights to merge into the base model; export "
                        "merges LoRA/DoRA adapters (use a prompt/prefix adapter with trmlx generate or peft)")


def default_dtype(config: dict[str, Any]) -> str:
    """The base's own dtype (config.json torch_dtype / dtype) when it is fp16/bf16/fp32, else fp16."""
    named = {v: k for k, v in HF_DTYPES.items()}
    for key in ("torch_dtype", "dtype"):
        value = config.get(key)
        if isinstance(value, str) and value.removeprefix("torch.") in named:
            return named[value.removeprefix("torch.")]
    return "fp16"


def sync_folder(folder: Path) -> None:
    """fsync every file and the folder, so the rename that publishes it comes after the data is on disk."""
    for file in folder.iterdir():
        with open(file, "rb") as stream:
            os.fsync(stream.fileno())
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # folders cannot be opened on every platform
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)




@contextmanager
def publishing(out_dir: Path) -> Iterator[Path]:
    """Yield a temp folder beside out_dir to write the model into; on success make it durable and rename it to
    out_dir, on failure remove it: a crash never leaves a folder that looks like a finished model."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        sync_folder(tmp)
        check_out_dir(out_dir)  # nobody wrote there while we worked
        if out_dir.is_dir():
            out_dir.rmdir()
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def block_count(model_path: str) -> int | None:
    """The base model's number of transformer blocks from its config.json (a local folder or the hub cache; nothing
    is downloaded), None when it cannot be read."""
    local = Path(model_path) / "config.json"
    if not local.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model_path, "config.json")
        except Exception:  # not a repo id, or no hub library: the count is simply unknown
            return None
        if not isinstance(cached, str):
            return None
        local = Path(cached)
    try:
        config = json.loads(local.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    config = config.get("text_config", config)  # multimodal configs keep the language model's own
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def export_mlxlm(recipe: "Recipe", adapter: Path, out_dir: Path) -> dict[str, Any]:
    """Write `adapter` (PEFT LoRA/DoRA) in mlx-lm's format at out_dir: adapters.safetensors + adapter_config.json,
    read by `mlx_lm.generate --adapter-path OUT_DIR`, `mlx_lm.server` and `mlx_lm.fuse`."""
    from trmlx import mlxlm

    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    if recipe.task != "causal":
        raise UserError(f"--format mlx-lm: mlx-lm adapts causal language models; this run's task is {recipe.task!r} "
                        "(use the merged export)")
    with publishing(out_dir) as tmp:
        config = mlxlm.peft_to_mlxlm(adapter, tmp, recipe.model.path, block_count(recipe.model.path))
    params = config["lora_parameters"]
    return {"out": str(out_dir), "format": "mlx-lm", "base": recipe.model.path, "adapter": str(adapter),
            "method": config["fine_tune_type"], "rank": params["rank"], "scale": params["scale"],
            "num_layers": config["num_layers"], "keys": params["keys"],
            "files": sorted([mlxlm.MLXLM_WEIGHTS, mlxlm.CONFIG_FILE])}
