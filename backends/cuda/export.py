"""Merge a LoRA/DoRA adapter into its base with peft and write a plain Hugging Face model folder (torch side).

The adapter is merged into the base's original (unquantised) weights, the usual QLoRA practice on CUDA: nothing
is gained by merging into NF4-rounded weights when the originals are at hand. The folder is written beside
OUT_DIR and renamed into place once complete.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from trmlx.export import check_mergeable, check_out_dir, default_dtype, publishing
from trmlx.recipe.schema import Recipe

from trmlx.backends.cuda.model import DTYPES


def export_model(recipe: Recipe, adapter: Path, out_dir: Path, dtype: str | None = None) -> dict[str, Any]:
    """Load the base in `dtype`, attach and merge `adapter`, save_pretrained + tokenizer into `out_dir`."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    check_mergeable(Path(adapter))
    config = AutoConfig.from_pretrained(recipe.model.path, trust_remote_code=recipe.model.trust_remote_code)
    dtype = dtype or default_dtype(config.to_dict())
    base = AutoModelForCausalLM.from_pretrained(recipe.model.path, dtype=DTYPES[dtype],
                                                trust_remote_code=recipe.model.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(recipe.model.path, trust_remote_code=recipe.model.trust_remote_code)
    peft_model = PeftModel.from_pretrained(base, str(adapter))
    adapter_config = json.loads((Path(adapter) / "adapter_config.json").read_text())
    merged_layers = sum(1 for _, m in peft_model.named_modules() if hasattr(m, "lora_A") and m.lora_A)
    with torch.no_grad():
        model = peft_model.merge_and_unload()
    with publishing(out_dir) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
    files = sorted(p.name for p in out_dir.iterdir())
    parameters = sum(p.numel() for p in model.parameters())
    return {"out": str(out_dir), "base": recipe.model.path, "adapter": str(adapter),
            "method": "dora" if adapter_config.get("use_dora") else "lora", "rank": adapter_config["r"],
            "alpha": adapter_config["lora_alpha"], "merged_layers": merged_layers, "dequantized": False,
            "dtype": dtype, "parameters": parameters,
            "bytes": sum((out_dir / f).stat().st_size for f in files if f.endswith(".safetensors")),
            "files": files, "dropped": []}
