"""BERT and XLM-RoBERTa encoders in MLX, loaded 1:1 from Hugging Face folders, and sentence-transformers models
(Transformer → Pooling → optional Normalize) on top of them.

The module tree keeps HF's parameter names (`embeddings.word_embeddings`, `encoder.layer.N.attention.self.query`,
...), so a checkpoint loads without renaming and a LoRA adapter's keys are the ones peft writes for the same
model (`base_model.model.encoder.layer.N.attention.self.query.lora_A.weight`). `EncoderModel.layers` is a property
over `encoder.layer` (not a second reference in the module tree, which would list every parameter twice), so
`adapters.apply_lora` finds the blocks.

Semantics follow transformers / sentence-transformers exactly:
- post-LN blocks; "gelu" is the exact erf GELU;
- BERT positions are 0..L-1; (XLM-)RoBERTa positions start at padding_idx + 1 and padding tokens keep
  padding_idx (`create_position_ids_from_input_ids`);
- padding keys are masked out of attention; dropout (hidden_dropout_prob after the embeddings and each sublayer,
  attention_probs_dropout_prob on the attention weights) acts only in training mode: load_encoder returns the
  model in eval mode, a training loop calls `model.train()` as sentence-transformers' fit does;
- mean pooling averages over the attention mask, CLS pooling takes the
  first unmasked token; Normalize is an L2 normalisation (eps 1e-12).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from trmlx.errors import UserError

BERT_TYPES = ("bert",)
ROBERTA_TYPES = ("roberta", "xlm-roberta", "camembert")
POOLING_MODES = ("mean", "cls", "max")
_ACTIVATIONS = {
    "gelu": nn.gelu,  # exact (erf), as transformers' "gelu"
    "gelu_new": nn.gelu_approx, "gelu_pytorch_tanh": nn.gelu_approx, "gelu_fast": nn.gelu_fast_approx,
    "relu": nn.relu, "silu": nn.silu, "swish": nn.silu,
}
# Checkpoint keys that are not part of the bare encoder: heads, the pooler, and buffers.
_IGNORED_PREFIXES = ("pooler.", "cls.", "lm_head.", "classifier.", "qa_outputs.", "sparse_linear.", "colbert_linear.")
_STRIPPED_PREFIXES = ("bert.", "roberta.", "xlm_roberta.", "model.")
_ST_TRANSFORMER_CONFIGS = ("sentence_bert_config.json", "sentence_roberta_config.json",
                           "sentence_xlm-roberta_config.json", "sentence_camembert_config.json")


@dataclass(frozen=True)
class EncoderConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1

    @classmethod
    def from_dict(cls, config: dict[str, Any], source: str = "config.json") -> EncoderConfig:
        model_type = config.get("model_type")
        if model_type not in BERT_TYPES + ROBERTA_TYPES:
            raise UserError(f"{source}: model_type {model_type!r} is not supported by the MLX encoder "
                            f"(supported: {', '.join(BERT_TYPES + ROBERTA_TYPES)})")
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise UserError(f"{source}: position_embedding_type {config['position_embedding_type']!r} is not "
                            "supported by the MLX encoder (only 'absolute')")
        if config.get("hidden_act", "gelu") not in _ACTIVATIONS:
            raise UserError(f"{source}: hidden_act {config['hidden_act']!r} is not supported by the MLX encoder "
                            f"(supported: {', '.join(_ACTIVATIONS)})")
        missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                               "intermediate_size") if k not in config]
        if missing:
            raise UserError(f"{source}: missing {', '.join(missing)}")
        defaults = {f: getattr(cls, f) for f in ("hidden_act", "max_position_embeddings", "type_vocab_size",
                                                 "layer_norm_eps", "pad_token_id", "hidden_dropout_prob",
                                                 "attention_probs_dropout_prob")}
        values = {k: (config.get(k) if config.get(k) is not None else v) for k, v in defaults.items()}
        return cls(model_type=model_type, vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
                   num_hidden_layers=config["num_hidden_layers"], num_attention_heads=config["num_attention_heads"],
                   intermediate_size=config["intermediate_size"], **values)

    @property
    def roberta_positions(self) -> bool:
        return self.model_type in ROBERTA_TYPES

    @property
    def max_tokens(self) -> int:
        """The longest sequence the position table allows (RoBERTa positions start at padding_idx + 1)."""
        return self.max_position_embeddings - (self.pad_token_id + 1 if self.roberta_positions else 0)


class Embeddings(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.roberta_positions = config.roberta_positions
        self.padding_idx = config.pad_token_id
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        if config.type_vocab_size > 0:
            self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def position_ids(self, input_ids: mx.array) -> mx.array:
        length = input_ids.shape[1]
        if not self.roberta_positions:
            return mx.broadcast_to(mx.arange(length)[None], input_ids.shape)
        # transformers' create_position_ids_from_input_ids: padding tokens keep padding_idx, others count from +1.
        real = (input_ids != self.padding_idx).astype(mx.int32)
        return mx.cumsum(real, axis=1) * real + self.padding_idx

    def __call__(self, input_ids: mx.array, token_type_ids: mx.array | None = None) -> mx.array:
        hidden = self.word_embeddings(input_ids) + self.position_embeddings(self.position_ids(input_ids))
        if "token_type_embeddings" in self:
            types = mx.zeros_like(input_ids) if token_type_ids is None else token_type_ids
            hidden = hidden + self.token_type_embeddings(types)
        return self.dropout(self.LayerNorm(hidden))


class SelfAttention(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise UserError(f"config.json: hidden_size {config.hidden_size} is not a multiple of "
                            f"num_attention_heads {config.num_attention_heads}")
        self.heads = config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = float(config.attention_probs_dropout_prob)
        self.dropout = nn.Dropout(self.dropout_p)

    def __call__(self, hidden: mx.array, mask: mx.array | None) -> mx.array:
        batch, length, width = hidden.shape
        head_dim = width // self.heads

        def split(x: mx.array) -> mx.array:
            return x.reshape(batch, length, self.heads, head_dim).transpose(0, 2, 1, 3)

        q, k, v = split(self.query(hidden)), split(self.key(hidden)), split(self.value(hidden))
        scale = 1.0 / math.sqrt(head_dim)
        if self.training and self.dropout_p > 0:  # dropout on the attention weights needs them explicitly
            scores = (q * scale) @ k.transpose(0, 1, 3, 2)
            if mask is not None:
                scores = mx.where(mask, scores, mx.array(-mx.inf, scores.dtype))
            out = self.dropout(mx.softmax(scores, axis=-1, precise=True)) @ v
        else:
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
        return out.transpose(0, 2, 1, 3).reshape(batch, length, width)


class DenseLayerNorm(nn.Module):
    """HF's BertSelfOutput / BertOutput: LayerNorm(dropout(dense(x)) + residual)."""

    def __init__(self, in_dim: int, out_dim: int, config: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(in_dim, out_dim)
        self.LayerNorm = nn.LayerNorm(out_dim, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def __call__(self, hidden: mx.array, residual: mx.array) -> mx.array:
        return self.LayerNorm(self.dropout(self.dense(hidden)) + residual)


class Attention(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.self = SelfAttention(config)  # HF's name: attention.self.query
        self.output = DenseLayerNorm(config.hidden_size, config.hidden_size, config)

    def __call__(self, hidden: mx.array, mask: mx.array | None) -> mx.array:
        return self.output(self.self(hidden, mask), hidden)


class Intermediate(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = _ACTIVATIONS[config.hidden_act]

    def __call__(self, hidden: mx.array) -> mx.array:
        return self.act(self.dense(hidden))


class Block(nn.Module):
    """One post-LN transformer block (HF's BertLayer)."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.attention = Attention(config)
        self.intermediate = Intermediate(config)
        self.output = DenseLayerNorm(config.intermediate_size, config.hidden_size, config)

    def __call__(self, hidden: mx.array, mask: mx.array | None) -> mx.array:
        attended = self.attention(hidden, mask)
        return self.output(self.intermediate(attended), attended)


class Blocks(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.layer = [Block(config) for _ in range(config.num_hidden_layers)]


class EncoderModel(nn.Module):
    """BertModel / XLMRobertaModel without the pooler: `model(input_ids, attention_mask)` -> last hidden states."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = Blocks(config)

    @property
    def layers(self) -> list[Block]:
        """The transformer blocks (what adapters.apply_lora walks); the same objects as `encoder.layer`."""
        return self.encoder.layer

    def __call__(self, input_ids: mx.array, attention_mask: mx.array | None = None,
                 token_type_ids: mx.array | None = None) -> mx.array:
        hidden = self.embeddings(input_ids, token_type_ids)
        mask = None
        if attention_mask is not None:
            mask = (attention_mask != 0)[:, None, None, :]  # (B, 1, 1, L): True = attend to this key
        for block in self.encoder.layer:
            hidden = block(hidden, mask)
        return hidden


# --------------------------------------------------------------------------------------------------- loading


def resolve_path(path: str | Path) -> Path:
    """A local folder, or a hub id resolved through the local cache / the hub (offline: fails at once)."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    if local.exists() or str(path).startswith((".", "/", "~")):
        raise UserError(f"{path}: not a model folder")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(path), allow_patterns=[
            "*.json", "*.safetensors", "pytorch_model.bin", "*.txt", "*.model", "1_Pooling/*", "2_Normalize/*"]))
    except Exception as err:  # hub errors come in many types; all mean "not here and not downloadable"
        raise UserError(f"{path}: cannot find this model locally or on the hub ({type(err).__name__})") from None


def _rename(key: str) -> str | None:
    """HF checkpoint key -> our parameter path; None for keys that are not part of the bare encoder."""
    for prefix in _STRIPPED_PREFIXES:
        if key.startswith((prefix + "embeddings.", prefix + "encoder.")):
            key = key[len(prefix):]
            break
    if key.startswith(_IGNORED_PREFIXES) or key.endswith(("position_ids", "token_type_ids")):
        return None
    if not key.startswith(("embeddings.", "encoder.")):
        return None
    # Old (TF-converted) BERT checkpoints name LayerNorm's parameters gamma/beta; transformers renames them.
    if key.endswith(".gamma"):
        key = key[: -len("gamma")] + "weight"
    elif key.endswith(".beta"):
        key = key[: -len("beta")] + "bias"
    return key


def read_checkpoint(folder: Path) -> dict[str, mx.array]:
    """All tensors of model.safetensors (sharded or not), else pytorch_model.bin (through torch)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        tensors: dict[str, mx.array] = {}
        for name in files:
            tensors.update(mx.load(str(folder / name)))
        return tensors
    if (folder / "model.safetensors").is_file():
        return mx.load(str(folder / "model.safetensors"))
    bin_path = folder / "pytorch_model.bin"
    if bin_path.is_file():
        try:
            import torch
        except ImportError:
            raise UserError(f"{bin_path}: this model has only a PyTorch checkpoint; reading it needs torch "
                            "(pip install torch), or convert it to model.safetensors") from None
        state = torch.load(str(bin_path), map_location="cpu", weights_only=True)
        out = {}
        for key, tensor in state.items():
            if tensor.dtype == torch.bfloat16:
                out[key] = mx.array(tensor.float().numpy()).astype(mx.bfloat16)
            else:
                out[key] = mx.array(tensor.numpy())
        return out
    raise UserError(f"{folder}: no model.safetensors or pytorch_model.bin")


def load_encoder(path: str | Path, dtype: mx.Dtype | None = None) -> EncoderModel:
    """An HF BERT / (XLM-)RoBERTa folder as an EncoderModel, weights loaded 1:1 (pooler and heads ignored).

    dtype: cast floating-point weights (e.g. mx.float32, mx.bfloat16); None keeps the checkpoint's dtype."""
    folder = resolve_path(path)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UserError(f"{folder}: no config.json; expected a Hugging Face model folder")
    config = EncoderConfig.from_dict(json.loads(config_path.read_text()), str(config_path))
    model = EncoderModel(config)
    weights: dict[str, mx.array] = {}
    for key, value in read_checkpoint(folder).items():
        name = _rename(key)
        if name is not None:
            weights[name] = value
    expected = dict(_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    if missing:
        shown = ", ".join(missing[:5]) + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else "")
        raise UserError(f"{folder}: the checkpoint lacks weights this {config.model_type} encoder needs: {shown}")
    wrong = [f"{k} {tuple(weights[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
             if tuple(weights[k].shape) != tuple(v.shape)]
    if wrong:
        raise UserError(f"{folder}: weights with the wrong shape for config.json: {'; '.join(wrong[:5])}")
    loaded = [(k, weights[k]) for k in expected]
    if dtype is not None:
        loaded = [(k, v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v) for k, v in loaded]
    model.load_weights(loaded, strict=True)
    mx.eval(model.parameters())
    model.eval()
    return model


def _flatten(params: Any) -> list[tuple[str, mx.array]]:
    from mlx.utils import tree_flatten

    return tree_flatten(params)


# ------------------------------------------------------------------------------------- sentence-transformers


def _pooling_mode(config: dict[str, Any], source: Path) -> str:
    """The pooling mode of a sentence-transformers Pooling config (v5+ `pooling_mode` or legacy booleans)."""
    if "pooling_mode" in config:
        mode = config["pooling_mode"]
        modes = [mode] if isinstance(mode, str) else list(mode)
    else:
        names = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean",
                 "pooling_mode_max_tokens": "max", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                 "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}
        modes = [mode for key, mode in names.items() if config.get(key)]
    if len(modes) != 1 or modes[0] not in POOLING_MODES:
        raise UserError(f"{source}: pooling {' + '.join(modes) or 'none'} is not supported by the MLX encoder "
                        f"(one of: {', '.join(POOLING_MODES)})")
    return modes[0]


def pool(hidden: mx.array, attention_mask: mx.array, mode: str) -> mx.array:
    """Sentence embeddings from token states, as sentence-transformers' Pooling computes them."""
    mask = attention_mask.astype(mx.float32)[..., None]
    if mode == "mean":
        total = (hidden.astype(mx.float32) * mask).sum(axis=1)
        return (total / mx.maximum(mask.sum(axis=1), 1e-9)).astype(hidden.dtype)
    if mode == "cls":  # the first unmasked token (position 0 with right padding)
        first = mx.argmax(attention_mask.astype(mx.int32), axis=1)
        return mx.take_along_axis(hidden, first[:, None, None], axis=1).squeeze(1)
    if mode == "max":
        return mx.where(mask.astype(mx.bool_), hidden, mx.array(-mx.inf, hidden.dtype)).max(axis=1)
    raise UserError(f"pooling: {mode!r} is not one of {', '.join(POOLING_MODES)}")


def l2_normalize(x: mx.array) -> mx.array:
    norm = mx.sqrt((x.astype(mx.float32) ** 2).sum(axis=-1, keepdims=True))
    return (x / mx.maximum(norm, 1e-12)).astype(x.dtype)


class SentenceEncoder:
    """A sentence-transformers model (Transformer → Pooling → optional Normalize) on an MLX EncoderModel.

    `model` is the nn.Module to adapt (`adapters.apply_lora(encoder.model, peft)`) and to differentiate
    (`nn.value_and_grad(encoder.model, loss)` with `encoder.embed(...)` inside the loss)."""

    def __init__(self, model: EncoderModel, tokenizer: Any, pooling: str = "mean", normalize: bool = False,
                 max_seq_length: int | None = None, do_lower_case: bool = False, path: Path | None = None):
        if pooling not in POOLING_MODES:
            raise UserError(f"pooling: {pooling!r} is not one of {', '.join(POOLING_MODES)}")
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.normalize = normalize
        self.max_seq_length = min(max_seq_length or model.config.max_tokens, model.config.max_tokens)
        self.do_lower_case = do_lower_case
        self.path = path

    @property
    def dimension(self) -> int:
        return self.model.config.hidden_size

    @property
    def layers(self) -> list[Block]:
        return self.model.layers

    def tokenize(self, texts: Sequence[str], max_length: int | None = None) -> dict[str, mx.array]:
        """input_ids, attention_mask (and token_type_ids where the tokenizer makes them), right-padded to the
        longest text, truncated to max_length (default: the model's max_seq_length)."""
        limit = self.max_seq_length if max_length is None else int(max_length)
        if limit < 1 or limit > self.model.config.max_tokens:
            raise UserError(f"max_length: {limit} is outside 1..{self.model.config.max_tokens} for this model")
        texts = [t.lower() if self.do_lower_case else t for t in texts]
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=limit, return_tensors="np")
        return {k: mx.array(np.asarray(batch[k]).astype(np.int32))
                for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}

    def embed(self, input_ids: mx.array, attention_mask: mx.array, token_type_ids: mx.array | None = None,
              normalize: bool | None = None) -> mx.array:
        """Pooled (and, if the model normalises or normalize=True, L2-normalised) embeddings; differentiable."""
        hidden = self.model(input_ids, attention_mask, token_type_ids)
        out = pool(hidden, attention_mask, self.pooling)
        return l2_normalize(out) if (self.normalize if normalize is None else normalize) else out

    def encode(self, texts: str | Sequence[str], batch_size: int = 32, max_length: int | None = None,
               normalize: bool | None = None) -> np.ndarray:
        """float32 embeddings, one row per text (a 1-D vector for a single string), in the input order."""
        single = isinstance(texts, str)
        items = [texts] if single else list(texts)
        if batch_size < 1:
            raise UserError(f"batch_size: {batch_size} must be at least 1")
        out = np.zeros((len(items), self.dimension), dtype=np.float32)
        order = sorted(range(len(items)), key=lambda i: -len(items[i]))  # similar lengths share a batch
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            batch = self.tokenize([items[i] for i in chunk], max_length)
            vectors = self.embed(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"),
                                 normalize)
            out[chunk] = np.array(vectors.astype(mx.float32))
        return out[0] if single else out


def load_sentence_encoder(path: str | Path, pooling: str | None = None, normalize: bool | None = None,
                          dtype: mx.Dtype | None = None) -> SentenceEncoder:
    """A sentence-transformers folder (modules.json) or a plain HF BERT / XLM-R folder (mean pooling, like
    sentence-transformers does for a bare model) as a SentenceEncoder.

    pooling ("mean" | "cls" | "max") and normalize override what the folder says."""
    folder = resolve_path(path)
    transformer_dir, mode, normalizes = folder, "mean", False
    modules_path = folder / "modules.json"
    if modules_path.is_file():
        transformer_dir = None
        for module in json.loads(modules_path.read_text()):
            kind = str(module.get("type", "")).rsplit(".", 1)[-1]
            module_dir = folder / module.get("path", "")
            if kind == "Transformer":
                transformer_dir = module_dir
            elif kind == "Pooling":
                config_path = module_dir / "config.json"
                config = json.loads(config_path.read_text()) if config_path.is_file() else {}
                mode = _pooling_mode(config, config_path)
            elif kind == "Normalize":
                normalizes = True
            else:
                raise UserError(f"{modules_path}: module {module.get('type')!r} is not supported by the MLX "
                                "encoder (Transformer, Pooling, Normalize)")
        if transformer_dir is None:
            raise UserError(f"{modules_path}: no Transformer module")
    st_config: dict[str, Any] = {}
    for name in _ST_TRANSFORMER_CONFIGS:
        if (transformer_dir / name).is_file():
            st_config = json.loads((transformer_dir / name).read_text())
            break
    model = load_encoder(transformer_dir, dtype)
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(transformer_dir))
    except (OSError, ValueError) as err:
        raise UserError(f"{transformer_dir}: cannot load the tokenizer ({err})") from None
    max_len = st_config.get("max_seq_length")
    if max_len is None:  # sentence-transformers: the tokenizer's limit, capped by the position table
        max_len = min(int(getattr(tokenizer, "model_max_length", 10**9) or 10**9),
                      model.config.max_position_embeddings)
    return SentenceEncoder(model, tokenizer, pooling=pooling or mode,
                           normalize=normalizes if normalize is None else bool(normalize), max_seq_length=max_len,
                           do_lower_case=bool(st_config.get("do_lower_case", False)), path=folder)
