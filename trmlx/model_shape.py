"""The shape of a decoder-only model that memory and FLOPs depend on, from its config.json (a folder, the Hugging
Face cache, a file) or a --model-shape preset. Core: imports neither mlx nor torch, and never downloads."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trmlx.errors import UserError
from trmlx.recipe.schema import Recipe

# --model-shape presets. 7b and tiny are benchmarks/cuda_qlora.py's shapes (7b = Llama-2-7B, 6,738,415,616
# parameters); qwen2.5-7b is recipes/translate_7b.toml's model (Qwen2.5-7B-Instruct).
PRESETS: dict[str, dict[str, Any]] = {
    "7b": {"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 32, "intermediate_size": 11008,
           "max_position_embeddings": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16"},
    "qwen2.5-7b": {"model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584, "num_hidden_layers": 28,
                   "num_attention_heads": 28, "num_key_value_heads": 4, "intermediate_size": 18944,
                   "max_position_embeddings": 32768, "tie_word_embeddings": False, "torch_dtype": "bfloat16"},
    "tiny": {"model_type": "llama", "vocab_size": 1024, "hidden_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 352,
             "max_position_embeddings": 2048, "tie_word_embeddings": False, "torch_dtype": "float32"},
}

@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only transformer that memory depends on, read from its config.json."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    tied: bool
    qkv_bias: bool
    storage_dtype: str
    source: str = ""

    @classmethod
    def from_config(cls, config: dict[str, Any], source: str = "") -> "ModelShape":
        text = config.get("text_config") or config
        if config.get("is_encoder_decoder") or "d_model" in text:
            raise UserError(f"{source}: plan covers decoder-only causal LMs; this is an encoder-decoder model")
        try:
            h, heads = int(text["hidden_size"]), int(text["num_attention_heads"])
            return cls(model_type=str(text.get("model_type", "")), vocab_size=int(text["vocab_size"]),
                       hidden_size=h, num_layers=int(text["num_hidden_layers"]), num_heads=heads,
                       num_kv_heads=int(text.get("num_key_value_heads") or heads),
                       head_dim=int(text.get("head_dim") or h // heads),
                       intermediate_size=int(text["intermediate_size"]),
                       tied=bool(text.get("tie_word_embeddings", False)),
                       qkv_bias=bool(text.get("attention_bias", text.get("model_type") == "qwen2")),
                       storage_dtype=str(text.get("torch_dtype") or text.get("dtype") or "float32")
                       .removeprefix("torch."), source=source)
        except KeyError as err:
            raise UserError(f"{source}: config.json has no {err.args[0]!r}; plan needs a Llama-like decoder "
                            "config (hidden_size, num_attention_heads, num_hidden_layers, intermediate_size, "
                            "vocab_size)") from None

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of every linear layer of one block, under the names both backends use."""
        h, i = self.hidden_size, self.intermediate_size
        return {"self_attn.q_proj": (h, self.q_dim), "self_attn.k_proj": (h, self.kv_dim),
                "self_attn.v_proj": (h, self.kv_dim), "self_attn.o_proj": (self.q_dim, h),
                "mlp.gate_proj": (h, i), "mlp.up_proj": (h, i), "mlp.down_proj": (i, h)}

    def block_linear_parameters(self) -> int:
        return sum(a * b for a, b in self.linears().values())

    def small_parameters(self) -> int:
        """Norm weights and attention biases: never quantised."""
        bias = (self.q_dim + 2 * self.kv_dim) if self.qkv_bias else 0
        return self.num_layers * (2 * self.hidden_size + bias) + self.hidden_size

    def parameters(self) -> int:
        embed = self.vocab_size * self.hidden_size
        return embed * (1 if self.tied else 2) + self.num_layers * self.block_linear_parameters() \
            + self.small_parameters()

    def describe(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "parameters": self.parameters()}


# Each task's shape class, imported when needed: "module:Class" with a from_config(config, source) classmethod.
SHAPES = {"causal": "trmlx.model_shape:ModelShape", "seq2seq": "trmlx.plan_seq2seq:Seq2SeqShape",
          "embedding": "trmlx.plan_embedding:EncoderShape"}


def shape_from_config(task: str, config: dict[str, Any], source: str = "") -> Any:
    """The shape object of a task's model (ModelShape for causal LMs) from a config.json dict."""
    module, name = SHAPES[task].split(":")
    return getattr(__import__(module, fromlist=[name]), name).from_config(config, source)


def load_shape(recipe: Recipe, model_shape: str | None = None) -> Any:
    """The model's shape for the recipe's task: a --model-shape preset or config file, else model.path's
    config.json (a local folder or the Hugging Face cache; never downloads)."""
    config, source = read_config(recipe, model_shape)
    return shape_from_config(recipe.task, config, source)


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
        return _read_json(path), str(path)
    spec = recipe.model.path
    local = Path(spec).expanduser() / "config.json"
    if recipe.task == "embedding" and not local.is_file():  # package:NAME not installed; ST subfolder layouts
        from trmlx.embedding import model_path
        from trmlx.plan_embedding import transformer_config

        local = transformer_config(Path(model_path(recipe)).expanduser()) or local
    if local.is_file():
        return _read_json(local), str(local)
    cached = None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(spec, "config.json")
    except Exception:  # not a repo id, or huggingface_hub missing: same advice below
        cached = None
    if isinstance(cached, str) and Path(cached).is_file():
        return _read_json(Path(cached)), cached  # the cached file: bench loads its folder
    raise UserError(f"model.path: no config.json for {spec!r} locally or in the Hugging Face cache; fetch just the "
                    f"config (huggingface-cli download {spec} config.json) or pass --model-shape "
                    f"{'|'.join(PRESETS)}|CONFIG.json")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: cannot read it as JSON ({err})") from None
