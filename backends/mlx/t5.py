"""T5 encoder-decoder in MLX: T5 v1.0 (ReLU `wi`/`wo`, tied head with the d_model**-0.5 output scaling) and
T5 v1.1 / mT5 / flan-t5 / t5-efficient (gated-GELU `wi_0`/`wi_1`/`wo`, untied `lm_head`).

Module and parameter names are Hugging Face's, so `model.safetensors` loads 1:1 and LoRA paths are PEFT's paths
(`encoder.block.0.layer.0.SelfAttention.q`, `decoder.block.1.layer.1.EncDecAttention.v`, ...).

T5 specifics kept exactly as transformers computes them: RMS layer norm without mean or bias, no 1/sqrt(d)
attention scaling (folded into the initialisation), a learned relative position bias (bidirectional buckets in the
encoder, causal in the decoder) held by the first block of each stack and added in every block, no bias in the
cross attention, fp16 clamping of the residual stream.

`T5.layers` is what trmlx's LoRA code (adapters.apply_lora, which walks `model.layers`) sees: one `BlockPair` per
block index i holding encoder block i and decoder block i (a view, not part of the parameter tree). Inside a pair
the linears are named `encoder.layer.0.SelfAttention.q`, `decoder.layer.1.EncDecAttention.q`,
`decoder.layer.2.DenseReluDense.wo`, ..., identical for every i, so a target such as `q` adapts the encoder self
attention, the decoder self attention and the cross attention, as PEFT's `target_modules=["q"]` does, and
`peft.layers = n` adapts the last n block indices of both stacks (PEFT's `layers_to_transform` with
`layers_pattern="block"`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import KVCache

from trmlx.errors import UserError

__all__ = [
    "T5",
    "BlockPair",
    "T5Args",
    "T5Cache",
    "load_t5",
    "relative_position_bucket",
    "shift_right",
]


def _gelu_new(x: mx.array) -> mx.array:
    """transformers' gelu_new (the tanh approximation) used by gated-gelu T5 v1.1 / mT5."""
    return 0.5 * x * (1.0 + mx.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * (x * x * x))))


_ACTIVATIONS = {"relu": nn.relu, "gelu": nn.gelu, "gelu_new": _gelu_new, "gelu_pytorch_tanh": _gelu_new,
                "silu": nn.silu, "swish": nn.silu}


@dataclass
class T5Args:
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int | None = None
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    tie_word_embeddings: bool = True   # here: the head IS the shared embedding (decided from the checkpoint)
    scale_decoder_outputs: bool | None = None  # None: scale iff the head is tied (T5 v1.0)
    pad_token_id: int = 0
    eos_token_id: int | list[int] = 1
    decoder_start_token_id: int = 0

    def __post_init__(self):
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        if self.scale_decoder_outputs is None:
            self.scale_decoder_outputs = bool(self.tie_word_embeddings)
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise UserError(f"feed_forward_proj: {self.feed_forward_proj!r} is not 'ACT' or 'gated-ACT'")
        act = "gelu_new" if self.feed_forward_proj == "gated-gelu" else parts[-1]
        if act not in _ACTIVATIONS:
            raise UserError(f"feed_forward_proj: activation {act!r} is not supported by the MLX T5 "
                            f"(supported: {', '.join(sorted(_ACTIVATIONS))})")

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self):
        return _ACTIVATIONS["gelu_new" if self.feed_forward_proj == "gated-gelu"
                            else self.feed_forward_proj.split("-")[-1]]

    @classmethod
    def from_config(cls, config: dict[str, Any], **overrides: Any) -> T5Args:
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in config.items() if k in names and v is not None}
        values.update(overrides)
        return cls(**values)


# --------------------------------------------------------------------------------------------------- position bias

def relative_position_bucket(relative_position: np.ndarray, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> np.ndarray:
    """transformers' T5Attention._relative_position_bucket in numpy, with its float32 arithmetic: bucket
    boundaries such as 16, 32, 64 (for 32 buckets, distance 128) are exact, so the precision matters in principle;
    tests/test_mlx_t5.py compares the buckets with transformers' over ±1500 positions."""
    relative_position = np.asarray(relative_position, dtype=np.int64)
    buckets = np.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).astype(np.int64) * num_buckets
        relative_position = np.abs(relative_position)
    else:
        relative_position = -np.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    scaled = np.maximum(relative_position, 1).astype(np.float32) / np.float32(max_exact)
    large = max_exact + (np.log(scaled) / np.float32(math.log(max_distance / max_exact))
                         * np.float32(num_buckets - max_exact)).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return buckets + np.where(is_small, relative_position, large)


