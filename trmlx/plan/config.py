"""A model's config.json, wherever it is: a --model-shape preset or file, model.path's folder (also a
sentence-transformers folder whose Transformer sits in a subfolder), or the Hugging Face cache. Never downloads;
imports neither mlx nor torch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trmlx.errors import UserError
from trmlx.models import transformer_config
from trmlx.recipe.checks import model_path
from trmlx.recipe.schema import Recipe

# --model-shape presets. 7b and tiny are benchmarks/cuda_qlora.py's shapes (7b = Llama-2-7B, 6,738,415,616
# parameters); qwen2.5-7b is recipes/translate_7b.toml's model (Qwen2.5-7B-Instruct); llama3-8b is
# Meta-Llama-3-8B's config.json (8,030,261,248 parameters).
PRESETS: dict[str, dict[str, Any]] = {
    "7b": {"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 32, "intermediate_size": 11008,
           "max_position_embeddings": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16"},
    "qwen2.5-7b": {"model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584, "num_hidden_layers": 28,
                   "num_attention_heads": 28, "num_key_value_heads": 4, "intermediate_size": 18944,
                   "max_position_embeddings": 32768, "tie_word_embeddings": False, "torch_dtype": "bfloat16"},
    "llama3-8b": {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
                  "max_position_embeddings": 8192, "rope_theta": 500000.0, "tie_word_embeddings": False,
                  "torch_dtype": "bfloat16"},
    "tiny": {"model_type": "llama", "vocab_size": 1024, "hidden_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 352,
             "max_position_embeddings": 2048, "tie_word_embeddings": False, "torch_dtype": "float32"},
}


def read_config(recipe: Recipe, model_shape: str | None = None) -> tuple[dict[str, Any], str]:
    """(config.json as a dict, where it came from): a preset, a file or folder, model.path, or the hub cache."""
    if model_shape:
        if model_shape in PRESETS:
            return PRESETS[model_shape], f"--model-shape {model_shape}"
        path = Path(model_shape).expanduser()
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise UserError(f"--model-shape: {model_shape!r} is neither a preset ({', '.join(PRESETS)}) nor a "
                            "config.json file")
        return read_json(path), str(path)
    spec = recipe.model.path
    local = Path(spec).expanduser() / "config.json"
    if recipe.task == "embedding" and not local.is_file():  # package:NAME not installed; ST subfolder layouts
        local = transformer_config(Path(model_path(recipe)).expanduser()) or local
    if local.is_file():
        return read_json(local), str(local)
    cached = None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(spec, "config.json")
    except Exception:  # not a repo id, or huggingface_hub missing: same advice below
        cached = None
    if isinstance(cached, str) and Path(cached).is_file():
        return read_json(Path(cached)), cached  # the cached file: bench loads its folder
    raise UserError(f"model.path: no config.json for {spec!r} locally or in the Hugging Face cache; fetch just the "
                    f"config (huggingface-cli download {spec} config.json) or pass --model-shape "
                    f"{'|'.join(PRESETS)}|CONFIG.json")


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: cannot read it as JSON ({err})") from None