class RelativeAttentionBias(nn.Module):
    """The (num_buckets, num_heads) table `relative_attention_bias.weight`. Not an nn.Embedding on purpose:
    quantising the model must leave this tiny table alone."""

    def __init__(self, num_buckets: int, num_heads: int):
        super().__init__()
        self.weight = mx.random.normal((num_buckets, num_heads)) * 0.02

    def __call__(self, query_length: int, key_length: int, offset: int, bidirectional: bool, num_buckets: int,
                 max_distance: int) -> mx.array:
        """Bias of shape (1, heads, query_length, key_length) for queries at positions offset..offset+q-1."""
        context = np.arange(offset, offset + query_length)[:, None]
        memory = np.arange(key_length)[None, :]
        buckets = relative_position_bucket(memory - context, bidirectional, num_buckets, max_distance)
        values = self.weight[mx.array(buckets.astype(np.int32))]  # (q, k, heads)
        return values.transpose(2, 0, 1)[None]


# ---------------------------------------------------------------------------------------------------------- layers

class T5LayerNorm(nn.Module):
    """RMS norm: no mean subtraction, no bias; variance accumulated in fp32."""

    def __init__(self, dims: int, eps: float = 1e-6):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.weight, self.eps)


class T5Attention(nn.Module):
    def __init__(self, args: T5Args, has_relative_attention_bias: bool = False):
        super().__init__()
        inner = args.num_heads * args.d_kv
        self.n_heads, self.d_kv, self.dropout_rate = args.num_heads, args.d_kv, args.dropout_rate
        self.q = nn.Linear(args.d_model, inner, bias=False)
        self.k = nn.Linear(args.d_model, inner, bias=False)
        self.v = nn.Linear(args.d_model, inner, bias=False)
        self.o = nn.Linear(inner, args.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = RelativeAttentionBias(args.relative_attention_num_buckets,
                                                                 args.num_heads)
        self.dropout = nn.Dropout(args.dropout_rate)  # on the attention weights, as in transformers

    def _heads(self, x: mx.array) -> mx.array:
        B, L, _ = x.shape
        return x.reshape(B, L, self.n_heads, self.d_kv).transpose(0, 2, 1, 3)

    def __call__(self, x: mx.array, mask: mx.array | None, kv_states: mx.array | None = None,
                 cache: T5LayerCache | None = None) -> mx.array:
        """Self attention (kv_states None; cache: the growing KV cache) or cross attention over kv_states
        (cache: K/V computed once from the encoder states and reused). `mask` is additive (bias + masking)."""
        B, L, _ = x.shape
        q = self._heads(self.q(x))
        if kv_states is None:
            k, v = self._heads(self.k(x)), self._heads(self.v(x))
            if cache is not None:
                k, v = cache.self_attn.update_and_fetch(k, v)
        elif cache is not None and cache.cross is not None:
            k, v = cache.cross
        else:
            k, v = self._heads(self.k(kv_states)), self._heads(self.v(kv_states))
            if cache is not None:
                cache.cross = (k, v)
        if self.training and self.dropout_rate > 0:
            scores = q @ k.swapaxes(-1, -2)
            if mask is not None:
                scores = scores + mask
            out = self.dropout(mx.softmax(scores, axis=-1, precise=True)) @ v
        else:
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0,
                                                       mask=None if mask is None else mask.astype(q.dtype))
        return self.o(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, args: T5Args, has_relative_attention_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(args, has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(args.d_model, args.layer_norm_epsilon)
        self.dropout = nn.Dropout(args.dropout_rate)

    def __call__(self, h: mx.array, mask: mx.array | None, cache: T5LayerCache | None = None) -> mx.array:
        return h + self.dropout(self.SelfAttention(self.layer_norm(h), mask, cache=cache))


class T5LayerCrossAttention(nn.Module):
    def __init__(self, args: T5Args):
        super().__init__()
        self.EncDecAttention = T5Attention(args, has_relative_attention_bias=False)
        self.layer_norm = T5LayerNorm(args.d_model, args.layer_norm_epsilon)
        self.dropout = nn.Dropout(args.dropout_rate)

    def __call__(self, h: mx.array, encoder_states: mx.array, mask: mx.array | None,
                 cache: T5LayerCache | None = None) -> mx.array:
        return h + self.dropout(self.EncDecAttention(self.layer_norm(h), mask, kv_states=encoder_states,
                                                     cache=cache))


class T5DenseActDense(nn.Module):
    def __init__(self, args: T5Args):
        super().__init__()
        self.wi = nn.Linear(args.d_model, args.d_ff, bias=False)
        self.wo = nn.Linear(args.d_ff, args.d_model, bias=False)
        self.dropout = nn.Dropout(args.dropout_rate)
        self._act = args.activation

    def __call__(self, x: mx.array) -> mx.array:
        return self.wo(self.dropout(self._act(self.wi(x))))


class T5DenseGatedActDense(nn.Module):
    def __init__(self, args: T5Args):
        super().__init__()
        self.wi_0 = nn.Linear(args.d_model, args.d_ff, bias=False)
        self.wi_1 = nn.Linear(args.d_model, args.d_ff, bias=False)
        self.wo = nn.Linear(args.d_ff, args.d_model, bias=False)
        self.dropout = nn.Dropout(args.dropout_rate)
        self._act = args.activation

    def __call__(self, x: mx.array) -> mx.array:
        return self.wo(self.dropout(self._act(self.wi_0(x)) * self.wi_1(x)))


class T5LayerFF(nn.Module):
    def __init__(self, args: T5Args):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(args) if args.is_gated else T5DenseActDense(args)
        self.layer_norm = T5LayerNorm(args.d_model, args.layer_norm_epsilon)
        self.dropout = nn.Dropout(args.dropout_rate)

    def __call__(self, h: mx.array) -> mx.array:
        return h + self.dropout(self.DenseReluDense(self.layer_norm(h)))


def _clamp_fp16(h: mx.array) -> mx.array:
    """transformers' guard against fp16 overflow in T5's residual stream (a no-op for other dtypes)."""
    if h.dtype != mx.float16:
        return h
    big = float(np.finfo(np.float16).max)
    limit = mx.where(mx.isinf(h).any(), big - 1000, big)
    return mx.clip(h, -limit, limit)


class T5Block(nn.Module):
    """layer[0]: self attention; decoder: layer[1] cross attention; last: feed-forward."""

    def __init__(self, args: T5Args, is_decoder: bool, has_relative_attention_bias: bool):
        super().__init__()
        self.layer = [T5LayerSelfAttention(args, has_relative_attention_bias)]
        if is_decoder:
            self.layer.append(T5LayerCrossAttention(args))
        self.layer.append(T5LayerFF(args))

    def __call__(self, h: mx.array, mask: mx.array | None, encoder_states: mx.array | None = None,
                 cross_mask: mx.array | None = None, cache: T5LayerCache | None = None) -> mx.array:
        h = _clamp_fp16(self.layer[0](h, mask, cache))
        if len(self.layer) == 3:
            h = _clamp_fp16(self.layer[1](h, encoder_states, cross_mask, cache))
        return _clamp_fp16(self.layer[-1](h))


class T5Stack(nn.Module):
    def __init__(self, args: T5Args, is_decoder: bool):
        super().__init__()
        count = args.num_decoder_layers if is_decoder else args.num_layers
        self.block = [T5Block(args, is_decoder, has_relative_attention_bias=(i == 0)) for i in range(count)]
        self.final_layer_norm = T5LayerNorm(args.d_model, args.layer_norm_epsilon)
        self.dropout = nn.Dropout(args.dropout_rate)
        self._bidirectional = not is_decoder
        self._buckets, self._max_distance = args.relative_attention_num_buckets, args.relative_attention_max_distance

    def position_bias(self, query_length: int, key_length: int, offset: int = 0) -> mx.array:
        """(1, heads, q, k) relative position bias from the first block's table, shared by all blocks."""
        table = self.block[0].layer[0].SelfAttention.relative_attention_bias
        return table(query_length, key_length, offset, self._bidirectional, self._buckets, self._max_distance)


def _min_value(dtype: mx.Dtype) -> float:
    """The most negative finite value of dtype: masked scores, as transformers masks them."""
    return float(mx.finfo(dtype).min)


def _padding_mask(attention_mask: mx.array | None, dtype: mx.Dtype) -> mx.array | None:
    """(B, S) 1/0 mask → additive (B, 1, 1, S): 0 where attended, the dtype's most negative value at padding."""
    if attention_mask is None:
        return None
    keep = mx.array(attention_mask).astype(mx.bool_)
    return mx.where(keep, mx.array(0.0, dtype), mx.array(_min_value(dtype), dtype))[:, None, None, :]


# ----------------------------------------------------------------------------------------------------------- cache

class T5LayerCache:
    """One decoder block: the self-attention KV cache (grows by one step per token) and the cross-attention K/V
    (computed from the encoder states on the first decode call, then reused)."""

    def __init__(self):
        self.self_attn = KVCache()
        self.cross: tuple[mx.array, mx.array] | None = None


class T5Cache(list):
    """The decoder's cache: a list with one T5LayerCache per decoder block."""

    @property
    def offset(self) -> int:
        return self[0].self_attn.offset if self else 0


# --------------------------------------------------------------------------------------------------------- the model

class BlockPair(nn.Module):
    """A view for LoRA code that walks `model.layers`: encoder block i as `encoder`, decoder block i as `decoder`
    (either may be missing when the stacks have different depths). Not part of the model's parameter tree;
    replacing a linear inside the view replaces it in the model."""

    def __init__(self, encoder_block: T5Block | None, decoder_block: T5Block | None):
        super().__init__()
        if encoder_block is not None:
            self.encoder = encoder_block
        if decoder_block is not None:
            self.decoder = decoder_block

    def __call__(self, *args, **kwargs):
        raise TypeError("BlockPair is a view of an encoder and a decoder block for adapter code; call the T5 "
                        "model (encode/decode) instead")


class T5(nn.Module):
    """T5ForConditionalGeneration with Hugging Face's parameter names."""

    model_type = "t5"

    def __init__(self, args: T5Args):
        super().__init__()
        self.args = args
        self.shared = nn.Embedding(args.vocab_size, args.d_model)
        self.encoder = T5Stack(args, is_decoder=False)
        self.decoder = T5Stack(args, is_decoder=True)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.d_model, args.vocab_size, bias=False)

    @property
    def layers(self) -> list[BlockPair]:
        """One BlockPair per block index (see the module docstring); fresh views on every access."""
        enc, dec = self.encoder.block, self.decoder.block
        return [BlockPair(enc[i] if i < len(enc) else None, dec[i] if i < len(dec) else None)
                for i in range(max(len(enc), len(dec)))]

    def make_cache(self) -> T5Cache:
        return T5Cache(T5LayerCache() for _ in self.decoder.block)

    def encode(self, input_ids: mx.array | None, attention_mask: mx.array | None = None,
               inputs_embeds: mx.array | None = None) -> mx.array:
        """Encoder states (B, S, d_model); padded positions (attention_mask 0) are never attended. `inputs_embeds`
        (B, S, d_model) replaces the token embeddings, as transformers' (prompt tuning prepends rows to them)."""
        h = self.encoder.dropout(self.shared(input_ids) if inputs_embeds is None else inputs_embeds)
        L = h.shape[1]
        mask = self.encoder.position_bias(L, L).astype(h.dtype)
        pad = _padding_mask(attention_mask, h.dtype)
        if pad is not None:
            mask = mask + pad
        for block in self.encoder.block:
            h = block(h, mask)
        return self.encoder.dropout(self.encoder.final_layer_norm(h))

    def decode(self, decoder_input_ids: mx.array, encoder_states: mx.array, attention_mask: mx.array | None = None,
               cache: T5Cache | None = None) -> mx.array:
        """Logits (B, T, vocab) of the decoder; with `cache`, decoder_input_ids continue the cached positions
        (the cross-attention K/V are taken from the cache after the first call)."""
        return self.head(self.decoder_states(decoder_input_ids, encoder_states, attention_mask, cache))

    def head(self, h: mx.array) -> mx.array:
        """Logits of decoder states (decoder_states): the untied lm_head, or the shared embedding as a linear."""
        return self.lm_head(h) if "lm_head" in self else self.shared.as_linear(h)

    def decoder_states(self, decoder_input_ids: mx.array, encoder_states: mx.array,
                       attention_mask: mx.array | None = None, cache: T5Cache | None = None) -> mx.array:
        """What the head takes (B, T, d_model): the decoder's final states, scaled by d_model**-0.5 where the
        model scales them (T5 v1.0); the chunked loss (loss.py) runs the head over their target rows only."""
        h = self.decoder.dropout(self.shared(decoder_input_ids))
        L = decoder_input_ids.shape[1]
        offset = cache.offset if cache is not None else 0
        mask = self.decoder.position_bias(L, offset + L, offset).astype(h.dtype)
        if L > 1:
            causal = np.arange(offset + L)[None, :] > np.arange(offset, offset + L)[:, None]
            mask = mask + mx.array(np.where(causal, _min_value(h.dtype), 0.0).astype(np.float32)).astype(h.dtype)
        cross_mask = _padding_mask(attention_mask, h.dtype)
        for i, block in enumerate(self.decoder.block):
            h = block(h, mask, encoder_states, cross_mask, cache[i] if cache is not None else None)
        h = self.decoder.dropout(self.decoder.final_layer_norm(h))
        return h * (self.args.d_model ** -0.5) if self.args.scale_decoder_outputs else h

    def __call__(self, input_ids: mx.array, attention_mask: mx.array | None = None,
                 decoder_input_ids: mx.array | None = None) -> mx.array:
        """Training forward: logits (B, T, vocab) for decoder_input_ids (the labels shifted right)."""
        return self.head(self.train_states(input_ids, attention_mask, decoder_input_ids))

    def train_states(self, input_ids: mx.array, attention_mask: mx.array | None,
                     decoder_input_ids: mx.array | None) -> mx.array:
        """The training forward up to the head: decoder_states (B, T, d_model) for teacher-forced inputs."""
        if decoder_input_ids is None:
            raise ValueError("T5 needs decoder_input_ids (the targets shifted right; see shift_right)")
        return self.decoder_states(decoder_input_ids, self.encode(input_ids, attention_mask), attention_mask)


def shift_right(labels: mx.array, decoder_start_id: int = 0, pad_id: int = 0, ignore_index: int = -100) -> mx.array:
    """Decoder inputs for teacher forcing: [start] + labels[:-1], with ignore_index replaced by pad_id."""
    labels = mx.where(labels == ignore_index, pad_id, labels)
    start = mx.full((labels.shape[0], 1), decoder_start_id, dtype=labels.dtype)
    return mx.concatenate([start, labels[:, :-1]], axis=1)


# ----------------------------------------------------------------------------------------------------------- loading

def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    files = sorted(p for p in path.glob("*.safetensors") if not p.name.startswith("adapter"))
    if not files:
        raise UserError(f"{path}: no *.safetensors weights (a pytorch_model.bin-only checkpoint must be converted "
                        "first, e.g. load and save_pretrained it with transformers)")
    return files


def load_t5(path: str | Path, dtype: mx.Dtype | str | None = None, lazy: bool = False) -> tuple[T5, dict[str, Any]]:
    """(model in eval mode, config.json dict) from a local Hugging Face T5/mT5 folder.

    Weights keep their stored dtype unless `dtype` (mx dtype or 'float32'/'bfloat16'/'float16') is given. The head
    is untied when the checkpoint stores an `lm_head.weight` that differs from `shared.weight`; the decoder output is
    scaled by d_model**-0.5 as config.json's `scale_decoder_outputs` says (transformers 5) or else iff the head is
    tied (T5 v1.0; v1.1/mT5 checkpoints have their own head and no scaling)."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"{path}: no config.json; expected a Hugging Face T5/mT5 model folder")
    config = json.loads(config_file.read_text())
    if not config.get("is_encoder_decoder", True) or config.get("model_type") not in (None, "t5", "mt5"):
        raise UserError(f"{path}: model_type {config.get('model_type')!r} is not T5/mT5")
    weights: dict[str, mx.array] = {}
    for file in _weight_files(path):
        weights.update(mx.load(str(file)))
    weights = {k.removeprefix("model.") if k.startswith("model.shared") else k: v for k, v in weights.items()}

    for alias in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        duplicate = weights.pop(alias, None)
        if duplicate is not None and "shared.weight" not in weights:
            weights["shared.weight"] = duplicate
    if "shared.weight" not in weights:
        raise UserError(f"{path}: no shared.weight (nor encoder/decoder.embed_tokens.weight) in the checkpoint")
    # transformers ignores this never-used table when present; so do we.
    weights.pop("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight", None)
    head = weights.get("lm_head.weight")
    tied = head is None or (head.shape == weights["shared.weight"].shape
                            and bool(mx.array_equal(head, weights["shared.weight"])))
    if tied:
        weights.pop("lm_head.weight", None)

    scale = config.get("scale_decoder_outputs")
    args = T5Args.from_config(config, tie_word_embeddings=tied,
                              scale_decoder_outputs=tied if scale is None else bool(scale))
    model = T5(args)
    quantization = config.get("quantization")
    if quantization:
        nn.quantize(model, group_size=quantization["group_size"], bits=quantization["bits"],
                    mode=quantization.get("mode", "affine"),
                    class_predicate=lambda p, m: f"{p}.scales" in weights)
    if dtype is not None:
        target = getattr(mx, dtype) if isinstance(dtype, str) else dtype
        weights = {k: v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as err:
        raise UserError(f"{path}: the weights do not fit the T5 built from config.json: {err}") from None
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    return model, config


# -------------------------------------------------------------------------------------------------------- generation
